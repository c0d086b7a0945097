"""The backend registry: one module per runtime, each with `lower()` and `load()`.

A backend module is imported only when a target that uses it is built, so a missing optional
runtime costs nothing until asked for, and then it is one clear message with the install command.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from edgecomp.errors import UsageError


@dataclass(frozen=True)
class BackendInfo:
    module: str
    requires: tuple[str, ...]  # importable modules lowering needs (all of them)
    install: str
    summary: str
    runs_with: tuple[str, ...] = ()  # modules that can load and run an artifact (any one); () = `requires`


BACKENDS: dict[str, BackendInfo] = {
    "onnxruntime": BackendInfo("edgecomp.backends.onnxruntime", ("onnxruntime",), "pip install 'edgecomp[ort]'",
                               "ONNX Runtime, CPU execution provider"),
    "openvino": BackendInfo("edgecomp.backends.openvino", ("openvino",), "pip install 'edgecomp[openvino]'",
                            "OpenVINO, CPU plugin (IR; fp16 weights; NNCF INT8)"),
    "tflite": BackendInfo("edgecomp.backends.tflite", ("onnx2tf", "tensorflow"), "pip install 'edgecomp[tflite]'",
                          "LiteRT (TFLite) CPU with XNNPACK, via onnxslim + onnx2tf; builtin ops only",
                          runs_with=("ai_edge_litert", "tflite_runtime", "tensorflow")),
    "tensorrt": BackendInfo("edgecomp.backends.tensorrt", ("tensorrt",),
                            "pip install 'edgecomp[tensorrt]' (needs an NVIDIA GPU with a CUDA driver)",
                            "TensorRT on an NVIDIA GPU, via its ONNX parser (fp16; INT8 from explicit QDQ)"),
}


def availability(name: str, lowering: bool = True) -> tuple[bool, str]:
    """(usable here, why not). Checks the import without importing the runtime itself. Running an
    artifact (`validate`, `bench`) needs only a runtime, not the converters that made it."""
    info = BACKENDS[name]
    if lowering or not info.runs_with:
        for mod in info.requires:
            if importlib.util.find_spec(mod) is None:
                return False, f"{mod} is not installed: {info.install}"
    elif not any(importlib.util.find_spec(mod) for mod in info.runs_with):
        return False, f"none of {', '.join(info.runs_with)} is installed: {info.install}"
    probe = getattr(backend_module(name), "probe", None)
    return probe() if probe else (True, "")


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name].module)


def require(name: str, lowering: bool = True) -> ModuleType:
    ok, why = availability(name, lowering)
    if not ok:
        raise UsageError(f"backend {name} is unavailable: {why}")
    return backend_module(name)
