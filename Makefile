# pg_changerelay: the two commands are `make run` and `make test`.
PG_MAJOR    := 15
PG_CONFIG   := /usr/lib/postgresql/$(PG_MAJOR)/bin/pg_config
RUN_DIR     := $(CURDIR)/target/run-cluster
RUN_PORT    ?= 5499
TEST_DIR    := $(CURDIR)/target/test-cluster
TEST_PORT   ?= 5498
PGRX_DATA   := $(CURDIR)/target/pgrx-test-data
PYTEST_ARGS ?=

.PHONY: setup install run stop test lint test-unit test-pg test-integration bench-decode bench fuzz fmt clean

## Install toolchain and packages (idempotent).
setup:
	@scripts/setup.sh

## Build (release) and install into the system PostgreSQL.
install: setup
	scripts/install.sh --release $(PG_CONFIG)

## Build, install, start a local cluster (127.0.0.1:$(RUN_PORT)) and show the plugin working.
run: install
	@scripts/cluster.sh start $(RUN_DIR) $(RUN_PORT)
	@scripts/demo.sh $(RUN_PORT)

## Stop the cluster `make run` started.
stop:
	@scripts/cluster.sh stop $(RUN_DIR)

## Every test tier: lints, pure unit tests, #[pg_test], integration tests on a real cluster.
test: setup lint test-unit test-pg test-integration

## Formatting and clippy (warnings are errors; workspace lints in Cargo.toml).
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test-unit:
	cargo test -p changerelay-core -p changerelay-endpoint

test-pg:
	@mkdir -p $(PGRX_DATA) && chown postgres:postgres $(PGRX_DATA)
	@# cargo pgrx test copies its build over the installed library in place;
	@# unlinking it first makes that a new file, so a running server keeps its own.
	rm -f $$($(PG_CONFIG) --pkglibdir)/pg_changerelay.so
	cargo pgrx test pg$(PG_MAJOR) --runas postgres --pgdata $(PGRX_DATA)

test-integration:
	scripts/install.sh --debug $(PG_CONFIG)
	@scripts/cluster.sh stop $(TEST_DIR); rm -rf $(TEST_DIR)
	@scripts/cluster.sh start $(TEST_DIR) $(TEST_PORT)
	@PGCR_PORT=$(TEST_PORT) PGCR_DATA=$(TEST_DIR) .venv/bin/pytest tests/integration $(PYTEST_ARGS); \
	  status=$$?; \
	  scripts/cluster.sh stop $(TEST_DIR); exit $$status

## Decoding throughput next to wal2json, test_decoding and pgoutput (ROWS=600000 for >1M changes).
ROWS ?= 100000
bench-decode: install
	@scripts/cluster.sh start $(RUN_DIR) $(RUN_PORT)
	@mkdir -p bench/out
	PGCR_PORT=$(RUN_PORT) .venv/bin/python bench/decode_throughput.py --rows $(ROWS) --json-out bench/out/decode.json

## The benchmark suite (issue 6): installs (release), starts its own cluster on 127.0.0.1:5487 (endpoint 6487),
## runs every workload, writes bench/out/results.{json,md,png}, stops the cluster. QUICK=1: under 3 minutes.
bench: install
	.venv/bin/python bench/run.py --no-install $(if $(QUICK),--quick)

## Each fuzz target for FUZZ_SECONDS (default 60); installs cargo-fuzz when missing. Not part of `make test`.
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

fmt:
	cargo fmt --all

clean:
	-scripts/cluster.sh stop $(RUN_DIR)
	-scripts/cluster.sh stop $(TEST_DIR)
	-scripts/cluster.sh stop $(CURDIR)/target/bench-cluster
	cargo clean
