"""Error-correcting least-squares refit of a pruned BERT-like encoder (prune-structured, after the cut).

Each sublayer of a BERT layer ends in a Linear whose output joins the residual stream before a LayerNorm:
attention `LN(Wo c + bo + h)`, FFN `LN(W2 a + b2 + g)`. Those Linears are solved, layer by layer from the
first, on the compressed model's own inputs (x = c or a, the residual h or g), as they are after the layers
before were solved, against the original model's LayerNorm input at the same point:
    min E|| W x_s + b - (sum_t - residual_s) ||^2
so each layer also cancels, as far as it is linear in its own units, the error that reached it; solving each
layer alone on the original's inputs (prune-structured's `refit_linear`) leaves that error standing to compound.
Not used for distillation's students: MiniLM layers [0,4,5] standing in for [3,4,5], solved against those
layers' sums (with their LayerNorms), start much nearer the teacher (cosine 0.896 against 0.772 as copied) but
end 1000 steps worse (Spearman 0.904 against 0.921): a kept layer refit to mimic three others is a poorer
starting point for training than the layer itself.
"""

from __future__ import annotations

from typing import Any

from edgecomp.model import ModelHandle
from edgecomp.passes._torch_util import find_transformer
from edgecomp.passes.context import PassContext


class _Stop(Exception):
    """Raised by a hook to end a forward once what it needed was seen."""


def inputs_of(module: Any, target: Any, *args: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword inputs `target` receives when `module(*args)` runs (the forward stops there)."""
    import torch

    got: list[Any] = []

    def hook(mod: Any, a: Any, kw: Any) -> None:
        got.append((a, kw))
        raise _Stop

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            module(*args)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"{type(target).__name__} was not called")
    return got[0]


def train_sample(model: ModelHandle, ctx: PassContext, seed: int, n: int) -> dict[str, Any]:
    """Up to n training samples (a seeded choice), the model's inputs only, as tensors keyed by input name."""
    import torch

    from edgecomp.passes._train_data import training_data

    data, _ = training_data(model, ctx)
    data = {k: v for k, v in data.items() if k in model.input_names}
    total = len(next(iter(data.values())))
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return {k: v[idx] for k, v in data.items()}


def refit_batches(model: ModelHandle, ctx: PassContext, seed: int, n: int, size: int = 64) -> list[tuple[list[Any], Any]]:
    """Up to n training samples (seeded, apart from prune-structured's `mean_batch`), sorted by length and cut into
    batches of `size` with their padding trimmed: (positional inputs, attention mask) each."""
    import torch

    from edgecomp.passes._train_distill import trim_padding

    data = train_sample(model, ctx, seed + 1, n)
    order = torch.arange(len(next(iter(data.values()))))
    mask = data.get("attention_mask")
    if mask is not None:
        order = torch.argsort(mask.sum(1), stable=True)
    out = []
    for chunk in order.split(size):
        batch = trim_padding({k: v[chunk] for k, v in data.items()})
        out.append(([batch[k] for k in model.input_names], batch.get("attention_mask")))
    return out


class Moments:
    """Running first and second moments of (x, y) row pairs, in float64, for a least-squares solve."""

    def __init__(self) -> None:
        self.n, self.sx, self.sy, self.sxx, self.syx = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, x: Any, y: Any) -> None:
        x, y = x.double(), y.double()
        self.n += len(x)
        self.sx, self.sy = self.sx + x.sum(0), self.sy + y.sum(0)
        self.sxx, self.syx = self.sxx + x.T @ x, self.syx + y.T @ x

    def solve(self, lam: float = 1e-3) -> tuple[Any, Any]:
        """W, b minimising E||W x + b - y||^2 + lam * mean(diag Cov x) * ||W||^2 (the ridge term keeps the solve
        stable when inputs are nearly collinear)."""
        import torch

        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx / self.n - torch.outer(mx, mx)
        cyx = self.syx / self.n - torch.outer(my, mx)
        cxx = cxx + lam * cxx.diagonal().mean() * torch.eye(len(cxx), dtype=cxx.dtype)
        w = torch.linalg.solve(cxx, cyx.T).T
        return w, my - w @ mx


def assign(linear: Any, weight: Any, bias: Any) -> None:
    import torch

    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))
        linear.bias.copy_(bias.to(linear.bias.dtype))


def _out(y: Any) -> Any:
    return y[0] if isinstance(y, tuple) else y


def correct_layers(student: Any, teacher: Any, batches: list[tuple[list[Any], Any]]) -> int:
    """Solve the student's attention-output and FFN-output Linears, first layer to last (see the module doc),
    against the teacher's layer of the same index. Needs the same layers and hidden size; returns the samples
    used (0: nothing done)."""
    import torch

    ts, tt = find_transformer(student), find_transformer(teacher)
    if (ts is None or tt is None or not batches or ts.config.hidden_size != tt.config.hidden_size
            or len(ts.encoder.layer) != len(tt.encoder.layer)):
        return 0
    was = teacher.training
    teacher.eval()
    state = []
    for args, mask in batches:
        (h, *rest), kw = inputs_of(student, ts.encoder, *args)
        real = mask.bool() if mask is not None else torch.ones(h.shape[:2], dtype=torch.bool)
        state.append({"hs": h, "ht": inputs_of(teacher, tt.encoder, *args)[0][0],
                      "ext": kw.get("attention_mask", rest[0] if rest else None), "real": real})
    try:
        with torch.no_grad():
            for ls, lt in zip(ts.encoder.layer, tt.encoder.layer):
                for c in state:  # the teacher's layer: its two LayerNorm inputs, and its output for the next one
                    sums: dict[str, Any] = {}
                    hooks = [ln.register_forward_pre_hook(lambda m, a, k=k: sums.__setitem__(k, a[0]))
                             for k, ln in (("attention", lt.attention.output.LayerNorm), ("ffn", lt.output.LayerNorm))]
                    try:
                        c["ht"] = _out(lt(c["ht"], c["ext"]))
                    finally:
                        for hk in hooks:
                            hk.remove()
                    c["target"] = {k: v[c["real"]] for k, v in sums.items()}
                for key, sub in (("attention", ls.attention.output), ("ffn", ls.output)):
                    acc = Moments()
                    for c in state:
                        (x, res), _ = inputs_of(ls, sub, c["hs"], c["ext"])
                        acc.add(x[c["real"]], c["target"][key] - res[c["real"]])
                    assign(sub.dense, *acc.solve())
                for c in state:
                    c["hs"] = _out(ls(c["hs"], c["ext"]))
    finally:
        teacher.train(was)
    return sum(len(args[0]) for args, _ in batches)
