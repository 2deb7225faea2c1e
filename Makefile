# pg_changerelay: the two commands are `make run` and `make test`.
#
# PG=15|17|18 selects the PostgreSQL major for every target (default 15, the
# host's own package). 17 and 18 are built, installed and run inside Debian
# roots (scripts/root.sh, made once per machine by `make setup PG=NN`); the
# tests and clients run on the host and reach their servers over 127.0.0.1.
#
#   make test             every tier on 15, 17 and 18 in turn, then the client
#                         libraries and the dashboard once, on 15 (what CI runs)
#   make test PG=17       every tier on one major
#   make run PG=18        the demo on an 18 cluster; make stop PG=18
#
# Ports derive from one base per major, PGCR_PORT (15: 5498, 17: 5700,
# 18: 5800): the test cluster is PGCR_PORT, `make run`'s PGCR_PORT+1, the
# bench's PGCR_PORT-11, the tests' extra clusters PGCR_PORT-2 ... -9
# (tests/integration/conftest.py), the client tests' PGCR_PORT-10 (and their
# page server its port+2000), and every cluster's endpoint its port+1000.
# Set PGCR_PORT to run two majors (or two people) side by side.

# `make test` with no PG given anywhere runs every major.
ifeq ($(origin PG),undefined)
TEST_EVERY_MAJOR := 1
endif
PG          ?= 15
PGS         ?= 15 17 18
ifeq ($(filter $(PG),15 17 18),)
$(error PG=$(PG) is not supported: use 15, 17 or 18)
endif

PORT_BASE_15 := 5498
PORT_BASE_17 := 5700
PORT_BASE_18 := 5800
PGCR_PORT   ?= $(PORT_BASE_$(PG))
RUN_PORT    ?= $(shell echo $$(($(PGCR_PORT) + 1)))
BENCH_PORT  ?= $(shell echo $$(($(PGCR_PORT) - 11)))
CLIENTS_PORT ?= $(shell echo $$(($(PGCR_PORT) - 10)))

# Paths below are the same on the host and inside a root (the project tree
# is mounted at its own path there). Each major has its own cargo target
# directory, which also holds its clusters: target/pg15 is the host's.
PG_CONFIG   := /usr/lib/postgresql/$(PG)/bin/pg_config
WORK        := $(CURDIR)/target/pg$(PG)
IN_ROOT     := $(if $(filter 15,$(PG)),,scripts/root.sh run $(PG))
CARGO       := $(IN_ROOT) env CARGO_TARGET_DIR=$(WORK) cargo
# Installs by rename, never rewriting a library a running server has mapped.
INSTALL     := $(if $(IN_ROOT),$(CURDIR)/$(IN_ROOT)) env CARGO_TARGET_DIR=$(WORK) $(CURDIR)/scripts/install.sh
HOST_CARGO  := env CARGO_TARGET_DIR=$(CURDIR)/target/pg15 cargo
FEATURES    := --no-default-features --features pg$(PG)
RUN_DIR     := $(WORK)/run-cluster
TEST_DIR    := $(WORK)/test-cluster
CLIENTS_DIR := $(WORK)/clients-cluster
PGRX_DATA   := $(WORK)/pgrx-test-data
TIMED       := scripts/timed.sh
PYTEST_ARGS ?=
# The cross-major load check loads this major's build into a server of
# another major: 15's into 17, 17's into 15, 18's into 17.
FOREIGN_PG_15 := 17
FOREIGN_PG_17 := 15
FOREIGN_PG_18 := 17
FOREIGN_PG  ?= $(FOREIGN_PG_$(PG))

.PHONY: setup setup-all install run stop test test-all test-one test-major lint test-unit test-pg test-integration \
        test-clients \
        bench-decode bench fuzz fmt clean

## Install toolchain and packages (idempotent); for 17/18 also that major's root.
setup:
	@PG=$(PG) scripts/setup.sh

setup-all:
	@for pg in $(PGS); do PG=$$pg scripts/setup.sh || exit 1; done

## Build (release) and install into PostgreSQL $(PG) (the host's for 15, the root's for 17/18).
install: setup
	$(INSTALL) --release $(PG_CONFIG) $(FEATURES)

## Build, install, start a local cluster (127.0.0.1:$(RUN_PORT)) and show the plugin working.
run: install
	@PG=$(PG) scripts/cluster.sh start $(RUN_DIR) $(RUN_PORT)
	@PG=$(PG) scripts/demo.sh $(RUN_PORT)

## Stop the cluster `make run` started.
stop:
	@PG=$(PG) scripts/cluster.sh stop $(RUN_DIR)

## Every test tier: lints and pure unit tests (once, on the host), then #[pg_test] and integration tests
## on a real cluster, for PG, or for every major in PGS when no PG is given; then the client libraries and
## the dashboard (once, on PG or the first of PGS: they test the endpoint's protocol, not the major).
test: $(if $(TEST_EVERY_MAJOR),test-all,test-one)

test-one: setup
	@$(TIMED) "lint" $(MAKE) --no-print-directory lint
	@$(TIMED) "unit tests" $(MAKE) --no-print-directory test-unit
	@$(MAKE) --no-print-directory test-major PG=$(PG)
	@$(TIMED) "clients and dashboard (PostgreSQL $(PG))" $(MAKE) --no-print-directory test-clients PG=$(PG)

test-all: setup-all
	@rm -f target/times.log
	@$(TIMED) "lint" $(MAKE) --no-print-directory lint
	@$(TIMED) "unit tests" $(MAKE) --no-print-directory test-unit
	@failed=""; for pg in $(PGS); do \
	  $(TIMED) "PostgreSQL $$pg, all tiers" $(MAKE) --no-print-directory test-major PG=$$pg || failed="$$failed $$pg"; \
	done; \
	first=$(firstword $(PGS)); \
	$(TIMED) "clients and dashboard (PostgreSQL $$first)" $(MAKE) --no-print-directory test-clients PG=$$first \
	  || failed="$$failed (clients on $$first)"; \
	echo "== times"; cat target/times.log; \
	if [ -n "$$failed" ]; then echo "FAILED on PostgreSQL$$failed"; exit 1; fi; \
	echo "all tiers passed on PostgreSQL $(PGS), the clients on $$first"

test-major:
	@$(TIMED) "PostgreSQL $(PG): #[pg_test]" $(MAKE) --no-print-directory test-pg
	@$(TIMED) "PostgreSQL $(PG): integration" $(MAKE) --no-print-directory test-integration

## Formatting and clippy (warnings are errors; workspace lints in Cargo.toml); on the host, for 15.
lint:
	cargo fmt --all -- --check
	$(HOST_CARGO) clippy --workspace --all-targets -- -D warnings

test-unit:
	$(HOST_CARGO) test -p changerelay-core -p changerelay-endpoint -p changerelay-sinks

test-pg:
	@$(IN_ROOT) sh -c 'rm -rf "$$0" && install -d -o postgres -g postgres "$$0"' $(PGRX_DATA)
	@# cargo pgrx test copies its build over the installed library in place;
	@# unlinking it first makes that a new file, so a running server keeps its own.
	$(IN_ROOT) sh -c 'rm -f "$$("$$0" --pkglibdir)/pg_changerelay.so"' $(PG_CONFIG)
	$(CARGO) pgrx test pg$(PG) --runas postgres --pgdata $(PGRX_DATA)

test-integration:
	$(INSTALL) --debug $(PG_CONFIG) $(FEATURES)
	@PG=$(PG) scripts/cluster.sh stop $(TEST_DIR); rm -rf $(TEST_DIR)
	@PG=$(PG) scripts/cluster.sh start $(TEST_DIR) $(PGCR_PORT)
	@PG=$(PG) PGCR_PORT=$(PGCR_PORT) PGCR_DATA=$(TEST_DIR) PGCR_WORK=$(WORK) \
	  PGCR_LIB=$(WORK)/debug/libpg_changerelay.so PGCR_FOREIGN_PG=$(FOREIGN_PG) \
	  PGCR_INSTALL="$(INSTALL) --debug $(PG_CONFIG) $(FEATURES)" \
	  .venv/bin/pytest tests/integration $(PYTEST_ARGS); \
	  status=$$?; \
	  PG=$(PG) scripts/cluster.sh stop $(TEST_DIR); exit $$status

## The client libraries against a real cluster (127.0.0.1:$(CLIENTS_PORT), endpoint +1000): clients/js built
## with TypeScript and run in Node and in headless Chromium (Debian's, through playwright-core), the dashboard
## in Chromium (its screenshot in $(WORK)/clients/), clients/python with pytest. The cluster allows the
## browser tests' page origin, 127.0.0.1:CLIENTS_PORT+2000.
CLIENTS_OUT := $(WORK)/clients
test-clients:
	$(INSTALL) --debug $(PG_CONFIG) $(FEATURES)
	cd clients/js && npm run --silent build
	@PG=$(PG) scripts/cluster.sh stop $(CLIENTS_DIR); rm -rf $(CLIENTS_DIR) $(CLIENTS_OUT); mkdir -p $(CLIENTS_OUT)
	@PG=$(PG) EXTRA_CONF="changerelay.allowed_origins = 'http://127.0.0.1:$$(($(CLIENTS_PORT) + 2000))'" \
	  scripts/cluster.sh start $(CLIENTS_DIR) $(CLIENTS_PORT)
	@status=0; export PGCR_CLIENTS_PORT=$(CLIENTS_PORT) PGCR_CLIENTS_OUT=$(CLIENTS_OUT); \
	  node --experimental-websocket --disable-warning=ExperimentalWarning --test --test-force-exit --test-concurrency=1 \
	    clients/js/test/*.test.mjs || status=$$?; \
	  .venv/bin/pytest clients/python/tests $(PYTEST_ARGS) || status=$$?; \
	  PG=$(PG) scripts/cluster.sh stop $(CLIENTS_DIR); exit $$status

## Decoding throughput next to wal2json, test_decoding and pgoutput (ROWS=600000 for >1M changes).
ROWS ?= 100000
bench-decode: install
	@PG=$(PG) scripts/cluster.sh start $(RUN_DIR) $(RUN_PORT)
	@mkdir -p bench/out
	PGCR_PORT=$(RUN_PORT) .venv/bin/python bench/decode_throughput.py --rows $(ROWS) --json-out bench/out/decode.json

## The benchmark suite (issue 6): installs (release), starts its own cluster on 127.0.0.1:$(BENCH_PORT)
## (endpoint +1000), runs every workload, writes bench/out/results.{json,md,png} (bench/out/pgNN for 17
## and 18), stops the cluster. QUICK=1: under 3 minutes. ONLY=sinks (comma-separated): those workloads only.
BENCH_OUT := $(CURDIR)/bench/out$(if $(filter 15,$(PG)),,/pg$(PG))
bench: install
	PG=$(PG) .venv/bin/python bench/run.py --no-install --port $(BENCH_PORT) --out $(BENCH_OUT) $(if $(QUICK),--quick) \
	  $(if $(ONLY),--only $(ONLY))

## Each fuzz target for FUZZ_SECONDS (default 60); installs cargo-fuzz when missing. Not part of `make test`.
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

fmt:
	cargo fmt --all

clean:
	-for pg in $(PGS); do for d in run-cluster test-cluster bench-cluster clients-cluster; do \
	  [ -d target/pg$$pg/$$d ] && PG=$$pg scripts/cluster.sh stop $(CURDIR)/target/pg$$pg/$$d; done; done
	rm -rf target
