"""Decoding throughput: bench/decode_throughput.py (every plugin decodes the same WAL, relay worker paused),
then the table is dropped and the relay worker is given time to read past the workload's WAL."""
import sys

import common
import decode_throughput


def run(b):
    rows = 60_000 if b.quick else 600_000
    out = decode_throughput.measure(b.dsn, rows, repeat=3, log=sys.stdout)
    b.sql("DROP TABLE bench_t")
    b.sql("DROP PUBLICATION bench_pub")
    out["worker_catch_up_s"] = common.wait_worker_idle(b, timeout=600)
    out["mixed"] = decode_throughput.measure_mixed(b.dsn, 50_000 if b.quick else 200_000, repeat=3, log=sys.stdout)
    common.wait_worker_idle(b, timeout=600)
    return out
