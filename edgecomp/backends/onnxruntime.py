"""ONNX Runtime, CPU execution provider.

Threads are explicit (intra-op = the profile's count, inter-op = 1, sequential execution): the
default uses every core, which makes latencies incomparable across machines and targets.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.backends.base import Artifact, Feed
from edgecomp.model import ModelHandle

def lower(model: ModelHandle, profile: Any, folder: Path, ctx: Any) -> Artifact:
    """The ONNX graph is already the artifact: copy it in, inlining external data under 2 GB."""
    import onnx

    m = onnx.load(str(model.onnx_path))
    big = m.ByteSize() > 1_800_000_000 if hasattr(m, "ByteSize") else False
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(folder / "model.onnx"), save_as_external_data=big, location="model.onnx.data")
    files = {"model": "model.onnx"} | ({"data": "model.onnx.data"} if big else {})
    return Artifact(folder, "onnxruntime", files, {"executed_precision": executed_precision(m), **quantized_share(m)})


def executed_precision(m: Any) -> str:
    """What the graph will run, read from its ops (the file, not the profile, is the truth)."""
    ops = Counter(n.op_type for n in m.graph.node)
    if any(ops[o] for o in ("MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear")):
        return "int8-dynamic"
    if ops["QuantizeLinear"] and ops["DequantizeLinear"]:
        return "int8-qdq"  # ORT fuses DQ -> op -> Q into int8 kernels at load time
    if any(ops[o] for o in ("QLinearMatMul", "QLinearConv", "QAttention", "QGemm")):
        return "int8"
    return _float_type(m)


_FLOAT_COMPUTE = ("MatMul", "Gemm", "Conv", "Attention", "FusedMatMul", "FusedConv")


def quantized_share(m: Any) -> dict[str, int]:
    """How many compute ops run in int8 versus float: partial quantization must be visible.

    In QDQ form a quantized op is still written as a float op (Conv, MatMul) whose activation and
    weight both come from DequantizeLinear; ORT fuses DQ -> op -> Q into an int8 kernel, so it counts as int8."""
    ops = Counter(n.op_type for n in m.graph.node)
    int8 = sum(ops[o] for o in ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv", "ConvInteger",
                                "QAttention", "QGemm"))
    dequantized = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    qdq = sum(1 for n in m.graph.node
              if n.op_type in _FLOAT_COMPUTE and len(n.input) >= 2 and n.input[0] in dequantized and n.input[1] in dequantized)
    floats = sum(ops[o] for o in _FLOAT_COMPUTE) - qdq
    return {"int8_compute_ops": int8 + qdq, "float_compute_ops": floats}


def _float_type(m: Any) -> str:
    from onnx import TensorProto

    types = Counter(i.data_type for i in m.graph.initializer)
    return "fp16" if types[TensorProto.FLOAT16] > types[TensorProto.FLOAT] else "fp32"


class OrtRunner:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.threads = threads
        self._version = ort.__version__
        self._path = path

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feed)))

    def info(self) -> dict[str, Any]:
        import onnx

        return {"runtime": "onnxruntime", "version": self._version, "threads": self.threads,
                "providers": self.session.get_providers(),
                "executed_precision": executed_precision(onnx.load(str(self._path), load_external_data=False))}


def load(artifact: Artifact, threads: int) -> OrtRunner:
    return OrtRunner(artifact.path("model"), threads)


def op_histogram(m: Any) -> dict[str, int]:
    return dict(Counter(n.op_type for n in m.graph.node).most_common())
