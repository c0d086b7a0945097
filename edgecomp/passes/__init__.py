"""The pass registry: every pass the pipeline can run, with what it needs.

A pass is one module with a frozen dataclass `Params` and `run(model, params, ctx) -> ModelHandle`.
`level` says where it runs: "torch" passes (training: distillation, QAT, pruning fine-tunes) run
on the torch module before export and return a handle with `onnx_path=None` (the pipeline exports
what they made); "graph" passes rewrite the ONNX graph after it. Entries are
imported lazily; a test imports every one so this table cannot go stale.
"""

from __future__ import annotations

import importlib
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
    "smoothquant": PassInfo("edgecomp.passes.smoothquant", "graph", ("onnxruntime",),
                            "SmoothQuant: per-channel scales move activation outliers into MatMul weights (exact in float)"),
    "fuse-transformer": PassInfo("edgecomp.passes.fuse_transformer", "graph", ("onnxruntime",),
                                 "transformer fusion for ORT's CPU kernels (Attention, Gelu, EmbedLayerNorm; Add + LayerNorm kept apart)"),
    "trim-padding": PassInfo("edgecomp.passes.trim_padding", "graph", ("onnx",),
                             "cut the sequence inputs to the batch's last real token inside the graph (exact for masked encoders)"),
    "mixed-precision": PassInfo("edgecomp.passes.mixed_precision", "graph", ("onnxruntime",),
                                "INT8 with the fewest layers kept in fp32 that meet a cosine target (error attribution)"),
    "distill": PassInfo("edgecomp.passes.distill", "torch", ("torch",),
                        "knowledge distillation into a student built from the model (fewer layers / heads / neurons / channels)"),
    "prune-structured": PassInfo("edgecomp.passes.prune_structured", "torch", ("torch",),
                                 "remove attention heads, FFN neurons, conv channels (tensors shrink), optional recovery"),
    "prune-unstructured": PassInfo("edgecomp.passes.prune_unstructured", "torch", ("torch",),
                                   "magnitude pruning to a sparsity: one-shot, iterative, lottery-ticket rewinding"),
    "lowrank": PassInfo("edgecomp.passes.lowrank", "torch", ("torch",),
                        "truncated-SVD factorization of Linear (and embedding) weights, rank by ratio or energy"),
    "share": PassInfo("edgecomp.passes.share", "torch", ("torch",),
                      "ALBERT-style cross-layer weight sharing: smaller storage, same FLOPs"),
    "qat": PassInfo("edgecomp.passes.qat", "torch", ("torch",),
                    "quantization-aware training: int8 fake quantization (STE), distillation fine-tune, QDQ export"),
}


def pass_module(name: str) -> ModuleType:
    if name not in PASSES:
        raise UsageError(f"unknown pass {name!r} (known: {', '.join(PASSES)})")
    return importlib.import_module(PASSES[name].module)


def make_params(name: str, options: dict[str, Any], where: str = "") -> Any:
    """Build a pass's `Params` from TOML/CLI options; errors name the bad key or value."""
    from edgecomp.tomlconf import typed

    return typed(pass_module(name).Params, options, f"{where} (pass {name})" if where else f"pass {name}")


def choice(field: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """For `Params.__post_init__`: an unknown option value is an error that lists the valid ones."""
    if value not in allowed:
        raise ValueError(f"{field} = {value!r} is not one of {', '.join(map(repr, allowed))}")


def parse_pass_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`--pass NAME:key=value,key=value`; values are TOML literals (true, 3, 0.5, "x", [..]) or bare words."""
    import tomllib

    name, _, rest = spec.partition(":")
    pass_module(name)
    options: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in split_options(rest))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise UsageError(f"--pass {spec!r}: expected KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = raw.strip()
    make_params(name, options, where=f"--pass {spec}")
    return name, options


def split_options(text: str) -> list[str]:
    """Split on commas outside brackets, so `layers=[1,2]` stays whole."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]
