"""How often a worker process runs Python's cyclic garbage collector.

A worker holds a large heap that lives as long as it does (Celery, kombu, SQLAlchemy's
compiled statements, the greenlets of up to a thousand calls in flight, each with its
frames), and churns through small objects on every job. At CPython's default thresholds
(700, 10, 10) a young collection runs every 700 allocations and a full one every hundred
young ones; each full collection walks the whole long-lived heap. With 1,000 calls in
flight that was 16 full collections of about 140 ms each in a 5,000-job run of
`bench/throughput.py --concurrency 1000 --latency 10`, and 11% of the worker's CPU spent
in the collector; during each of those pauses every greenlet stood still.

Collecting less often keeps what is collected the same (cycles are still found, only
later), and cut the worker's CPU per job by about a tenth with no more resident memory in
those runs (182 to 187 MiB at most, as before; docs/benchmarks.md, "Throughput").
Reference counting, which frees everything that is not in a cycle, is not affected.
"""

from __future__ import annotations

import gc

# A young collection every 10,000 net allocations of container objects rather than 700; a
# middle one every 20 young ones and a full one every 20 middle ones (CPython 3.11 still
# runs a full collection only once the objects waiting for one are a quarter of the heap).
WORKER_GC_THRESHOLDS = (10_000, 20, 20)


def collect_less_often() -> None:
    """Set the worker process's collector thresholds (worker.lifecycle, at worker_init)."""
    gc.set_threshold(*WORKER_GC_THRESHOLDS)
