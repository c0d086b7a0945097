"""Static INT8 quantization (QDQ) with ONNX Runtime: weights and activations in int8, each
activation's range fixed ahead of time from the calibration split.

Ranges come from `edgecomp.passes.calibrate`, not from ONNX Runtime's calibrators: those keep
every intermediate output of every sample until the end, so memory grows with the calibration
set. Ours runs one sample at a time into fixed-size histograms, so memory is one sample's
activations plus the statistics (recorded in the pass record as `calibration_stats_bytes`).
ONNX Runtime's QDQ quantizer then places the Q/DQ pairs from those ranges, exactly as its
`quantize_static` would (same pre-processing, opset update, op-type and node selection).

Weights are 7-bit (`reduce_range`) where this CPU's int8 kernels would saturate full-range ones
(x86 without VNNI; see `_int8`).

Percentile, entropy and mse clip outliers that minmax would let stretch the scale; see
`calibrate.py` for the math of each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle
from edgecomp.passes import _int8, choice
from edgecomp.passes.calibrate import METHODS
from edgecomp.passes.context import PassContext


@dataclass(frozen=True)
class Params:
    method: str = "minmax"  # minmax | percentile | entropy | mse
    percentile: float = 99.99  # for method = "percentile": the share of values kept inside the range
    per_channel: bool = True
    activation_type: str = "quint8"  # quint8 | qint8
    weight_type: str = "qint8"
    reduce_range: bool | str = "auto"  # 7-bit weights; auto: where int8 saturates (x86 without VNNI)
    symmetric_activations: bool = False
    op_types: tuple[str, ...] = ()  # empty: every op ONNX Runtime can quantize
    exclude_nodes: tuple[str, ...] = ()
    samples: int = 0  # calibration samples to use; 0 = all of the calibration split

    def __post_init__(self) -> None:
        choice("method", self.method, METHODS)
        choice("activation_type", self.activation_type, ("quint8", "qint8"))
        choice("weight_type", self.weight_type, ("qint8", "quint8"))
        choice("reduce_range", self.reduce_range, _int8.CHOICES)
        if self.samples < 0:
            raise ValueError(f"samples = {self.samples} must be >= 0")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile = {self.percentile} must be in (50, 100] (e.g. 99.99)")
        if self.activation_type == "qint8" and self.weight_type == "quint8":
            raise ValueError("activation_type = 'qint8' with weight_type = 'quint8' is not supported by ONNX Runtime")


def quantize(src: Path, out: Path, feeds: Any, params: Params, scratch: Path) -> dict[str, Any]:
    """Calibrate `src` on `feeds` (an iterable, consumed once) and write the QDQ model to `out`;
    returns the calibration figures for the pass record."""
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.calibrate import TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer, update_opset_version
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgecomp.passes.calibrate import calibrate, default_op_types
    pre = scratch / "pre.onnx"
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception:  # pre-processing only helps; the quantizer works without it
        pre = src
    qt = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    model = update_opset_version(load_model_with_shape_infer(Path(pre)), qt[params.weight_type], qt[params.activation_type])
    op_types = list(params.op_types) or default_op_types()
    cal = calibrate(model, feeds, op_types, params.method, params.percentile, params.symmetric_activations)
    ranges = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in cal.ranges.items()})
    reduce_range, why = _int8.resolve(params.reduce_range)
    quantizer = QDQQuantizer(
        model, params.per_channel, reduce_range, qt[params.weight_type], qt[params.activation_type], ranges,
        [], list(params.exclude_nodes), op_types, {"ActivationSymmetric": params.symmetric_activations},
    )
    quantizer.quantize_model()
    quantizer.model.save_model_to_file(str(out), False)
    return {"calibration_samples": cal.samples, "calibrated_tensors": len(cal.ranges),
            "calibration_stats_bytes": cal.stats_bytes, **_int8.record(reduce_range, why)}


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    feeds = ctx.samples.calibration[: params.samples or None]
    if not feeds:
        raise UsageError("quantize-static: the calibration set is empty; supply samples with --samples FILE.npz")
    scratch = ctx.scratch("quantize-static")
    out = scratch / "model.onnx"
    figures = quantize(Path(model.onnx_path), out, iter(feeds), params, scratch)
    record = {"pass": "quantize-static", **dataclasses.asdict(params), **figures, "seed": ctx.seed}
    return model.with_pass(record, onnx_path=out)
