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
