"""Benchmarks in the layouts users keep them (CLIP_benchmark webdataset, ImageNet-style folders, Karpathy JSON),
suites, CLIP_benchmark-named results, the feature cache, and decontamination of training pools."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from eval import benchmark, retrieval, zeroshot
from pipeline.evaldata import EvalDataError, class_folders, clip_benchmark_wds, karpathy, parse_spec


def texture(seed: int, size: int = 96, fmt: str = "PNG", quality: int = 90) -> bytes:
    """A smooth random texture: distinct images are far apart in pHash, like distinct photographs."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(root: Path, split: str, samples: list[tuple[bytes, str, str]]) -> None:
    """CLIP_benchmark's layout, written by hand: SPLIT/0.tar with KEY.EXT and KEY.cls or KEY.txt."""
    (root / split).mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / split / "0.tar", "w") as tar:
        for i, (image, ext, target) in enumerate(samples):
            add(tar, f"{i:05d}.{ext}", image)
            add(tar, f"{i:05d}.{'txt' if not target.isdigit() else 'cls'}", target.encode())
    (root / split / "nshards.txt").write_text("1\n")


@pytest.fixture
def classification(tmp_path) -> Path:
    root = tmp_path / "wds_textures"
    write_wds(root, "test", [(texture(i, fmt="WEBP"), "webp", str(i % 3)) for i in range(9)])
    write_wds(root, "train", [(texture(100 + i), "png", str(i % 3)) for i in range(12)])
    (root / "classnames.txt").write_text("red thing\ngreen thing\nblue thing\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nan image of the {c}.\n")
    return root


def test_clip_benchmark_layout_with_webp_images_and_both_splits(classification):
    test = clip_benchmark_wds(str(classification))
    assert (test.name, test.count, test.classnames) == ("textures", 9, ("red thing", "green thing", "blue thing"))
    assert test.labels.tolist() == [0, 1, 2] * 3 and test.templates == ("a photo of a {}.", "an image of the {}.")
    assert test.read(0) == texture(0, fmt="WEBP")
    full = benchmark.eval_set(benchmark.read_spec(f"clip_benchmark:{classification}"))
    assert full.count == 21 and full.split.tolist() == ["train"] * 12 + ["test"] * 9
    assert full.images([0, 20], 32).shape == (2, 3, 32, 32)


def test_malformed_sets_are_one_line_errors(tmp_path, classification):
    (classification / "classnames.txt").write_text("only one\n")
    with pytest.raises(EvalDataError, match=r"sample 00001 has class 1, outside classnames.txt's 1"):
        clip_benchmark_wds(str(classification))
    (classification / "classnames.txt").unlink()
    with pytest.raises(EvalDataError, match="classnames.txt is missing"):
        clip_benchmark_wds(str(classification))
    with pytest.raises(EvalDataError, match="expected"):
        parse_spec("nonsense:/x")
    done = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--checkpoint", str(tmp_path), "--dataset",
                           f"clip_benchmark:{classification}"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_imagenet_folders_take_openai_names_and_templates(tmp_path):
    root = tmp_path / "val"
    for i in range(1000):
        (root / f"n{i:08d}").mkdir(parents=True)
    (root / "n00000000" / "a.JPEG").write_bytes(texture(1, fmt="JPEG"))
    (root / "n00000999" / "b.JPEG").write_bytes(texture(2, fmt="JPEG"))
    raw = class_folders(root)
    assert raw.name == "imagenet1k" and len(raw.classnames) == 1000 and raw.classnames[0] == "tench"
    assert raw.classnames[-1] == "toilet paper" and len(raw.templates) == 80 and "{}" in raw.templates[0]
    assert raw.labels.tolist() == [0, 999]
    other = tmp_path / "pets"
    for name in ("cat", "dog"):
        (other / name).mkdir(parents=True)
        (other / name / "1.png").write_bytes(texture(len(name)))
    assert class_folders(other).classnames == ("cat", "dog")
    (other / "classnames.txt").write_text("a cat\na dog\n")
    assert class_folders(other).classnames == ("a cat", "a dog")


def write_karpathy(root: Path) -> Path:
    (root / "images" / "val2014").mkdir(parents=True)
    entries = []
    for i in range(4):
        (root / "images" / "val2014" / f"{i}.jpg").write_bytes(texture(200 + i, fmt="JPEG"))
        entries.append({"filepath": "val2014", "filename": f"{i}.jpg", "split": "test" if i < 3 else "train",
                        "sentences": [{"raw": f"caption {k} of image {i} "} for k in range(5)]})  # fmt: skip
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    return root / "dataset_coco.json"


def test_karpathy_split_json(tmp_path):
    raw = karpathy(write_karpathy(tmp_path), tmp_path / "images")
    assert raw.name == "coco" and raw.count == 3 and all(len(c) == 5 for c in raw.captions)
    assert raw.captions[2][4] == "caption 4 of image 2"
    with pytest.raises(EvalDataError, match="not found"):
        karpathy(tmp_path / "dataset_coco.json", tmp_path / "nowhere")


def test_metrics_under_clip_benchmark_names_by_hand():
    # 3 images of classes 0, 1, 1: the first two classified right, the third as class 0
    weights = torch.eye(3)
    features = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.9, 0.1, 0]])
    got = benchmark.benchmark_metrics("zeroshot", zeroshot.scores(features, np.array([0, 1, 1]), weights))
    assert got == {"acc1": pytest.approx(2 / 3), "acc5": 1.0, "mean_per_class_recall": pytest.approx((1 + 0.5) / 2)}
    # 2 images, 2 captions each; caption 3 (of image 1) is closest to image 0
    images = torch.tensor([[1.0, 0], [0, 1.0]])
    texts = torch.tensor([[1.0, 0], [0.9, 0.1], [0.1, 0.9], [0.8, 0.2]])
    found = benchmark.benchmark_metrics("retrieval", retrieval.recall_at_k(images, texts, torch.tensor([0, 0, 1, 1])))
    assert found["image_retrieval_recall@1"] == 0.75  # texts whose nearest image is their own: 3 of 4
    assert found["text_retrieval_recall@1"] == 1.0  # each image's nearest caption is one of its own


@pytest.fixture
def checkpoint(tmp_path) -> str:
    pytest.importorskip("transformers")
    from tests.training.test_pretrained import hf_reference, openai_state_dict

    torch.save(openai_state_dict(hf_reference(seed=7)), tmp_path / "ViT-tiny.pt")
    return str(tmp_path / "ViT-tiny.pt")


def test_a_suite_writes_clip_benchmark_results_and_resumes_from_its_feature_cache(
    tmp_path, classification, checkpoint, monkeypatch
):
    from eval.run import main_eval

    monkeypatch.setenv("CLIPLINE_CACHE", str(tmp_path / "cache"))
    write_karpathy(tmp_path / "coco")
    folders = tmp_path / "folders"
    for c in range(2):
        (folders / f"class{c}").mkdir(parents=True)
        for i in range(3):
            (folders / f"class{c}" / f"{i}.png").write_bytes(texture(300 + 10 * c + i))
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""datasets:
  - {{name: textures, kind: clip_benchmark, path: {classification.name}, tasks: [zeroshot, linear]}}
  - {{name: shapes, kind: folders, path: folders}}
  - {{name: coco, kind: karpathy, json: coco/dataset_coco.json, images: coco/images}}
""")
    out = tmp_path / "eval" / "eval.json"
    first = main_eval(checkpoint, [], [], str(out), suite=str(suite), workers=2)
    assert set(first["zeroshot"]) == {"textures", "shapes"} and set(first["linear"]) == {"textures", "shapes"}
    assert set(first["retrieval"]) == {"coco"} and json.loads(out.read_text()) == first
    row = json.loads((out.parent / "textures_zeroshot_classification.json").read_text())
    assert set(row) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert set(row["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert row["metrics"]["acc1"] == first["zeroshot"]["textures"]["top1"]
    coco = json.loads((out.parent / "coco_zeroshot_retrieval.json").read_text())["metrics"]
    assert set(coco) == {f"{k}_retrieval_recall@{n}" for k in ("image", "text") for n in (1, 5, 10)}
    lp = json.loads((out.parent / "textures_linear_probe.json").read_text())["metrics"]
    assert set(lp) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}
    page = (out.parent / "eval.html").read_text()
    assert "red thing" in page and "Most frequent confusions" in page
    # Again, with every image decode broken: the features come from the cache, and so do equal results
    monkeypatch.setattr(benchmark, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    assert main_eval(checkpoint, [], [], str(tmp_path / "again.json"), suite=str(suite)) == first


def test_decontamination_drops_planted_copies_of_evaluation_images_and_nothing_else(tmp_path):
    """Exact, resized + recompressed, and re-encoded copies of evaluation images are eval_overlap; other
    images, and an image of the same kind that is not in the evaluation set, are kept."""
    from pipeline.config import RunConfig
    from pipeline.decontaminate import image_signatures
    from pipeline.filter import STAGES as FILTER_STAGES
    from pipeline.filter import FilterConfig
    from pipeline.runner import run_pipeline
    from pipeline.stats import StatsConfig, collect
    from tests.pipeline.test_dedup import store_with_shards

    evalset = tmp_path / "eval" / "things"
    (evalset / "a").mkdir(parents=True)
    originals = [texture(500 + i, size=160) for i in range(4)]
    for i, data in enumerate(originals):
        (evalset / "a" / f"{i}.png").write_bytes(data)

    def resized(data: bytes, scale: float, fmt: str, quality: int = 50) -> bytes:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
        return buf.getvalue()

    planted = {
        "exact": originals[0],
        "resized": resized(originals[1], 0.5, "JPEG", quality=40),
        "reencoded": resized(originals[2], 1.0, "JPEG", quality=60),
    }
    clean = {f"other{i}": texture(900 + i, size=160) for i in range(20)}
    rows = []
    for name, data in {**planted, **clean}.items():
        sha, pixels, phash, colour = image_signatures(data)
        rows.append({"uid": f"{abs(hash(name)):032x}"[:32], "caption": name, "sha": sha, "phash": phash,
                     "colour": colour, "pixels": pixels})  # fmt: skip
    store = store_with_shards(tmp_path, [rows[:10], rows[10:]])
    config = FilterConfig(preset="none", drop_duplicates=False, decontaminate=(f"things=folders:{evalset}",))
    run_pipeline(list(FILTER_STAGES), store, RunConfig(out=store.uri, filter=config), executor="inline",
                 progress=False)  # fmt: skip
    out = pl.concat([store.read_frame(f"filter/{s:05d}.parquet") for s in range(2)])
    dropped = out.filter(pl.col("drop_reason") == "eval_overlap")
    assert sorted(dropped["caption"].to_list()) == sorted(planted)
    assert set(dropped["eval_overlap"].to_list()) == {"things"} and out.filter("keep").height == len(clean)
    assert collect(store, StatsConfig())["eval_overlap"] == {"things": 3}
    # with a checkpoint the evaluation images' embeddings are stored, and the crawl's compared with them
    pytest.importorskip("transformers")
    from tests.training.test_pretrained import hf_reference, openai_state_dict

    torch.save(openai_state_dict(hf_reference(seed=3)), tmp_path / "ViT-tiny.pt")
    semantic = FilterConfig(preset="none", drop_duplicates=False, decontaminate=(f"things=folders:{evalset}",),
                            decontaminate_checkpoint=str(tmp_path / "ViT-tiny.pt"),
                            decontaminate_semantic_threshold=0.9999)  # fmt: skip
    for rel in store.list("filter"):
        store.delete(rel)
    crawled = {r["caption"]: data for r, data in zip(rows, {**planted, **clean}.values(), strict=True)}
    for s in range(2):  # the crawl tars the embeddings are computed from
        from pipeline.formats import TarWriter

        shard_rows = store.read_frame(f"crawl/{s:05d}.parquet")
        with TarWriter(Path(store.uri) / f"crawl/{s:05d}.tar") as tar:
            for uid, caption in zip(shard_rows["uid"], shard_rows["caption"], strict=True):
                tar.add(uid, {"png": crawled[caption], "txt": caption.encode()})
    run_pipeline(list(FILTER_STAGES), store, RunConfig(out=store.uri, filter=semantic), executor="inline",
                 progress=False)  # fmt: skip
    signed = store.read_frame("filter/_evalsig/00000.parquet")
    assert signed.height == 4 and len(signed["embedding"][0]) == 48
    again = pl.concat([store.read_frame(f"filter/{s:05d}.parquet") for s in range(2)])
    assert sorted(again.filter(pl.col("drop_reason") == "eval_overlap")["caption"].to_list()) == sorted(planted)


def test_shipped_suites_parse():
    from pipeline.evaldata import KINDS

    for path in sorted(Path("eval/suites").glob("*.yaml")):
        entries = benchmark.load_suite(path)
        assert entries and all(e["kind"] in (*KINDS, "heldout", "fashion-mnist") for e in entries), path


def test_semantic_decontamination_marks_rows_close_to_an_evaluation_embedding():
    from pipeline.decontaminate import semantic_overlaps

    rng = np.random.default_rng(0)
    evals = rng.normal(size=(5, 16)).astype(np.float32)
    evals /= np.linalg.norm(evals, axis=1, keepdims=True)
    signatures = pl.DataFrame({"dataset": ["a", "a", "b", "b", "b"], "embedding": [list(v) for v in evals]})
    rows = rng.normal(size=(6, 16)).astype(np.float32)
    rows[1] = evals[3] + 0.01 * rng.normal(size=16)  # an edited copy of b's image 3
    rows[4] = np.nan  # an image that did not decode
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    found = np.full(6, None, dtype=object)
    found[0] = "a"  # already a copy by its hashes: kept as it is
    semantic_overlaps(found, rows, signatures, threshold=0.95)
    assert found.tolist() == ["a", "b", None, None, None, None]


def test_folders_karpathy_and_clip_benchmark_sets_read_from_s3(tmp_path, s3, classification):
    from pipeline.storage import open_storage
    from tests.conftest import BUCKET

    folders = tmp_path / "pets"
    for c, name in enumerate(("cat", "dog")):
        (folders / name).mkdir(parents=True)
        for i in range(2):
            (folders / name / f"{i}.png").write_bytes(texture(40 + 2 * c + i))
    write_karpathy(tmp_path / "coco")
    remote = f"s3://{BUCKET}/evalsets-{tmp_path.name}"
    store = open_storage(remote)
    for local in (folders, tmp_path / "coco", classification):
        for f in sorted(local.rglob("*")):
            if f.is_file():
                store.put_file(f, f"{local.name}/{f.relative_to(local)}")
    a, b = class_folders(folders), class_folders(f"{remote}/pets")
    assert (b.name, b.classnames, b.labels.tolist()) == (a.name, a.classnames, a.labels.tolist())
    assert [b.read(i) for i in range(b.count)] == [a.read(i) for i in range(a.count)]
    c = karpathy(f"{remote}/coco/dataset_coco.json", f"{remote}/coco/images")
    d = karpathy(tmp_path / "coco" / "dataset_coco.json", tmp_path / "coco" / "images")
    assert c.captions == d.captions and c.read(2) == d.read(2)
    e = clip_benchmark_wds(f"{remote}/{classification.name}")
    assert e.labels.tolist() == [0, 1, 2] * 3 and e.read(0) == texture(0, fmt="WEBP")
