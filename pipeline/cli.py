"""The `clipline` command (also `python -m pipeline`). Parses, calls, prints; no logic of its own.

Bad input raises a ClipError somewhere below; it is printed here as one line
and the command exits 2 (1 for failed shards).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline import __version__
from pipeline.errors import ClipError
from pipeline.layout import CONFIG_FILE, STAGE_ORDER

if TYPE_CHECKING:
    from pipeline.config import RunConfig


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML run config (defaults when omitted)")
    p.add_argument("--out", metavar="LOCATION", help="output location: a directory or s3://bucket/prefix")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--executor", choices=("ray", "inline"), help="run shards on Ray (default) or inline, for debugging")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set runtime.max_retries=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipline",
        description="Build CLIP-scale image-text datasets on Ray, and train and evaluate CLIP on them.",
    )
    parser.add_argument("--version", action="version", version=f"clipline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="the whole flow on the embedded defaults (synthetic web on loopback)")
    p.add_argument("--out", default="demo-out", metavar="DIR", help="work directory (default: demo-out)")
    p.add_argument("--size", default="small", choices=("tiny", "small", "medium"), help="corpus size (default: small)")
    p.add_argument("--storage", metavar="LOCATION", help="put the data outputs here instead (e.g. s3://bucket/demo)")
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs (default: the size's budget: 30 for tiny, "
                   "16 for small; fewer train faster and score lower)")  # fmt: skip
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="every data stage of a config, in order, resumable")
    _config_args(p)
    p.add_argument(
        "--stage",
        dest="stages",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this stage (repeatable; default: the config's stages, else all)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--dry-run", action="store_true", help="say what a run would redo (stale and missing shards) and exit"
    )
    p.add_argument(
        "--variant",
        metavar="NAME",
        help="run the filter, shard and stats stages of this dataset variant (the config's variants.NAME, or the "
        "config as given) into OUT/variants/NAME/, over the shared ingest, crawl and dedup",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="per stage: shards committed, stale (and why) or missing; what a run would redo")
    p.add_argument("location", metavar="OUT", help="the output location (its config.yaml is read)")
    p.add_argument("--config", metavar="FILE", help="judge against this config instead of OUT/config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for run")  # fmt: skip
    p.add_argument("--stage", dest="stages", action="append", default=[], metavar="NAME", help="only this stage")
    p.add_argument("--variant", metavar="NAME", help="the status of this dataset variant's stages")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    for name in STAGE_ORDER:
        p = sub.add_parser(name, help=f"run the {name} stage alone")
        _config_args(p)
        if name == "crawl":
            p.add_argument(
                "--retry-failed",
                action="store_true",
                help="fetch again only the transient failures (timeouts, 5xx, 429, connection errors) "
                "of committed shards, and commit new versions of those shards",
            )
        p.set_defaults(func=cmd_stage, stage=name)

    p = sub.add_parser("ablate", help="dataset variants -> shards -> matched-compute training -> eval -> comparison")
    p.add_argument("--config", metavar="FILE", help="an ablation config (run, train, samples_seen, seeds, eval_*)")
    p.add_argument("--demo", action="store_true", help="four variants (clip-wit too) of the tiny web, in minutes")
    p.add_argument("--out", default="ablate-demo", metavar="DIR", help="with --demo: where (default: ablate-demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set samples_seen=20000 --set run.out=s3://b/x")  # fmt: skip
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("train", help="CLIP pretraining on a manifest's shards; resumes from OUT if it has a checkpoint")
    p.add_argument("--data", metavar="MANIFEST", help="the dataset's manifest.json (local or s3://)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory: checkpoints, metrics.jsonl, tokenizer.json")
    p.add_argument("--config", metavar="FILE", help="YAML training config (training.trainer.TrainConfig)")
    p.add_argument("--init-from", metavar="CKPT",
                   help="fine-tune from a checkpoint: a clipline run or .pt, an OpenAI/OpenCLIP file or directory, "
                   "a Hugging Face CLIPModel directory (local or s3://)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config value, e.g. --set lr=1e-3 --set loader.batch_size=128")  # fmt: skip
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="DDP over N local processes (torchrun)")
    p.add_argument("--ray-workers", type=int, default=0, metavar="N", help="DDP over N Ray Train workers instead")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster address for --ray-workers")
    p.add_argument("--ray-wait", action="store_true",
                   help="with --ray-workers on an autoscaling cluster: wait for nodes (reported every 30 s) "
                   "instead of failing when the cluster is too small")  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="zero-shot, retrieval and linear probe of a checkpoint -> eval.json")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a run directory or .pt, an OpenAI/OpenCLIP file or directory, a Hugging Face CLIPModel "
                   "directory (local or s3://)")  # fmt: skip
    p.add_argument("--task", default="zeroshot,retrieval,linear", help="comma-separated tasks")
    p.add_argument("--dataset", dest="datasets", action="append", default=[], metavar="[NAME=]PATH",
                   help="heldout=DIR, fashion-mnist, an image folder, a manifest.json, clip_benchmark:DIR, "
                   "folders:DIR, karpathy:JSON:IMAGES (repeatable)")  # fmt: skip
    p.add_argument("--suite", metavar="FILE", help="a suite file (eval/suites/*.yaml or your own): every dataset it "
                   "lists, each with its tasks")  # fmt: skip
    p.add_argument("--out", metavar="FILE",
                   help="where eval.json goes (default: RUN_DIR/../eval/eval.json for a run, "
                   "else ./eval.json)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("metadata", help="build a CLIP-style metadata list (filter.metadata) from WordNet and a corpus")
    p.add_argument("--wordnet", metavar="DIR", help="WordNet's index.* files (Debian wordnet-base: /usr/share/wordnet)")
    p.add_argument("--corpus", action="append", default=[], metavar="FILE", help="a UTF-8 text file (repeatable)")
    p.add_argument("--min-count", type=int, default=100, help="a corpus word becomes an entry at this many occurrences")
    p.add_argument("--bigram-min-count", type=int, default=30, help="... and a bigram at this many")
    p.add_argument("--min-pmi", type=float, default=3.0, help="... whose pointwise mutual information is at least this")
    p.add_argument("--out", required=True, metavar="FILE", help="the list, one entry a line (local or s3://)")
    p.set_defaults(func=cmd_metadata)

    p = sub.add_parser("export", help="write a checkpoint as an OpenCLIP or Hugging Face model directory")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="any checkpoint eval takes")
    p.add_argument("--format", required=True, choices=["open_clip", "hf"])
    p.add_argument("--out", required=True, metavar="DIR", help="the model directory to write (local or s3://)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("submit", help="run any clipline command as a Ray job on a cluster, streaming its logs")
    p.add_argument("--address", required=True, metavar="URL", help="the cluster's job API, e.g. http://HEAD:8265")
    p.add_argument("--working-dir", metavar="DIR", help="upload this directory as the job's working directory")
    p.add_argument("--runtime-env", metavar="FILE", help="YAML Ray runtime env (pip, env_vars, ...)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument(
        "--ship-credentials",
        action="store_true",
        help="also send secret AWS_*/CLIPLINE_* variables (keys, tokens, passwords) in the job's runtime env, "
        "where Ray's job info and dashboard keep them; by default the cluster uses its own credentials",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the clipline command to run")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list the cluster's jobs, show or follow one's logs, stop one")
    p.add_argument("action", choices=("list", "logs", "stop"))
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", required=True, metavar="URL", help="the cluster's job API, e.g. http://HEAD:8265")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("takedown", help="remove samples from a published dataset: new manifest version, old kept")
    p.add_argument("--manifest", required=True, metavar="LOCATION", help="the dataset's manifest.json (local or s3://)")
    p.add_argument("--uids", metavar="FILE", help="ids to remove, one a line (local or s3://)")
    p.add_argument(
        "--kind",
        default="uid",
        choices=("uid", "url", "url_sha256", "image_sha256", "image_md5", "image_pdq"),
        help="what the ids are: sample uids (default), URLs, sha256 of URLs, sha256 / md5 of image bytes, "
        "or PDQ hashes (64 hex digits, optionally a distance; md5 and PDQ need the run's crawl)",
    )
    p.add_argument("--reason", default="", help="why (recorded in the new manifest and OUT/takedowns/NNNN.json)")
    p.add_argument(
        "--purge",
        action="store_true",
        help="also rewrite every object under OUT that still holds a removed image (crawl tars, superseded "
        "shard versions); without --uids: run the purges whose grace has passed",
    )
    p.add_argument("--grace", type=float, default=0.0, metavar="DAYS", help="purge only after DAYS (with --purge)")
    p.set_defaults(func=cmd_takedown)

    p = sub.add_parser("web", help="generate (if needed) and serve a synthetic web on loopback")
    p.add_argument("--root", required=True, metavar="DIR", help="corpus directory (generated if absent)")
    p.add_argument("--port", type=int, default=0, metavar="P", help="port (default: a free one)")
    p.add_argument("--size", default="small", choices=("tiny", "small", "medium"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_web)
    return parser


# --- commands ------------------------------------------------------------------------------


def _load(args) -> RunConfig:
    from pipeline.config import load_config

    # --set texts first, then the command's own flags as typed values: `--out 2024` stays the string "2024".
    flags = [("out", args.out), ("runtime.address", args.address), ("runtime.executor", args.executor)]
    flags += [("runtime.progress", False)] if args.quiet else []
    return load_config(args.config, [*args.overrides, *((k, v) for k, v in flags if v is not None)])


def run_data(config, names, selected=None, variant: str | None = None) -> int:
    """Run the selected stages; then, or only with `variant`, the variants' own filter, shard and stats."""
    from pipeline import stages as registry
    from pipeline import variants
    from pipeline.runner import run_pipeline
    from pipeline.storage import open_storage

    base = open_storage(config.out)
    chosen = selected or registry.select(names)
    own = [s for s in chosen if s.name.split("/")[0] in variants.STAGES]

    def arm(name: str, stages: list) -> tuple:
        return variants.variant_config(config, name), variants.VariantStorage(base, name), stages

    if variant is not None:
        plan = [arm(variant, own)]  # (config, storage, stages) in order
    else:
        # With variants, every report comes last: each compares all the variants' datasets.
        reports = [s for s in chosen if s.name == "stats"] if config.variants else []
        plan = [(config, base, [s for s in chosen if s not in reports])]
        plan += [arm(name, [s for s in own if s not in reports]) for name in config.variants]
        if reports:
            plan += [(config, base, reports), *(arm(name, reports) for name in config.variants)]
    written = set()
    for run, store, stages in plan:
        if store.url() not in written:  # the config travels with the data (a variant's in its own folder)
            store.write_bytes(CONFIG_FILE, _dump_config(run).encode())
            written.add(store.url())
        for stage in stages:
            (report,) = run_pipeline([stage], store, run)
            redone = f", {len(report.stale)} of them stale" if report.stale else ""
            same = f", {len(report.unchanged)} came out unchanged" if report.unchanged else ""
            pruned = f", {len(report.pruned)} no longer planned removed" if report.pruned else ""
            print(
                f"{stage.name}: {report.planned} shards ({len(report.ran)} run{redone}{same}, "
                f"{len(report.skipped)} already committed{pruned}), "
                f"{report.total('rows')} rows, {report.seconds:.1f}s -> {store.url(stage.name)}"
            )
    return 0


def cmd_run(args) -> int:
    config = _load(args)
    if args.print_config:
        print(_dump_config(config), end="")
        return 0
    names = args.stages or list(config.stages)
    if args.dry_run:
        return _print_status(config, names, as_json=False, variant=args.variant)
    return run_data(config, names, variant=args.variant)


def _print_status(config, names, as_json: bool, variant: str | None = None) -> int:
    import json

    from pipeline import variants
    from pipeline.status import format_status, status
    from pipeline.storage import open_storage

    store = open_storage(config.out)
    if variant is not None:
        config, store = variants.variant_config(config, variant), variants.VariantStorage(store, variant)
        names = [n for n in (names or variants.STAGES) if n in variants.STAGES]
    rows = status(store, config, names)
    print(json.dumps(rows, indent=1) if as_json else format_status(rows))
    return 0


def cmd_status(args) -> int:
    from pipeline.config import load_config
    from pipeline.storage import open_storage

    path = args.config
    if path is None:
        store = open_storage(args.location)
        if not store.exists(CONFIG_FILE):
            raise ClipError(f"{store.url(CONFIG_FILE)} does not exist: give the run's config with --config FILE")
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CONFIG_FILE
            path.write_bytes(store.read_bytes(CONFIG_FILE))
            config = load_config(path, [*args.overrides, ("out", args.location)])
    else:
        config = load_config(path, [*args.overrides, ("out", args.location)])
    return _print_status(config, args.stages, args.json, args.variant)


def _dump_config(config) -> str:
    from pipeline.config import dump_config

    return dump_config(config)


def cmd_stage(args) -> int:
    if getattr(args, "retry_failed", False):
        from pipeline.crawl import RETRY_STAGE

        return run_data(_load(args), [], [RETRY_STAGE])
    return run_data(_load(args), [args.stage])


def cmd_train(args) -> int:
    from pipeline import configio
    from pipeline.launch import launch
    from training.trainer import TrainConfig

    given = (("data", args.data), ("out", args.out), ("init_from", args.init_from))
    flags = [(k, v) for k, v in given if v is not None]
    config = configio.load(TrainConfig, args.config, [*args.overrides, *flags])
    result = launch(config, nproc=args.nproc, ray_workers=args.ray_workers, address=args.address,
                    wait_for_resources=args.ray_wait)  # fmt: skip
    if result is not None:
        shown = {k: result[k] for k in ("workers", "processes", "step", "epoch", "loss") if k in result}
        print(f"train: {shown} -> {config.out}")
    return 0


def cmd_ablate(args) -> int:
    from pipeline import ablate

    if args.demo == bool(args.config):
        raise ClipError("ablate: give --config FILE or --demo")
    results = (
        ablate.run_demo_ablate(args.out) if args.demo else ablate.run_ablate(ablate.load(args.config, args.overrides))
    )
    print(ablate.format_table(results))
    print(f"ablate: wrote {results_location(results, args)}")
    return 0


def results_location(results: dict, args) -> str:
    return f"{args.out}/ablate/report.html" if args.demo else "OUT/ablate/report.html and ablate.json"


def cmd_eval(args) -> int:
    from pathlib import Path

    from eval.run import format_table, main_eval
    from training.checkpoint import resolve_checkpoint

    if not args.datasets and not args.suite:
        raise ClipError("eval: give --suite FILE or at least one --dataset (heldout=DIR, fashion-mnist, an image "
                        "folder, a manifest, clip_benchmark:DIR, folders:DIR, karpathy:JSON:IMAGES)")  # fmt: skip
    resolved = Path(resolve_checkpoint(args.checkpoint))
    beside_run = "://" not in args.checkpoint and resolved.parent.name == "checkpoints"
    out = args.out or str(resolved.parent.parent.parent / "eval" / "eval.json" if beside_run else "eval.json")
    results = main_eval(args.checkpoint, [t for t in args.task.split(",") if t], args.datasets, out, args.device,
                        progress=True, suite=args.suite)  # fmt: skip
    print(format_table(results))
    print(f"eval: wrote {out}")
    return 0


def cmd_metadata(args) -> int:
    from pipeline.curation import build_metadata
    from pipeline.storage import split_location

    entries = build_metadata(args.wordnet, args.corpus, args.min_count, args.bigram_min_count, args.min_pmi)
    store, rel = split_location(args.out)
    store.write_bytes(rel, ("\n".join(entries) + "\n").encode())
    print(f"metadata: {len(entries):,} entries -> {store.url(rel)}")
    return 0


def cmd_export(args) -> int:
    import tempfile

    from pipeline.storage import open_storage
    from training.checkpoint import load_model
    from training.pretrained import export

    model, tokenizer = load_model(args.checkpoint)
    target = open_storage(args.out)
    with tempfile.TemporaryDirectory(prefix="clipline-export-") as tmp:
        written = export(model, tokenizer, args.format, tmp)
        for name in written:
            target.put_file(f"{tmp}/{name}", name)
    print(f"export: {args.format} model ({model.describe()['parameters']:,} parameters) -> {target.url()}: "
          f"{', '.join(written)}")  # fmt: skip
    return 0


def cmd_submit(args) -> int:
    from pipeline.submit import submit

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return submit(
        args.address, rest, args.working_dir, args.runtime_env, wait=not args.no_wait,
        ship_credentials=args.ship_credentials,
    )  # fmt: skip


def cmd_jobs(args) -> int:
    from pipeline.submit import jobs_command

    return jobs_command(args.address, args.action, args.job_id, args.follow)


def cmd_takedown(args) -> int:
    from pipeline.takedown import takedown

    if args.grace < 0:
        raise ClipError(f"takedown: --grace must be >= 0 days, got {args.grace:g}")
    done = takedown(args.manifest, args.uids, kind=args.kind, reason=args.reason, purge=args.purge,
                    grace_days=args.grace)  # fmt: skip
    if args.uids and not done["removed"]:
        print(f"takedown: no listed sample is in {args.manifest}; nothing changed (version {done['version']})")
    elif args.uids:
        print(
            f"takedown: removed {done['removed']} samples from {len(done['changed_shards'])} shards; "
            f"manifest is now version {done['version']} (previous kept as {done['archived']}); "
            f"audit record {done['audit']}"
        )
        for other in done["datasets"][1:]:
            print(f"takedown: also {other['dataset']}: {other['removed']} samples, version {other['version']}")
    for purge in done["purged"]:
        print(f"takedown: purged {purge['takedown']}: rewrote {len(purge['rewritten'])} objects")
    if args.purge and args.grace and args.uids and done["removed"]:
        print(f"takedown: the purge runs on `clipline takedown --manifest ... --purge` after {args.grace:g} days")
    return 0


def cmd_demo(args) -> int:
    from pipeline.demo import format_summary, run_demo

    summary = run_demo(args.out, args.size, storage=args.storage, progress=not args.quiet, epochs=args.epochs)
    print(format_summary(summary))
    return 0


def cmd_web(args) -> int:
    from pipeline.web import SIZES, generate, serve_forever

    spec = replace(SIZES[args.size], seed=args.seed)
    serve_forever(generate(args.root, spec), args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ClipError as e:
        print(f"clipline: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("clipline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
