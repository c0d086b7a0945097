"""The TensorRT target. Everywhere: the profiles, what a machine without a usable TensorRT is told
(`edgecomp targets`, exit 2 from `edgecomp build`), the options, and the graph work done before
TensorRT sees the model (TensorRT's QDQ form, the fp16 graph), run on ONNX Runtime's CPU provider.
On an NVIDIA GPU with tensorrt installed: real engine builds, parity, the timing cache, a parse error
named by node, and the refusal to load an engine built for another GPU or TensorRT version."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from conftest import ROOT, run_cli
from edgecomp.backends import availability
from edgecomp.backends import tensorrt as trt_backend
from edgecomp.data import SampleSet
from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle, onnx_signature
from edgecomp.passes.context import PassContext
from edgecomp.profile import load_profile

TARGETS = ("tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8")
HAS_GPU_TRT = torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(not HAS_GPU_TRT, reason="needs an NVIDIA GPU and tensorrt")
ok, why = availability("tensorrt")


def _ort(path: Path, feeds: list[dict[str, np.ndarray]], as_written: bool = False) -> list[np.ndarray]:
    """`as_written`: no graph optimization, so a QDQ graph runs as its float ops (Q, DQ, MatMul), the
    arithmetic TensorRT's int32-accumulating kernels reproduce, not this CPU's int8 kernels (which
    saturate full-range int8 weights on x86 without VNNI)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if as_written:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [s.run(None, f)[0] for f in feeds]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _handle(path: Path) -> ModelHandle:
    ins, outs = onnx_signature(onnx.load(str(path)))
    return ModelHandle(path.stem, ins, outs, {"source": str(path)}, onnx_path=path)


def _ctx(tmp_path: Path, n: int = 16) -> PassContext:
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(n)]
    return PassContext(tmp_path / "work", SampleSet(feeds, feeds, None, "npz:test"))


# ---- everywhere -----------------------------------------------------------------------------------

def test_profiles_parse_with_the_issue_budgets() -> None:
    profiles = {name: load_profile(name) for name in TARGETS}
    for name, p in profiles.items():
        assert p.name == name and p.backend == "tensorrt" and p.threads >= 1 and not p.passes
        assert set(p.bench) == {"warmup", "runs", "min_seconds"} and p.bench["runs"] >= 1
        opts = trt_backend.options(p)  # every shipped [options] table is valid
        assert opts.tf32 is False and opts.timing_cache
    assert [profiles[n].precision for n in TARGETS] == ["fp32", "fp16", "int8"]
    assert profiles["tensorrt-fp32"].budget["max_abs"] == 1e-3
    assert profiles["tensorrt-fp16"].budget["cosine_mean"] == 0.999
    assert profiles["tensorrt-int8"].budget["cosine_mean"] == 0.99


@pytest.mark.parametrize("line, words", [
    ('colour = "blue"', ["'colour'", "[options]", "max_batch"]),
    ("max_batch = 0", ["max_batch"]),
    ('max_batch = "8"', ["max_batch", "int"]),
    ("tf32 = 1", ["tf32", "bool"]),
    ("optimization_level = 9", ["optimization_level"]),
    ('calibration_method = "kl"', ["calibration_method", "'kl'"]),
    ('quantize_ops = "MatMul"', ["quantize_ops", "list"]),
])
def test_bad_options_name_the_key(line: str, words: list[str], tmp_path: Path) -> None:
    path = tmp_path / "trt-bad.toml"
    path.write_text(f'schema = 1\nbackend = "tensorrt"\nprecision = "fp16"\n\n[options]\n{line}\n\n[budget]\ncosine_mean = 0.9\n')
    with pytest.raises(UsageError) as e:
        trt_backend.options(load_profile(str(path)))
    assert all(w in str(e.value) for w in words) and "trt-bad.toml" in str(e.value), str(e.value)


def test_backend_module_imports_no_runtime() -> None:
    code = "import sys, edgecomp.backends.tensorrt; print(sorted({'torch', 'tensorrt', 'onnx'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.skipif(ok, reason="tensorrt is usable here")
def test_targets_show_tensorrt_unavailable_with_reason() -> None:
    r = run_cli("targets", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["target"]: row for row in json.loads(r.stdout)}
    assert set(TARGETS) <= set(rows)
    for name in TARGETS:
        assert not rows[name]["available"] and rows[name]["reason"] == why
    if importlib.util.find_spec("tensorrt") is None:
        assert why == "tensorrt is not installed: pip install 'edgecomp[tensorrt]' (needs an NVIDIA GPU with a CUDA driver)"
    else:
        assert why.startswith("no CUDA device") or why.startswith("tensorrt does not load")
    assert rows["ort-fp32"]["available"]


@pytest.mark.skipif(ok, reason="tensorrt is usable here")
def test_build_without_tensorrt_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    r = run_cli("build", "minilm", "--target", "tensorrt-fp16", "--out", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"edgecomp: error: backend tensorrt is unavailable: {why}"]
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()
    previous = tmp_path / "prev"  # a previous edgecomp output stays as it was
    previous.mkdir()
    (previous / "report.json").write_text('{"ok": true}')
    r = run_cli("build", "minilm", "-t", "ort-fp32", "-t", "tensorrt-fp16", "--out", previous)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert [p.name for p in previous.iterdir()] == ["report.json"] and (previous / "report.json").read_text() == '{"ok": true}'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_probe_names_the_missing_cuda_device() -> None:
    usable, reason = trt_backend.probe()
    assert not usable and reason.startswith("no CUDA device") and "\n" not in reason


def test_profile_shapes_from_the_sample() -> None:
    shapes = trt_backend.profile_shapes({"input_ids": (-1, -1), "mask": (-1, 128), "fixed": (1, 4)},
                                        {"input_ids": (1, 128), "mask": (1, 128), "fixed": (1, 4)}, 8, 0)
    assert shapes == {"input_ids": {"min": [1, 1], "opt": [1, 128], "max": [8, 128]},
                      "mask": {"min": [1, 128], "opt": [1, 128], "max": [8, 128]}}  # static inputs need no profile
    assert trt_backend.profile_shapes({"x": (-1, -1)}, {"x": (2, 64)}, 4, 256)["x"] == {
        "min": [1, 1], "opt": [2, 64], "max": [4, 256]}
    with pytest.raises(UsageError, match="'x'.*rank 2"):
        trt_backend.profile_shapes({"x": (-1, 16)}, {"x": (16,)}, 8, 0)


def test_engine_identity_mismatch_is_one_line() -> None:
    built = {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "tensorrt": "10.3.0", "other": 1}
    assert trt_backend.mismatch(built, {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "tensorrt": "10.3.0"}) is None
    for change in ({"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, {"tensorrt": "10.8.0"}):
        here = {k: built[k] for k in ("gpu", "compute_capability", "tensorrt")} | change
        msg = trt_backend.mismatch(built, here)
        assert msg and "\n" not in msg and "specific to the GPU" in msg
        assert all(str(v) in msg for v in change.values()) and "10.3.0" in msg and "A100" in msg


def test_parse_failure_names_the_nodes() -> None:
    nodes = [("/conv/Conv", "Conv"), ("/weird/Foo", "Foo")]
    msg = trt_backend.parse_failure("m", [(1, "", "", "No importer registered for op: Foo\n more"),
                                          (-1, "", "", "graph-level problem")], nodes)
    assert msg == ("TensorRT's ONNX parser cannot lower m: node 1 '/weird/Foo' (Foo): No importer registered for op: "
                   "Foo more; the graph: graph-level problem")
    assert "node 0 'given' (Bar)" in trt_backend.parse_failure("m", [(0, "given", "Bar", "x")], nodes)


def test_layer_precisions_from_inspector_json() -> None:
    def layer(kind: str, fmt: str) -> dict[str, Any]:
        return {"Name": kind, "LayerType": kind, "Inputs": [{"Name": "t", "Format/Datatype": fmt}], "Outputs": []}

    info = {"Layers": [layer("CaskConvolution", "Thirty-two wide channel vectorized row major Int8 format"),
                       layer("CaskGemmMatrixMultiply", "Int8"), layer("Reformat", "Row major linear FP32 format"),
                       layer("PointWiseV2", "Channel major FP16 format where channel % 8 == 0"),
                       layer("CaskPooling", "Half"), layer("Softmax", "Float"),
                       layer("Gather", "Row major linear INT32 format"), "a layer name only"], "Bindings": ["x", "y"]}
    layers = trt_backend.layer_precisions(json.dumps(info))
    assert layers == {"int8": 2, "fp16": 2, "fp32": 1}
    assert trt_backend.executed_precision(layers, "fp16") == "int8+fp16+fp32"
    assert trt_backend.executed_precision({}, "int8+fp16") == "int8+fp16"  # nothing readable: the build flags


def test_int8_qdq_graph_is_what_tensorrt_accepts(tiny_onnx: Path, tmp_path: Path) -> None:
    """No QDQ in: quantize-static with symmetric int8, int32 bias dequantization folded to float; the
    graph still computes the model (ONNX Runtime CPU as the judge, cosine >= 0.99)."""
    ctx = _ctx(tmp_path)
    path, record = trt_backend.prepare_int8(_handle(tiny_onnx), trt_backend.Options(), ctx)
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and record["quantize_linear"] == len(qs) and record["folded_int32_bias"] == 2  # two Gemm biases
    assert record["activation_type"] == "qint8" and record["symmetric_activations"] and record["calibration_samples"] == 16
    for n in qs:
        zp = onnx.numpy_helper.to_array(inits[n.input[2]])
        assert zp.dtype == np.int8 and not zp.any()
    assert not any(inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == onnx.TensorProto.INT32
                   for n in m.graph.node if n.op_type == "DequantizeLinear")
    onnx.checker.check_model(m)
    ref, got = _ort(tiny_onnx, ctx.samples.validation), _ort(path, ctx.samples.validation, as_written=True)
    assert min(_cos(a, b) for a, b in zip(ref, got)) > 0.99
    weights = [onnx.numpy_helper.to_array(inits[n.input[0]]) for n in m.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 127  # TensorRT gets full-range weights
    assert any(not np.allclose(a, b, atol=1e-6) for a, b in zip(ref, got))  # quantized, not a copy


def test_int8_keep_float_patterns(tiny_onnx: Path, tmp_path: Path) -> None:
    gemms = [n.name for n in onnx.load(str(tiny_onnx)).graph.node if n.op_type == "Gemm"]
    path, record = trt_backend.prepare_int8(_handle(tiny_onnx), trt_backend.Options(keep_float=(gemms[1],)), _ctx(tmp_path))
    assert list(record["exclude_nodes"]) == [gemms[1]]
    m = onnx.load(str(path))
    dequantized = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    last = next(n for n in m.graph.node if n.op_type == "Gemm" and n.output[0] == "y")
    assert not dequantized & set(last.input)  # the excluded layer stays float
    with pytest.raises(UsageError, match="keep_float.*'nope\\*'"):
        trt_backend.prepare_int8(_handle(tiny_onnx), trt_backend.Options(keep_float=("nope*",)), _ctx(tmp_path / "b"))


def test_int8_refuses_asymmetric_qdq(tiny_onnx: Path, tmp_path: Path) -> None:
    """A QDQ graph made for ONNX Runtime (uint8 activations, zero point != 0) is named, not half-built."""
    from edgecomp.passes import make_params, pass_module

    ctx = _ctx(tmp_path)
    ort_qdq = pass_module("quantize-static").run(_handle(tiny_onnx), make_params("quantize-static", {}), ctx)
    with pytest.raises(UsageError, match="not symmetric int8.*UINT8.*qint8"):
        trt_backend.prepare_int8(ort_qdq, trt_backend.Options(), ctx)


def test_fp16_graph_for_strongly_typed_tensorrt(tiny_onnx: Path, tmp_path: Path) -> None:
    path = trt_backend.prepare_fp16(tiny_onnx, tmp_path / "m16.onnx")
    m = onnx.load(str(path))
    assert {i.data_type for i in m.graph.initializer if i.dims} == {onnx.TensorProto.FLOAT16}
    ins, outs = onnx_signature(m)
    assert [(t.name, t.dtype) for t in ins + outs] == [("x", "float32"), ("y", "float32")]  # I/O stays fp32
    feeds = _ctx(tmp_path).samples.validation
    assert min(_cos(a, b) for a, b in zip(_ort(tiny_onnx, feeds), _ort(path, feeds))) > 0.999


# ---- on an NVIDIA GPU with tensorrt ---------------------------------------------------------------

def _report(r: subprocess.CompletedProcess) -> dict[str, Any]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def gpu_build(tiny_onnx: Path, tiny_samples: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    if not HAS_GPU_TRT:
        pytest.skip("needs an NVIDIA GPU and tensorrt")
    base = tmp_path_factory.mktemp("trt")
    r = run_cli("build", tiny_onnx, "-t", "tensorrt-fp32", "-t", "tensorrt-fp16", "--samples", tiny_samples,
                "--out", base / "out", "--json", "--no-bench", env=os.environ | {"EDGECOMP_CACHE": str(base / "cache")})
    return base / "out", base / "cache", {t["target"]: t for t in _report(r)["targets"]}


@needs_gpu
def test_tiny_fp32_and_fp16_engines(gpu_build: tuple[Path, Path, dict[str, Any]]) -> None:
    import tensorrt as trt

    out, cache, targets = gpu_build
    fp32, fp16 = targets["tensorrt-fp32"], targets["tensorrt-fp16"]
    for t in (fp32, fp16):
        assert t["verdict"]["ok"] and t["runtime"]["runtime"] == "tensorrt" and t["runtime"]["version"] == trt.__version__
        assert t["meta"]["gpu"] == torch.cuda.get_device_name() and t["meta"]["tensorrt"] == trt.__version__
        assert t["meta"]["compute_capability"] == "{}.{}".format(*torch.cuda.get_device_capability())
        assert t["meta"]["profile_shapes"] == {"x": {"min": [1, 16], "opt": [1, 16], "max": [8, 16]}}
        assert {f["name"] for f in t["artifact"]["files"]} == {"model.engine", "manifest.json", "reference.npz"}
    assert fp32["parity"]["outputs"]["y"]["max_abs"] <= 1e-3 and fp32["precision_executed"] == "fp32"
    assert fp16["parity"]["outputs"]["y"]["cosine_mean"] >= 0.999 and fp16["meta"]["precision_flags"] in ([], ["fp16"])
    assert set(fp16["precision_executed"].split("+")) <= {"fp16", "fp32"}  # weakly typed: TensorRT may keep fp32
    caches = list((cache / "tensorrt").glob("timing-*.cache"))
    assert len(caches) == 1 and fp16["meta"]["timing_cache"]["path"] == str(caches[0])
    assert fp32["meta"]["timing_cache"]["saved_bytes"] > 0 and fp16["meta"]["timing_cache"]["reused_bytes"] > 0
    r = run_cli("validate", out / "tensorrt-fp16", "--json")  # re-loaded from the folder alone
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runtime"]["runtime"] == "tensorrt"


@needs_gpu
@pytest.mark.parametrize("key, value", [("gpu", "NVIDIA Imaginary 9000"), ("tensorrt", "9.0.0"),
                                        ("compute_capability", "1.0")])
def test_engine_from_another_gpu_or_version_is_refused(key: str, value: str, gpu_build: tuple[Path, Path, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    folder = shutil.copytree(gpu_build[0] / "tensorrt-fp16", tmp_path / "tensorrt-fp16")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["meta"][key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("validate", folder)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert value in r.stderr and "specific to the GPU and the TensorRT version" in r.stderr


@needs_gpu
def test_parse_error_names_the_node(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery_node", domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]), path)
    with pytest.raises(UsageError) as e:
        trt_backend.lower(_handle(path), load_profile("tensorrt-fp32"), tmp_path / "out", _ctx(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and re.search(r"node \d+ 'mystery_node' \(NoSuchOp\)", msg) and not (tmp_path / "out").exists()


@needs_gpu
@pytest.mark.slow
def test_digits_fp16_and_int8(tmp_path: Path) -> None:
    r = run_cli("build", "digits", "-t", "tensorrt-fp16", "-t", "tensorrt-int8", "--out", tmp_path / "d", "--json", "--no-bench")
    targets = {t["target"]: t for t in _report(r)["targets"]}
    fp16, int8 = targets["tensorrt-fp16"], targets["tensorrt-int8"]
    assert fp16["verdict"]["ok"] and fp16["parity"]["outputs"]["logits"]["cosine_mean"] >= 0.999
    assert int8["verdict"]["ok"] and int8["parity"]["outputs"]["logits"]["top1_agreement"] >= 0.99
    assert int8["precision_executed"].startswith("int8") and int8["runtime"]["layers"].get("int8", 0) >= 2
    q = int8["meta"]["quantization"]
    assert q["source"].startswith("quantize-static") and q["calibration_samples"] == 200 and q["folded_int32_bias"] >= 1
