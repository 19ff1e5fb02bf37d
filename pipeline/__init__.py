"""clipline's data pipeline: ingest → crawl → dedup → filter → shard → stats, run on Ray."""

__version__ = "0.1.0"
