"""Launch training (front door): here, over local DDP processes (torchrun), or over Ray Train workers.

The trainer knows nothing of evaluation; this is where the in-loop evaluator
(eval.run.evaluate, the code of `clipline eval`) is wired in, in every process
that trains. ``python -m pipeline.launch '{config json}'`` is the torchrun entry.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from eval.run import evaluate
from pipeline import configio
from pipeline.errors import ClipError
from training import trainer
from training.trainer import TrainConfig

log = logging.getLogger(__name__)


def train(config: TrainConfig) -> dict:
    """Run (or resume) training in this process, with in-loop evaluation as configured."""
    return trainer.train(config, evaluator=evaluate)


def launch(config: TrainConfig, nproc: int = 1, ray_workers: int = 0, address: str | None = None,
           wait_for_resources: bool = False) -> dict | None:  # fmt: skip
    """Train here, over `nproc` local DDP processes (torchrun), or over `ray_workers` Ray Train workers."""
    if ray_workers:
        return train_on_ray(config, ray_workers, address, wait_for_resources)
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline.launch", json.dumps(configio.to_dict(config))]  # fmt: skip
        done = subprocess.run(cmd, check=False)
        if done.returncode:
            raise ClipError(f"train: torchrun exited with status {done.returncode}")
        return {"processes": nproc, **trained(config.out)}
    return train(config)


TRAINER_CPUS = 1  # Ray Train's own trainer actor takes a CPU beside the workers'


def ray_needs(workers: int, use_gpu: bool) -> dict[str, float]:
    """What a TorchTrainer of `workers` asks the cluster for: a CPU (and a GPU) per worker, a CPU for itself."""
    needs = {"CPU": workers + TRAINER_CPUS}
    if use_gpu:
        needs["GPU"] = workers
    return needs


def check_resources(needs: dict[str, float], have: dict[str, float], wait: bool) -> str | None:
    """A one-line ClipError when the cluster can never run the job (no autoscaler: `wait` False); else the
    line to repeat while waiting for an autoscaler, or None when it fits."""
    short = {k: v for k, v in needs.items() if have.get(k, 0) < v}
    if not short:
        return None
    asked = ", ".join(f"{v:g} {k}" for k, v in needs.items())
    has = ", ".join(f"{have.get(k, 0):g} {k}" for k in needs)
    line = f"train: --ray-workers needs {asked} ({TRAINER_CPUS} CPU for Ray Train's trainer), the cluster has {has}"
    if not wait:
        raise ClipError(f"{line}: use fewer workers, or --ray-wait if an autoscaler will add nodes")
    return line


def train_on_ray(config: TrainConfig, workers: int, address: str | None, wait: bool = False) -> dict:
    """DDP over Ray Train's TorchTrainer: Ray starts the workers and the process group; the loop is `train`.

    Before it starts, what the workers ask for is compared with what the cluster has: without an
    autoscaler (`wait` False) a job that can never be placed fails at once in one line; with one,
    that line is logged every 30 s until the nodes arrive. Ray Train's own storage is the run
    directory's `ray-train/`: on s3:// every node reaches it; a local run directory must be on a shared
    file system for a multi-node job.
    """
    import threading

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    needs = ray_needs(workers, use_gpu)
    waiting = check_resources(needs, ray.cluster_resources(), wait)
    started, done = time.time(), threading.Event()

    def report() -> None:
        while not done.wait(30):
            line = check_resources(needs, ray.cluster_resources(), True)
            if line is None:
                return
            log.warning("%s; waiting for nodes, %.0f s so far", line, time.time() - started)

    if waiting:
        log.warning("%s; waiting for nodes", waiting)
        threading.Thread(target=report, daemon=True).start()
    out = config.out.rstrip("/")
    storage = f"{out}/ray-train" if out.startswith("s3://") else str(Path(out).resolve() / "ray-train")
    ray_trainer = TorchTrainer(
        _ray_loop,
        train_loop_config=configio.to_dict(config),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"clipline-{os.getpid()}", storage_path=storage),
    )
    try:
        ray_trainer.fit()
    finally:
        done.set()
    return {"workers": workers, **trained(config.out)}


def trained(out: str) -> dict:
    """What a training in other processes did, for the caller: the step of the run's latest checkpoint, and the
    epoch and loss of its last metrics line."""
    from pipeline.storage import open_storage
    from training.checkpoint import LATEST

    run = open_storage(out)
    found = {}
    if run.exists("metrics.jsonl"):
        rows = [json.loads(x) for x in run.read_bytes("metrics.jsonl").decode().splitlines() if x.strip()]
        last = next((r for r in reversed(rows) if "loss" in r), {})
        found = {k: last[k] for k in ("step", "epoch", "loss") if k in last}
    if run.exists(LATEST):
        found["step"] = run.read_json(LATEST)["step"]
    return found


def _ray_loop(config_dict: dict) -> None:
    train(configio.from_dict(TrainConfig, config_dict))


if __name__ == "__main__":  # torchrun entry: python -m pipeline.launch '{config json}'
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(configio.from_dict(TrainConfig, json.loads(sys.argv[1])))
