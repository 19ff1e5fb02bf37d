"""clipline's data pipeline: ingest → crawl → dedup → filter → shard → stats, run on Ray."""

import os

__version__ = "0.1.0"

# In a Ray worker (which runs one task per CPU it was given: Ray sets OMP_NUM_THREADS to that),
# polars gets as many threads, not one per core of the machine: otherwise every worker starts a
# thread per core and N workers' N x N threads fight over N cores (exact dedup at 10M rows on 2
# cores: 20% slower). Must happen before polars is imported; a user's own setting wins.
if "RAY_RAYLET_PID" in os.environ and "POLARS_MAX_THREADS" not in os.environ:
    _threads = os.environ.get("OMP_NUM_THREADS", "")
    os.environ["POLARS_MAX_THREADS"] = _threads if _threads.isdigit() and int(_threads) > 0 else "1"
