"""The trainer: exact kill-and-resume, DDP under torchrun (gloo), precision, checkpoint safety, manifests."""

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import ClipError
from pipeline.manifest import SupersededManifest
from tests.training.helpers import make_dataset
from training import checkpoint
from training.checkpoint import CheckpointError
from training.data import DataConfig, open_manifest
from training.trainer import Run, TrainConfig


def config(manifest, out, **kw) -> TrainConfig:
    loader = DataConfig(batch_size=4, num_workers=kw.pop("num_workers", 2), image_size=32)
    return TrainConfig(data=str(manifest), out=str(out), max_steps=8, warmup_steps=2, log_every=1, save_every=3,
                       vocab_size=300, context_length=16, loader=loader, **kw)  # fmt: skip


class Killed(Exception):
    pass


def test_killed_and_resumed_training_equals_an_uninterrupted_run(tmp_path):
    manifest = make_dataset(tmp_path / "data", [9, 7, 11, 5])
    seen_full, seen_resumed = [], []
    Run(config(manifest, tmp_path / "full")).fit(on_step=lambda run, b: seen_full.append(b["uids"]))

    def kill_at_5(run, batch):
        seen_resumed.append(batch["uids"])
        if run.step == 5:  # after the step-3 checkpoint, before the step-6 one: steps 4-5 are lost
            raise Killed

    with pytest.raises(Killed):
        Run(config(manifest, tmp_path / "resumed")).fit(on_step=kill_at_5)
    resumed = Run(config(manifest, tmp_path / "resumed"))
    assert resumed.step == 3
    resumed.fit(on_step=lambda run, b: seen_resumed.append(b["uids"]))
    # steps 4 and 5 were redone with the same samples: the resumed run saw exactly the uninterrupted sequence
    assert seen_resumed[:3] + seen_resumed[5:] == seen_full
    assert seen_full[3:5] == seen_resumed[3:5]
    full = checkpoint.load(tmp_path / "full" / checkpoint.latest(_store(tmp_path / "full")))
    again = checkpoint.load(tmp_path / "resumed" / checkpoint.latest(_store(tmp_path / "resumed")))
    assert full["step"] == again["step"] == 8
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, again["model"][name]), name
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r][-3:] == [6, 7, 8]


def _store(path):
    from pipeline.storage import open_storage

    return open_storage(path)


def test_an_epoch_ends_when_data_ends_and_the_next_one_reshuffles(tmp_path):
    manifest = make_dataset(tmp_path / "data", [6, 6])
    orders = []
    cfg = config(manifest, tmp_path / "run", num_workers=0)
    cfg = TrainConfig(**{**cfg.__dict__, "max_steps": 0, "epochs": 2})
    result = Run(cfg).fit(on_step=lambda run, b: orders.append((run.epoch, tuple(b["uids"]))))
    assert result["epoch"] == 2 and result["step"] == 6  # 12 samples / batch 4 = 3 steps an epoch
    first = [u for e, b in orders if e == 0 for u in b]
    second = [u for e, b in orders if e == 1 for u in b]
    assert sorted(first) == sorted(second) and first != second


def test_ddp_with_torchrun_two_gloo_processes(tmp_path):
    manifest = make_dataset(tmp_path / "data", [8, 8, 8, 8])  # 2 shards a rank: 4 steps of 4 each
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pipeline", "-q", "train", "--data", str(manifest), "--out", str(out), "--nproc", "2",
           "--set", "max_steps=3", "--set", "loader.batch_size=4", "--set", "loader.num_workers=1",
           "--set", "loader.image_size=32", "--set", "vocab_size=300", "--set", "log_every=1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = checkpoint.load(out / checkpoint.latest(_store(out)))
    assert state["world"] == [2, 1] and state["step"] == 3
    assert len(state["data"]["positions"]) == 2  # one consumer per rank, both recorded
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # rank 0 alone writes metrics


def test_bf16_autocast_on_cpu_and_gradient_checkpointing_train(tmp_path):
    manifest = make_dataset(tmp_path / "data", [8])
    for kw in ({"precision": "bf16"}, {"grad_checkpointing": True}):
        run = Run(config(manifest, tmp_path / str(kw), num_workers=0, **kw))
        result = run.fit()
        assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    with pytest.raises(ClipError, match="fp16 needs CUDA"):
        Run(config(manifest, tmp_path / "fp16", num_workers=0, precision="fp16")).fit()


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clipline-checkpoint-ran",))


def test_a_tampered_checkpoint_is_refused_and_never_run(tmp_path):
    if os.path.exists("/tmp/clipline-checkpoint-ran"):
        os.remove("/tmp/clipline-checkpoint-ran")
    good = {"model": {"w": torch.ones(2)}, "step": 1}
    torch.save(good, tmp_path / "good.pt")
    assert checkpoint.load(tmp_path / "good.pt")["step"] == 1
    torch.save({"model": {"w": torch.ones(2)}, "hook": Payload()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not os.path.exists("/tmp/clipline-checkpoint-ran")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "junk.pt")


def test_superseded_manifest_and_changed_data_are_refused(tmp_path):
    manifest = make_dataset(tmp_path / "data", [8, 8])
    Run(config(manifest, tmp_path / "run", num_workers=0)).fit()
    from pipeline.takedown import takedown

    uid = _store(tmp_path / "data").read_parquet("shards/00000.parquet")["uid"][0].as_py()
    (tmp_path / "ids.txt").write_text(uid + "\n")
    takedown(str(manifest), str(tmp_path / "ids.txt"), reason="test")
    with pytest.raises(SupersededManifest):
        Run(config(tmp_path / "data" / "manifest.v1.json", tmp_path / "other", num_workers=0))
    with pytest.raises(ClipError, match="another version of the data"):
        Run(config(manifest, tmp_path / "run", num_workers=0))  # resuming on the new version


def test_streams_from_the_s3_endpoint_and_keeps_the_run_there(tmp_path, s3_store):
    manifest = make_dataset(tmp_path / "data", [8, 8])
    for path in sorted((tmp_path / "data").rglob("*")):
        if path.is_file():
            s3_store.put_file(path, f"data/{path.relative_to(tmp_path / 'data')}")
    out = f"{s3_store.uri}/run"
    cfg = config(f"{s3_store.uri}/data/manifest.json", out, num_workers=1)
    cfg = TrainConfig(**{**cfg.__dict__, "max_steps": 3, "save_every": 1, "keep_checkpoints": 2})
    seen = []
    Run(cfg).fit(on_step=lambda run, b: seen.append(b["uids"]))
    run_store = _store(out)
    state = checkpoint.load(run_store, checkpoint.latest(run_store))
    assert state["step"] == 3 and state["samples_seen"] == 12 and len(seen) == 3
    # saved in the background every step, the newest 2 kept; a new run resumes from the endpoint
    assert run_store.list("checkpoints", suffix=".pt") == [
        "checkpoints/step-00000002.pt",
        "checkpoints/step-00000003.pt",
    ]
    resumed = Run(replace(cfg, max_steps=4))
    assert resumed.step == 3
    resumed.fit()
    assert checkpoint.load(run_store, checkpoint.latest(run_store))["step"] == 4
    assert run_store.exists("tokenizer.json") and run_store.exists("metrics.jsonl")
    rows = [json.loads(x) for x in run_store.read_bytes("metrics.jsonl").decode().splitlines()]
    assert rows[-1]["step"] == 4 and 0 <= rows[-1]["data_wait"] <= 1 and rows[-1]["samples_seen"] == 16
    assert manifest.exists()


def test_local_runs_write_tensorboard_events(tmp_path):
    manifest = make_dataset(tmp_path / "data", [8])
    Run(config(manifest, tmp_path / "run", num_workers=0)).fit()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_fine_tuning_from_public_weights_learns_and_resumes(tmp_path):
    """train --init-from an OpenAI-named file: its architecture, tokenizer and image size; loss falls; resume works."""
    from tests.training.test_pretrained import hf_reference, openai_state_dict
    from training.checkpoint import load_model

    pytest.importorskip("transformers")
    torch.save(openai_state_dict(hf_reference(seed=2)), tmp_path / "ViT-tiny.pt")
    manifest = make_dataset(tmp_path / "data", [24, 24])
    tune = dict(init_from=str(tmp_path / "ViT-tiny.pt"), lr=2e-3, warmup_steps=1, save_every=6, epochs=3)
    base = config(manifest, tmp_path / "run", num_workers=0)
    run = Run(replace(base, **tune, max_steps=6))
    assert run.tokenizer.kind == "openai" and run.config.loader.image_size == 32
    assert run.model.config.activation == "quick_gelu" and run.model.config.vision_layers == 3
    start, _ = load_model(str(tmp_path / "ViT-tiny.pt"))
    expected = start.state_dict()
    assert run.model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in run.model.state_dict().items())
    run.fit()
    resumed = Run(replace(base, **tune, max_steps=30))
    assert resumed.step == 6  # the run's checkpoint wins over --init-from
    resumed.fit()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]  # fmt: skip
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    model, tokenizer = load_model(str(tmp_path / "run"))
    assert tokenizer.kind == "openai" and model.config.image_size == 32


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_accumulated_gradients_equal_one_big_batch(loss):
    """OpenCLIP's --accum-freq semantics: 4 micro-batches of 4 give the gradients of one batch of 16."""
    import contextlib
    import copy

    from training.loss import LOSSES
    from training.model import CLIP, model_config
    from training.trainer import accumulated_backward

    torch.manual_seed(0)
    model = CLIP(model_config("tiny", vocab_size=300, context_length=16, image_size=32), eot_id=2,
                 siglip=loss == "siglip")  # fmt: skip
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    text = torch.randint(3, 300, (16, 16))
    text[:, 0] = 1
    text[torch.arange(16), torch.randint(2, 16, (16,))] = 2
    grads = {}
    for name, parts in (("big", [(images, text)]), ("accumulated", [(images[i : i + 4], text[i : i + 4])
                                                                    for i in range(0, 16, 4)])):  # fmt: skip
        net = copy.deepcopy(model)
        value = accumulated_backward(net, LOSSES[loss], parts, contextlib.nullcontext, lambda x: x.backward())
        grads[name] = (value, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    (big_loss, big), (acc_loss, acc) = grads["big"], grads["accumulated"]
    assert big.keys() == acc.keys() and len(big) > 20
    assert abs(float(big_loss) - float(acc_loss)) < 1e-5
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-5, rtol=1e-4), name


def test_accumulation_steps_count_micro_batches_and_show_progress(tmp_path, capfd):
    manifest = make_dataset(tmp_path / "data", [16, 16])
    cfg = replace(config(manifest, tmp_path / "run", num_workers=0), accum_steps=2, max_steps=0, progress=True)
    run = Run(cfg)
    assert run.steps_per_epoch == 4  # 32 samples, batches of 4, 2 a step
    out = run.fit()
    assert out["step"] == 4 and run.samples_seen == 32
    err = capfd.readouterr().err
    assert "train epoch 0" in err and "samples/s" in err and "4/4" in err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "data_wait_ms_per_step" in rows[-1]


@pytest.mark.slow
def test_resume_onto_other_world_sizes_repeats_and_skips_nothing(tmp_path):
    """2 ranks x 2 workers, then 1 x 3, then 4 x 1 within one epoch (gloo processes): every sample is trained
    on at most once, and what was trained on plus what the last checkpoint has left is the whole epoch."""
    from collections import Counter

    import torch.multiprocessing as mp

    from pipeline import configio
    from tests.conftest import free_port
    from tests.training import ddp_workers
    from training.data import ManifestDataset, Unit, remaining_plan

    manifest = make_dataset(tmp_path / "data", [12, 12, 12, 12])
    base = replace(config(manifest, tmp_path / "run"), save_every=100, progress=False,
                   loader=DataConfig(batch_size=2, num_workers=2, image_size=32))  # fmt: skip
    seen: list[str] = []
    record = seen.extend
    for world, workers, steps in ((2, 2, 3), (1, 3, 6), (4, 1, 8)):
        cfg = replace(base, max_steps=steps, loader=replace(base.loader, num_workers=workers))
        if world == 1:
            Run(cfg).fit(on_step=lambda r, b: record(b["uids"]))
        else:
            args = (world, free_port(), json.dumps(configio.to_dict(cfg)), str(tmp_path))
            mp.spawn(ddp_workers.elastic_worker, args=args, nprocs=world, join=True)
            for rank in range(world):
                record(json.loads((tmp_path / f"seen-{world}-{rank}.json").read_text()))
        state = checkpoint.load(tmp_path / "run" / checkpoint.latest(_store(tmp_path / "run")))
        assert state["world"] == [world, workers] and state["step"] == steps and state["epoch"] == 0
    assert len(seen) == 3 * 2 * 2 + 3 * 2 + 2 * 4 * 2 == 34  # steps x ranks x batch, phase by phase
    assert not [u for u, n in Counter(seen).items() if n > 1]  # nothing repeated across the resizes
    # what the last checkpoint leaves: its plan, less what its consumers read
    after = ManifestDataset(open_manifest(str(manifest), base.loader), replace(base.loader, num_workers=1), None, 0,
                            4, 0, {"plan": state["data"]["plan"]})  # fmt: skip
    positions = {int(k): tuple(v) for k, v in state["data"]["positions"].items()}
    left = []
    for shard, start, stop, skip in remaining_plan(after.units(), positions):
        left += [key for key, _ in after.unit_samples(Unit(shard, start, stop), Counter())[skip:]]
    every = [u for s in range(4) for u in pq.read_table(tmp_path / "data" / "shards" / f"{s:05d}.parquet")["uid"]
             .to_pylist()]  # fmt: skip
    assert not set(seen) & set(left) and sorted(seen + left) == sorted(every)  # nothing skipped either
