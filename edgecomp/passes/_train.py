"""The one training loop every torch pass uses (distillation, pruning recovery, sharing recovery).

It runs unchanged in one process (a build) and under `torchrun --nproc_per_node N` (each rank
one process, gloo on CPU): with several ranks the model is wrapped in DistributedDataParallel and
gradients are averaged. Rank r owns the same samples every epoch (r, r + N, r + 2N, ...; the last
ones repeated so every rank has as many), in a new seeded order each epoch: a rank's teacher cache
(the distiller's) then serves its whole shard from the second epoch on, where a sampler that
reshuffles samples across ranks (DistributedSampler) leaves half of each epoch uncached. One
process is the case N = 1: its order is the seeded permutation of all samples.

Determinism and resume: the order of epoch e is a seeded permutation (seed + e); the global
`batch_size` is split over ranks; a checkpoint holds the trainable weights, optimizer, schedule,
step, RNG state and loss curve, written by rank 0 at the end of every epoch (and at the last
step). Resuming loads it and skips the batches already done, so a resumed run continues from
the saved step and ends where an uninterrupted run would.

Schedule: AdamW, linear warm-up over `warmup` of the steps, then linear decay to zero.

Precision: `precision="bf16"` runs the forward (and so the backward) under CPU autocast to bfloat16,
with fp32 master weights and optimizer; about 1.6x faster per step on CPUs with native bf16
(AVX512-BF16, AMX) and much slower on others, so "auto" takes bf16 only where the CPU has it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecomp.errors import UsageError

CHECKPOINT_SCHEMA = "edgecomp.train-checkpoint/1"
PRECISIONS = ("fp32", "bf16", "auto")  # TrainConfig.precision


@dataclass
class TrainConfig:
    epochs: int = 3
    steps: int = 0  # > 0: stop after this many optimizer steps (epochs then only bound the data order)
    batch_size: int = 32  # global: each of N ranks takes batch_size // N
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.06
    clip: float = 1.0
    seed: int = 0
    checkpoint_dir: Path | None = None
    resume: Path | None = None
    keep_checkpoints: bool = False  # True: also keep step-N.pt beside last.pt (rewritten every epoch)
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 where the CPU computes it natively)


@dataclass
class TrainResult:
    steps: int
    epochs_done: float
    start_step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step, mean over ranks
    parts: dict[str, float] = field(default_factory=dict)  # mean of each loss term over the last epoch
    checkpoints: list[str] = field(default_factory=list)
    world_size: int = 1
    resumed_world_size: int = 1  # the ranks that trained the checkpoint this run resumed from
    precision: str = "fp32"  # what the forward ran in (auto resolved)
    seconds: float = 0.0  # wall-clock seconds of training, this run plus the runs it resumed
    cpu_seconds: float = 0.0  # CPU seconds (all threads) of this process, likewise


def world() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Start the gloo process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return world()


def resolve_precision(precision: str) -> str:
    """fp32 or bf16 for a TrainConfig.precision; "auto" is bf16 only where oneDNN computes it natively."""
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"precision must be fp32, bf16 or auto, not {precision!r}")
    if precision == "auto":
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return "bf16" if native else "fp32"
    return precision


def train(model: Any, data: dict[str, Any], cfg: TrainConfig, *,
          after_step: Callable[[], None] | None = None, lengths: Any = None,
          progress: Callable[[str], None] | None = None, label: str = "train") -> TrainResult:
    """Minimise `model(batch) -> (loss, parts)` over `data` (tensors sharing their first axis).

    `model` holds the trainable parameters (a frozen teacher must not be registered in it);
    `after_step` runs after every optimizer step (e.g. re-applying pruning masks); `lengths`
    (tokens per sample) turns on length bucketing: each window of 8 batches of the epoch's
    permutation is sorted by length before it is cut into batches, so little padding is computed.
    """
    import time

    import torch
    import torch.distributed as dist

    t0, c0 = time.perf_counter(), time.process_time()
    rank, size = world()
    n = len(next(iter(data.values())))
    if n == 0:
        raise UsageError(f"{label}: no training data")
    per_rank = max(1, cfg.batch_size // size)
    torch.manual_seed(cfg.seed + rank)
    shard = _shard(n, rank, size)
    per_epoch = math.ceil(len(shard) / per_rank)
    total = cfg.steps if cfg.steps > 0 else cfg.epochs * per_epoch
    epochs = math.ceil(total / per_epoch)

    net = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, find_unused_parameters=True)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))

    result = TrainResult(steps=0, epochs_done=0.0, start_step=0, world_size=size,
                         precision=resolve_precision(cfg.precision))
    bf16 = result.precision == "bf16"
    step = 0
    if cfg.resume is not None:
        step = _load_checkpoint(Path(cfg.resume), model, opt, sched, result, label)
        result.start_step = step
        if step > total:
            raise UsageError(f"{label}: checkpoint {cfg.resume} is at step {step}, the run has only {total} steps")
        # step == total: a finished run; its weights are the result and nothing more is trained
        if step == total:
            result.world_size = result.resumed_world_size

    bar = _Progress(label, total, step, progress if rank == 0 else None, enabled=rank == 0)
    model.train()
    parts_sum: dict[str, float] = {}
    parts_n = 0
    try:
        for epoch in range(step // per_epoch, epochs):
            batches = _batches(_epoch_order(shard, cfg.seed + epoch), lengths, per_rank, cfg.seed + epoch)
            parts_sum, parts_n = {}, 0
            for b in range(per_epoch):
                if epoch * per_epoch + b < step:
                    continue  # done before the checkpoint we resumed from
                if step >= total:
                    break
                idx = torch.tensor(batches[b])
                batch = {k: v[idx] for k, v in data.items()}
                if hasattr(model, "set_progress"):
                    model.set_progress(step / total)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss, parts = net(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                sched.step()
                if after_step is not None:
                    after_step()
                step += 1
                value = loss.detach().clone()
                if size > 1:
                    dist.all_reduce(value)
                    value /= size
                result.losses.append(float(value))
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
                parts_n += 1
                bar.update(step, epoch, float(value))
            if step == total or step % per_epoch == 0:
                result.checkpoints += _save_checkpoint(cfg, model, opt, sched, step, epoch, result, rank, label, t0, c0)
            if step >= total:
                break
    finally:
        bar.close()
        model.eval()
    if size > 1:
        dist.barrier()
    result.steps = step
    result.epochs_done = round(step / per_epoch, 3)
    result.parts = {k: round(v / max(1, parts_n), 6) for k, v in parts_sum.items()}
    result.seconds = round(result.seconds + time.perf_counter() - t0, 3)
    result.cpu_seconds = round(result.cpu_seconds + time.process_time() - c0, 3)
    return result


def _shard(n: int, rank: int, size: int) -> list[int]:
    """The samples rank `rank` of `size` owns every epoch: every size-th one from `rank`, padded with the
    shard's first samples to ceil(n / size), so all ranks take the same number of steps."""
    shard = list(range(rank, n, size))
    want = -(-n // size)
    return shard + shard[:want - len(shard)]


def _epoch_order(shard: list[int], seed: int) -> list[int]:
    """The shard in epoch order: a permutation seeded by seed + epoch (for one rank, the order
    DistributedSampler(shuffle=True) gives, so single-process runs are unchanged)."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return [shard[i] for i in torch.randperm(len(shard), generator=g).tolist()]


def _batches(order: list[int], lengths: Any, batch: int, seed: int) -> list[list[int]]:
    """Cut the epoch's order into batches; with lengths, sort each window of 8 batches by length
    first and shuffle the batches afterwards (seeded), so a batch holds samples of similar length."""
    if lengths is None or batch < 2:
        return [order[b:b + batch] for b in range(0, len(order), batch)]
    import random

    window = 8 * batch
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: int(lengths[i]))
        batches += [chunk[b:b + batch] for b in range(0, len(chunk), batch)]
    random.Random(seed).shuffle(batches)
    return batches


def _save_checkpoint(cfg: TrainConfig, model: Any, opt: Any, sched: Any, step: int, epoch: int,
                     result: TrainResult, rank: int, label: str, t0: float, c0: float) -> list[str]:
    import time

    import torch

    if cfg.checkpoint_dir is None or rank != 0:
        return []
    folder = Path(cfg.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"schema": CHECKPOINT_SCHEMA, "label": label, "step": step, "epoch": epoch,
             "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": torch.get_rng_state(), "losses": list(result.losses),
             "world_size": result.world_size, "seconds": result.seconds + time.perf_counter() - t0, "cpu_seconds": result.cpu_seconds + time.process_time() - c0,
             "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}
    tmp = folder / f".tmp-{os.getpid()}.pt"
    torch.save(state, tmp)
    written = []
    if cfg.keep_checkpoints:
        import shutil

        shutil.copyfile(tmp, folder / f"step-{step:06d}.pt")
        written.append(str(folder / f"step-{step:06d}.pt"))
    tmp.replace(folder / "last.pt")
    return written + [str(folder / "last.pt")]


def _load_checkpoint(path: Path, model: Any, opt: Any, sched: Any, result: TrainResult, label: str) -> int:
    import torch

    if not path.is_file():
        raise UsageError(f"{label}: resume checkpoint {path} does not exist")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a checkpoint is data: never unpickle code from it
        raise UsageError(f"{label}: {path} is not a readable checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        raise UsageError(f"{label}: {path} is not an edgecomp training checkpoint")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UsageError(f"{label}: {path} was saved for a different student ({str(e).splitlines()[0][:160]})") from None
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    result.losses = list(state["losses"])
    result.seconds, result.cpu_seconds = float(state.get("seconds", 0.0)), float(state.get("cpu_seconds", 0.0))
    result.resumed_world_size = int(state.get("world_size", 1))
    return int(state["step"])


class _Progress:
    """A rich progress bar on stderr when it is a terminal; else the pipeline's status line, throttled."""

    def __init__(self, label: str, total: int, done: int, callback: Callable[[str], None] | None, enabled: bool) -> None:
        self.label, self.total, self.callback = label, total, callback
        self.bar = None
        self.task = None
        self.last = 0.0
        if enabled and callback is None and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=done, info="")

    def update(self, step: int, epoch: int, loss: float) -> None:
        import time

        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=f"epoch {epoch + 1} loss {loss:.4f}")
        elif self.callback is not None and (time.monotonic() - self.last > 0.5 or step == self.total):
            self.last = time.monotonic()
            self.callback(f"{self.label}: step {step}/{self.total}, epoch {epoch + 1}, loss {loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
