"""`clipline status OUT` and `clipline run --dry-run`: per stage, what is committed, stale (and why) or missing.

Read-only: no stage plans (plans write files), no shard runs. A step's shards are
judged by their markers against the config and the inputs they would read now
(pipeline.lineage); a shard that reads a shard which will be redone is counted
stale too, with that reason, so the report says what a run would redo.
"""

from __future__ import annotations

from typing import Any

from pipeline import stages as registry
from pipeline.lineage import InputReader, staleness
from pipeline.stage import Stage, committed_shards, config_sha256, read_marker
from pipeline.storage import Storage


def _expected_shards(stage: Stage, config: Any, storage: Storage, committed: list[int]) -> list[int]:
    """The shards a run would have: those of the stage read at the same index, else the committed ones;
    none for a step its config turns off (its reads are None)."""
    reads = stage.reads(config) if stage.reads else None
    if stage.reads is not None and reads is None:
        return []
    if reads is not None and reads.same:
        return sorted(set(committed_shards(storage, reads.same[0])) | set(committed))
    return sorted(set(committed) or ({0} if reads is not None and reads.every else set()))


def step_status(stage: Stage, storage: Storage, run: Any, changing: dict[str, set[int] | None]) -> dict:
    """One step's shards: committed (fresh), stale with reasons, missing. `changing` says, per step
    already seen, which of its shards a run would redo (None: all of them)."""
    config = stage.config_of(run)
    config_hash = config_sha256(config)
    committed = committed_shards(storage, stage.name)
    markers = {s: read_marker(storage, stage.name, s) for s in committed}
    shards = _expected_shards(stage, config, storage, committed)
    reads = stage.reads(config) if stage.reads else None
    reader = InputReader(storage)
    fresh, stale, missing = [], {}, []
    for shard in shards:
        marker = markers.get(shard)
        if marker is None:
            missing.append(shard)
            continue
        if stage.redo:
            stale[shard] = "recomputed on every run"
            continue
        reason = staleness(marker, config_hash, reader.inputs(reads, shard) if reads else None)
        if reason is None and reads is not None:
            upstream = [f"{u}/{shard:05d}" for u in reads.same if _changes(changing, u, shard)]
            upstream += [f"{u}/*" for u in reads.every if _changes(changing, u, None)]
            if upstream:
                reason = f"input will be redone: {', '.join(upstream)}"
        if reason is None:
            fresh.append(shard)
        else:
            stale[shard] = reason
    changing[stage.name] = set(stale) | set(missing)
    return {
        "stage": stage.name,
        "shards": len(shards),
        "committed": len(fresh),
        "stale": {str(s): r for s, r in stale.items()},
        "missing": missing,
        "would_run": sorted(set(stale) | set(missing)),
    }


def _changes(changing: dict[str, set[int] | None], stage: str, shard: int | None) -> bool:
    shards = changing.get(stage)
    if not shards:
        return False
    return shard is None or shard in shards


def status(storage: Storage, run: Any, names: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Every step of the selected stages (all when empty), in order."""
    changing: dict[str, set[int] | None] = {}
    return [step_status(stage, storage, run, changing) for stage in registry.select(list(names))]


def format_status(rows: list[dict]) -> str:
    lines = [f"{'step':20} {'shards':>7} {'committed':>9} {'stale':>6} {'missing':>7}  would run"]
    for r in rows:
        todo = r["would_run"]
        shown = "nothing" if not todo else f"{len(todo)} shard(s): {', '.join(map(str, todo[:8]))}"
        lines.append(
            f"{r['stage']:20} {r['shards']:>7} {r['committed']:>9} {len(r['stale']):>6} {len(r['missing']):>7}  "
            f"{shown}{' ...' if len(todo) > 8 else ''}"
        )
        reasons: dict[str, list[str]] = {}
        for shard, reason in r["stale"].items():
            reasons.setdefault(reason, []).append(shard)
        for reason, shards in sorted(reasons.items()):
            lines.append(f"{'':20}   stale ({len(shards)}): {reason}")
    return "\n".join(lines)
