"""Launch training (front door): here, over local DDP processes (torchrun), or over Ray Train workers.

The trainer knows nothing of evaluation; this is where the in-loop evaluator
(eval.run.evaluate, the code of `clipline eval`) is wired in, in every process
that trains. ``python -m pipeline.launch '{config json}'`` is the torchrun entry.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from eval.run import evaluate
from pipeline import configio
from pipeline.errors import ClipError
from training import trainer
from training.trainer import TrainConfig


def train(config: TrainConfig) -> dict:
    """Run (or resume) training in this process, with in-loop evaluation as configured."""
    return trainer.train(config, evaluator=evaluate)


def launch(config: TrainConfig, nproc: int = 1, ray_workers: int = 0, address: str | None = None) -> dict | None:
    """Train here, over `nproc` local DDP processes (torchrun), or over `ray_workers` Ray Train workers."""
    if ray_workers:
        return train_on_ray(config, ray_workers, address)
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline.launch", json.dumps(configio.to_dict(config))]  # fmt: skip
        done = subprocess.run(cmd, check=False)
        if done.returncode:
            raise ClipError(f"train: torchrun exited with status {done.returncode}")
        return None
    return train(config)


def train_on_ray(config: TrainConfig, workers: int, address: str | None) -> dict:
    """DDP over Ray Train's TorchTrainer: Ray starts the workers and the process group; the loop is `train`."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    ray_trainer = TorchTrainer(
        _ray_loop,
        train_loop_config=configio.to_dict(config),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"clipline-{os.getpid()}", storage_path=tempfile.mkdtemp(prefix="clipline-ray-train-")
        ),
    )
    ray_trainer.fit()
    return {"workers": workers}


def _ray_loop(config_dict: dict) -> None:
    train(configio.from_dict(TrainConfig, config_dict))


if __name__ == "__main__":  # torchrun entry: python -m pipeline.launch '{config json}'
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(configio.from_dict(TrainConfig, json.loads(sys.argv[1])))
