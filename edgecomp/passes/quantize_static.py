"""Static INT8 quantization (QDQ) with ONNX Runtime: weights and activations in int8, each
activation's range fixed ahead of time from the calibration split.

The calibration reader streams one sample at a time, so memory holds one batch plus the
calibrator's statistics, never the whole set. Percentile and entropy clip outliers that MinMax
would let stretch the scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle
from edgecomp.passes import choice
from edgecomp.passes.context import PassContext


@dataclass(frozen=True)
class Params:
    method: str = "minmax"  # minmax | percentile | entropy
    per_channel: bool = True
    activation_type: str = "quint8"  # quint8 | qint8
    weight_type: str = "qint8"
    symmetric_activations: bool = False
    op_types: tuple[str, ...] = ()  # empty: every op ONNX Runtime can quantize
    exclude_nodes: tuple[str, ...] = ()
    samples: int = 0  # calibration samples to use; 0 = all of the calibration split

    def __post_init__(self) -> None:
        choice("method", self.method, ("minmax", "percentile", "entropy"))
        choice("activation_type", self.activation_type, ("quint8", "qint8"))
        choice("weight_type", self.weight_type, ("qint8", "quint8"))
        if self.samples < 0:
            raise ValueError(f"samples = {self.samples} must be >= 0")


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds, one at a time."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = ctx.samples.calibration[: params.samples or None]
    if not feeds:
        raise UsageError("quantize-static: the calibration set is empty; supply samples with --samples FILE.npz")
    scratch = ctx.scratch("quantize-static")
    pre = scratch / "pre.onnx"
    try:
        quant_pre_process(str(model.onnx_path), str(pre), skip_symbolic_shape=True)
    except Exception:  # pre-processing only helps; the quantizer works without it
        pre = model.onnx_path
    out = scratch / "model.onnx"
    qt = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[params.method]
    quantize_static(
        str(pre), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(params.op_types) or None, nodes_to_exclude=list(params.exclude_nodes),
        per_channel=params.per_channel, activation_type=qt[params.activation_type], weight_type=qt[params.weight_type],
        calibrate_method=method,
        extra_options={"ActivationSymmetric": params.symmetric_activations},
    )
    record = {"pass": "quantize-static", **dataclasses.asdict(params), "calibration_samples": len(feeds), "seed": ctx.seed}
    return model.with_pass(record, onnx_path=out)
