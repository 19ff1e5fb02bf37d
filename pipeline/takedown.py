"""`clipline takedown`: remove samples from a published dataset, and with `--purge` from every object of its run.

A takedown never edits a current shard in place: it writes new versions of the
affected shards under new names, archives the old manifest beside the new one as
``manifest.v{N}.json`` (marked ``superseded_by``) and then replaces
``manifest.json``, so readers of the current one never see a removed sample.

When the dataset belongs to a run (``OUT/dataset`` or ``OUT/variants/NAME/dataset``
beside ``OUT/crawl``), the takedown works on the whole run:

- ids are matched against the crawl too, so image md5 and PDQ work (the dataset's
  parquet carries neither); every exact copy of a removed image (the same bytes
  under another URL) goes with it; and every dataset of the run (variants
  included) gets its new version;
- the removed samples' URL hashes, image sha256 and PDQ hashes are added to
  ``OUT/takedowns/blocklist_*.txt``, which ingest and crawl always apply: a
  re-crawl never fetches them again;
- an audit record ``OUT/takedowns/NNNN.json`` says what was removed, when, why,
  and (once purged) which objects were rewritten.

``--purge`` (now, or once ``--grace DAYS`` have passed, on a later ``takedown
--purge``) rewrites every object that still holds a removed image: the crawl's
tar (its parquet rows become ``blocked``, "taken down", and the crawl marker
records the new outputs, so `clipline status` shows what downstream is now
stale) and the shards of superseded manifest versions (whose entries are
rewritten with the new sizes and hashes, so they still verify).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import layout, schema
from pipeline.errors import ClipError
from pipeline.formats import TarWriter, group_samples, iter_tar_members
from pipeline.lineage import shard_identity
from pipeline.manifest import CURRENT, dumps, now, read_manifest
from pipeline.pdq import HashList
from pipeline.stage import committed_shards, marker_path
from pipeline.storage import (
    PARQUET_OPTIONS,
    Storage,
    file_sha256,
    open_storage,
    parquet_options,
    read_hash_lists,
    split_location,
)

KINDS = ("uid", "url", "url_sha256", "image_sha256", "image_md5", "image_pdq")
NEEDS_CRAWL = ("image_md5", "image_pdq")  # hashes only the crawl's parquet holds
AUDIT, LISTS = layout.TAKEDOWNS, layout.TAKEDOWN_LISTS


def run_root(manifest_storage: Storage) -> Storage | None:
    """The run a dataset directory belongs to (OUT for OUT/dataset and OUT/variants/NAME/dataset)."""
    parts = manifest_storage.uri.rstrip("/").split("/")
    for up in (1, 3):
        if len(parts) <= up or (up == 3 and parts[-3] != "variants"):
            continue
        root = open_storage("/".join(parts[:-up]) or "/")
        if committed_shards(root, "crawl"):
            return root
    return None


def _url_sha256(urls: list[str]) -> list[str]:
    return [hashlib.sha256(u.encode()).hexdigest() for u in urls]


def _hits(table: pa.Table, ids: frozenset[str] | HashList, kind: str) -> list[bool]:
    """Which rows of a crawl or dataset table the ids name."""
    if kind == "image_pdq":
        return [m is not None for m in ids.match(table["pdq"].to_pylist(), table["pdq_quality"].to_pylist())]
    if kind == "url":
        return [u in ids for u in table["url"].to_pylist()]
    if kind == "url_sha256":
        return [h in ids for h in _url_sha256(table["url"].to_pylist())]
    column = {"uid": "uid", "image_sha256": "sha256", "image_md5": "md5"}[kind]
    return [(v or "").lower() in ids if kind != "uid" else v in ids for v in table[column].to_pylist()]


def _load_ids(ids_file: str, kind: str) -> frozenset[str] | HashList:
    if kind == "image_pdq":
        ids = HashList.load([ids_file])
    elif kind in ("uid", "url"):  # verbatim, one a line
        store, name = split_location(ids_file)
        text = store.read_bytes(name).decode("utf-8", "replace")
        ids = frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    else:
        ids = read_hash_lists([ids_file])
    if not len(ids):
        raise ClipError(f"takedown: {ids_file} lists no ids")
    return ids


CRAWL_COLUMNS = ["uid", "key", "url", "sha256", "md5", "pdq", "pdq_quality", "status"]


def _crawl_tables(root: Storage):
    for shard in committed_shards(root, "crawl"):
        yield schema.with_later_crawl_columns(root.read_parquet(layout.crawl_parquet(shard))).select(CRAWL_COLUMNS)


def _crawl_victims(root: Storage, ids, kind: str) -> dict[str, dict]:
    """uid -> its crawl row, for every crawled row the ids name and every exact copy of their images
    (the same downloaded bytes under another URL: the image is what is taken down)."""
    victims = {}
    for table in _crawl_tables(root):
        for row in table.filter(pa.array(_hits(table, ids, kind), pa.bool_())).to_pylist():
            victims[row["uid"]] = row
    images = frozenset(v["sha256"] for v in victims.values() if v["sha256"])
    if images:
        for table in _crawl_tables(root):
            for row in table.filter(pa.array(_hits(table, images, "image_sha256"), pa.bool_())).to_pylist():
                victims.setdefault(row["uid"], row)
    return victims


def _dataset_manifests(root: Storage | None, manifest_storage: Storage) -> list[Storage]:
    """Every dataset directory of the run (the given one first)."""
    dirs = [manifest_storage]
    if root is not None:
        for rel in root.list("", suffix=CURRENT):
            parts = rel.split("/")
            if parts[-1] == CURRENT and (parts[:-1] == ["dataset"] or (len(parts) == 4 and parts[0] == "variants")):
                child = root.child("/".join(parts[:-1]))
                if child.uri.rstrip("/") != manifest_storage.uri.rstrip("/"):
                    dirs.append(child)
    return dirs


def _versioned(path: str, version: int) -> str:
    stem, _, ext = path.rpartition(".")
    base = stem.split(".v")[0]
    return f"{base}.v{version}.{ext}"


def _copy_tar_without(storage: Storage, rel: str, keys: set[str], out: Path) -> None:
    """Copy the tar `rel` to the local file `out`, leaving out the samples whose key is in `keys`."""
    with storage.open_read(rel) as f, TarWriter(out) as writer:
        for key, members in group_samples(iter_tar_members(f)):
            if key not in keys:
                writer.add(key, members)


def _rewrite_shard(storage: Storage, tar: str, parquet: str, gone: set[str], tmp: str, out_tar: str, out_parquet: str):
    """Write a dataset shard without the samples `gone` (uids) as out_tar/out_parquet; its manifest entry."""
    table = storage.read_parquet(parquet)
    keep = pc.invert(pc.is_in(table["uid"], pa.array(sorted(gone), pa.string())))
    kept = table.filter(keep)
    gone_keys = set(table.filter(pc.invert(keep))["key"].to_pylist())
    tar_path, parquet_path = Path(tmp) / "shard.tar", Path(tmp) / "shard.parquet"
    _copy_tar_without(storage, tar, gone_keys, tar_path)
    pq.write_table(kept, parquet_path, **PARQUET_OPTIONS)
    entry = {
        "tar": out_tar,
        "parquet": out_parquet,
        "num_samples": kept.num_rows,
        "bytes": tar_path.stat().st_size,
        "sha256": file_sha256(tar_path),
        "parquet_bytes": parquet_path.stat().st_size,
        "parquet_sha256": file_sha256(parquet_path),
    }
    storage.put_file(tar_path, out_tar)
    storage.put_file(parquet_path, out_parquet)
    return entry


def _shard_uids(storage: Storage, parquet: str) -> set[str]:
    return set(storage.read_parquet(parquet, columns=["uid"])["uid"].to_pylist())


def _new_version(storage: Storage, gone: set[str], record: dict) -> dict | None:
    """The dataset in `storage` without the samples `gone`, as a new manifest version (None: none was in it)."""
    manifest = read_manifest(storage.url(CURRENT))
    version = manifest.version + 1
    new_shards, changed, removed = [], [], []
    with tempfile.TemporaryDirectory(prefix="clipline-takedown-") as tmp:
        for shard in manifest.shards:
            hit = _shard_uids(storage, shard["parquet"]) & gone
            if not hit:
                new_shards.append(shard)
                continue
            removed.extend(sorted(hit))
            tar, parquet = _versioned(shard["tar"], version), _versioned(shard["parquet"], version)
            new_shards.append(_rewrite_shard(storage, shard["tar"], shard["parquet"], hit, tmp, tar, parquet))
            changed.append({"from": shard["tar"], "to": tar, "removed": len(hit)})
    if not removed:
        return None
    archive = f"manifest.v{manifest.version}.json"
    storage.write_bytes(archive, dumps(dict(manifest.data, superseded_by=CURRENT)))
    entry = {
        **record,
        "version": version,
        "removed": len(removed),
        "removed_uids": removed,
        "shards": changed,
        "previous": archive,
    }
    new = dict(
        manifest.data,
        version=version,
        created=record["created"],
        num_samples=sum(s["num_samples"] for s in new_shards),
        shards=new_shards,
        takedowns=[*manifest.data.get("takedowns", []), entry],
    )
    storage.write_bytes(CURRENT, dumps(new))  # last: the switch
    return {"dataset": storage.uri, "version": version, "removed": len(removed), "shards": changed, "archived": archive}


def _append_lists(root: Storage, victims: dict[str, dict]) -> None:
    """Add the removed samples to the run's standing blocklists (kept sorted and unique)."""
    new = {
        "url_sha256": set(_url_sha256([v["url"] for v in victims.values() if v.get("url")])),
        "image_sha256": {v["sha256"] for v in victims.values() if v.get("sha256")},
        "image_pdq": {v["pdq"] for v in victims.values() if v.get("pdq") and (v.get("pdq_quality") or 0) >= 50},
    }
    for kind, values in new.items():
        if not values:
            continue
        old = read_hash_lists([root.url(LISTS[kind])]) if root.exists(LISTS[kind]) else frozenset()
        header = f"# clipline takedowns: {kind}, one a line; ingest and crawl always apply this list\n"
        root.write_bytes(LISTS[kind], (header + "".join(f"{h}\n" for h in sorted(old | values))).encode())


def _next_number(store: Storage) -> int:
    numbers = [int(Path(n).stem) for n in store.list(AUDIT, suffix=".json") if Path(n).stem.isdigit()]
    return max(numbers, default=0) + 1


def takedown(
    location: str,
    ids_file: str | None,
    kind: str = "uid",
    reason: str = "",
    purge: bool = False,
    grace_days: float = 0.0,
    clock: dt.datetime | None = None,
) -> dict:
    """Remove samples named by `ids_file` (see the module docstring); with `purge`, then rewrite every
    object still holding a removed image whose grace has passed (also of earlier takedowns)."""
    if kind not in KINDS:
        raise ClipError(f"takedown: unknown id kind '{kind}' (one of {', '.join(KINDS)})")
    if ids_file is None and not purge:
        raise ClipError("takedown: give the ids to remove (--uids FILE), or --purge to run due purges")
    manifest = read_manifest(location)
    root = run_root(manifest.storage)
    audit = root or manifest.storage
    clock = clock or dt.datetime.now(dt.UTC)
    done: dict = {"removed": 0, "version": manifest.version, "changed_shards": [], "datasets": [], "purged": []}
    if ids_file is not None:
        ids = _load_ids(ids_file, kind)
        if kind in NEEDS_CRAWL and root is None:
            raise ClipError(f"takedown: --kind {kind} needs the run's crawl (OUT/crawl beside {manifest.storage.uri})")
        victims = _crawl_victims(root, ids, kind) if root is not None else {}
        for shard in manifest.shards:  # a dataset without its run, or samples the crawl no longer lists
            if kind in NEEDS_CRAWL:
                break
            column = {"uid": "uid", "url": "url", "url_sha256": "url", "image_sha256": "sha256"}[kind]
            table = manifest.storage.read_parquet(shard["parquet"], columns=list(dict.fromkeys(["uid", column])))
            for row in table.filter(pa.array(_hits(table, ids, kind), pa.bool_())).to_pylist():
                victims.setdefault(row["uid"], row)
        number = _next_number(audit)
        record = {"takedown": f"{AUDIT}/{number:04d}.json", "created": now(), "reason": reason, "kind": kind}
        gone = set(victims)
        datasets = [d for s in _dataset_manifests(root, manifest.storage) if (d := _new_version(s, gone, record))]
        if victims:
            if root is not None:
                _append_lists(root, victims)
            due = clock + dt.timedelta(days=grace_days)
            audit.write_json(
                record["takedown"],
                {
                    **record,
                    "ids_file": ids_file,
                    "requested": len(ids),
                    "removed_uids": sorted(gone),
                    "datasets": datasets,
                    "purge": {"requested": purge, "due": due.isoformat(timespec="seconds"), "done": None},
                },
            )
        first = datasets[0] if datasets and datasets[0]["dataset"] == manifest.storage.uri else None
        done.update(
            removed=len(gone),
            version=first["version"] if first else manifest.version,
            changed_shards=first["shards"] if first else [],
            archived=first["archived"] if first else None,
            datasets=datasets,
            audit=record["takedown"] if victims else None,
        )
    if purge:
        done["purged"] = run_due_purges(audit, root, manifest.storage, clock)
    return done


def run_due_purges(audit: Storage, root: Storage | None, dataset: Storage, clock: dt.datetime) -> list[dict]:
    """Purge every takedown not purged yet whose grace has passed (a takedown made without --purge is
    due at once: a later --purge covers it); what each rewrote."""
    purged = []
    for rel in audit.list(AUDIT, suffix=".json"):
        record = audit.read_json(rel)
        plan = record.get("purge") or {}
        if plan.get("done") or dt.datetime.fromisoformat(plan.get("due", "9999-01-01T00:00:00+00:00")) > clock:
            continue
        rewritten = purge_objects(root, dataset, set(record["removed_uids"]), rel)
        record["purge"] = {**plan, "requested": True, "done": now(), "rewritten": rewritten}
        audit.write_json(rel, record)
        purged.append({"takedown": rel, "rewritten": rewritten})
    return purged


def purge_objects(root: Storage | None, dataset: Storage, gone: set[str], audit_name: str) -> list[str]:
    """Rewrite every object that still holds a sample of `gone`: crawl tars (and their parquet and
    marker) and the shards of superseded manifests (and their entries). Returns their names."""
    rewritten: list[str] = []
    base = root or dataset
    if root is not None:
        for shard in committed_shards(root, "crawl"):
            rewritten += _purge_crawl_shard(root, shard, gone, audit_name)
    for storage in _dataset_manifests(root, dataset):
        prefix = "" if root is None else storage.uri[len(base.uri) :].strip("/") + "/"
        rewritten += [prefix + name for name in _purge_dataset_versions(storage, gone)]
    return rewritten


def _purge_crawl_shard(root: Storage, shard: int, gone: set[str], audit_name: str) -> list[str]:
    parquet_rel, tar_rel = layout.crawl_parquet(shard), layout.crawl_tar(shard)
    table = root.read_parquet(parquet_rel)
    hit = pc.is_in(table["uid"], pa.array(sorted(gone), pa.string()))
    succeeded = pc.and_(hit, pc.equal(table["status"], schema.SUCCESS))
    if not pc.any(succeeded).as_py():
        return []
    gone_keys = set(table.filter(succeeded)["key"].to_pylist())
    table = table.set_column(
        table.schema.get_field_index("status"), "status", pc.if_else(succeeded, "blocked", table["status"])
    )
    table = table.set_column(
        table.schema.get_field_index("error_message"),
        "error_message",
        pc.if_else(succeeded, f"taken down ({audit_name})", table["error_message"]),
    )
    for name in ("colour_sig", "window_sig"):  # mean colours of a coarse grid: the nearest thing to a thumbnail
        if name in table.column_names:
            column = table[name]
            table = table.set_column(
                table.schema.get_field_index(name), name, pc.if_else(succeeded, pa.nulls(1, column.type)[0], column)
            )
    marker_rel = marker_path("crawl", shard)
    marker = root.read_json(marker_rel)
    with tempfile.TemporaryDirectory(prefix="clipline-purge-") as tmp:
        tar_path, parquet_path = Path(tmp) / "crawl.tar", Path(tmp) / "crawl.parquet"
        _copy_tar_without(root, tar_rel, gone_keys, tar_path)
        pq.write_table(table, parquet_path, **parquet_options(table.column_names, distinct=schema.CRAWL_DISTINCT))
        outputs = dict(marker.get("outputs") or {})
        for rel, local in ((tar_rel, tar_path), (parquet_rel, parquet_path)):
            outputs[rel] = {"bytes": local.stat().st_size, "sha256": file_sha256(local)}
            root.put_file(local, rel)
    inputs = marker.get("inputs") or {}
    stats = dict(marker.get("stats") or {})
    stats["taken_down"] = int(stats.get("taken_down", 0)) + len(gone_keys)
    root.write_json(
        marker_rel,
        {**marker, "outputs": outputs, "identity": shard_identity(outputs, marker.get("config_sha256"), inputs),
         "stats": stats},
    )  # fmt: skip
    return [tar_rel, parquet_rel]


def _purge_dataset_versions(storage: Storage, gone: set[str]) -> list[str]:
    """Rewrite in place the shards of archived manifests that hold removed samples, and those entries."""
    names = [n for n in storage.list("", suffix=".json") if n.startswith("manifest") and "/" not in n]
    manifests = {n: json.loads(storage.read_bytes(n)) for n in names}
    fresh: dict[str, dict] = {}  # tar path -> its rewritten entry
    with tempfile.TemporaryDirectory(prefix="clipline-purge-") as tmp:
        for data in manifests.values():
            for shard in data["shards"]:
                if shard["tar"] in fresh or not storage.exists(shard["parquet"]):
                    continue
                hit = _shard_uids(storage, shard["parquet"]) & gone
                if hit:
                    fresh[shard["tar"]] = _rewrite_shard(
                        storage, shard["tar"], shard["parquet"], hit, tmp, shard["tar"], shard["parquet"]
                    )
    for name, data in manifests.items():
        if any(s["tar"] in fresh for s in data["shards"]):
            data["shards"] = [fresh.get(s["tar"], s) for s in data["shards"]]
            data["num_samples"] = sum(s["num_samples"] for s in data["shards"])
            data["purged"] = now()
            storage.write_bytes(name, dumps(data))
    return sorted(n for t, e in fresh.items() for n in (t, e["parquet"]))
