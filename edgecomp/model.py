"""The model handle: the one object every pipeline stage takes and returns.

A handle holds the ONNX graph (the lingua franca between stages) once the model has been
exported, its I/O signature, where it came from, and the torch module when the source was
PyTorch (torch-level passes and the eager reference need it). Handles are immutable: a
pass returns a new one with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Dim = int | str  # a fixed size, or a symbolic name ("batch", "seq")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[Dim, ...]

    def concrete(self, fill: dict[str, int] | None = None) -> tuple[int, ...]:
        """The shape with symbolic dims replaced (by `fill`, else 1)."""
        fill = fill or {}
        return tuple(d if isinstance(d, int) else fill.get(d, 1) for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> TensorSpec:
        return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class ModelHandle:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provenance: dict[str, Any]  # source path, format, sha256, loader
    onnx_path: Path | None = None
    torch_module: Any = field(default=None, compare=False, repr=False)
    history: tuple[dict[str, Any], ...] = ()  # passes applied so far, with their parameters

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def replace(self, **changes: Any) -> ModelHandle:
        return dataclasses.replace(self, **changes)

    def with_pass(self, record: dict[str, Any], **changes: Any) -> ModelHandle:
        return dataclasses.replace(self, history=self.history + (record,), **changes)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


ONNX_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 16: "bfloat16",
}


def onnx_signature(model: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs (initializers excluded) and outputs of an `onnx.ModelProto`."""
    inits = {i.name for i in model.graph.initializer}

    def spec(vi: Any) -> TensorSpec:
        t = vi.type.tensor_type
        dims: list[Dim] = []
        for i, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or f"d{i}")
        return TensorSpec(vi.name, ONNX_DTYPES.get(t.elem_type, f"onnx:{t.elem_type}"), tuple(dims))

    ins = tuple(spec(v) for v in model.graph.input if v.name not in inits)
    outs = tuple(spec(v) for v in model.graph.output)
    return ins, outs
