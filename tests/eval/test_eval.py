"""Evaluation: metrics on hand-made embeddings with known answers, datasets, and in-loop == offline."""

import json

import numpy as np
import pytest
import torch

from eval import datasets as eval_datasets
from eval.linear import probe
from eval.retrieval import recall_at_k
from eval.run import evaluate, main_eval
from eval.zeroshot import classifier, scores
from training.checkpoint import load_model


def test_zeroshot_perfect_model_scores_one_and_a_shuffled_one_chance():
    classes = 10
    weights = torch.eye(classes)  # class c's text embedding is e_c
    labels = np.repeat(np.arange(classes), 20)
    perfect = torch.nn.functional.one_hot(torch.as_tensor(labels), classes).float()
    got = scores(perfect, labels, weights)
    assert got["top1"] == got["top5"] == got["mean_per_class_recall"] == 1.0
    shuffled = perfect[torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))]
    got = scores(shuffled, labels, weights)
    assert 0.03 < got["top1"] < 0.2 and 0.35 < got["top5"] < 0.65  # chance: 0.1 and 0.5


def test_template_ensemble_averages_then_renormalises():
    def encode(texts):  # template "a {}" -> (1, 0); "{}" -> (0, 1), whatever the class
        return torch.tensor([[1.0, 0.0] if t.startswith("a ") else [0.0, 1.0] for t in texts])

    w = classifier(encode, ["cat", "dog"], ["a {}", "{}"])
    assert torch.allclose(w, torch.full((2, 2), 2**-0.5))


def test_retrieval_recall_with_several_captions_hand_computed():
    images = torch.eye(3)
    # captions 0,1 belong to image 0; caption 2 to image 1; caption 3 to image 2
    texts = torch.tensor([[0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.2, 0.8], [0.0, 0.0, 1.0]])
    texts = torch.nn.functional.normalize(texts, dim=1)
    owner = torch.tensor([0, 0, 1, 2])
    got = recall_at_k(images, texts, owner, ks=(1, 2), chunk=2)
    # image->text top1: img0 -> caption 0 (hit); img1 -> caption 1 (owner 0: miss); img2 -> caption 3 (hit)
    assert got["image_to_text_R@1"] == pytest.approx(2 / 3)
    # img1's top2: caption 1 (0.0/1.0 sims) then caption 2 (0.24) -> hit
    assert got["image_to_text_R@2"] == 1.0
    # text->image top1: c0 -> img0 hit; c1 -> img1 miss; c2 -> img2 miss (0.8 vs 0.2); c3 -> img2 hit
    assert got["text_to_image_R@1"] == 0.5
    assert got["text_to_image_R@2"] == 1.0


def test_linear_probe_sweeps_regularisation_and_separates_separable_classes():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, 400)
    x = torch.from_numpy(centres[y] + rng.normal(size=(400, 16))).float()
    got = probe(x[:300], y[:300], x[300:], y[300:], classes=4)
    assert got["top1"] > 0.95 and len(got["sweep"]) == 9 and got["l2"] in [float(k) for k in got["sweep"]]
    noise = torch.from_numpy(rng.normal(size=(400, 16))).float()
    assert probe(noise[:300], y[:300], noise[300:], y[300:], classes=4)["top1"] < 0.45  # chance 0.25


def test_image_folder_and_heldout_loaders(tmp_path, web_root):
    from tests.training.helpers import image_bytes

    for cls in ("red_thing", "blue_thing"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "folder" / cls / f"{i}.jpg").write_bytes(image_bytes(cls.split("_")[0], i))
    folder = eval_datasets.load(str(tmp_path / "folder"))
    assert folder.classnames == ("blue thing", "red thing") and folder.count == 6
    assert folder.images([0, 5], 16).shape == (2, 3, 16, 16)
    held = eval_datasets.load(f"heldout={web_root / 'heldout'}")
    assert held.count == 120 and len(held.classnames) == 30 and all(len(c) == 1 for c in held.captions)
    with pytest.raises(eval_datasets.EvalDataError, match="no such directory"):
        eval_datasets.load(str(tmp_path / "nowhere"))


def test_fashion_mnist_from_the_debian_package():
    if eval_datasets.find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed here (Debian package dataset-fashion-mnist; `make setup` adds it)")
    fm = eval_datasets.fashion_mnist(max_train=100, max_test=50)
    assert fm.count == 150 and len(fm.classnames) == 10 and (fm.split == "test").sum() == 50
    image = fm.load_image(0, 32)
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and int(image.max()) > 100


def test_in_loop_numbers_equal_offline_ones(tmp_path, web_root, capfd):
    from tests.training.helpers import make_dataset
    from training.data import DataConfig
    from training.trainer import Run, TrainConfig

    manifest = make_dataset(tmp_path / "data", [16, 16])
    datasets = (f"heldout={web_root / 'heldout'}",)
    tasks = ("zeroshot", "retrieval", "linear")
    config = TrainConfig(data=str(manifest), out=str(tmp_path / "run"), max_steps=4, warmup_steps=1, vocab_size=300,
                         context_length=16, eval_every=2, eval_tasks=tasks, eval_datasets=datasets,
                         loader=DataConfig(batch_size=8, num_workers=0, image_size=32))  # fmt: skip
    in_loop = Run(config, evaluator=evaluate).fit()["eval"]
    offline = main_eval(str(tmp_path / "run"), ["zeroshot", "retrieval", "linear"], datasets, str(tmp_path / "e.json"),
                        progress=True)  # fmt: skip
    shown = capfd.readouterr().err
    assert "eval heldout" in shown and "img/s" in shown  # the in-loop evaluation and clipline eval show progress
    assert json.loads((tmp_path / "e.json").read_text()) == offline
    assert in_loop == offline
    assert set(offline) == {"zeroshot", "retrieval", "linear", "templates"}
    assert 0 <= offline["zeroshot"]["heldout"]["top1"] <= 1 and "image_to_text_R@1" in offline["retrieval"]["heldout"]
    model, tokenizer = load_model(str(tmp_path / "run" / "checkpoints" / "step-00000004.pt"))
    assert evaluate(model, tokenizer, ["zeroshot"], datasets)["zeroshot"] == offline["zeroshot"]
