"""The pass registry: every pass the pipeline can run, with what it needs.

A pass is one module with a frozen dataclass `Params` and `run(model, params, ctx) -> ModelHandle`.
`level` says where it runs: "torch" passes (training: distillation, QAT, pruning fine-tunes) run
on the torch module before export; "graph" passes rewrite the ONNX graph after it. Entries are
imported lazily; a test imports every one so this table cannot go stale.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from edgecomp.errors import UsageError


@dataclass(frozen=True)
class PassInfo:
    module: str
    level: str  # "torch" | "graph"
    requires: tuple[str, ...]
    summary: str


PASSES: dict[str, PassInfo] = {
    "quantize-dynamic": PassInfo("edgecomp.passes.quantize_dynamic", "graph", ("onnxruntime",),
                                 "INT8 weights ahead of time, activation scales at run time (ONNX Runtime)"),
    "quantize-static": PassInfo("edgecomp.passes.quantize_static", "graph", ("onnxruntime",),
                                "INT8 weights and activations (QDQ), ranges calibrated on the calibration split"),
}


def pass_module(name: str) -> ModuleType:
    if name not in PASSES:
        raise UsageError(f"unknown pass {name!r} (known: {', '.join(PASSES)})")
    return importlib.import_module(PASSES[name].module)


def make_params(name: str, options: dict[str, Any], where: str = "") -> Any:
    """Build a pass's `Params` from TOML/CLI options; errors name the bad key or value."""
    cls = pass_module(name).Params
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = where or f"pass {name}"
    for key, value in options.items():
        if key not in fields:
            raise UsageError(f"{where}: unknown option {key!r} for pass {name} (allowed: {', '.join(fields)})")
        expected = typing.get_type_hints(cls)[key]
        origin = typing.get_origin(expected) or expected
        if origin in (int, float, bool, str) and not (isinstance(value, origin) or (origin is float and isinstance(value, int))):
            raise UsageError(f"{where}: option {key!r} must be {origin.__name__}, not {value!r}")
        if origin in (tuple, list) and not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: option {key!r} must be a list, not {value!r}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def choice(field: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """For `Params.__post_init__`: an unknown option value is an error that lists the valid ones."""
    if value not in allowed:
        raise ValueError(f"{field} = {value!r} is not one of {', '.join(map(repr, allowed))}")
