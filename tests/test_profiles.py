"""Target profiles and recipes are strict data: every shipped file loads, and every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecomp.errors import UsageError
from edgecomp.passes import PASSES, make_params, parse_pass_spec, pass_module
from edgecomp.paths import TARGETS_DIR
from edgecomp.profile import BUDGET_KEYS, load_profile, profile_names
from edgecomp.recipe import load_recipe, recipe_names

GOOD = """\
schema = 1
backend = "onnxruntime"
precision = "int8"
threads = 2

[[passes]]
name = "quantize-static"
method = "minmax"

[budget]
cosine_mean = 0.99
"""


def _write(tmp_path: Path, text: str, name: str = "custom.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_shipped_targets_exist() -> None:
    assert {"ort-fp32", "ort-int8", "ort-int8-static"} <= set(profile_names())


@pytest.mark.parametrize("name", sorted(p.stem for p in TARGETS_DIR.glob("*.toml")))
def test_every_shipped_profile_loads(name: str) -> None:
    p = load_profile(name)
    assert p.name == name  # the file name is the target name users type
    assert p.threads >= 1 and p.budget and set(p.budget) <= set(BUDGET_KEYS)
    assert all(isinstance(v, float) for v in p.budget.values())
    assert p.bench["runs"] >= 1
    for spec in p.passes:  # each pass's options build its Params
        make_params(spec["name"], {k: v for k, v in spec.items() if k != "name"})
    assert load_profile(str(TARGETS_DIR / f"{name}.toml")) == p  # by path, the same profile


def test_shipped_budgets_match_the_issue() -> None:
    assert load_profile("ort-fp32").budget["max_abs"] <= 1e-4
    assert load_profile("ort-int8").budget["cosine_mean"] >= 0.995
    assert load_profile("ort-int8-static").budget["top1_agreement"] >= 0.99
    assert [p["name"] for p in load_profile("ort-int8").passes] == ["fuse-transformer", "smoothquant", "quantize-dynamic",
                                                                   "trim-padding"]
    assert [p["name"] for p in load_profile("ort-int8-static").passes] == ["quantize-static", "trim-padding"]
    assert all(load_profile(n).passes[-1]["name"] == "trim-padding" for n in ("ort-fp32", "ort-int8", "ort-int8-mixed"))


def test_a_profile_by_path_loads(tmp_path: Path) -> None:
    p = load_profile(_write(tmp_path, GOOD))
    assert p.name == "custom" and p.backend == "onnxruntime" and p.budget == {"cosine_mean": 0.99}
    assert p.passes[0]["method"] == "minmax"


@pytest.mark.parametrize("text, names", [
    (GOOD + "colour = 'blue'\n", ["'colour'"]),  # a top-level key after a table lands in it: [budget]
    ("colour = 'blue'\n" + GOOD, ["'colour'"]),
    (GOOD.replace("cosine_mean = 0.99", "cosine_mean = 0.99\ncosine_avg = 0.99"), ["'cosine_avg'", "budget"]),
    (GOOD + "\n[bench]\nwarmups = 3\n", ["'warmups'", "bench"]),
    (GOOD.replace('method = "minmax"', 'method = "minmax"\nmethd = "entropy"'), ["'methd'", "quantize-static"]),
    (GOOD.replace('method = "minmax"', 'method = "foo"'), ["method", "'foo'"]),
    (GOOD.replace('method = "minmax"', 'per_channel = "yes"'), ["'per_channel'", "bool"]),
    (GOOD.replace('name = "quantize-static"', 'name = "prune"'), ["'prune'", "quantize-dynamic"]),
    (GOOD.replace('schema = 1', 'schema = 2'), ["schema"]),
    (GOOD.replace('backend = "onnxruntime"', 'backend = "coreml"'), ["'coreml'"]),
    (GOOD.replace('backend = "onnxruntime"\n', ''), ["missing", "'backend'"]),
    (GOOD.replace('threads = 2', 'threads = 0'), ["threads"]),
    ("schema = 1\nbackend = [", ["invalid TOML"]),
])
def test_profile_errors_name_the_bad_key(tmp_path: Path, text: str, names: list[str]) -> None:
    with pytest.raises(UsageError) as e:
        load_profile(_write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg, msg


def test_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(UsageError, match="unknown target 'ort-int4'.*ort-fp32"):
        load_profile("ort-int4")


def test_every_pass_in_the_registry_imports_with_default_params() -> None:
    for name, info in PASSES.items():
        mod = pass_module(name)
        assert callable(mod.run), name
        assert info.level in ("torch", "graph")
        make_params(name, {})  # defaults are valid


def test_pass_spec_parsing() -> None:
    name, opts = parse_pass_spec('quantize-dynamic:per_channel=false,op_types=["MatMul","Gemm"],weight_type=quint8')
    assert name == "quantize-dynamic"
    assert opts == {"per_channel": False, "op_types": ["MatMul", "Gemm"], "weight_type": "quint8"}
    params = make_params(name, opts)
    assert params.op_types == ("MatMul", "Gemm") and params.per_channel is False
    assert parse_pass_spec("quantize-static:samples=10") == ("quantize-static", {"samples": 10})


@pytest.mark.parametrize("spec, names", [
    ("quantize-static:method=foo", ["method", "'foo'", "minmax"]),
    ("quantize-static:samples=-1", ["samples"]),
    ("quantize-static:nope=1", ["'nope'", "method"]),
    ("quantize-static:method", ["KEY=VALUE"]),
    ("quantize-dynamic:per_channel=3", ["'per_channel'"]),
    ("quantize-static:op_types=MatMul", ["'op_types'", "list"]),
    ("int4", ["'int4'"]),
])
def test_bad_pass_specs_name_the_problem(spec: str, names: list[str]) -> None:
    with pytest.raises(UsageError) as e:
        parse_pass_spec(spec)
    for n in names:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_loads(name: str) -> None:
    r = load_recipe(name)
    assert r.inputs and r.outputs and r.calibration > 0 and r.validation > 0
    assert r.module().build and r.module().samples  # the builder module exists and has both entry points


def test_recipe_names_include_both_recipes() -> None:
    assert {"minilm", "digits"} <= set(recipe_names())
    with pytest.raises(UsageError, match="unknown recipe 'resnet'"):
        load_recipe("resnet")
