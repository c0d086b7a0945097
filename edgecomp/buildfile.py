"""Build files (`edgecomp.toml`): a release as data, read by `edgecomp release`.

Schema 1 (flat: model, passes, targets, gate; relative paths are relative to the file):

    schema = 1
    out = "build/release"                 # output folder (replaced atomically)

    [model]
    source = "minilm"                     # a recipe name, or a model file / folder
    samples = "samples.npz"               # optional: real inputs (see `edgecomp build --samples`)
    recipe = "minilm"                     # optional: a recipe's data and task for a model file
    inputs = ["x:1x16:float32"]           # optional: signature for TorchScript / pickles
    seed = 0                              # optional, default 0
    threads = 2                           # optional: overrides every target's threads
    trust_remote_code = false             # optional

    [[passes]]                            # build-level passes, in order (as `--pass NAME:k=v`)
    name = "prune-structured"
    ratio = 0.25

    [[targets]]                           # the matrix: one entry per artifact
    profile = "ort-int8"                  # a name from targets/, or a path to a profile .toml
    name = "ort-int8-strict"              # optional: the folder and report name (default: the profile's)
    threads = 2                           # optional overrides: threads, passes, description replace;
    budget = { cosine_mean = 0.996 }      #   budget, bench and options merge key by key
    bench = { runs = 300 }
    diff = true                           # optional: per-layer error against the source graph, in report.html

    [gate]                                # regression gate against `--baseline` (edgecomp.release)
    parity_drop = 0.002
    latency_regression = 0.10
    confidence = 0.95

`edgecomp build MODEL -t T --pass P --samples S --seed N --threads K -o OUT` is the same request:
`[model] source/samples/seed/threads`, one `[[passes]]` per --pass, one `[[targets]]` per -t, `out`;
`edgecomp build ... --emit-build-file edgecomp.toml` writes that file (`to_toml`) instead of building.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.tomlconf import check_keys, read_toml, typed

DEFAULT_NAME = "edgecomp.toml"
_MODEL_KEYS = {"source", "samples", "recipe", "inputs", "seed", "threads", "trust_remote_code"}
_TARGET_KEYS = {"profile", "name", "threads", "passes", "budget", "bench", "options", "description", "diff"}


def load_build_file(path: Path, out: Path | None = None, command: list[str] | None = None) -> Any:
    """The `BuildRequest` a build file describes (`out` overrides the file's), with its gate settings."""
    from edgecomp.load import parse_input_specs
    from edgecomp.passes import make_params
    from edgecomp.pipeline import BuildRequest, TargetSpec
    from edgecomp.release import Gate

    if path.is_dir():
        path = path / DEFAULT_NAME
    if not path.is_file():
        raise UsageError(f"{path}: no such build file (see `edgecomp release --help` for the schema)")
    d = read_toml(path)
    where = path.name
    check_keys(where, d, {"schema", "out", "model", "passes", "targets", "gate"}, {"schema", "model", "targets"})
    if d["schema"] != 1:
        raise UsageError(f"{where}: unsupported schema {d['schema']!r} (this edgecomp reads schema 1)")
    base = path.resolve().parent
    m = _table(d, "model", where)
    check_keys(f"{where} [model]", m, _MODEL_KEYS, {"source"})
    _types(f"{where} [model]", m, {"source": str, "samples": str, "recipe": str, "inputs": list, "seed": int,
                                   "threads": int, "trust_remote_code": bool})
    source = m["source"]
    if (base / source).exists():
        source = str(base / source)
    passes = []
    for i, p in enumerate(_list(d, "passes", where)):
        if not isinstance(p, dict) or "name" not in p:
            raise UsageError(f"{where}: passes[{i}] needs a name")
        options = {k: v for k, v in p.items() if k != "name"}
        make_params(p["name"], options, where=f"{where} passes[{i}] ({p['name']})")
        passes.append((p["name"], options))
    targets = []
    for i, t in enumerate(_list(d, "targets", where)):
        at = f"{where} targets[{i}]"
        if not isinstance(t, dict):
            raise UsageError(f"{at}: must be a table with a profile")
        check_keys(at, t, _TARGET_KEYS, {"profile"})
        profile = str(base / t["profile"]) if t["profile"].endswith(".toml") else t["profile"]
        targets.append(TargetSpec(profile, t.get("name"), {k: v for k, v in t.items() if k not in ("profile", "name")}, at))
    if not targets:
        raise UsageError(f"{where}: targets is empty; add at least one [[targets]] entry")
    gate = typed(Gate, _table(d, "gate", where), f"{where} [gate]")
    if out is None:
        if "out" not in d:
            raise UsageError(f"{where}: no out folder: set out = \"...\" or pass --out")
        out = (base / d["out"]).resolve()
    if m.get("threads") is not None and m["threads"] < 1:
        raise UsageError(f"{where} [model]: threads must be a positive integer, not {m['threads']!r}")
    return BuildRequest(
        model=source, targets=tuple(targets), out=out, samples=base / m["samples"] if "samples" in m else None,
        recipe=m.get("recipe"), inputs=parse_input_specs(tuple(m.get("inputs", ()))), threads=m.get("threads"),
        seed=m.get("seed", 0), trust_remote_code=m.get("trust_remote_code", False), passes=tuple(passes),
        command=command or [], gate=gate,
        build_file={"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})


def _table(d: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {key} must be a table ([{key}]), not {type(value).__name__}")
    return value


def _list(d: dict[str, Any], key: str, where: str) -> list[Any]:
    value = d.get(key, [])
    if not isinstance(value, list):
        raise UsageError(f"{where}: {key} must be an array of tables ([[{key}]]), not {type(value).__name__}")
    return value


def _types(where: str, table: dict[str, Any], want: dict[str, type]) -> None:
    for key, value in table.items():
        t = want[key]
        if not isinstance(value, t) or (t is int and isinstance(value, bool)):
            raise UsageError(f"{where}: {key} must be {t.__name__}, not {value!r}")


def to_toml(req: Any) -> str:
    """The build file of a `BuildRequest` made from `edgecomp build` flags (paths made absolute, so
    the file means the same wherever it is put); `load_build_file` reads it back to the same request."""
    model: dict[str, Any] = {"source": str(Path(req.model).resolve()) if Path(req.model).exists() else req.model}
    if req.samples is not None:
        model["samples"] = str(req.samples.resolve())
    if req.recipe:
        model["recipe"] = req.recipe
    if req.inputs:
        model["inputs"] = [f"{t.name}:{'x'.join(map(str, t.shape))}:{t.dtype}" for t in req.inputs]
    model["seed"] = req.seed
    if req.threads:
        model["threads"] = req.threads
    if req.trust_remote_code:
        model["trust_remote_code"] = True
    lines = ["# Written by `edgecomp build --emit-build-file`; run it with `edgecomp release FILE`.",
             "schema = 1", f"out = {_value(str(req.out.resolve()))}", "", "[model]"]
    lines += [f"{k} = {_value(v)}" for k, v in model.items()]
    for name, options in req.passes:
        lines += ["", "[[passes]]", f"name = {_value(name)}", *(f"{k} = {_value(v)}" for k, v in options.items())]
    for t in req.targets:
        lines += ["", "[[targets]]", f"profile = {_value(t if isinstance(t, str) else t.profile)}"]
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    """A TOML literal for the scalars and lists that build options hold."""
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string
