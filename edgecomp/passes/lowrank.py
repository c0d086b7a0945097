"""Low-rank factorization: W (m x n) ~ U_k S_k V_k^T, a Linear becomes two (n -> k -> m).

Truncated SVD is the best rank-k approximation (Eckart-Young): ||W - W_k||_2 = s_{k+1}, so for any
input x the output error is at most s_{k+1} ||x||, and ||W - W_k||_F^2 / ||W||_F^2 is the energy
dropped, sum_{i>k} s_i^2 / sum_i s_i^2. The factors split the singular values evenly:
A = sqrt(S_k) V_k^T (k x n, first) and B = U_k sqrt(S_k) (m x k, second, with the bias).

Rank per layer: `energy` > 0 picks the smallest k keeping that share of sum s_i^2; otherwise
`ratio` keeps that share of the layer's parameters, k = floor(ratio * m n / (m + n)). A layer
where k (m + n) >= m n would not get cheaper and is left alone (the record says why).
`embeddings` also factorizes embedding tables (ALBERT's V x E then E x H). Optional recovery
fine-tune by distillation from the unfactorized model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle
from edgecomp.passes._torch_util import Clock, Recovery, clone, linear_conv_macs, record, stats, torch_module
from edgecomp.passes.context import PassContext


@dataclass(frozen=True)
class Params(Recovery):
    ratio: float = 0.5
    energy: float = 0.0
    include: tuple[str, ...] = ()  # module-name substrings: only these layers (default: every Linear)
    exclude: tuple[str, ...] = ()
    embeddings: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.ratio < 1 or not 0 <= self.energy < 1:
            raise ValueError("ratio must be in (0, 1) and energy in [0, 1)")


@functools.cache
def _make_classes() -> tuple[Any, Any]:
    """The factorized modules, made once on first use (torch is imported only when a pass runs)."""
    import torch

    class LowRankLinear(torch.nn.Module):
        """y = B (A x) + b: a rank-k Linear, `first` = A (k x n), `second` = B (m x k) with the bias."""

        def __init__(self, n: int, k: int, m: int, bias: bool) -> None:
            super().__init__()
            self.in_features, self.rank, self.out_features = n, k, m
            self.first = torch.nn.Linear(n, k, bias=False)
            self.second = torch.nn.Linear(k, m, bias=bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x))

    class LowRankEmbedding(torch.nn.Module):
        """E[ids] = (A[ids]) B^T: a V x k table then a k -> H projection."""

        def __init__(self, v: int, k: int, h: int, padding_idx: int | None) -> None:
            super().__init__()
            self.num_embeddings, self.rank, self.embedding_dim = v, k, h
            self.first = torch.nn.Embedding(v, k, padding_idx=padding_idx)
            self.second = torch.nn.Linear(k, h, bias=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(ids))

    return LowRankLinear, LowRankEmbedding


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    import torch

    clock = Clock()
    teacher = torch_module(model, "lowrank")
    feed = ctx.samples.validation[0]
    before, macs_before = stats(teacher), linear_conv_macs(teacher, feed, model.input_names)
    student = clone(teacher).eval()
    kinds = (torch.nn.Linear, torch.nn.Embedding) if params.embeddings else (torch.nn.Linear,)
    layers, skipped = [], []
    for name, mod in list(student.named_modules()):
        if not isinstance(mod, kinds) or (params.include and not any(s in name for s in params.include)) \
                or any(s in name for s in params.exclude):
            continue
        new, info = factorize(mod, params.ratio, params.energy)
        if new is None:
            skipped.append({"layer": name, **info})
            continue
        parent = student.get_submodule(name.rpartition(".")[0]) if "." in name else student
        setattr(parent, name.rpartition(".")[2], new)
        layers.append({"layer": name, **info})
    if not layers:
        raise UsageError(f"lowrank: no layer gets cheaper at ratio={params.ratio} energy={params.energy} "
                         f"({len(skipped)} considered)")
    extra: dict[str, Any] = {}
    if params.tunes:
        from edgecomp.passes.distill import recover

        extra["recovery"] = recover(teacher, student, model, ctx, params, "lowrank")
    rec = record("lowrank", params, before, stats(student), clock, factorized=layers[:200], skipped=skipped[:200],
                 layers_factorized=len(layers), layers_skipped=len(skipped),
                 linear_conv_macs_before=macs_before, linear_conv_macs_after=linear_conv_macs(student, feed, model.input_names),
                 **extra)
    return model.with_pass(rec, onnx_path=None, torch_module=student.eval())


def rank_for(s: Any, m: int, n: int, ratio: float, energy: float) -> int:
    """The rank: smallest k keeping `energy` of sum s^2, else floor(ratio * m n / (m + n)); at least 1."""
    import torch

    if energy > 0:
        kept = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        return max(1, int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1)
    return max(1, int(ratio * m * n / (m + n)))


def factorize(mod: Any, ratio: float, energy: float) -> tuple[Any, dict[str, Any]]:
    """(the factorized module, or None when it would not be cheaper; what was decided)."""
    import torch

    LowRankLinear, LowRankEmbedding = _make_classes()
    w = mod.weight.detach().double()
    if isinstance(mod, torch.nn.Embedding):
        w = w.T  # treat the table as H x V so the same A / B split applies
    m, n = w.shape
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = min(rank_for(s, m, n, ratio, energy), len(s))
    info = {"shape": [int(m), int(n)], "rank": int(k),
            "energy_kept": round(float((s[:k] ** 2).sum() / (s ** 2).sum()), 6),
            "sigma_next": round(float(s[k]), 6) if k < len(s) else 0.0}
    if k * (m + n) >= m * n:
        return None, {**info, "reason": f"rank {k}: k(m+n) = {k * (m + n)} >= mn = {m * n}, no saving"}
    root = s[:k].sqrt()
    a = (root[:, None] * vh[:k]).float()  # k x n
    b = (u[:, :k] * root[None, :]).float()  # m x k
    with torch.no_grad():
        if isinstance(mod, torch.nn.Embedding):
            new = LowRankEmbedding(n, k, m, mod.padding_idx)
            new.first.weight.copy_(a.T)
            new.second.weight.copy_(b)
        else:
            new = LowRankLinear(n, k, m, mod.bias is not None)
            new.first.weight.copy_(a)
            new.second.weight.copy_(b)
            if mod.bias is not None:
                new.second.bias.copy_(mod.bias)
    return new, {**info, "params_before": int(m * n), "params_after": int(k * (m + n))}
