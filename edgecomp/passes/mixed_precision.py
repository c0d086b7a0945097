"""Mixed precision to a budget: quantize everything, then keep the fewest layers in fp32 that
bring the model back within the target.

Sensitivity comes from attribution, not from re-quantizing once per layer: the fp32 and fully
quantized graphs run once each on a few calibration samples with every tensor exposed (the
machinery of `edgecomp diff`), and each node the quantizer replaced is scored by the relative
noise power it adds, |y - y_q|^2 / |y|^2 at its output minus the same at its input (in dB): the
error that node introduces rather than inherits. Layers then return to fp32 greedily, largest drop first, re-measuring the
output cosine on the calibration split (never the validation split, which judges the result)
and the latency after each step, until the target is met or `max_float_layers` is reached.
Every step is recorded, so the report shows the accuracy/latency trade-off of the search.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecomp.model import ModelHandle
from edgecomp.passes import _int8, choice
from edgecomp.passes.context import PassContext


@dataclass(frozen=True)
class Params:
    base: str = "quantize-dynamic"  # quantize-dynamic | quantize-static
    per_channel: bool = True
    reduce_range: bool | str = "auto"  # the base pass's: 7-bit weights where int8 saturates
    target_cosine: float = 0.995  # mean output cosine vs fp32 on the calibration split
    max_float_layers: int = 8
    attribution_samples: int = 4
    eval_samples: int = 32
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")

    def __post_init__(self) -> None:
        choice("base", self.base, ("quantize-dynamic", "quantize-static"))
        choice("reduce_range", self.reduce_range, _int8.CHOICES)
        if not 0 < self.target_cosine <= 1:
            raise ValueError(f"target_cosine = {self.target_cosine} must be in (0, 1]")


def _quantize(model: ModelHandle, params: Params, exclude: list[str], ctx: PassContext, tag: str) -> ModelHandle:
    from edgecomp.passes import make_params, pass_module

    sub = PassContext(ctx.workdir / "mixed" / tag, ctx.samples, ctx.seed, ctx.recipe)
    opts: dict[str, Any] = {"per_channel": params.per_channel, "reduce_range": params.reduce_range,
                            "exclude_nodes": list(exclude)}
    return pass_module(params.base).run(model, make_params(params.base, opts), sub)


def _cosine_mean(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    cos = [float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)) for a, b in zip(ref, got)]
    return float(np.mean(cos))


def _quantized_nodes(graph: Any) -> Callable[[str], bool]:
    """Whether the quantizer took a float node: dynamic quantization replaces it (its name is gone),
    QDQ keeps it but feeds it from DequantizeLinear."""
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    names = {n.name for n in graph.node}
    fed = {n.name for n in graph.node if any(i in dequantized for i in n.input)}
    return lambda name: name not in names or name in fed


def _attribute(fp32: ModelHandle, quant: ModelHandle, feeds: list[dict[str, np.ndarray]], op_types: tuple[str, ...]) -> list[tuple[str, float]]:
    """(node, dB of relative noise the node adds), largest first, over the nodes the quantizer replaced."""
    import onnx

    from edgecomp.diff import intermediates

    graph = onnx.load(str(fp32.onnx_path), load_external_data=False).graph
    quantized = _quantized_nodes(onnx.load(str(quant.onnx_path), load_external_data=False).graph)
    candidates = [n for n in graph.node if n.op_type in op_types and n.name and quantized(n.name)]
    added: dict[str, list[float]] = {n.name: [] for n in candidates}
    for feed in feeds:
        _, a = intermediates(fp32.onnx_path, feed)
        _, b = intermediates(quant.onnx_path, feed)

        def rel_noise(t: str) -> float | None:
            if t not in a or t not in b or a[t].shape != b[t].shape:
                return None
            x = a[t].astype(np.float64)
            return float(((x - b[t]) ** 2).sum() / max((x ** 2).sum(), 1e-30))

        for n in candidates:
            n_in, n_out = rel_noise(n.input[0]), rel_noise(n.output[0])
            if n_out is not None:
                added[n.name].append(max(n_out - (n_in or 0.0), 1e-12))
    scored = [(name, float(10 * np.log10(np.mean(v)))) for name, v in added.items() if v]
    return sorted(scored, key=lambda x: -x[1])


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    from edgecomp.backends.onnxruntime import OrtRunner
    from edgecomp.bench import latency

    t0 = time.perf_counter()
    feeds = ctx.samples.calibration[: params.eval_samples]
    out_name = model.output_names[0]
    ref = [OrtRunner(model.onnx_path, 2)(f)[out_name] for f in feeds]

    def measure(m: ModelHandle) -> dict[str, float]:
        r = OrtRunner(m.onnx_path, 2)
        got = [r(f)[out_name] for f in feeds]
        return {"cosine_mean": _cosine_mean(ref, got), "p50_ms": latency(r, feeds[0], warmup=3, runs=20, min_seconds=0.2)["p50_ms"]}

    full = _quantize(model, params, [], ctx, "all")
    steps = [{"float_layers": [], **measure(full)}]
    ranking: list[tuple[str, float]] = []
    best, kept = full, []
    if steps[0]["cosine_mean"] < params.target_cosine:
        ranking = _attribute(model, full, ctx.samples.calibration[: params.attribution_samples], params.op_types)
        for name, _ in ranking[: params.max_float_layers]:
            kept.append(name)
            best = _quantize(model, params, kept, ctx, f"step{len(kept)}")
            steps.append({"float_layers": list(kept), **measure(best)})
            if steps[-1]["cosine_mean"] >= params.target_cosine:
                break
    record = {"pass": "mixed-precision", **dataclasses.asdict(params), "float_layers": kept,
              "target_met": steps[-1]["cosine_mean"] >= params.target_cosine, "steps": steps,
              "sensitivity_db": [{"node": n, "added_noise_db": d} for n, d in ranking[:20]],
              "calibration_samples": len(feeds), "seconds": time.perf_counter() - t0}
    return model.with_pass(record, onnx_path=best.onnx_path)
