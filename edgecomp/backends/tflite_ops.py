"""What a .tflite file asks of the runtime, read from the flatbuffer itself (the file is the truth).

Each operator is either a builtin (a stock LiteRT / TFLite runtime has its kernel) or a custom op;
`Flex*` custom ops are TensorFlow kernels (Select TF ops) that only a runtime linked with the Flex
delegate can run, so a mobile artifact must not carry them unless the profile allows it.
The precision actually executed is read from the compute ops' operand types:
  activation int8                    -> int8 (full-integer)
  activation float, weights int8     -> int8-dynamic (activations quantized per inference)
  activation float, weights fp16/fp32 -> float (fp16 weights are dequantized once, at load)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPUTE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONV_3D"}
_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8"}


@dataclass(frozen=True)
class Op:
    name: str  # builtin name ("FULLY_CONNECTED") or custom code ("FlexErf")
    builtin: bool
    outputs: tuple[str, ...]  # names of the tensors it writes: they carry the Keras layer it came from
    input_types: tuple[str, ...]
    weights_fp16: bool = False  # second operand is a DEQUANTIZE of fp16 constants

    @property
    def flex(self) -> bool:
        return not self.builtin and self.name.startswith("Flex")


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def read_ops(path: Path) -> list[Op]:
    """Every operator of every subgraph, in execution order."""
    s = _schema()
    buf = Path(path).read_bytes()
    model = s.Model.GetRootAsModel(buf, 0)
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    ops: list[Op] = []
    for g in (model.Subgraphs(i) for i in range(model.SubgraphsLength())):
        producer: dict[int, tuple[str, str]] = {}  # tensor -> (op name, its first input's type)
        for i in range(g.OperatorsLength()):
            o = g.Operators(i)
            code = model.OperatorCodes(o.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            custom = builtin == s.BuiltinOperator.CUSTOM
            name = (code.CustomCode() or b"CUSTOM").decode() if custom else names.get(builtin, f"BUILTIN_{builtin}")
            ins = [o.Inputs(j) for j in range(o.InputsLength())]
            types = tuple(_TYPES.get(g.Tensors(t).Type(), "other") if t >= 0 else "none" for t in ins)
            fp16 = len(ins) > 1 and ins[1] >= 0 and producer.get(ins[1], ("", ""))[0] == "DEQUANTIZE" \
                and producer[ins[1]][1] == "float16"
            outs = tuple(g.Tensors(o.Outputs(j)).Name().decode(errors="replace") for j in range(o.OutputsLength()))
            for j in range(o.OutputsLength()):
                producer[o.Outputs(j)] = (name, types[0] if types else "")
            ops.append(Op(name, not custom, outs, types, fp16))
    return ops


def histogram(ops: list[Op]) -> dict[str, int]:
    return dict(Counter(o.name for o in ops).most_common())


def precision(ops: list[Op]) -> tuple[str, dict[str, int]]:
    """(executed precision, compute-op counts by kind), from the operand types of the compute ops."""
    kinds: Counter[str] = Counter()
    for o in ops:
        if o.name not in COMPUTE or not o.input_types:
            continue
        act, w = o.input_types[0], (o.input_types[1] if len(o.input_types) > 1 else "")
        kinds["int8" if act in ("int8", "uint8", "int16") else "dynamic" if w in ("int8", "uint8")
              else "fp16w" if o.weights_fp16 or w == "float16" else "float"] += 1
    counts = {"int8_compute_ops": kinds["int8"] + kinds["dynamic"], "float_compute_ops": kinds["float"] + kinds["fp16w"]}
    if kinds["int8"] and not (kinds["dynamic"] or kinds["float"] or kinds["fp16w"]):
        return "int8", counts
    if kinds["int8"]:
        return "int8-mixed", counts
    if kinds["dynamic"]:
        return "int8-dynamic", counts
    return ("fp32 (fp16 weights)" if kinds["fp16w"] else "fp32"), counts


def source_node(op: Op, layer_nodes: dict[str, str], onnx_nodes: list[tuple[str, str]]) -> str | None:
    """The ONNX node an op came from: its output tensor names carry the Keras layer ("model/tf.math.erf/Erf"),
    onnx2tf names the layer's TF op after the ONNX node; else the one ONNX node of the same op type."""
    for tensor in op.outputs:
        for part in tensor.replace(";", "/").split("/"):
            if part in layer_nodes:
                return layer_nodes[part]
    kind = op.name.removeprefix("Flex").lower()
    same = [n for n, t in onnx_nodes if t.lower() == kind]
    return same[0] if len(same) == 1 else (f"{same[0]} (and {len(same) - 1} more {op.name.removeprefix('Flex')} nodes)"
                                           if same else None)


def broken_scales(path: Path, limit: float = 1e30) -> list[tuple[str, float]]:
    """Quantized tensors whose scale is zero, infinite or absurd: int8 kernels abort on load computing
    their requantization multipliers. Float-min masks (HF attention: (1 - mask) * -3.4e38) cause it."""
    import math

    s = _schema()
    model = s.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    bad = []
    for g in (model.Subgraphs(i) for i in range(model.SubgraphsLength())):
        for t in (g.Tensors(i) for i in range(g.TensorsLength())):
            q = t.Quantization()
            if q is not None and q.ScaleLength() and t.Type() in (3, 7, 9):  # uint8, int16, int8
                worst = max(float(v) for v in q.ScaleAsNumpy())
                if not math.isfinite(worst) or worst > limit or worst <= 0:
                    bad.append((t.Name().decode(errors="replace"), worst))
    return bad
