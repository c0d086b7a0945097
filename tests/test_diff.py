"""`edgecomp diff`: layer-by-layer comparison finds where error enters, across ONNX and OpenVINO IR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tiny_onnx, run_cli
from onnx import numpy_helper

from edgecomp.diff import diff


def _perturb_second_layer(src: Path, dst: Path) -> Path:
    """A copy of the tiny MLP whose second Linear weight carries 5 % noise: the only place error enters."""
    m = onnx.load(str(src))
    weights = [t for t in m.graph.initializer if numpy_helper.to_array(t).ndim == 2]
    last = weights[-1]
    w = numpy_helper.to_array(last)
    noisy = w + 0.05 * np.abs(w).mean() * np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
    last.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), last.name))
    onnx.save(m, str(dst))
    return dst


def test_error_entry_is_the_perturbed_layer(tmp_path: Path) -> None:
    a = make_tiny_onnx(tmp_path / "a.onnx")
    b = _perturb_second_layer(a, tmp_path / "b.onnx")
    feed = {"x": np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)}
    result = diff(a, b, feed)
    rows = {r["tensor"]: r for r in result["tensors"]}
    assert result["matched"] >= 3
    exact = [r for r in result["tensors"] if r["tensor"] != "y" and r["sqnr_db"] == float("inf")]
    assert len(exact) >= 2  # the first Linear and the ReLU are untouched
    assert result["first_jump"] == "y" and np.isfinite(rows["y"]["sqnr_db"]) and rows["y"]["cosine"] < 1.0
    assert diff(a, a, feed)["first_jump"] is None


def test_cli_json_and_unreadable_input(tmp_path: Path) -> None:
    a = make_tiny_onnx(tmp_path / "a.onnx")
    b = _perturb_second_layer(a, tmp_path / "b.onnx")
    np.savez(tmp_path / "s.npz", x=np.ones((2, 16), np.float32))
    proc = run_cli("diff", a, b, "--samples", tmp_path / "s.npz", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["first_jump"] == "y"
    bad = run_cli("diff", a, tmp_path / "missing.onnx", "--samples", tmp_path / "s.npz")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def digits_builds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diff") / "digits"
    proc = run_cli("build", "digits", "-t", "ort-fp32", "-t", "openvino-f32", "-t", "ort-int8-static", "-o", out, "--no-bench")
    assert proc.returncode == 0, proc.stderr
    return out


def test_onnx_against_openvino_ir_matches_by_name(digits_builds: Path) -> None:
    proc = run_cli("diff", digits_builds / "ort-fp32", digits_builds / "openvino-f32", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["matched"] >= 5  # convolutions, activations, pooling, the classifier
    assert min(r["cosine"] for r in result["tensors"]) > 0.9999
    assert result["first_jump"] is None


def test_int8_error_is_located(digits_builds: Path) -> None:
    proc = run_cli("diff", digits_builds / "ort-fp32", digits_builds / "ort-int8-static", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["first_jump"] is not None
    assert min(r["sqnr_db"] for r in result["tensors"]) < 60  # quantization noise is visible somewhere


def _break_layer(artifact: Path, dst: Path) -> str:
    """A copy of a QDQ model whose second Conv has a wrong weight scale (x4): a deliberately broken
    quantization of one layer. Returns that layer's output tensor."""
    m = onnx.load(str(artifact / "model.onnx"))
    producers = {o: n for n in m.graph.node for o in n.output}
    conv = [n for n in m.graph.node if n.op_type == "Conv"][1]
    dq = producers[conv.input[1]]
    assert dq.op_type == "DequantizeLinear"
    scale = next(t for t in m.graph.initializer if t.name == dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 4, scale.name))
    onnx.save(m, str(dst))
    return conv.output[0]


def test_a_broken_layer_is_named_first(digits_builds: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    layer = _break_layer(digits_builds / "ort-int8-static", broken)
    good = digits_builds / "ort-int8-static" / "model.onnx"
    with np.load(digits_builds / "ort-fp32" / "reference.npz") as z:
        feed = {k.split("/", 1)[1]: z[k][:1] for k in z.files if k.startswith("input/")}
    assert diff(good, broken, feed)["first_jump"] == layer  # int8 vs broken int8: everything before it is exact
    against_fp32 = diff(digits_builds / "ort-fp32", broken, feed)  # fp32 vs broken: the largest jump is the layer
    jumped = [r for r in against_fp32["tensors"] if r.get("jump_db")]
    assert max(jumped, key=lambda r: r["jump_db"])["tensor"] == layer
