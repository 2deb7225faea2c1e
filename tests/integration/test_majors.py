"""A build of the library for one PostgreSQL major refuses to load into a server of another, saying so."""
import os
import shutil
import subprocess

import psycopg
import pytest

from conftest import PG, ROOT, WORK, extra_port
from test_relay import ExtraCluster

# The other major (set by the Makefile: 15's build goes into 17, 17's into 15, 18's into 17) and this
# major's build (what `cargo pgrx install` just installed).
FOREIGN = os.environ.get("PGCR_FOREIGN_PG", "17" if PG == "15" else "15")
LIB = os.environ.get("PGCR_LIB", os.path.join(WORK, "debug", "libpg_changerelay.so"))


def major_available(pg):
    if pg == "15":
        return os.path.exists("/usr/lib/postgresql/15/bin/postgres")
    root = subprocess.run([os.path.join(ROOT, "scripts", "root.sh"), "path", pg], capture_output=True,
                          text=True, check=True).stdout.strip()
    return os.path.exists(os.path.join(root, ".pg_changerelay-ready"))


def test_a_build_for_another_major_refuses_to_load():
    assert FOREIGN != PG
    if not major_available(FOREIGN):
        pytest.skip(f"no PostgreSQL {FOREIGN} on this machine to load the {PG} build into "
                    f"(make setup PG={FOREIGN}; `make test` sets up every major first)")
    assert os.path.exists(LIB), f"no build at {LIB}"
    # A scratch directory inside the project (17 and 18 see the project tree only), readable by postgres.
    scratch = os.path.join(WORK, "foreign-load")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    os.chmod(scratch, 0o755)
    lib = os.path.join(scratch, "pg_changerelay.so")
    shutil.copy(LIB, lib)
    os.chmod(lib, 0o755)
    cluster = ExtraCluster("test-cluster-foreign", extra_port("foreign"), "shared_preload_libraries = ''", pg=FOREIGN)
    try:
        with cluster.connect() as c:
            assert c.execute("SHOW server_version_num").fetchone()[0][:2] == FOREIGN
            with pytest.raises(psycopg.Error) as err:
                c.execute(f"LOAD '{lib}'")
            assert err.value.diag.message_primary == f'incompatible library "{lib}": version mismatch'
            assert err.value.diag.message_detail == f"Server is version {FOREIGN}, library is version {PG}."
            # The server is unharmed.
            assert c.execute("SELECT 1").fetchone()[0] == 1
    finally:
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
