"""`clipline train`: CLIP pretraining from manifest shards, single process, torchrun DDP or Ray Train.

The loop, phase by phase: set up (distributed, device, tokenizer, model,
optimiser, schedule, resume) → per epoch, stream batches and step → log, save,
evaluate on schedule. Everything a resumed run needs is in the checkpoint:
model, optimiser, scheduler, scaler, step and the data position of every
data consumer, so a killed run resumes exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal

import torch
import torch.distributed as dist

from pipeline.errors import ClipError
from pipeline.storage import open_storage
from training import checkpoint
from training.data import (
    DataConfig,
    ManifestDataset,
    loader,
    manifest_captions,
    next_worker,
    open_manifest,
    remaining_plan,
)
from training.loss import LOSSES
from training.model import CLIP, model_config
from training.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# (model, tokenizer, tasks, datasets, device) -> eval.json-shaped results; eval.run.evaluate is the one clipline uses.
# It is passed in, not imported: evaluation sits above training (docs/design.md, "Layers").
Evaluator = Callable[..., dict]


@dataclass(frozen=True)
class TrainConfig:
    """A training run. `data` is a manifest (local or s3://); `out` the run directory."""

    data: str = ""  # the dataset's manifest.json (local or s3://)
    out: str = "train"  # the run directory (local or s3://): checkpoints, metrics, tokenizer
    model: str = "tiny"  # a training.model.SIZES name (ignored with init_from: the checkpoint's architecture)
    # fine-tune: start from this checkpoint's weights, tokenizer and image size (a clipline run or .pt, an
    # OpenAI/OpenCLIP file or directory, a Hugging Face CLIPModel directory; local or s3://)
    init_from: str | None = None
    loss: Literal["clip", "siglip"] = "clip"  # clip: symmetric InfoNCE; siglip: SigLIP's sigmoid loss
    epochs: int = 1  # passes over the dataset
    max_steps: int = 0  # stop after this many steps in all (0: epochs decide)
    lr: float = 5e-4  # peak learning rate (AdamW), after warmup; cosine decay by step
    weight_decay: float = 0.2  # AdamW; none on gains, biases, embeddings and the logit scale
    warmup_steps: int = 20  # linear warmup
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW
    eps: float = 1e-6  # AdamW
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    # micro-batches per optimiser step (OpenCLIP's --accum-freq): the loss sees all of them as negatives
    accum_steps: int = 1
    progress: bool = True  # a progress bar on rank 0 (samples/s, loss, ETA); off in logs and tests
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: autocast on CPU or CUDA; fp16: CUDA + scaler
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto: cuda when present, else cpu
    vocab_size: int = 4096  # of the BPE tokenizer trained on the captions at the first run
    context_length: int = 32  # tokens per caption, the end token included
    seed: int = 0  # model initialisation
    log_every: int = 10  # steps between metrics.jsonl lines
    save_every: int = 200  # steps; a checkpoint is also saved at the end of every epoch
    keep_checkpoints: int = 3  # the newest checkpoints kept in RUN/checkpoints (local or s3://)
    eval_every: int = 0  # steps; 0 = only at the end
    eval_tasks: tuple[str, ...] = ()  # "zeroshot", "retrieval", "linear" (eval/run.py)
    eval_datasets: tuple[str, ...] = ()  # "heldout=DIR", "fashion-mnist", an image folder, a manifest.json
    loader: DataConfig = field(default_factory=DataConfig)


# --- set-up ---------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_have(self, have: bool, device) -> bool:
        """True only if every rank has a batch: ranks stop an epoch together, never hang (R3)."""
        if self.world_size == 1:
            return have
        flag = torch.tensor([1 if have else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


def init_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun or Ray Train set up (env RANK/WORLD_SIZE); gloo on CPU, nccl on CUDA."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist()
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(config: TrainConfig, ctx: Dist) -> torch.device:
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ClipError("train: device 'cuda' asked for, but no CUDA device is available")
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return torch.device(kind)


def ensure_tokenizer(config: TrainConfig, run, manifest, ctx: Dist, given: Tokenizer | None = None) -> Tokenizer:
    """The run's tokenizer: loaded from RUN/tokenizer.json, or (rank 0 first) the `given` one of the checkpoint
    it fine-tunes, or one trained on the captions."""
    if ctx.main and not run.exists("tokenizer.json"):
        tokenizer = given or Tokenizer.train(manifest_captions(manifest), config.vocab_size, config.context_length)
        run.write_bytes("tokenizer.json", tokenizer.to_bytes())
    ctx.barrier()
    return Tokenizer.from_bytes(run.read_bytes("tokenizer.json"))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices and conv kernels only, not on gains, biases, embeddings, scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "token" in name or name.endswith((".pos", "cls")) or "logit_" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def schedule(warmup: int, total: int):
    """Linear warmup then cosine decay to 0, by step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def autocast(config: TrainConfig, device: torch.device):
    if config.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- the run ------------------------------------------------------------------------------------------


def accumulated_backward(net, loss_fn, inputs: list, autocast_ctx, backward) -> torch.Tensor:
    """Gradients of the contrastive loss over all micro-batches in `inputs` [(images, text), ...] taken together,
    with activations for one micro-batch at a time (OpenCLIP's --accum-freq); returns the loss.

    First every micro-batch's features without gradients; then, micro-batch by micro-batch, its
    features again with gradients, the loss over the whole accumulated batch (the others' features
    as constants) and a backward. The sum of those backwards is the big batch's gradient: each
    feature's gradient comes from the pass that recomputes it, and the temperature (and SigLIP bias)
    takes its gradient in the last pass only. Under DDP the gradients are reduced once, at the last.
    """
    if len(inputs) == 1:
        with autocast_ctx():
            image_f, text_f, scale, bias = net(*inputs[0])
            loss = loss_fn(image_f, text_f, scale, bias)
        backward(loss)
        return loss.detach()
    with torch.no_grad(), autocast_ctx():
        cached = [net(images, text)[:2] for images, text in inputs]
    last = len(inputs) - 1
    for j, (images, text) in enumerate(inputs):
        sync = contextlib.nullcontext() if j == last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast_ctx():
                image_j, text_j, scale, bias = net(images, text)
                if j != last:
                    scale, bias = scale.detach(), None if bias is None else bias.detach()
                image_f = torch.cat([image_j if i == j else c[0] for i, c in enumerate(cached)])
                text_f = torch.cat([text_j if i == j else c[1] for i, c in enumerate(cached)])
                loss = loss_fn(image_f, text_f, scale, bias)
            backward(loss)
    return loss.detach()


class Run:
    """One training run: everything set up, then `fit()`."""

    def __init__(self, config: TrainConfig, evaluator: Evaluator | None = None):
        if not config.data:
            raise ClipError("train: --data MANIFEST is required")
        if config.eval_tasks and evaluator is None:
            raise ClipError("train: eval_tasks need an evaluator (clipline train wires in eval.run.evaluate)")
        self.config = config
        self.evaluator = evaluator
        self.ctx = init_distributed(
            "cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        )
        self.device = pick_device(config, self.ctx)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ClipError("train: precision fp16 needs CUDA (use bf16 on CPU)")
        self.run = open_storage(config.out)
        start = checkpoint.load_model(config.init_from) if config.init_from else None
        if start is not None:  # the checkpoint decides the input size: its preprocessing, not the loader default's
            config = replace(config, loader=replace(config.loader, image_size=start[0].config.image_size))
            self.config = config
        self.manifest = open_manifest(config.data, config.loader)
        self.tokenizer = ensure_tokenizer(config, self.run, self.manifest, self.ctx, start[1] if start else None)
        torch.manual_seed(config.seed)
        if start is None:
            mc = model_config(
                config.model,
                vocab_size=self.tokenizer.vocab_size,
                context_length=config.context_length,
                image_size=config.loader.image_size,
                grad_checkpointing=config.grad_checkpointing,
            )
        else:
            mc = replace(start[0].config, grad_checkpointing=config.grad_checkpointing)
        self.model = CLIP(mc, eot_id=self.tokenizer.eot_id, siglip=config.loss == "siglip").to(self.device)
        if start is not None:
            self._init_from(start[0])
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps
        )
        if config.accum_steps < 1:
            raise ClipError(f"train: accum_steps must be >= 1, not {config.accum_steps}")
        global_batch = config.loader.batch_size * self.ctx.world_size * config.accum_steps
        self.steps_per_epoch = max(1, self.manifest.data["num_samples"] // global_batch)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, schedule(config.warmup_steps, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.step, self.epoch, self.data_state, self.samples_seen = 0, 0, {}, 0
        self.counts: dict[str, int] = {}
        self._metrics: bytes | None = None
        self.last_loss = float("nan")
        self._tb = None
        self.saver = checkpoint.BackgroundSaver(self.run, config.keep_checkpoints)
        self._resume()
        self.net = self.model
        if config.compile:
            self.net = torch.compile(self.net)
        if self.ctx.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.loss_fn = LOSSES[config.loss]

    # -- checkpoints

    def _init_from(self, source: torch.nn.Module) -> None:
        """Copy a loaded checkpoint's weights in; a SigLIP loss on a CLIP checkpoint starts its bias at -10."""
        result = self.model.load_state_dict(source.state_dict(), strict=False)
        extra = [k for k in (*result.missing_keys, *result.unexpected_keys) if k != "logit_bias"]
        if extra:
            raise ClipError(f"train: --init-from {self.config.init_from}: weights do not fit ({extra[0]})")
        if self.ctx.main:
            log.info("initialised from %s (%d parameters)", self.config.init_from, self.model.describe()["parameters"])

    def _resume(self) -> None:
        rel = checkpoint.latest(self.run)
        if rel is None:
            return
        state = checkpoint.load(self.run, rel, map_location=str(self.device))
        if state["manifest_sha256"] != self.manifest.sha256():
            raise ClipError(
                f"train: {self.run.url(rel)} was trained on another version of the data "
                f"(manifest changed, e.g. by a takedown); start a new run directory"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.data_state = state["step"], state["epoch"], state["data"]
        self.samples_seen = int(state.get("samples_seen", 0))
        self.counts = dict(state.get("counts", {}))
        now = [self.ctx.world_size, self.config.loader.num_workers]
        if state["world"] != now:
            self.data_state = self._replan(state["world"], self.data_state)
        if self.ctx.main:
            log.info("resumed from %s at step %d (epoch %d)", rel, self.step, self.epoch)

    def _replan(self, world: list[int], data: dict) -> dict:
        """The data state of a run resumed onto another world size: the rest of the epoch as units with what was
        trained on skipped, dealt afresh to this run's ranks x workers (training/data.py `remaining_plan`)."""
        before = ManifestDataset(self.manifest, self.config.loader, None, 0, world[0], self.epoch,
                                 {"plan": data.get("plan")})  # fmt: skip
        before.workers = max(1, world[1])
        positions = {int(k): tuple(v) for k, v in data.get("positions", {}).items()}
        plan = remaining_plan(before.units(), positions) if positions or data.get("plan") else None
        if self.ctx.main:
            left = "the epoch from its start" if plan is None else f"{len(plan)} units of the epoch left"
            log.info("resuming %d x %d (ranks x workers) as %d x %d: %s", *world, self.ctx.world_size,
                     self.config.loader.num_workers, left)  # fmt: skip
        return {} if plan is None else {"plan": plan, "positions": {}, "next_worker": [0] * self.ctx.world_size}

    def save(self, positions: dict, next_workers: int, epoch_done: bool) -> None:
        """Gather every rank's data position; rank 0 writes the checkpoint."""
        mine = {"positions": {str(k): list(v) for k, v in positions.items()}, "next_worker": next_workers}
        everyone = [mine]
        if self.ctx.world_size > 1:
            everyone = [None] * self.ctx.world_size
            dist.all_gather_object(everyone, mine)
        if not self.ctx.main:
            return
        data = {"positions": {}, "next_worker": [r["next_worker"] for r in everyone]}
        if (self.data_state or {}).get("plan") is not None:  # the epoch continues a plan made on a resize
            data["plan"] = self.data_state["plan"]
        for r in everyone:
            data["positions"].update(r["positions"])
        if epoch_done:
            data = {"positions": {}, "next_worker": [0] * self.ctx.world_size}
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "epoch": self.epoch + 1 if epoch_done else self.epoch,
            "data": data,
            "counts": self.counts,
            "world": [self.ctx.world_size, self.config.loader.num_workers],
            "manifest_sha256": self.manifest.sha256(),
            "model_config": asdict(self.model.config),
            "train_config": json.dumps(asdict(self.config), default=str),
        }
        self.saver.save(state, self.step)  # written and uploaded in the background

    # -- the loop

    def train_step(self, batch: dict | list[dict]) -> float:
        """One optimiser step over a batch, or over a group of micro-batches accumulated as one batch."""
        group = batch if isinstance(batch, list) else [batch]
        inputs = [
            (b["images"].to(self.device, non_blocking=True), b["text"].to(self.device, non_blocking=True))
            for b in group
        ]
        self.optimizer.zero_grad(set_to_none=True)
        backward = (lambda loss: self.scaler.scale(loss).backward()) if self.scaler else (lambda loss: loss.backward())
        precision = lambda: autocast(self.config, self.device)  # noqa: E731
        loss = accumulated_backward(self.net, self.loss_fn, inputs, precision, backward)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def fit(self, on_step=None) -> dict:
        """Train to the configured end; returns the last metrics. `on_step(run, batch)` is a test hook."""
        last: dict = {}
        try:
            while self.epoch < self.config.epochs and not self._done():
                finished, last = self.run_epoch(on_step)
                if not finished:
                    break
        finally:
            self.saver.wait()  # the last checkpoint is complete before fit returns or raises
        final = self.evaluate() if self.config.eval_tasks else {}
        return {**last, **final, "loss": self.last_loss, "step": self.step, "epoch": self.epoch}

    def run_epoch(self, on_step=None) -> tuple[bool, dict]:
        """Stream this epoch's batches (from the resumed position) and step; True when the data ran out."""
        config, state, last = self.config, self.data_state or {}, {}
        workers = max(1, config.loader.num_workers)
        rank_state = {
            "plan": state.get("plan"),
            "positions": state.get("positions", {}),
            "next_worker": (state.get("next_worker") or [0] * self.ctx.world_size)[self.ctx.rank],
        }
        dataset = ManifestDataset(
            self.manifest, config.loader, self.tokenizer, self.ctx.rank, self.ctx.world_size, self.epoch, rank_state
        )
        positions, next_w = dict(dataset.positions), dataset.rotation
        batches, started, seen, finished = iter(loader(dataset)), time.time(), 0, False
        sync_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        waited = 0.0  # seconds spent waiting for data since the epoch (or resume) started
        bar, first_step = self.progress_bar(), self.step
        while not self._done():
            asked, group = time.time(), []
            while len(group) < config.accum_steps:  # one batch, or the micro-batches of one accumulated step
                batch = next(batches, None)
                while batch is not None and not batch["uids"]:  # bookkeeping only: fault counts at a stream's end
                    self._account(batch, positions)
                    next_w = next_worker(batch["consumer"], workers)
                    batch = next(batches, None)
                if not self.ctx.all_have(batch is not None, sync_device):
                    finished = True
                    break
                group.append(batch)
            waited += time.time() - asked
            if not group:  # an epoch that ends inside a group still steps on the micro-batches it has
                break
            loss = self.last_loss = self.train_step(group)
            self.step += 1
            for batch in group:
                seen += len(batch["uids"])
                self.samples_seen += len(batch["uids"]) * self.ctx.world_size
                self._account(batch, positions)
                next_w = next_worker(batch["consumer"], workers)
                if on_step:
                    on_step(self, batch)
            elapsed = max(1e-9, time.time() - started)
            rate = seen * self.ctx.world_size / elapsed
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.3f}", "samples/s": f"{rate:.1f}"}, refresh=False)
            if self.step % config.log_every == 0 or self.step == 1:
                last = self.log(
                    {
                        "loss": loss,
                        "samples_per_s": round(rate, 1),
                        "data_wait": round(waited / elapsed, 3),
                        "data_wait_ms_per_step": round(1000 * waited / max(1, self.step - first_step), 2),
                    }  # fmt: skip
                )
            if config.eval_every and self.step % config.eval_every == 0:
                last.update(self.evaluate())
            if config.save_every and self.step % config.save_every == 0:
                self.save(positions, next_w, epoch_done=False)
            if finished:  # the data ran out inside an accumulation group, which has just been stepped
                break
        bar.close()
        self.save(positions, next_w, epoch_done=finished)
        if finished:
            self.epoch += 1
            self.data_state = {}
        return finished, last

    def progress_bar(self):
        """The stages' kind of bar for the steps: samples/s, loss and an ETA, on rank 0 only."""
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"train epoch {self.epoch}",
            unit="step",
            disable=not (self.config.progress and self.ctx.main),
            file=sys.stderr,
            mininterval=1.0,
            dynamic_ncols=True,
        )

    def _account(self, batch: dict, positions: dict) -> None:
        positions[batch["consumer"]] = batch["position"]
        for k, v in batch["counts"].items():
            self.counts[k] = self.counts.get(k, 0) + v

    def _done(self) -> bool:
        return bool(self.config.max_steps) and self.step >= self.config.max_steps

    def log(self, metrics: dict) -> dict:
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": float(self.model.logit_scale.detach().exp()),
            **metrics,
            "data": dict(self.counts),
            "time": round(time.time(), 3),
        }
        if self.ctx.main:
            if self._metrics is None:  # the lines of earlier (resumed) sessions come first
                self._metrics = self.run.read_bytes("metrics.jsonl") if self.run.exists("metrics.jsonl") else b""
            self._metrics += (json.dumps(row) + "\n").encode()
            self.run.write_bytes("metrics.jsonl", self._metrics)  # whole-object writes: works on s3:// too
            self._tensorboard(row)
            if "loss" in metrics:  # a training step's line (an eval's row is in metrics.jsonl and TensorBoard)
                log.info(
                    "step %d loss %.4f lr %.2e %.0f samples/s",
                    self.step,
                    metrics["loss"],
                    row["lr"],
                    metrics.get("samples_per_s", 0),
                )
        return row

    def _tensorboard(self, row: dict) -> None:
        """Scalars to RUN_DIR/tensorboard (local run directories; on s3:// metrics.jsonl is the record)."""
        if self.run.url().startswith("s3://"):
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=self.run.url("tensorboard"))
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("step", "time"):
                self._tb.add_scalar(f"train/{key}", value, self.step)
            elif key == "eval":
                for task, by_set in value.items():
                    for name, metrics in by_set.items() if isinstance(by_set, dict) else ():
                        for metric, v in metrics.items():
                            if isinstance(v, float):
                                self._tb.add_scalar(f"eval/{task}/{name}/{metric}", v, self.step)
        self._tb.flush()

    def evaluate(self) -> dict:
        """The offline evaluators on the configured tasks, run in the loop (the evaluator `clipline eval` uses)."""
        if not self.config.eval_tasks or not self.ctx.main:
            return {}
        was_training = self.model.training
        results = self.evaluator(
            self.model,
            self.tokenizer,
            self.config.eval_tasks,
            self.config.eval_datasets,
            self.device,
            progress=self.config.progress,
        )
        self.model.train(was_training)
        self.log({"eval": results})
        return {"eval": results}


def train(config: TrainConfig, evaluator: Evaluator | None = None) -> dict:
    """Run (or resume) training; returns the final metrics. Launchers (torchrun, Ray Train) are in pipeline.launch."""
    run = Run(config, evaluator)
    if run.ctx.main:
        run.run.write_bytes("config.json", json.dumps(asdict(run.config), indent=1, default=str).encode())
    try:
        return run.fit()
    finally:
        if run.ctx.world_size > 1 and dist.is_initialized():
            dist.barrier()
