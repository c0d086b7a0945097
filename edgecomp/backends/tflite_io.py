"""What the converter child and the Runner share: which LiteRT interpreter to use, and the numpy side
of quantized I/O. Light on purpose (numpy only at import): the child imports it before TensorFlow.

Quantized tensors follow TFLite's affine scheme: real = (q - zero_point) * scale.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

INTERPRETERS = ("ai_edge_litert", "tflite_runtime", "tensorflow")  # in order of preference


def interpreter(need_flex: bool = False) -> tuple[str, str, Any]:
    """(runtime name, version, Interpreter class): LiteRT first, then tflite-runtime, then TensorFlow Lite.
    Only full TensorFlow links the Flex delegate, so a model with Flex ops gets that one."""
    from importlib.metadata import version

    for mod in ("tensorflow",) if need_flex else INTERPRETERS:
        if importlib.util.find_spec(mod) is None:
            continue
        if mod == "ai_edge_litert":
            from ai_edge_litert.interpreter import Interpreter

            return "litert", version("ai-edge-litert"), Interpreter
        if mod == "tflite_runtime":
            from tflite_runtime.interpreter import Interpreter

            return "tflite-runtime", version("tflite-runtime"), Interpreter
        import tensorflow as tf

        return "tensorflow-lite", tf.__version__, tf.lite.Interpreter
    raise ImportError("no LiteRT interpreter is installed: pip install ai-edge-litert")


def quantize(x: np.ndarray, q: dict[str, Any] | None, dtype: str) -> np.ndarray:
    """Real -> stored: round(x / scale) + zero_point, saturated to the integer type (else a plain cast)."""
    if q and np.dtype(dtype).kind in "iu" and x.dtype.kind == "f":
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / q["scale"]) + q["zero_point"], info.min, info.max)
    return np.ascontiguousarray(x, dtype=dtype)


def dequantize(y: np.ndarray, q: dict[str, Any] | None) -> np.ndarray:
    """Stored -> real: (q - zero_point) * scale."""
    return (y.astype(np.float32) - q["zero_point"]) * np.float32(q["scale"]) if q else y
