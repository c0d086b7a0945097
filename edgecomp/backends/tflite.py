"""LiteRT (TensorFlow Lite) on CPU with XNNPACK: the mobile / ARM target.

Lowering: ONNX -> static shapes from the real samples -> onnxslim -> onnx2tf -> TFLiteConverter,
in a child process with a timeout (`tflite_convert`), because converters can crash the process.
The .tflite must hold builtin ops only: a Flex (Select TF) op needs the TensorFlow kernels a stock
mobile runtime does not ship, so it fails the build (exit 2, op and ONNX node named) unless the
profile sets `allow_flex = true`. Erf (from GELU) is the usual culprit: exported GELUs are fused
into TFLite's builtin GELU (`tflite_gelu`), and any other Erf becomes a builtin-op polynomial with
`pseudo_ops = ["erf"]` (|error| < 1.5e-7, Abramowitz-Stegun 7.1.26).

Layout: onnx2tf makes rank-3..5 inputs channel-last (NCHW -> NHWC). The manifest's meta.layout
records, per tensor, the artifact's own name, shape, dtype, quantization and the transpose:
  inputs:  artifact = source.transpose(transpose);  q = round(x / scale) + zero_point
  outputs: source = artifact.transpose(transpose);  x = (q - zero_point) * scale
The Runner takes and returns tensors in the source (ONNX) layout and applies exactly that.

Profile `[options]`: quantize = none | fp16 | dynamic | int8 (full-integer, calibrated);
io_dtype = float32 | int8 (int8 only); per_channel; calibration_samples (0 = all);
pseudo_ops; allow_flex; timeout_s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.backends.base import Artifact, Feed
from edgecomp.backends.tflite_io import INTERPRETERS, dequantize, interpreter, quantize
from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle

LAYOUTS = {(0, 2, 1): ("NCW", "NWC"), (0, 2, 3, 1): ("NCHW", "NHWC"), (0, 2, 3, 4, 1): ("NCDHW", "NDHWC")}


@dataclass(frozen=True)
class Options:
    quantize: str = "none"
    io_dtype: str = "float32"
    per_channel: bool = True
    calibration_samples: int = 0
    pseudo_ops: tuple[str, ...] = ("erf",)
    allow_flex: bool = False
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.quantize not in ("none", "fp16", "dynamic", "int8"):
            raise ValueError(f"quantize = {self.quantize!r} is not one of 'none', 'fp16', 'dynamic', 'int8'")
        if self.io_dtype not in ("float32", "int8"):
            raise ValueError(f"io_dtype = {self.io_dtype!r} is not one of 'float32', 'int8'")
        if self.io_dtype == "int8" and self.quantize != "int8":
            raise ValueError("io_dtype = 'int8' needs quantize = 'int8'")
        if self.calibration_samples < 0 or self.timeout_s <= 0:
            raise ValueError("calibration_samples must be >= 0 and timeout_s > 0")


def options(profile: Any) -> Options:
    """The profile's [options] table as typed `Options`; errors name the file and the key."""
    from edgecomp.tomlconf import options_where, typed

    return typed(Options, profile.options, f"{options_where(profile)} (tflite)")


def probe() -> tuple[bool, str]:
    """Lowering needs onnx2tf + TensorFlow (checked by the registry); running needs an interpreter."""
    if importlib.util.find_spec("onnxslim") is None:
        return False, "onnxslim is not installed: pip install 'edgecomp[tflite]'"
    if not any(importlib.util.find_spec(m) for m in INTERPRETERS):
        return False, "no LiteRT interpreter (ai-edge-litert, tflite-runtime or tensorflow): pip install 'edgecomp[tflite]'"
    return True, ""


def convertible(onnx_path: Path) -> list[tuple[str, str]]:
    """(name, op type) of every ONNX node; fails fast, before any TensorFlow import, on an op onnx2tf lacks."""
    import onnx

    spec = importlib.util.find_spec("onnx2tf")
    ops_dir = Path(next(iter(spec.submodule_search_locations))) / "ops" if spec and spec.submodule_search_locations else None
    known = {p.stem for p in ops_dir.glob("*.py")} if ops_dir else set()
    nodes = [(n.name or n.output[0], n.op_type, n.domain) for n in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    for name, op, domain in nodes:
        if (domain not in ("", "ai.onnx") or op not in known) and known:
            dom = f" from domain {domain}" if domain not in ("", "ai.onnx") else ""
            raise UsageError(f"the TFLite converter (onnx2tf) has no conversion for op {op}{dom} (node {name}); "
                             "remove or replace that op, or build for another target")
    return [(n, op) for n, op, _ in nodes]


def _child_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "edgecomp.backends.tflite_convert", str(spec_path)]


def _run_converter(spec: dict[str, Any], work: Path, timeout: float, what: str) -> dict[str, Any]:
    """Run the conversion in a child process; every way it can end badly becomes one UsageError."""
    spec_path, log_path = work / "spec.json", work / "convert.log"
    spec_path.write_text(json.dumps(spec))
    root = str(Path(__file__).resolve().parents[2])
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
                        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_child_command(spec_path), stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException as e:  # timeout, Ctrl-C, SIGTERM: never leave a converter running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                raise UsageError(f"{what}: the TFLite converter did not finish within timeout_s = {timeout:g} s; "
                                 "raise timeout_s in the profile's [options]") from None
            raise
    result_path = Path(spec["result"])
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if rc == 0 and result and "io" in result:
        return result
    if result and "error" in result:
        raise UsageError(f"{what}: {result['error']}")
    tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["(no output)"]
    how = f"crashed (killed by {signal.Signals(-rc).name})" if rc < 0 else f"failed (exit status {rc})"
    stage = (work / "stage").read_text() if (work / "stage").is_file() else "start-up"
    if stage == "smoke-test":
        raise UsageError(f"{what}: the LiteRT interpreter {how} running the converted model once: an op has no kernel "
                         "for its types or quantization in this runtime; try another quantize mode in the profile")
    raise UsageError(f"{what}: the TFLite converter {how} during {stage}; last output: {tail[0].strip()[:200]}")


def lower(model: ModelHandle, profile: Any, folder: Path, ctx: Any) -> Artifact:
    from edgecomp.backends import tflite_ops
    from edgecomp.data import stack

    opts = options(profile)
    what = f"{profile.name}: {model.name}"
    onnx_nodes = convertible(model.onnx_path)
    work = ctx.scratch("tflite")
    shapes = {n: list(ctx.samples.validation[0][n].shape) for n in model.input_names}
    calibration = ctx.samples.calibration[: opts.calibration_samples or None]
    if opts.quantize == "int8":
        if not calibration:
            raise UsageError(f"{what}: full-integer quantization needs calibration samples; supply --samples FILE.npz")
        np.savez(work / "calibration.npz", **stack(calibration))
    np.savez(work / "check.npz", **ctx.samples.validation[0])
    spec = {"onnx": str(model.onnx_path), "out": str(work / "model.tflite"), "workdir": str(work),
            "result": str(work / "result.json"), "input_shapes": shapes, "quantize": opts.quantize,
            "io_dtype": opts.io_dtype, "per_channel": opts.per_channel, "pseudo_ops": list(opts.pseudo_ops),
            "allow_flex": opts.allow_flex,
            "calibration": str(work / "calibration.npz"), "check": str(work / "check.npz")}
    result = _run_converter(spec, work, opts.timeout_s, what)

    ops = tflite_ops.read_ops(work / "model.tflite")
    for op in ops:
        if not op.builtin and not (op.flex and opts.allow_flex):
            node = tflite_ops.source_node(op, result["layer_nodes"], onnx_nodes) or "unknown"
            hint = "set allow_flex = true in the profile's [options] to accept it" if op.flex else "no stock runtime has it"
            raise UsageError(f"{what}: the .tflite needs non-builtin op {op.name} (from ONNX node {node}), which a stock "
                             f"LiteRT runtime cannot run; {hint}")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.move(str(work / "model.tflite"), folder / "model.tflite")
    precision, counts = tflite_ops.precision(ops)
    meta = {
        "executed_precision": precision, **counts,
        "converter": {"path": "onnx2tf", "steps": ["static-shapes", "onnxslim", "onnx2tf", "tflite-converter"],
                      "versions": result["versions"], "pseudo_ops": list(opts.pseudo_ops), "slim": result["slim"]},
        "quantization": {"mode": opts.quantize, "io_dtype": opts.io_dtype if opts.quantize == "int8" else "float32",
                         "per_channel": opts.per_channel,
                         "calibration_samples": len(calibration) if opts.quantize == "int8" else 0},
        "builtin_ops_only": all(o.builtin for o in ops),
        "non_builtin_ops": sorted({o.name for o in ops if not o.builtin}),
        "ops": tflite_ops.histogram(ops),
        "layout": _layout(result["io"], shapes),
    }
    return Artifact(folder, "tflite", {"model": "model.tflite"}, meta, {k: round(v, 2) for k, v in result["timings"].items()})


def _layout(io: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, Any]:
    def names(perm: list[int] | None, output: bool) -> dict[str, str | None]:
        key = tuple(int(i) for i in np.argsort(perm)) if perm and output else tuple(perm or ())
        pair = LAYOUTS.get(key, (None, None))  # an output's transpose is the inverse of the layout change
        return {"source_layout": pair[0], "artifact_layout": pair[1]}

    keep = ("name", "artifact_name", "shape", "dtype", "quantization", "transpose")
    ins = [{k: e[k] for k in keep} | {"source_shape": shapes[e["name"]]} | names(e["transpose"], False) for e in io["inputs"]]
    outs = [{k: e[k] for k in keep} | names(e["transpose"], True) for e in io["outputs"]]
    return {"inputs": ins, "outputs": outs,
            "rule": "inputs: artifact = source.transpose(transpose), then q = round(x / scale) + zero_point if quantized; "
                    "outputs: x = (q - zero_point) * scale if quantized, then source = artifact.transpose(transpose)"}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence native code's stderr (file descriptor 2) for a moment; Python exceptions still carry the error."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class TfliteRunner:
    """One LiteRT interpreter (XNNPACK, explicit threads); feeds and outputs in the source layout."""

    def __init__(self, path: Path, threads: int, meta: dict[str, Any]) -> None:
        try:
            self.runtime, self.version, make = interpreter(need_flex=bool(meta.get("non_builtin_ops")))
        except ImportError as e:
            raise UsageError(str(e)) from None
        self.threads, self._meta, self._path = threads, meta, path
        with _quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate" is printed from C++
            self.interpreter = make(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        sig = self.interpreter.get_signature_runner()
        idx_in = {k: d["index"] for k, d in sig.get_input_details().items()}
        idx_out = {k: d["index"] for k, d in sig.get_output_details().items()}
        layout = meta["layout"]
        self._ins = [(e["name"], idx_in.get(e["artifact_name"], e.get("index")), e["transpose"], np.dtype(e["dtype"]),
                      e["quantization"]) for e in layout["inputs"]]
        self._outs = [(e["name"], idx_out[e["artifact_name"]], e["transpose"], e["quantization"]) for e in layout["outputs"]]
        self.input_names = [e[0] for e in self._ins]
        self.output_names = [e[0] for e in self._outs]
        raw = getattr(self.interpreter, "_interpreter", None)  # the checked wrappers cost ~us per call on a 10 us model
        if raw is not None:  # safe: nothing here holds a view into the interpreter's buffers (GetTensor copies)
            self._set, self._get, self._invoke = raw.SetTensor, lambda i: raw.GetTensor(i, 0), raw.Invoke
        else:
            self._set, self._get, self._invoke = (self.interpreter.set_tensor, self.interpreter.get_tensor,
                                                  self.interpreter.invoke)
        try:  # XNNPACK (LiteRT's default CPU delegate) shows as DELEGATE nodes, one per partition it took
            self.partitions: int | None = sum(o["op_name"] == "DELEGATE" for o in self.interpreter._get_ops_details())
        except AttributeError:
            self.partitions = None

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        for name, index, perm, dtype, q in self._ins:
            x = feed[name]
            if perm is not None:
                x = x.transpose(perm)
            self._set(index, quantize(x, q, dtype.name) if q else np.ascontiguousarray(x, dtype=dtype))
        try:
            self._invoke()
        except RuntimeError as e:  # a kernel that rejects its data (e.g. an int8 division by a zero-point)
            raise UsageError(f"LiteRT failed running {self._path}: {str(e).strip().splitlines()[0][:200]}") from None
        out = {}
        for name, index, perm, q in self._outs:
            y = self._get(index)
            y = dequantize(y, q) if q else y
            out[name] = y.transpose(perm) if perm is not None else y
        return out

    def info(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "version": self.version, "threads": self.threads,
                "executed_precision": self._meta.get("executed_precision", "fp32"),
                "delegate": "unknown" if self.partitions is None else "xnnpack" if self.partitions else "none",
                "delegate_partitions": self.partitions,
                "io_dtype": self._meta.get("quantization", {}).get("io_dtype", "float32")}


def load(artifact: Artifact, threads: int) -> TfliteRunner:
    if "layout" not in artifact.meta:
        raise UsageError(f"{artifact.folder}: the manifest has no meta.layout; rebuild the artifact with this edgecomp")
    return TfliteRunner(artifact.path("model"), threads, artifact.meta)
