"""OpenVINO, CPU plugin: the ONNX graph converted to IR (`model.xml` + `model.bin`).

The profile's `precision` picks the lowering: fp32 keeps the weights as they are, fp16 stores
them compressed (the CPU plugin widens them back to f32 at load), int8 quantizes weights and
activations with NNCF post-training quantization on the calibration split
(`edgecomp.backends.openvino_nncf`).

The bf16 trap: on CPUs with AVX512-BF16 or AMX the CPU plugin's default inference precision is
bf16, whatever the IR holds (MiniLM: max abs error about 1e-2 instead of 1e-6). Every profile
therefore pins `INFERENCE_PRECISION_HINT` (`[options] inference_precision`), and the runner reads
the precision back from the compiled model's runtime graph (the precision each compute layer
actually runs in), never from the request. Threads are explicit, one stream, latency hint.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.backends.base import Artifact, Feed
from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle

DEVICE = "CPU"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # profile.precision values this backend lowers
# runtime layer types that do the arithmetic, and IR op types whose fusions do (attention in a Subgraph)
COMPUTE_LAYERS = {"FullyConnected", "Convolution", "Deconvolution", "MatMul", "MHA", "ScaledDotProductAttention",
                  "RNNSeq", "RNNCell"}
COMPUTE_OPS = {"MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData",
               "ScaledDotProductAttention", "LSTMSequence", "GRUSequence", "RNNSequence", "LSTMCell", "GRUCell", "RNNCell"}
_WEIGHT_TYPES = {"f32", "f16", "bf16", "i8", "u8", "i4", "u4", "nf4", "f8e4m3", "f8e5m2"}
_NAMES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "u8": "int8", "i8": "int8", "f64": "fp64"}


@dataclass(frozen=True)
class Options:
    """A profile's `[options]` table for this backend; unknown keys and values are errors."""

    inference_precision: str = "f32"  # pinned INFERENCE_PRECISION_HINT: f32 | bf16 | f16
    static_shape: bool = False  # reshape the IR to the sample's shape (batch 1, recipe length)
    model_type: str = "auto"  # int8: auto | transformer | default (NNCF ModelType)
    preset: str = "mixed"  # int8: mixed (asymmetric activations) | performance (symmetric)
    subset_size: int = 0  # int8: calibration samples to use; 0 = the whole calibration split
    fast_bias_correction: bool = True  # int8: False runs NNCF's full (slower) bias correction
    smooth_quant_alpha: float = -1.0  # int8: SmoothQuant alpha for MatMuls; < 0 = NNCF's default
    ignored_types: tuple[str, ...] = ()  # int8: OpenVINO op types NNCF leaves in float
    accuracy_control: bool = False  # int8: NNCF accuracy-aware PTQ against the budget's cosine_mean

    def __post_init__(self) -> None:
        from edgecomp.passes import choice

        choice("inference_precision", self.inference_precision, ("f32", "bf16", "f16"))
        choice("model_type", self.model_type, ("auto", "transformer", "default"))
        choice("preset", self.preset, ("mixed", "performance"))
        if self.subset_size < 0:
            raise ValueError(f"subset_size = {self.subset_size} must be >= 0")


def options(profile: Any) -> Options:
    """The profile's [options] table as typed `Options`; errors name the file and the key."""
    from edgecomp.tomlconf import options_where, typed

    return typed(Options, profile.options, f"{options_where(profile)} (openvino)")


def probe() -> tuple[bool, str]:
    """The runtime imports and lists a CPU device."""
    try:
        import openvino as ov

        devices = ov.Core().available_devices
    except Exception as e:  # a broken install is "unavailable", not a crash of `edgecomp targets`
        return False, f"openvino does not load: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
    return (True, "") if DEVICE in devices else (False, f"OpenVINO lists no CPU device (devices: {devices})")


def lower(model: ModelHandle, profile: Any, folder: Path, ctx: Any) -> Artifact:
    """ONNX -> OpenVINO IR (+ fp16 weight compression or NNCF INT8), saved as model.xml + model.bin."""
    import openvino as ov

    opts = options(profile)
    if profile.precision not in PRECISIONS:
        raise UsageError(f"{profile.name}: precision {profile.precision!r} is not one OpenVINO lowers ({', '.join(PRECISIONS)})")
    if profile.precision != "int8" and (profile.precision == "bf16") != (opts.inference_precision == "bf16"):
        # bf16 is the profile's stated precision or nothing: an fp32 profile never quietly runs bf16
        raise UsageError(f"{profile.name}: precision {profile.precision!r} needs [options] inference_precision = "
                         f"{'bf16' if profile.precision == 'bf16' else 'f32'!r}, not {opts.inference_precision!r}")
    try:
        ov_model = ov.convert_model(str(model.onnx_path))
    except Exception as e:
        raise UsageError(f"openvino could not convert {model.name}: {str(e).splitlines()[0][:200]}") from None
    meta: dict[str, Any] = {"converter": f"openvino.convert_model (ONNX frontend) {ov.get_version()}",
                            "device": DEVICE, "inference_precision": opts.inference_precision,
                            "performance_hint": "LATENCY"}
    if opts.static_shape:
        shapes = {name: list(arr.shape) for name, arr in ctx.samples.validation[0].items()}
        ov_model.reshape(shapes)
        meta["static_shape"] = shapes
    if profile.precision == "int8":
        from edgecomp.backends.openvino_nncf import quantize

        ov_model, meta["quantization"] = quantize(ov_model, opts, ctx, profile.budget)
    folder.mkdir(parents=True, exist_ok=True)
    if profile.precision == "fp16":  # what save_model(compress_to_fp16=True) does, done here so that
        from openvino._offline_transformations import compress_model_transformation  # its nodes get stable names

        compress_model_transformation(ov_model)
    _stable_names(ov_model)
    ov.save_model(ov_model, str(folder / "model.xml"), compress_to_fp16=False)
    artifact = Artifact(folder, "openvino", {"model": "model.xml", "weights": "model.bin"}, meta)
    runner = load(artifact, profile.threads)  # what this machine's plugin makes of it, for tools that read the manifest
    meta["weights"] = weight_types(runner.ov_model)
    meta["executed_precision"] = runner.info()["executed_precision"]
    return artifact


def _stable_names(ov_model: Any) -> None:
    """Nodes that the converter or NNCF create are named from a process-wide counter (`Constant_291007`),
    so one model saved by two processes differs byte for byte; number them in graph order instead.
    Only node names change: tensor names (what `edgecomp diff` matches on) stay."""
    import re

    for i, op in enumerate(ov_model.get_ordered_ops()):
        made = re.fullmatch(r"([A-Za-z]+)_\d+(_compressed)?", op.get_friendly_name())
        if made:
            op.set_friendly_name(f"{made[1]}_n{i}{made[2] or ''}")


def weight_types(ov_model: Any) -> dict[str, int]:
    """Elements stored per constant type in the IR ({"f32": n, "f16": n, "i8": n}): what the .bin holds."""
    counts: Counter[str] = Counter()
    for op in ov_model.get_ordered_ops():
        kind = op.get_output_element_type(0).get_type_name() if op.get_type_name() == "Constant" else ""
        if kind in _WEIGHT_TYPES:  # i32/i64 constants are shapes and indices, not weights
            size = int(np.prod(op.get_output_partial_shape(0).to_shape(), dtype=np.int64))
            counts[kind] += size if size >= 16 else 0  # scalars (scales, epsilons) are noise
    return {k: v for k, v in counts.most_common() if v}


def compute_precisions(compiled: Any, op_types: dict[str, str]) -> dict[str, int]:
    """How many compute layers of the compiled runtime graph run in each precision.

    A runtime layer counts when its type computes (FullyConnected, Convolution, ...) or when one of
    the IR ops fused into it (`originalLayersNames`; `op_types`: IR op name -> type) is a MatMul,
    convolution or attention op: attention fused into a snippet `Subgraph` cannot hide."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        names = rt["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in rt else []
        kind = rt["layerType"].astype(str)
        if kind in COMPUTE_LAYERS or kind != "Const" and any(op_types.get(n.strip()) in COMPUTE_OPS for n in names):
            counts[_layer_precision(rt)] += 1
    return dict(counts.most_common())


def _layer_precision(rt: Any) -> str:
    """The kernel's suffix ("brgconv_avx512_f32", "brgemm_avx512_amx_bf16", "..._I8") names what it
    computes in; `runtimePrecision` names the input type (f16 for fp16 weights widened to f32)."""
    kernel = rt["primitiveType"].astype(str).rsplit("_", 1)[-1].lower() if "primitiveType" in rt else ""
    if kernel in _NAMES:
        return _NAMES[kernel]
    p = rt["runtimePrecision"].astype(str)
    return _NAMES.get(p, p)


def executed_precision(layers: dict[str, int], hint: str) -> str:
    """One word for the report: "int8" when every compute layer is int8, "int8+fp32" when some fall
    back to float, else the float precision the layers run in (the hint when there are none)."""
    if not layers:
        return _NAMES.get(hint, hint)
    ints = layers.get("int8", 0)
    floats = [p for p in layers if p != "int8"]
    if ints and floats:
        return "int8+" + "+".join(floats)
    return "int8" if ints else "+".join(floats)


class OpenVinoRunner:
    def __init__(self, xml: Path, threads: int, inference_precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        self.ov_model = core.read_model(str(xml))
        self._op_types = {op.get_friendly_name(): op.get_type_name() for op in self.ov_model.get_ordered_ops()}
        self.compiled = core.compile_model(self.ov_model, DEVICE, {
            "INFERENCE_PRECISION_HINT": inference_precision, "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        self._outputs = list(self.compiled.outputs)
        self.threads = threads
        self._version = ov.get_version()
        self._cpu = core.get_property(DEVICE, "FULL_DEVICE_NAME")

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        # inputs shared, not copied (the call is synchronous: halves the overhead on small models);
        # outputs copied, so the arrays stay valid after the next call
        result = self.request.infer(feed, share_inputs=True, share_outputs=False)
        return {name: result[port] for name, port in zip(self.output_names, self._outputs)}

    def info(self) -> dict[str, Any]:
        """Read back from the compiled model: what the plugin settled on, not what was asked."""
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        layers = compute_precisions(self.compiled, self._op_types)
        return {"runtime": "openvino", "version": self._version, "device": f"{DEVICE} ({self._cpu})",
                "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
                "performance_hint": str(self.compiled.get_property("PERFORMANCE_HINT")),
                "inference_precision_hint": hint, "compute_layers": layers,
                "executed_precision": executed_precision(layers, hint)}


def load(artifact: Artifact, threads: int) -> OpenVinoRunner:
    return OpenVinoRunner(artifact.path("model"), threads, artifact.meta.get("inference_precision", "f32"))


def intermediates(artifact: Artifact, feed: Feed, threads: int = 2) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every named f32 tensor of the IR, computed in f32, for `edgecomp diff`. The ONNX frontend names
    each output port after the ONNX tensor it came from, so IR and ONNX tensors match by name."""
    import openvino as ov

    core = ov.Core()
    ov_model = core.read_model(str(artifact.path("model")))
    ports = [out for op in ov_model.get_ordered_ops() if op.get_type_name() not in ("Parameter", "Constant", "Result")
             for out in op.outputs() if out.get_element_type() == ov.Type.f32 and out.get_names()]
    ov_model.add_outputs(ports)
    compiled = core.compile_model(ov_model, DEVICE, {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    result = compiled.create_infer_request().infer(feed, share_outputs=False)
    by_name = {name: port for port in compiled.outputs for name in port.get_names()}
    order = [name for port in ports for name in sorted(port.get_names()) if name in by_name]  # execution order
    return order, {name: np.asarray(result[by_name[name]]) for name in order}
