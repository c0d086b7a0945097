"""INT8 for the OpenVINO backend: NNCF post-training quantization on the calibration split.

NNCF inserts FakeQuantize on activations and quantizes weights (symmetric, per output channel):
    x_q = clamp(round(x / s) + z, 0, 255),  s = (hi - lo) / 255
with [lo, hi] the ranges seen on the calibration feeds; the CPU plugin then runs the quantized
MatMul / Convolution layers on int8 kernels (VNNI). Fast bias correction shifts each quantized
layer's bias by the mean error it introduced on the calibration data.

`model_type = "transformer"` selects NNCF's transformer settings: SmoothQuant (migrates activation
outliers into the weights: x W = (x / s)(s W), s_j = max|x_j|^a / max|W_j|^(1 - a)), and keeps
LayerNorm / Softmax / GELU inputs and the residual adds in float. "auto" picks it when the graph
has attention: a fused ScaledDotProductAttention, or a Softmax with MatMuls whose both
operands are activations (Q K^T, P V).

`accuracy_control = true` runs NNCF's accuracy-aware mode: the metric is the mean cosine between
the int8 and the float model's outputs on the calibration split (the validation split stays
unseen), and layers go back to float, most harmful first, until the drop is at most
1 - budget.cosine_mean. When plain PTQ already meets it, this costs two passes over the split.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np

from edgecomp.errors import UsageError

_PASS_THROUGH = {"Convert", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Multiply", "Subtract"}


def attention_ops(ov_model: Any) -> tuple[int, bool]:
    """(attention ops, whether the graph has a Softmax). An attention op is a fused
    ScaledDotProductAttention (the ONNX frontend makes one) or a MatMul of two activations."""
    def constant(node: Any) -> bool:
        while node.get_type_name() in _PASS_THROUGH:
            if node.get_type_name() in ("Multiply", "Subtract"):  # weight decompression: const * scale
                return all(constant(node.input_value(i).get_node()) for i in range(node.get_input_size()))
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    n, softmax = 0, False
    for op in ov_model.get_ordered_ops():
        kind = op.get_type_name()
        softmax |= kind == "Softmax"
        if kind == "ScaledDotProductAttention":
            n, softmax = n + 1, True
        elif kind == "MatMul" and not any(constant(op.input_value(i).get_node()) for i in range(2)):
            n += 1
    return n, softmax


def resolve_model_type(ov_model: Any, requested: str) -> tuple[str, str]:
    if requested != "auto":
        return requested, "set by the profile"
    n, softmax = attention_ops(ov_model)
    if n and softmax:
        return "transformer", f"auto: {n} attention ops (ScaledDotProductAttention or activation x activation MatMul + Softmax)"
    return "default", "auto: no attention (no ScaledDotProductAttention, no activation x activation MatMul + Softmax)"


def quantize(ov_model: Any, opts: Any, ctx: Any, budget: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    """Return the quantized `ov.Model` and what was done, for the artifact's meta."""
    try:
        import nncf
    except ImportError:
        raise UsageError("openvino int8 needs NNCF: pip install 'edgecomp[openvino]'") from None
    feeds = ctx.samples.calibration[: opts.subset_size or None]
    if not feeds:
        raise UsageError("openvino int8: the calibration set is empty; supply samples with --samples FILE.npz")
    model_type, why = resolve_model_type(ov_model, opts.model_type)
    advanced = nncf.AdvancedQuantizationParameters()
    if opts.smooth_quant_alpha >= 0:
        advanced = nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=opts.smooth_quant_alpha))
    kw: dict[str, Any] = {
        "preset": nncf.QuantizationPreset.MIXED if opts.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        "subset_size": len(feeds), "fast_bias_correction": opts.fast_bias_correction,
        "model_type": nncf.ModelType.TRANSFORMER if model_type == "transformer" else None,
        "ignored_scope": nncf.IgnoredScope(types=list(opts.ignored_types), validate=False) if opts.ignored_types else None,
    }
    record: dict[str, Any] = {"tool": f"nncf {nncf.__version__}", "method": "post-training (min-max ranges)",
                              "model_type": model_type, "model_type_reason": why, "preset": opts.preset,
                              "calibration_samples": len(feeds), "fast_bias_correction": opts.fast_bias_correction,
                              "smooth_quant_alpha": opts.smooth_quant_alpha if opts.smooth_quant_alpha >= 0 else "nncf default",
                              "ignored_types": list(opts.ignored_types), "seed": ctx.seed}
    dataset = nncf.Dataset(feeds)
    if getattr(ctx, "progress", None):
        ctx.progress(f"NNCF int8 ({model_type}, {len(feeds)} calibration samples)")
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars would corrupt `--json` on stdout
        q = _run(nncf, ov_model, dataset, feeds, opts, budget, advanced, kw, record)
    record["fake_quantize_ops"] = sum(op.get_type_name() == "FakeQuantize" for op in q.get_ordered_ops())
    return q, record


def _run(nncf: Any, ov_model: Any, dataset: Any, feeds: list[dict[str, np.ndarray]], opts: Any, budget: dict[str, float],
         advanced: Any, kw: dict[str, Any], record: dict[str, Any]) -> Any:
    if opts.accuracy_control and "cosine_mean" in budget:
        max_drop = 1.0 - budget["cosine_mean"]
        metric = _CosineMetric(ov_model, feeds)
        q = nncf.quantize_with_accuracy_control(
            ov_model, dataset, dataset, metric, max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, **kw)
        full = [v for n, v in metric.calls if n == len(feeds)]  # [float model, plain PTQ, ..., the one kept]
        record["accuracy_control"] = {"metric": "mean cosine vs the float model, calibration split",
                                      "max_drop": max_drop, "evaluations": len(metric.calls),
                                      "cosine_ptq": full[1] if len(full) > 1 else None,
                                      "cosine_final": full[-1] if len(full) > 1 else None}
    else:
        q = nncf.quantize(ov_model, dataset, advanced_parameters=advanced, **kw)
        record["accuracy_control"] = False if not opts.accuracy_control else "skipped: the budget has no cosine_mean"
    return q


class _CosineMetric:
    """validation_fn for NNCF: mean (and per-sample) cosine to the float model's outputs; keeps
    (samples, value) of every call so the record can say what accuracy control changed."""

    def __init__(self, ov_model: Any, feeds: list[dict[str, np.ndarray]]) -> None:
        import openvino as ov

        self._ref = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self._refs = {id(f): _flat(self._ref(f)) for f in feeds}  # NNCF may pass any subset, in any order
        self.calls: list[tuple[int, float]] = []

    def __call__(self, compiled: Any, data: Any) -> tuple[float, list[float]]:
        cos: list[float] = []
        for feed in data:
            ref = self._refs[id(feed)] if id(feed) in self._refs else _flat(self._ref(feed))
            out = _flat(compiled(feed))
            denom = np.linalg.norm(out) * np.linalg.norm(ref)
            cos.append(float(out @ ref / denom) if denom else float(np.array_equal(out, ref)))
        self.calls.append((len(cos), float(np.mean(cos))))
        return self.calls[-1][1], cos


def _flat(result: Any) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in result.values()])
