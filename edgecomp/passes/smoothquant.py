"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before INT8.

A few input channels of a transformer's linear layers carry values 10-100x the others, so one
per-tensor activation scale wastes most of the int8 grid on them. For y = x W (x: [..., K],
W: [K, N]) and any s > 0 per input channel j, y = (x / s) (diag(s) W) exactly. With

    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha),   clipped to [1e-5, 1e5]

(max|x_j| over the calibration split, max|W_j| over row j of W) the channels of x / s are
flattened and the difficulty moves into W, where per-channel weight scales absorb it. alpha = 0.5
splits it evenly; larger alpha moves more into the weights.

The division is folded into the producer, so the graph gains no op on that path: a
LayerNormalization with constant gamma, beta computes gamma * n + beta, and (gamma / s) * n + beta / s
= LN(x) / s. ONNX Runtime's fused norms (SkipLayerNormalization, EmbedLayerNormalization: output 0
is gamma * n + beta the same way) take the fold too, and a fused Attention reads its input through
one packed [K, 3N] QKV weight, smoothed like a MatMul's; so the pass runs as well after
`fuse-transformer` as before it. When several MatMul/Gemm read the same LayerNorm output (attention's Q, K, V) they
share one s, with max|W_j| taken over all of their weights. Any other reader of that output (a
residual Add, a graph output) still needs the unsmoothed tensor: it reads it back through one
inserted Mul by s (Shape readers are moved to the smoothed tensor, whose shape is the same).

Float results are unchanged up to rounding; the gain appears once a quantize pass follows.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle
from edgecomp.passes.context import PassContext

S_MIN, S_MAX = 1e-5, 1e5
READERS = ("MatMul", "Gemm", "Attention")
# where gamma and beta are among each norm's inputs; output 0 is gamma * normalized + beta in all three
NORMS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3), "EmbedLayerNormalization": (5, 6)}


@dataclass(frozen=True)
class Params:
    alpha: float = 0.5  # 0: all difficulty stays in the activations, 1: all of it moves into the weights
    op_types: tuple[str, ...] = READERS
    samples: int = 0  # calibration samples for max|x_j|; 0 = all of the calibration split

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha = {self.alpha} must be in [0, 1]")
        unknown = set(self.op_types) - set(READERS)
        if unknown or not self.op_types:
            raise ValueError(f"op_types = {list(self.op_types)} must be a non-empty subset of {list(READERS)}")
        if self.samples < 0:
            raise ValueError(f"samples = {self.samples} must be >= 0")


@dataclass
class _Group:
    norm: Any  # the LayerNormalization (or fused Skip/EmbedLayerNormalization) node
    readers: list[tuple[Any, bool]]  # (MatMul/Gemm/Attention node, weight stored transposed: [N, K])


def _attr(node: Any, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _constant(graph: Any, name: str) -> str:
    """The initializer behind `name`, through the Identity nodes exporters use to share equal constants."""
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] == name:
            return _constant(graph, node.input[0])
    return name


def _groups(graph: Any, op_types: tuple[str, ...]) -> tuple[list[_Group], list[str]]:
    """Norms whose output feeds at least one smoothable MatMul/Gemm/Attention; and why others were skipped."""
    from onnx import TensorProto

    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    readers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            uses[name] += 1
            readers[name].append(node)
    groups, skipped = [], []
    for norm in (n for n in graph.node if n.op_type in NORMS and n.domain in ("", "ai.onnx", "com.microsoft")):
        lo, hi = NORMS[norm.op_type]
        params = list(norm.input[lo:hi + 1])
        if len(params) < 1 or not params[0]:
            skipped.append(f"{norm.name}: no gamma")
            continue
        if _attr(norm, "axis", -1) != -1:
            skipped.append(f"{norm.name}: normalizes over axis {_attr(norm, 'axis', -1)}, not the last one")
            continue
        if not all(_constant(graph, p) in inits for p in params if p):
            skipped.append(f"{norm.name}: gamma/beta are not constants")
            continue
        k = int(np.prod(inits[_constant(graph, params[0])].dims))
        chosen = []
        for r in readers[norm.output[0]]:
            if r.op_type not in op_types or r.input[0] != norm.output[0] or len(r.input) < 2:
                continue
            w = inits.get(r.input[1])
            trans = r.op_type == "Gemm" and _attr(r, "transB", 0) == 1
            if w is None or uses[w.name] != 1 or len(w.dims) != 2 or (r.op_type == "Gemm" and _attr(r, "transA", 0)):
                continue
            if w.dims[1 if trans else 0] == k and w.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
                chosen.append((r, trans))
        if chosen:
            groups.append(_Group(norm, chosen))
    return groups, skipped


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    import onnx
    from onnx import helper, numpy_helper

    from edgecomp.passes.calibrate import ChannelMax, stream_tensors

    feeds = ctx.samples.calibration[: params.samples or None]
    if not feeds:
        raise UsageError("smoothquant: the calibration set is empty; supply samples with --samples FILE.npz")
    proto = onnx.load(str(model.onnx_path))
    graph = proto.graph
    groups, skipped = _groups(graph, params.op_types)
    stats = ChannelMax()
    if groups:
        stream_tensors(proto, [g.norm.output[0] for g in groups], iter(feeds), stats.update)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    smoothed, unscale, replaced = [], {}, set()
    for n_group, g in enumerate(groups):
        y = g.norm.output[0]
        weights = {r.input[1]: numpy_helper.to_array(inits[r.input[1]]) for r, _ in g.readers}
        w_max = np.max([np.abs(weights[r.input[1]]).max(axis=0 if t else 1) for r, t in g.readers], axis=0)
        x_max = stats.amax[y].astype(np.float64)
        s = np.where((x_max > 0) & (w_max > 0), x_max ** params.alpha / np.maximum(w_max, 1e-30) ** (1 - params.alpha), 1.0)
        s = np.clip(s, S_MIN, S_MAX)
        lo, hi = NORMS[g.norm.op_type]
        dtype = numpy_helper.to_array(inits[_constant(graph, g.norm.input[lo])]).dtype
        for i, name in enumerate(g.norm.input[lo:hi + 1], start=lo):  # private copies: exporters share equal constants
            if name:
                v = numpy_helper.to_array(inits[_constant(graph, name)])
                graph.initializer.append(numpy_helper.from_array((v / s.reshape(v.shape)).astype(v.dtype), f"{name}_smoothed_{n_group}"))
                g.norm.input[i] = f"{name}_smoothed_{n_group}"
                replaced.add(name)
        for r, trans in g.readers:
            w = weights[r.input[1]]
            inits[r.input[1]].CopyFrom(numpy_helper.from_array((w * (s[None, :] if trans else s[:, None])).astype(w.dtype), r.input[1]))
        y_s = f"{y}_smoothed"
        g.norm.output[0] = y_s
        for r, _ in g.readers:
            r.input[0] = y_s
        others = [n for n in graph.node if y in n.input]  # residual Adds, Shapes, ...
        for node in others:
            if node.op_type == "Shape":
                node.input[:] = [y_s if i == y else i for i in node.input]
        if y in outputs or any(n.op_type != "Shape" for n in others):
            scale = f"{y}_smoothquant_scale"
            graph.initializer.append(numpy_helper.from_array(s.astype(dtype), scale))
            unscale[y_s] = helper.make_node("Mul", [y_s, scale], [y], name=f"{g.norm.name}/smoothquant_unscale")
        smoothed.append({"norm": g.norm.name, "layers": [r.name for r, _ in g.readers],
                         "s_min": float(s.min()), "s_max": float(s.max())})
    if unscale:  # each Mul right after its LayerNorm keeps the node list topologically sorted
        nodes = [m for n in graph.node for m in (n, unscale.get(n.output[0] if n.output else "")) if m is not None]
        graph.ClearField("node")
        graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used or i.name not in replaced]
    if len(kept) < len(graph.initializer):
        graph.ClearField("initializer")
        graph.initializer.extend(kept)
    out = ctx.scratch("smoothquant") / "model.onnx"
    onnx.save(proto, str(out), save_as_external_data=proto.ByteSize() > 1_800_000_000)
    record = {"pass": "smoothquant", **dataclasses.asdict(params), "layers_smoothed": sum(len(e["layers"]) for e in smoothed),
              "norms": smoothed, "skipped": skipped, "calibration_samples": len(feeds), "stats_bytes": stats.nbytes}
    return model.with_pass(record, onnx_path=out)
