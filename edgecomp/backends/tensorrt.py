"""TensorRT on an NVIDIA GPU: the ONNX graph parsed by TensorRT's ONNX parser, built into `model.engine`.

Precision. TensorRT 10 builds weakly typed networks: fp16 is `BuilderFlag.FP16` (TensorRT picks fp16
or fp32 per layer), int8 is `BuilderFlag.INT8` + `FP16` over an explicit QDQ graph. TensorRT 11 drops
those flags (every network is strongly typed: each layer runs in the type the graph gives it), so
there fp16 means converting the graph to fp16 first (I/O kept fp32) and int8 is the QDQ graph with
its float parts in fp32. TF32 (TensorRT's default on Ampere and later, 10 mantissa bits) is off
unless `[options] tf32 = true`, so fp32 means fp32.

INT8 is explicit quantization, never TensorRT's implicit calibrator: when the incoming graph has no
QuantizeLinear, edgecomp's `quantize-static` pass writes one on the calibration split, with what
TensorRT requires: symmetric int8 (zero point 0) for activations and weights. ONNX Runtime's
int32 bias DequantizeLinear (TensorRT has no int32 dequantize) is folded back into float biases:
bias = (q - zero_point) * scale, the very values ONNX Runtime would compute.

Shapes: one optimization profile; a dynamic axis gets min 1, opt = the sample's size, max =
`max_batch` (first axis) or `max_length` (other axes; 0 = the sample's size). Tactic timings are
cached per GPU and TensorRT version in `~/.cache/edgecomp/tensorrt` and reused by later builds.
Engines are specific to the GPU and TensorRT version: the manifest records both, and `load()` refuses
an engine built on another. Device buffers are torch CUDA tensors on a torch CUDA stream (no
pycuda / cuda-python); latency therefore includes the host <-> device copies of inputs and outputs.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.backends.base import Artifact, Feed
from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle

PRECISIONS = ("fp32", "fp16", "int8")
ENGINE = "model.engine"
# how the profile's int8 is quantized when the graph arrives without QDQ (TensorRT's requirements)
# (full-range weights: TensorRT's int8 kernels accumulate in int32, they do not saturate like x86 VPMADDUBSW)
QDQ_PARAMS = {"per_channel": True, "activation_type": "qint8", "weight_type": "qint8", "reduce_range": False,
              "symmetric_activations": True}
_ORDER = ("int8", "fp8", "int4", "fp16", "bf16", "fp32")
_MOVES_DATA = {"Reformat", "NoOp", "Constant", "Shuffle"}  # engine layers that copy, not compute


@dataclass(frozen=True)
class Options:
    """A profile's `[options]` table for this backend; unknown keys and values are errors."""

    max_batch: int = 8  # optimization profile max of a dynamic first axis
    max_length: int = 0  # max of other dynamic axes; 0 = the sample's size
    tf32: bool = False  # allow TF32 matmuls/convolutions (TensorRT's default; not fp32 numerics)
    fp16_fallback: bool = True  # int8 on TensorRT 10: layers without QDQ may run fp16 (else fp32)
    timing_cache: bool = True  # reuse tactic timings across builds (~/.cache/edgecomp/tensorrt)
    optimization_level: int = 3  # builder_optimization_level, 0 (fast build) .. 5 (best engine)
    workspace_mb: int = 0  # builder workspace limit; 0 = TensorRT's default (the device's memory)
    calibration_method: str = "minmax"  # int8 without QDQ: quantize-static method
    calibration_samples: int = 0  # int8 without QDQ: 0 = the whole calibration split
    quantize_ops: tuple[str, ...] = ("Conv", "MatMul", "Gemm")  # int8 without QDQ: ops given QDQ inputs
    keep_float: tuple[str, ...] = ()  # int8 without QDQ: ONNX node names (fnmatch patterns) left unquantized

    def __post_init__(self) -> None:
        from edgecomp.passes import choice

        choice("calibration_method", self.calibration_method, ("minmax", "percentile", "entropy"))
        if self.max_batch < 1 or self.max_length < 0 or self.workspace_mb < 0 or self.calibration_samples < 0:
            raise ValueError("max_batch must be >= 1; max_length, workspace_mb and calibration_samples >= 0")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level = {self.optimization_level} must be in 0..5")


def options(profile: Any) -> Options:
    """The profile's [options] table as typed `Options`; errors name the file and the key."""
    from edgecomp.tomlconf import options_where, typed

    return typed(Options, profile.options, f"{options_where(profile)} (tensorrt)")


def probe() -> tuple[bool, str]:
    """A CUDA device that torch can drive (the runner's buffers), and a tensorrt that loads."""
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return False, (f"no CUDA device: torch {torch.__version__} is a CPU-only build (TensorRT's buffers go "
                           "through torch.cuda); install a CUDA build of torch on an NVIDIA GPU machine")
        return False, "no CUDA device: torch.cuda.is_available() is False (no NVIDIA GPU or driver visible)"
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # a broken install is "unavailable", not a crash of `edgecomp targets`
        return False, f"tensorrt does not load: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
    return True, ""


def device_identity() -> dict[str, str]:
    """What an engine is tied to: the TensorRT version, the GPU's name and compute capability."""
    import tensorrt as trt
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def mismatch(built: dict[str, Any], here: dict[str, str]) -> str | None:
    """Why an engine built on `built` cannot run `here` (None when it can)."""
    if all(built.get(k) == here[k] for k in ("gpu", "compute_capability", "tensorrt")):
        return None
    return (f"engine built for {_describe(built)}, this machine has {_describe(here)}: TensorRT engines are specific "
            "to the GPU and the TensorRT version; rebuild it here with edgecomp build")


def _describe(d: dict[str, Any]) -> str:
    return f"{d.get('gpu')} (compute capability {d.get('compute_capability')}) with TensorRT {d.get('tensorrt')}"


def profile_shapes(network: dict[str, tuple[int, ...]], sample: dict[str, tuple[int, ...]], max_batch: int,
                   max_length: int) -> dict[str, dict[str, list[int]]]:
    """min/opt/max per input with a dynamic (-1) axis: min 1, opt the sample, max max_batch / max_length."""
    shapes = {}
    for name, dims in network.items():
        if all(d >= 0 for d in dims):
            continue
        if name not in sample or len(sample[name]) != len(dims):
            raise UsageError(f"TensorRT input {name!r} {list(dims)} has no sample of rank {len(dims)} "
                             f"(sample inputs: {', '.join(sorted(sample))})")
        got = sample[name]
        top = [max(v, max_batch if axis == 0 else max_length or v) for axis, v in enumerate(got)]
        shapes[name] = {"min": [d if d >= 0 else 1 for d in dims], "opt": [d if d >= 0 else v for d, v in zip(dims, got)],
                        "max": [d if d >= 0 else m for d, m in zip(dims, top)]}
    return shapes


def parse_failure(model: str, errors: list[tuple[int, str, str, str]], nodes: list[tuple[str, str]]) -> str:
    """One line naming each failing node: index, name and op (from the ONNX graph when the parser omits them)."""
    parts = []
    for index, name, op, desc in errors:
        if 0 <= index < len(nodes):
            name, op = name or nodes[index][0], op or nodes[index][1]
        where = f"node {index} {name!r} ({op})" if index >= 0 else "the graph"
        parts.append(f"{where}: {' '.join(desc.split())[:200]}")
    more = f" (and {len(parts) - 4} more)" if len(parts) > 4 else ""
    return f"TensorRT's ONNX parser cannot lower {model}: " + "; ".join(parts[:4] or ["no error reported"]) + more


def _precision(fmt: str) -> str | None:
    """The type in an inspector "Format/Datatype" ("Row major linear FP32 format", "Half", "Int8", "Float")."""
    f = fmt.lower()
    for word, name in (("int8", "int8"), ("fp8", "fp8"), ("int4", "int4"), ("bf16", "bf16"), ("bfloat", "bf16"),
                       ("fp16", "fp16"), ("half", "fp16"), ("fp32", "fp32"), ("float", "fp32")):
        if word in f:
            return name
    return None  # int32/int64/bool tensors, or "N/A due to dynamic shapes"


def layer_precisions(engine_json: str) -> dict[str, int]:
    """Compute layers per precision, from the engine inspector's JSON (needs ProfilingVerbosity.DETAILED):
    a layer counts in the type of its first floating-point or int8 input; reformats and no-ops do not count."""
    counts: Counter[str] = Counter()
    for layer in json.loads(engine_json).get("Layers", []):
        if not isinstance(layer, dict) or layer.get("LayerType") in _MOVES_DATA:
            continue  # names only (lower verbosity), or a copy
        kinds = [_precision(str(t.get("Format/Datatype", ""))) for t in layer.get("Inputs", []) if isinstance(t, dict)]
        kind = next((k for k in kinds if k), None)
        if kind:
            counts[kind] += 1
    return dict(counts.most_common())


def executed_precision(layers: dict[str, int], fallback: str) -> str:
    """One word for the report ("int8+fp16", "fp16+fp32", "fp32"); `fallback` when no layer was readable."""
    kinds = [k for k in _ORDER if layers.get(k)] + sorted(set(layers) - set(_ORDER))
    return "+".join(kinds) if kinds else fallback


def prepare_int8(model: ModelHandle, opts: Options, ctx: Any) -> tuple[Path, dict[str, Any]]:
    """An explicit QDQ graph TensorRT accepts: the incoming one if it has QuantizeLinear, else quantize-static's."""
    import onnx

    from edgecomp.passes import make_params, pass_module

    m = onnx.load(str(model.onnx_path))
    record: dict[str, Any] = {"source": "the incoming graph (passes before lowering)"}
    if not any(n.op_type == "QuantizeLinear" for n in m.graph.node):
        names = [n.name for n in m.graph.node]
        unmatched = [p for p in opts.keep_float if not fnmatch.filter(names, p)]
        if unmatched:
            raise UsageError(f"[options] keep_float: {unmatched[0]!r} matches no node of {model.name}")
        keep = sorted({n for p in opts.keep_float for n in fnmatch.filter(names, p)})
        params = make_params("quantize-static", QDQ_PARAMS | {"method": opts.calibration_method, "exclude_nodes": keep,
                             "samples": opts.calibration_samples, "op_types": list(opts.quantize_ops)})
        model = pass_module("quantize-static").run(model, params, ctx)
        record = {"source": "quantize-static, run by the tensorrt backend", **model.history[-1]}
        m = onnx.load(str(model.onnx_path))
    _check_symmetric(m)
    record["folded_int32_bias"] = fold_int32_dequantize(m)
    record["quantize_linear"] = sum(n.op_type == "QuantizeLinear" for n in m.graph.node)
    out = ctx.scratch("tensorrt") / "model.qdq.onnx"
    onnx.save_model(m, str(out), save_as_external_data=m.ByteSize() > 1_800_000_000, location="model.qdq.onnx.data")
    return out, record


def _check_symmetric(m: Any) -> None:
    """TensorRT quantizes to signed int8 with zero point 0; anything else fails deep in the parser."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        zp = inits.get(n.input[2]) if n.op_type == "QuantizeLinear" and len(n.input) > 2 else None
        if zp is not None and (zp.data_type != TensorProto.INT8 or numpy_helper.to_array(zp).any()):
            raise UsageError(f"QuantizeLinear {n.name or n.output[0]!r} is not symmetric int8 (zero point type "
                             f"{TensorProto.DataType.Name(zp.data_type)}): TensorRT needs quantize-static with "
                             "activation_type = \"qint8\" and symmetric_activations = true")


def fold_int32_dequantize(m: Any) -> int:
    """Replace DequantizeLinear(int32 initializer) (quantized biases) by the float initializer it computes."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    folded = []
    for n in m.graph.node:
        q = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if q is None or q.data_type != TensorProto.INT32 or n.input[1] not in inits:
            continue
        x = numpy_helper.to_array(q).astype(np.float64)
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] else 0.0
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if np.ndim(scale) == 1 and x.ndim > 1:  # per-channel: broadcast along `axis`
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
        m.graph.initializer.append(numpy_helper.from_array(((x - zp) * scale).astype(np.float32), n.output[0]))
        folded.append(n)
    for n in folded:
        m.graph.node.remove(n)
    used = {i for n in m.graph.node for i in n.input}
    for name in {i for n in folded for i in n.input} - used:  # drop the int32 and scale tensors left unused
        if name in inits:
            m.graph.initializer.remove(inits[name])
    return len(folded)


def prepare_fp16(onnx_path: Path, out: Path) -> Path:
    """For strongly typed TensorRT: the graph itself in fp16 (weights and compute), inputs and outputs fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    onnx.save_model(m, str(out), save_as_external_data=m.ByteSize() > 1_800_000_000, location=out.name + ".data")
    return out


def _logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors for the one-line message instead of printing them."""
    class Log(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(msg.split()))

    return Log()


def _ask(error: Any, method: str) -> str:
    """A ParserError field that older TensorRT versions lack ("" then)."""
    return str(getattr(error, method)()) if hasattr(error, method) else ""


def _use_timing_cache(config: Any, blob: bytes) -> bool:
    """Give the builder the serialized timing cache `blob` (b"": an empty one); False if TensorRT refuses it."""
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # a truncated or corrupt file
        return False
    return cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))


def _timing_cache_path(ident: dict[str, str]) -> Path:
    from edgecomp.paths import cache_dir

    gpu = re.sub(r"[^a-z0-9]+", "-", ident["gpu"].lower()).strip("-")
    folder = cache_dir() / "tensorrt"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"timing-{gpu}-cc{ident['compute_capability']}-trt{ident['tensorrt']}.cache"


def lower(model: ModelHandle, profile: Any, folder: Path, ctx: Any) -> Artifact:
    """ONNX -> TensorRT network (ONNX parser) -> serialized engine `model.engine` for this GPU."""
    import onnx
    import tensorrt as trt

    opts = options(profile)
    if profile.precision not in PRECISIONS:
        raise UsageError(f"{profile.name}: precision {profile.precision!r} is not one TensorRT lowers ({', '.join(PRECISIONS)})")
    weak = hasattr(trt.BuilderFlag, "FP16")  # TensorRT < 11: weakly typed networks, precision by builder flags
    ident = device_identity()
    meta: dict[str, Any] = {**ident, "converter": f"TensorRT ONNX parser {trt.__version__}",
                            "typing": "weak (builder flags)" if weak else "strong (graph types)"}
    onnx_path = model.onnx_path
    if profile.precision == "int8":
        onnx_path, meta["quantization"] = prepare_int8(model, opts, ctx)
    elif profile.precision == "fp16" and not weak:
        onnx_path = prepare_fp16(onnx_path, ctx.scratch("tensorrt") / "model.fp16.onnx")

    log = _logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(0)  # explicit batch: the only mode since TensorRT 10
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        details = [(e.node(), _ask(e, "node_name"), _ask(e, "node_operator"), e.desc()) for e in errors]
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        raise UsageError(parse_failure(model.name, details or [(-1, "", "", "; ".join(log.errors[-2:]))],
                                       [(n.name, n.op_type) for n in graph.node]))

    config = builder.create_builder_config()
    flags = {"fp16": ["fp16"], "int8": ["int8"] + (["fp16"] if opts.fp16_fallback else [])}.get(profile.precision, [])
    for flag in flags if weak else []:
        config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
    if not opts.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    config.builder_optimization_level = opts.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions readable from the engine
    if opts.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if any(t.is_shape_tensor for t in inputs):
        raise UsageError(f"{model.name}: an input is a shape tensor ({[t.name for t in inputs if t.is_shape_tensor]}); "
                         "edgecomp's TensorRT profiles take data inputs only")
    sample = {k: tuple(v.shape) for k, v in ctx.samples.validation[0].items()}
    shapes = profile_shapes({t.name: tuple(t.shape) for t in inputs}, sample, opts.max_batch, opts.max_length)
    if shapes:
        opt_profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            opt_profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(opt_profile)

    cache_path = _timing_cache_path(ident) if opts.timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    if cache_path and not _use_timing_cache(config, blob):  # unreadable, or from another device: start afresh
        blob = b""
        _use_timing_cache(config, b"")
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UsageError(f"TensorRT could not build an engine for {model.name}: {'; '.join(log.errors[-2:]) or 'no error logged'}")
    if cache_path:
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, cache_path)  # atomic: concurrent builds never read half a cache
        meta["timing_cache"] = {"path": str(cache_path), "reused_bytes": len(blob), "saved_bytes": cache_path.stat().st_size}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ENGINE).write_bytes(bytes(engine))
    meta |= {"precision_flags": flags if weak else [], "tf32": opts.tf32, "builder_optimization_level": opts.optimization_level,
             "profile_shapes": shapes}
    if not weak:  # the types the strongly typed graph holds (float parts of the int8 graph stay fp32)
        meta["graph_precision"] = {"fp32": "fp32", "fp16": "fp16", "int8": "int8+fp32"}[profile.precision]
    artifact = Artifact(folder, "tensorrt", {"model": ENGINE}, meta)
    info = load(artifact, profile.threads).info()  # read back from the engine, for tools that read the manifest
    meta |= {"layers": info["layers"], "executed_precision": info["executed_precision"]}
    return artifact


class TensorRTRunner:
    def __init__(self, path: Path, threads: int, meta: dict[str, Any]) -> None:
        import tensorrt as trt
        import torch

        self._log = _logger(trt)
        self.engine = trt.Runtime(self._log).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UsageError(f"{path}: TensorRT cannot deserialize this engine: {'; '.join(self._log.errors[-2:])}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = {n: self.engine.get_tensor_mode(n) for n in names}
        self.input_names = [n for n in names if mode[n] == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if mode[n] == trt.TensorIOMode.OUTPUT]
        self._np = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._torch = {n: torch.from_numpy(np.empty(0, d)).dtype for n, d in self._np.items()}
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self._device)  # TensorRT synchronizes extra on the default stream
        for n in self.input_names:  # concrete shapes from the start, so the inspector can read layer formats
            if -1 in tuple(self.engine.get_tensor_shape(n)):
                self.context.set_input_shape(n, tuple(self.engine.get_tensor_profile_shape(n, 0)[1]))
        self.threads = threads
        self.meta = meta
        self._layers: dict[str, int] | None = None

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        import torch

        keep = []  # the input tensors must outlive the launch
        with torch.cuda.stream(self._stream):  # copies, allocations and the engine all on one stream, in order
            for name in self.input_names:
                arr = np.ascontiguousarray(feed[name], dtype=self._np[name])
                if not self.context.set_input_shape(name, arr.shape):
                    raise UsageError(f"input {name!r} shape {list(arr.shape)} is outside the engine's optimization "
                                     f"profile {self.meta.get('profile_shapes', {}).get(name)}")
                keep.append(torch.from_numpy(arr).to(self._device))
                self.context.set_tensor_address(name, keep[-1].data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise UsageError(f"output {name!r} has a data-dependent shape {list(shape)}, which this runner does not allocate")
                outputs[name] = torch.empty(shape, dtype=self._torch[name], device=self._device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed: {'; '.join(self._log.errors[-2:])}")
            result = {name: t.cpu().numpy() for name, t in outputs.items()}  # .cpu() waits for the stream
        return result

    def layers(self) -> dict[str, int]:
        """Layer precisions from the engine inspector ({} when the engine holds no detailed layer information)."""
        import tensorrt as trt

        if self._layers is None:
            inspector = self.engine.create_engine_inspector()
            inspector.execution_context = self.context
            try:
                self._layers = layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
            except ValueError:  # not JSON: an engine built without DETAILED verbosity
                self._layers = {}
        return self._layers

    def info(self) -> dict[str, Any]:
        import tensorrt as trt

        ident = device_identity()
        flags = self.meta.get("precision_flags", [])
        fallback = "+".join(flags) if flags else self.meta.get("graph_precision", "fp32")
        layers = self.layers()
        return {"runtime": "tensorrt", "version": trt.__version__,
                "device": f"{self._device} ({ident['gpu']}, compute capability {ident['compute_capability']})",
                "threads": self.threads, "typing": self.meta.get("typing"), "precision_flags": flags,
                "tf32": self.meta.get("tf32", False), "layers": layers, "executed_precision": executed_precision(layers, fallback)}


def load(artifact: Artifact, threads: int) -> TensorRTRunner:
    """Refuses, in one line, an engine built for another GPU or TensorRT version (it would fail or crash)."""
    why = mismatch(artifact.meta, device_identity())
    if why:
        raise UsageError(f"{artifact.folder}: {why}")
    return TensorRTRunner(artifact.path("model"), threads, artifact.meta)
