"""Cross-layer parameter sharing (ALBERT): groups of consecutive transformer layers use one set of weights.

With groups of g layers, layer i runs the weights of layer g * floor(i / g) (init="first"), or of
the group's element-wise mean (init="mean"). The depth and the computation are unchanged: every
position still runs a full layer, so this shrinks storage (parameters, file size) and NOT FLOPs
or latency; the record says so. Optional recovery by distillation from the unshared model (the
shared weights get the gradients of every position that uses them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle
from edgecomp.passes import choice
from edgecomp.passes._torch_util import Clock, Recovery, clone, find_transformer, linear_conv_macs, record, stats, torch_module
from edgecomp.passes.context import PassContext


@dataclass(frozen=True)
class Params(Recovery):
    group_size: int = 2
    init: str = "first"  # first | mean

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("init", self.init, ("first", "mean"))
        if self.group_size < 2:
            raise ValueError(f"group_size = {self.group_size}: at least 2 layers must share")


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    clock = Clock()
    teacher = torch_module(model, "share")
    feed = ctx.samples.validation[0]
    before, macs_before = stats(teacher), linear_conv_macs(teacher, feed, model.input_names)
    student = clone(teacher).eval()
    tr = find_transformer(student)
    if tr is None:
        raise UsageError("share: cross-layer sharing needs a transformer encoder (a stack of identical layers)")
    unique_before = len({id(m) for m in tr.encoder.layer})
    groups = share_layers(tr.encoder.layer, params.group_size, params.init)
    extra: dict[str, Any] = {}
    if params.tunes:
        from edgecomp.passes.distill import recover

        extra["recovery"] = recover(teacher, student, model, ctx, params, "share")
    after = stats(student)
    rec = record("share", params, before, after, clock, groups=groups,
                 unique_layers_before=unique_before,
                 unique_layers_after=len({id(m) for m in tr.encoder.layer}),
                 linear_conv_macs_before=macs_before, linear_conv_macs_after=linear_conv_macs(student, feed, model.input_names),
                 effect="storage only: shared layers still run once per position, so FLOPs and latency do not change",
                 **extra)
    return model.with_pass(rec, onnx_path=None, torch_module=student.eval())


def share_layers(layers: Any, group_size: int, init: str) -> list[list[int]]:
    """Make each group of `group_size` consecutive layers one module (in place); the groups."""
    import torch

    n = len(layers)
    if n < 2:
        raise UsageError(f"share: {n} layer, nothing to share")
    groups = [list(range(i, min(n, i + group_size))) for i in range(0, n, group_size)]
    for g in groups:
        rep = layers[g[0]]
        shapes = [[p.shape for p in layers[i].parameters()] for i in g]
        if any(s != shapes[0] for s in shapes):
            raise UsageError(f"share: layers {g} differ in shape (pruned differently?) and cannot share weights")
        if init == "mean" and len(g) > 1:
            with torch.no_grad():
                for name, p in rep.named_parameters():
                    p.copy_(torch.stack([layers[i].get_parameter(name) for i in g]).mean(0))
        for i in g[1:]:
            layers[i] = rep
    return groups
