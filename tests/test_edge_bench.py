"""tools/edge_bench.py, the on-device script: run as a user would (a subprocess), on real artifacts,
including in a fresh virtual environment that holds only numpy and ai-edge-litert."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import ROOT, run_cli
from edgecomp.backends import BACKENDS, availability

SCRIPT = ROOT / "tools" / "edge_bench.py"
ok, why = availability("tflite")
needs_tflite = pytest.mark.skipif(not ok, reason=f"tflite backend unavailable: {why}")


def bench(folder: Path, python: str = sys.executable, *extra: str) -> tuple[int, dict[str, Any], str]:
    r = subprocess.run([python, str(SCRIPT), str(folder), "--runs", "20", "--min-seconds", "0.1", *extra],
                       capture_output=True, text=True, timeout=300, cwd=folder.parent)
    return r.returncode, json.loads(r.stdout), r.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "digits"
    targets = ["-t", "ort-fp32"] + (["-t", "tflite-int8"] if ok else [])
    r = run_cli("build", "digits", *targets, "--out", out, "--no-bench")
    assert r.returncode == 0, r.stderr
    return out


def _fields(result: dict[str, Any]) -> None:
    assert result["schema"] == "edgecomp.edge_bench/1" and result["ok"] is True
    assert {"machine", "system", "cpu", "cpu_count", "python"} <= set(result["device"])
    assert result["runtime"]["version"] and result["runtime"]["threads"] == result["threads"] == 2
    assert result["parity"]["ok"] and result["parity"]["samples"] == 8
    assert {c["metric"] for c in result["parity"]["checks"]} and all(c["ok"] for c in result["parity"]["checks"])
    lat = result["latency"]
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["runs"] >= 20
    assert result["load"]["load_s"] > 0 and result["peak_rss_mb"] > 0


def test_onnxruntime_artifact(built: Path) -> None:
    code, result, err = bench(built / "ort-fp32")
    assert code == 0, err
    _fields(result)
    assert result["runtime"]["name"] == "onnxruntime" and result["backend"] == "onnxruntime"
    assert result["parity"]["outputs"]["logits"]["max_abs"] < 1e-4


@needs_tflite
def test_tflite_artifact_threads_override(built: Path) -> None:
    code, result, err = bench(built / "tflite-int8", sys.executable, "--threads", "1")
    assert code == 0, err
    assert result["threads"] == result["runtime"]["threads"] == 1
    assert result["runtime"]["delegate"] == "xnnpack" and result["executed_precision"] == "int8"


def test_openvino_artifact(tmp_path: Path) -> None:
    from edgecomp.profile import profile_names

    ov_ok, ov_why = availability("openvino") if "openvino" in BACKENDS else (False, "not registered")
    if not ov_ok or "openvino-f32" not in profile_names():
        pytest.skip(f"openvino backend unavailable: {ov_why}")
    r = run_cli("build", "digits", "-t", "openvino-f32", "--out", tmp_path / "ov", "--no-bench")
    assert r.returncode == 0, r.stderr
    code, result, err = bench(tmp_path / "ov" / "openvino-f32")
    assert code == 0, err
    _fields(result)
    assert result["runtime"]["name"] == "openvino"


def _tampered(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    with np.load(dst / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output/logits"] = -arrays["output/logits"]  # every argmax moves: a wrong model would look like this
    np.savez(dst / "reference.npz", **arrays)
    return dst


def test_tampered_reference_exits_1(built: Path, tmp_path: Path) -> None:
    code, result, err = bench(_tampered(built / "ort-fp32", tmp_path / "ort-fp32"))
    assert code == 1 and result["ok"] is False and not result["parity"]["ok"]
    failed = {c["metric"] for c in result["parity"]["checks"] if not c["ok"]}
    assert {"top1_agreement", "cosine_min"} <= failed and "parity outside the budget" in err


@needs_tflite
def test_tampered_tflite_reference_exits_1(built: Path, tmp_path: Path) -> None:
    code, result, _ = bench(_tampered(built / "tflite-int8", tmp_path / "tflite-int8"))
    assert code == 1 and not result["parity"]["ok"]


def test_not_an_artifact_exits_2(tmp_path: Path) -> None:
    code, result, err = bench(tmp_path)
    assert code == 2 and result["ok"] is False and "not a readable edgecomp artifact" in result["error"]


def _dist_closure(names: list[str]) -> list[metadata.Distribution]:
    """The distributions pip would install for `names` (their requirements, extras left out)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # a requirement for another Python version (marker)
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))
    return list(seen.values())


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A new venv whose site-packages holds only numpy and ai-edge-litert (with its own requirements),
    linked from this environment so the test needs no network."""
    pytest.importorskip("ai_edge_litert")
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True, timeout=120)
    site = next((root / "env" / "lib").glob("python*/site-packages"))
    for dist in _dist_closure(["numpy", "ai-edge-litert"]):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (site / top).exists() and top != "__pycache__" and not top.endswith(".pth"):
                (site / top).symlink_to(src)
    return str(root / "env" / "bin" / "python")


@needs_tflite
def test_runs_in_a_venv_with_only_numpy_and_litert(built: Path, fresh_venv: str) -> None:
    probe = "import importlib.util as u; print([m for m in ('edgecomp', 'onnxruntime', 'tensorflow', 'torch', 'openvino') if u.find_spec(m)])"
    found = subprocess.run([fresh_venv, "-c", probe], capture_output=True, text=True, timeout=60, cwd=built)
    assert found.stdout.strip() == "[]", found.stderr
    code, result, err = bench(built / "tflite-int8", fresh_venv)
    assert code == 0, err
    _fields(result)
    assert result["runtime"]["name"] == "litert" and result["runtime"]["delegate"] == "xnnpack"
    code, result, _ = bench(built / "ort-fp32", fresh_venv)  # no onnxruntime there: a clear exit 2
    assert code == 2 and "onnxruntime is not installed" in result["error"]
