"""Where every stage's outputs live under OUT/, spelled once (docs/design.md, "File contracts").

Every module that reads or writes another stage's files takes the path from
here: ``layout.crawl_parquet(3)`` is ``"crawl/00003.parquet"``. The stage
order is declared once, in STAGES; the CLI, the runner's registry and the
stages' upstream lists derive from it. Work steps of a stage (``dedup/_map``,
``shard/_route``, ...) are the stage's own and are named in its module.

Ground floor: plain strings, no imports of clipline.
"""

from __future__ import annotations

# name -> "module:attribute" holding its pipeline.stage.Stage (or a tuple of them, run in order), in pipeline order.
STAGES: dict[str, str] = {
    "ingest": "pipeline.ingest:STAGES",
    "crawl": "pipeline.crawl:STAGE",
    "dedup": "pipeline.dedup:STAGES",
    "filter": "pipeline.filter:STAGES",
    "shard": "pipeline.shard:STAGES",
    "stats": "pipeline.stats:STAGES",
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)

MARKER_DIR = "_committed"
CONFIG_FILE = "config.yaml"  # the resolved run config that made the outputs under OUT/
DATASET = "dataset"
MANIFEST = f"{DATASET}/manifest.json"
STATS_JSON = f"{DATASET}/stats/stats.json"
REPORT_HTML = f"{DATASET}/stats/report.html"
TAKEDOWNS = "takedowns"  # audit records {n:04d}.json, and the lists below
# What every takedown removed, which ingest and crawl always refuse (a re-crawl never fetches it again).
TAKEDOWN_LISTS = {kind: f"{TAKEDOWNS}/blocklist_{kind}.txt" for kind in ("url_sha256", "image_sha256", "image_pdq")}


def takedown_lists(storage, kind: str) -> tuple[str, ...]:
    """The run's standing takedown list of `kind` as a location, if a takedown wrote one."""
    rel = TAKEDOWN_LISTS[kind]
    return (storage.url(rel),) if storage.exists(rel) else ()


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def marker(stage: str, shard: int) -> str:
    """The marker that commits `shard` of `stage` (a stage or a work step such as ``dedup/_map``)."""
    return f"{stage}/{MARKER_DIR}/{shard_name(shard)}.json"


def upstream(stage: str) -> tuple[str, ...]:
    """The data stages before `stage`, in order."""
    return STAGE_ORDER[: STAGE_ORDER.index(stage)]


def ingest_parquet(shard: int) -> str:
    return f"ingest/{shard_name(shard)}.parquet"


def crawl_parquet(shard: int) -> str:
    return f"crawl/{shard_name(shard)}.parquet"


def crawl_tar(shard: int) -> str:
    return f"crawl/{shard_name(shard)}.tar"


def dedup_parquet(shard: int) -> str:
    return f"dedup/{shard_name(shard)}.parquet"


def filter_parquet(shard: int) -> str:
    return f"filter/{shard_name(shard)}.parquet"


def manifest_tar(shard: int) -> str:
    """A final shard's tar as the manifest lists it: relative to the manifest."""
    return f"shards/{shard_name(shard)}.tar"


def manifest_parquet(shard: int) -> str:
    return f"shards/{shard_name(shard)}.parquet"


def in_dataset(rel: str) -> str:
    """A path relative to the manifest (its shard entries) as a path under OUT/."""
    return f"{DATASET}/{rel}"


def dataset_tar(shard: int) -> str:
    return in_dataset(manifest_tar(shard))


def dataset_parquet(shard: int) -> str:
    return in_dataset(manifest_parquet(shard))
