"""What the torch-level compression passes share: counting, sizes, FLOPs, finding the transformer
inside a wrapper, and the record every pass appends to the model's history.

Counts are over *unique* parameters (a Parameter reused by several layers counts once), so a
shared-weights model reports the storage it really needs. FLOPs are multiply-accumulates of
Linear and Conv layers measured with forward hooks on one real input (attention's two batched
matmuls are not modules and are not counted: the figure is labelled `linear_conv_macs`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle
from edgecomp.passes import choice
from edgecomp.passes._train import PRECISIONS

CURVE_POINTS = 200  # loss curves in records are downsampled to at most this many points


@dataclass(frozen=True)
class Recovery:
    """Options every shrinking pass shares: a recovery fine-tune by distillation from the model as it
    was before the pass (0 epochs and 0 steps: none)."""

    recover_epochs: int = 0
    recover_steps: int = 0
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = -1  # -1: the build's seed
    checkpoint_dir: str = ""
    # the distillation loss of the fine-tune (weights as in the distill pass; kd for classifiers)
    embed_cos: float = 1.0
    relation: float = 1.0
    hidden: float = 1.0
    augment: float = 0.0  # share of token samples rewritten per batch for the teacher to label
    precision: str = "fp32"  # the fine-tune's forward: fp32 | bf16 | auto (bf16 where the CPU has it natively)
    dropout: float = 0.0  # the model's dropout during the fine-tune (-1: its own)

    def __post_init__(self) -> None:
        """The fine-tune's options are checked when the pass is parsed, not when training starts after the
        pass's own work (a typo must not cost the pruning or factorizing before it)."""
        if self.recover_epochs < 0 or self.recover_steps < 0:
            raise ValueError("recover_epochs and recover_steps must be >= 0")
        check_training(self.batch_size, self.lr, self.augment, self.dropout, self.precision)

    @property
    def tunes(self) -> bool:
        """Whether the pass fine-tunes after shrinking."""
        return self.recover_epochs > 0 or self.recover_steps > 0


def check_training(batch_size: int, lr: float, augment: float, dropout: float, precision: str) -> None:
    """The training options distill and every recovery fine-tune share, for their `__post_init__`."""
    if batch_size < 1 or lr <= 0:
        raise ValueError(f"batch_size must be >= 1 and lr > 0 (got batch_size = {batch_size}, lr = {lr})")
    if not 0 <= augment <= 1 or not (dropout == -1 or 0 <= dropout < 1):
        raise ValueError("augment must be in [0, 1] and dropout in [0, 1) (or -1: the model's own)")
    choice("precision", precision, PRECISIONS)


def torch_module(model: ModelHandle, pass_name: str) -> Any:
    """The handle's nn.Module, or a clear error for sources a torch pass cannot rewrite."""
    import torch

    m = model.torch_module
    if not isinstance(m, torch.nn.Module):
        raise UsageError(f"pass {pass_name} rewrites an nn.Module; {model.name} is a {type(m).__name__}")
    return m


def clone(module: Any) -> Any:
    """A deep copy: passes are pure, the input handle's module (the teacher) is never modified."""
    return copy.deepcopy(module)


def stats(module: Any) -> dict[str, int]:
    """Unique parameters: count, non-zeros and bytes; buffers (BatchNorm statistics, ids) apart."""
    params = list(module.parameters())  # parameters() already yields each shared Parameter once
    seen = {id(p) for p in params}
    buffers = [b for b in module.buffers() if id(b) not in seen]
    return {"params": int(sum(p.numel() for p in params)),
            "nonzero": int(sum(int((p != 0).sum()) for p in params)),
            "param_bytes": int(sum(p.numel() * p.element_size() for p in params)),
            "buffer_bytes": int(sum(b.numel() * b.element_size() for b in buffers))}


def linear_conv_macs(module: Any, feed: dict[str, np.ndarray], input_names: list[str]) -> int:
    """Multiply-accumulates of every nn.Linear / nn.Conv*d call on one real input."""
    import torch

    total = [0]

    def hook(mod: Any, args: Any, out: Any) -> None:
        if isinstance(mod, torch.nn.Linear):
            total[0] += out.numel() * mod.in_features
        else:  # ConvNd: every output element costs in_channels/groups * kernel volume
            total[0] += out.numel() * (mod.in_channels // mod.groups) * int(np.prod(mod.kernel_size))

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names))
    finally:
        for h in handles:
            h.remove()
    return int(total[0])


def find_transformer(module: Any) -> Any | None:
    """The BERT-like encoder inside `module` (itself, or e.g. SentenceEncoder's `.bert`): a module
    with `.embeddings`, `.encoder.layer` (a ModuleList) and a `.config`; None for anything else."""
    import torch

    for m in module.modules():
        enc = getattr(m, "encoder", None)
        if (hasattr(m, "embeddings") and hasattr(m, "config") and enc is not None
                and isinstance(getattr(enc, "layer", None), torch.nn.ModuleList)):
            return m
    return None


def downsample(curve: list[float], points: int = CURVE_POINTS) -> list[float]:
    """At most `points` values, each the mean of consecutive steps, rounded to 5 significant digits."""
    if not curve:
        return []
    chunks = np.array_split(np.asarray(curve, dtype=np.float64), min(points, len(curve)))
    return [float(f"{c.mean():.5g}") for c in chunks]


def plot_curve(curve: list[float], path: Any, title: str) -> str | None:
    """A PNG of a loss curve when matplotlib is installed (it is not a dependency); the path, else None."""
    import importlib.util

    if not curve or importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(curve) + 1), curve)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def cubic_goal(final: float, k: int, rounds: int) -> float:
    """The share pruned after round k of `rounds` (Zhu & Gupta): s_k = s (1 - (1 - k/n)^3). Most of it goes
    early, while the model still has the capacity to absorb it; the last rounds remove little and polish."""
    return final * (1 - (1 - k / rounds) ** 3)


class Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 3)


def record(name: str, params: Any, before: dict[str, int], after: dict[str, int], clock: Clock,
           **extra: Any) -> dict[str, Any]:
    """The history entry of a torch pass: its options, the before/after counts, and what it did."""
    import dataclasses

    opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(params).items()}
    rec: dict[str, Any] = {"pass": name, **opts,
                           "params_before": before["params"], "params_after": after["params"],
                           "param_bytes_before": before["param_bytes"], "param_bytes_after": after["param_bytes"],
                           "nonzero_before": before["nonzero"], "nonzero_after": after["nonzero"],
                           "sparsity": round(1 - after["nonzero"] / max(1, after["params"]), 6),
                           "params_ratio": round(after["params"] / max(1, before["params"]), 6)}
    rec.update(extra)
    rec["seconds"] = clock.seconds()
    return rec


# -- conv channel chains -------------------------------------------------------------------------
# A chain is Conv2d -> [BatchNorm2d] -> (activations, pooling, dropout, flatten)* -> consumer, where
# the consumer is the next Conv2d or a Linear after Flatten. Removing output channel c of the conv
# removes BN entry c and input channel c of the consumer (for a Linear: the block of in_features
# that channel c flattens into), so the model computes the same function minus that channel.

_PASS_THROUGH = ("ReLU", "ReLU6", "GELU", "SiLU", "LeakyReLU", "Hardswish", "Hardtanh", "Sigmoid", "Tanh", "ELU",
                 "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Dropout", "Dropout2d",
                 "Identity", "Flatten")


class ConvChain:
    def __init__(self, name: str, slots: list[tuple[Any, str, Any]], i: int, bn: int | None, consumer: int) -> None:
        self.name, self.slots, self.i, self.bn_i, self.consumer_i = name, slots, i, bn, consumer

    @property
    def conv(self) -> Any:
        return self._get(self.i)

    @property
    def last(self) -> Any:
        """The module whose output carries the channels (the BN if any): where a gate goes."""
        return self._get(self.bn_i if self.bn_i is not None else self.i)

    def _get(self, i: int) -> Any:
        parent, key, _ = self.slots[i]
        return parent[int(key)] if key.isdigit() else getattr(parent, key)

    def _set(self, i: int, module: Any) -> None:
        parent, key, _ = self.slots[i]
        module.train(parent.training)  # a new BatchNorm must not start in training mode inside an eval model
        if key.isdigit():
            parent[int(key)] = module
        else:
            setattr(parent, key, module)

    def magnitude(self) -> Any:
        import torch

        with torch.no_grad():
            s = self.conv.weight.flatten(1).norm(dim=1)
            if self.bn_i is not None:
                bn = self._get(self.bn_i)
                s = s * bn.weight.abs() / (bn.running_var + bn.eps).sqrt()
            return s

    @property
    def consumer(self) -> Any:
        return self._get(self.consumer_i)

    def prune(self, drop: list[int], mean: Any = None) -> None:
        """Remove output channels `drop`; with `mean` (the consumer's mean input per channel or feature,
        measured on data) their average contribution is folded into the consumer's bias."""
        import torch

        conv = self.conv
        keep = torch.tensor([c for c in range(conv.out_channels) if c not in set(drop)], dtype=torch.long)
        new = torch.nn.Conv2d(conv.in_channels, len(keep), conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                              conv.groups, conv.bias is not None, conv.padding_mode)
        with torch.no_grad():
            new.weight.copy_(conv.weight[keep])
            if conv.bias is not None:
                new.bias.copy_(conv.bias[keep])
        self._set(self.i, new)
        if self.bn_i is not None:
            bn = self._get(self.bn_i)
            nb = torch.nn.BatchNorm2d(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(bn, name) is not None:
                        getattr(nb, name).copy_(getattr(bn, name)[keep])
                if bn.num_batches_tracked is not None:
                    nb.num_batches_tracked.copy_(bn.num_batches_tracked)
            self._set(self.bn_i, nb)
        nxt = self._get(self.consumer_i)
        if isinstance(nxt, torch.nn.Conv2d):
            gone = torch.tensor(sorted(set(drop)), dtype=torch.long)
            fold = mean is not None and len(gone) > 0
            nc = torch.nn.Conv2d(len(keep), nxt.out_channels, nxt.kernel_size, nxt.stride, nxt.padding, nxt.dilation,
                                 1, nxt.bias is not None or fold, nxt.padding_mode)
            with torch.no_grad():
                nc.weight.copy_(nxt.weight[:, keep])
                bias = nxt.bias.detach().clone() if nxt.bias is not None else torch.zeros(nxt.out_channels)
                if fold:  # border pixels see zero padding instead of the mean: the fold is exact inside
                    bias += nxt.weight[:, gone].sum((2, 3)) @ mean[gone].to(bias.dtype)
                if nc.bias is not None:
                    nc.bias.copy_(bias)
        else:
            block = nxt.in_features // conv.out_channels
            feats = (keep[:, None] * block + torch.arange(block)[None, :]).flatten()
            gone = torch.tensor([f for f in range(nxt.in_features) if f not in set(feats.tolist())], dtype=torch.long)
            fold = mean is not None and len(gone) > 0
            nc = torch.nn.Linear(len(feats), nxt.out_features, nxt.bias is not None or fold)
            with torch.no_grad():
                nc.weight.copy_(nxt.weight[:, feats])
                bias = nxt.bias.detach().clone() if nxt.bias is not None else torch.zeros(nxt.out_features)
                if fold:
                    bias += nxt.weight[:, gone] @ mean[gone].to(bias.dtype)
                if nc.bias is not None:
                    nc.bias.copy_(bias)
        self._set(self.consumer_i, nc)


def conv_chains(module: Any) -> list[ConvChain]:
    """The prunable Conv2d chains of a model built from nn.Sequential containers (nested allowed)."""
    import torch

    slots: list[tuple[Any, str, Any]] = []

    def walk(seq: Any, prefix: str) -> None:
        for key, m in seq.named_children():
            if isinstance(m, torch.nn.Sequential):
                walk(m, f"{prefix}{key}.")
            else:
                slots.append((seq, key, f"{prefix}{key}"))

    if not isinstance(module, torch.nn.Sequential):
        return []
    walk(module, "")
    mods = [(p[int(k)] if k.isdigit() else getattr(p, k)) for p, k, _ in slots]
    chains = []
    for i, conv in enumerate(mods):
        if not isinstance(conv, torch.nn.Conv2d) or conv.groups != 1:
            continue
        bn, flat = None, False
        for j in range(i + 1, len(mods)):
            m = mods[j]
            if isinstance(m, torch.nn.BatchNorm2d) and bn is None and m.num_features == conv.out_channels:
                bn = j
            elif isinstance(m, torch.nn.Conv2d):
                if m.groups == 1 and not flat:
                    chains.append(ConvChain(slots[i][2], slots, i, bn, j))
                break
            elif isinstance(m, torch.nn.Linear):
                if flat and m.in_features % conv.out_channels == 0:
                    chains.append(ConvChain(slots[i][2], slots, i, bn, j))
                break
            elif type(m).__name__ in _PASS_THROUGH:
                flat = flat or isinstance(m, torch.nn.Flatten)
            else:
                break
    return chains


def input_moments(module: Any, consumers: list[Any], args: list[Any], mask: Any = None,
                  cov: bool = False) -> dict[int, tuple[Any, Any]]:
    """Mean (and, with `cov`, covariance) of each consumer module's input on one batch, in float64:
    per channel (dim 1) for a conv, per feature (last dim) for a Linear, over real tokens only when a
    [batch, seq] `mask` is given. What a removed unit feeds its consumer on average (folded into the
    bias), and how the units co-vary (for importance and the least-squares refit)."""
    import torch

    stats: dict[int, tuple[Any, Any]] = {}

    def hook(mod: Any, inp: Any) -> None:
        x = inp[0].detach().double()
        if isinstance(mod, torch.nn.Conv2d):
            rows = x.transpose(0, 1).flatten(1).T
        elif mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            rows = x[mask.bool()]
        else:
            rows = x.reshape(-1, x.shape[-1])
        mean = rows.mean(0)
        c = None
        if cov:
            centred = rows - mean
            c = centred.T @ centred / max(1, len(rows) - 1)
        stats[id(mod)] = (mean, c)

    handles = [m.register_forward_pre_hook(hook) for m in consumers]
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for h in handles:
            h.remove()
    return stats
