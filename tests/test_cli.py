"""Every command through the real CLI in a child process: exit codes, stdout/stderr and files as a user sees them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from edgecomp.model import sha256_file
from edgecomp.passes._int8 import saturating_cpu
from edgecomp.profile import load_profile

HEAVY = ("torch", "onnxruntime", "tensorflow", "openvino", "numpy")
COMMANDS = ["build", "targets", "passes", "inspect", "validate", "bench"]


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def built(tiny_onnx: Path, tiny_samples: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny ONNX built for fp32 and dynamic int8 on real samples, once for this module."""
    out = tmp_path_factory.mktemp("cli") / "tiny-build"
    r = run_cli("build", tiny_onnx, "--target", "ort-fp32", "--target", "ort-int8", "--samples", tiny_samples, "--out", out)
    assert r.returncode == 0, r.stderr
    return out, r


# --- start-up -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_an_example(command: str | None) -> None:
    r = run_cli(*([command] if command else []), "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Example" in r.stdout
    assert f"edgecomp {command or 'build'}" in r.stdout  # the example is a command line for this command


def test_import_and_help_load_no_runtime() -> None:
    code = (
        "import sys, json\n"
        "import edgecomp, edgecomp.cli\n"
        f"after_import = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "try:\n"
        "    edgecomp.cli.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        f"after_help = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'import': after_import, 'help': after_help, 'code': code}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"import": [], "help": [], "code": 0}


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "edgecomp"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Usage: edgecomp" in r.stdout and "build" in r.stdout


def test_version() -> None:
    r = run_cli("--version", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"edgecomp, version {metadata.version('edgecomp')}"


# --- targets, passes, inspect -------------------------------------------------------------------

def test_targets_json() -> None:
    r = run_cli("targets", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {row["target"]: row for row in json.loads(r.stdout)}
    assert {"ort-fp32", "ort-int8", "ort-int8-static"} <= set(rows)
    for name in ("ort-fp32", "ort-int8", "ort-int8-static"):
        row = rows[name]
        assert row["backend"] == "onnxruntime" and row["available"] is True and row["reason"] == ""
        assert row["threads"] >= 1 and row["budget"]
    assert rows["ort-fp32"]["budget"]["max_abs"] == pytest.approx(1e-4)
    assert rows["ort-int8"]["precision"] == "int8"


def test_targets_table() -> None:
    r = run_cli("targets", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ort-int8-static" in r.stdout and "onnxruntime" in r.stdout


def test_passes_json() -> None:
    r = run_cli("passes", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {row["pass"]: row for row in json.loads(r.stdout)}
    assert rows["quantize-dynamic"]["level"] == "graph" and rows["quantize-dynamic"]["options"]["per_channel"] is True
    assert rows["quantize-static"]["options"]["method"] == "minmax"
    assert rows["quantize-static"]["requires"] == ["onnxruntime"]


def test_inspect_tiny_onnx(tiny_onnx: Path) -> None:
    r = run_cli("inspect", tiny_onnx, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "onnx" and info["opset"] == 17
    assert info["ops"] == {"Gemm": 2, "Relu": 1}
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}]
    assert info["parameters"] == 16 * 32 + 32 + 32 * 4 + 4
    assert info["size_bytes"] == tiny_onnx.stat().st_size
    text = run_cli("inspect", tiny_onnx, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "input  x: float32" in text.stdout and "output y: float32" in text.stdout and "Gemm" in text.stdout


# --- build ----------------------------------------------------------------------------------------

def test_build_prints_a_summary(built: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, r = built
    assert "ort-fp32" in r.stdout and "ort-int8" in r.stdout and "PASS" in r.stdout
    assert f"report: {out / 'report.md'}" in r.stdout
    assert "synthetic" not in r.stderr  # real samples were given


def test_build_report_schema(built: tuple[Path, subprocess.CompletedProcess], tiny_onnx: Path) -> None:
    out, _ = built
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "edgecomp.report/1"
    assert report["edgecomp_version"] == metadata.version("edgecomp") and report["created"].endswith("+00:00")
    assert report["command"][:2] == ["edgecomp", "build"] and report["ok"] is True
    assert report["model"]["provenance"]["format"] == "onnx"
    assert report["model"]["provenance"]["sha256"] == sha256_file(tiny_onnx)
    assert report["data"]["synthetic"] is False and report["data"]["origin"].startswith("npz:")
    assert report["data"]["calibration_samples"] == 12 and report["data"]["validation_samples"] == 12
    assert report["seeds"]["build"] == 0
    versions = report["environment"]["versions"]
    for dist in ("numpy", "onnx", "onnxruntime", "torch"):
        assert versions[dist] == metadata.version(dist)
    assert report["environment"]["cores"] >= 1 and report["environment"]["python"]
    assert report["reference"]["kind"] == "onnxruntime-fp32"  # the source was ONNX
    assert report["reference"]["latency"]["p50_ms"] > 0
    targets = {t["target"]: t for t in report["targets"]}
    assert list(targets) == ["ort-fp32", "ort-int8"]
    assert targets["ort-fp32"]["precision_executed"] == "fp32"
    assert targets["ort-int8"]["precision_executed"] == "int8-dynamic"
    assert [p["pass"] for p in targets["ort-int8"]["passes"]] == [p["name"] for p in load_profile("ort-int8").passes]
    last = [p for p in targets["ort-int8"]["passes"] if p["pass"] != "trim-padding"][-1]
    assert last["pass"] == "quantize-dynamic" and last["per_channel"] is True
    assert last["reduce_range"] == "auto" and last["weight_bits"] == (7 if saturating_cpu() else 8)
    for name, t in targets.items():
        folder = out / name
        assert t["artifact"]["folder"] == str(out / name)  # where it is, not the staging folder it was built in
        files = {f["name"]: f for f in t["artifact"]["files"]}
        assert {"model.onnx", "manifest.json", "reference.npz"} <= set(files)
        for fname, f in files.items():
            assert f["sha256"] == sha256_file(folder / fname), fname
            assert f["bytes"] == (folder / fname).stat().st_size
        assert t["artifact"]["size_bytes"] == (folder / "model.onnx").stat().st_size
        assert t["runtime"]["runtime"] == "onnxruntime" and t["runtime"]["version"] == metadata.version("onnxruntime")
        assert t["threads"] == t["runtime"]["threads"] == 2
        y = t["parity"]["outputs"]["y"]
        assert {"max_abs", "mean_abs", "cosine_mean", "cosine_min", "sqnr_db"} <= set(y)
        lat = t["latency"]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["runs"] >= 100
        assert lat["ratio_to_reference"] > 0
        assert t["load"]["load_s"] > 0 and t["peak_rss_mb"] > 0
        assert t["verdict"]["ok"] is True and t["verdict"]["checks"]
        # top1_agreement is in both budgets, but the data has no task: listed, not failed
        assert "top1_agreement" in t["verdict"]["not_applicable"]
    assert targets["ort-fp32"]["parity"]["outputs"]["y"]["max_abs"] <= 1e-5
    md = (out / "report.md").read_text()
    assert "## ort-fp32" in md and "## ort-int8" in md and "int8-dynamic" in md
    assert f"quantize-dynamic: weight_bits {last['weight_bits']}" in md
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tiny-build.")]  # no staging leftovers


def test_artifact_folder_is_self_contained(built: tuple[Path, subprocess.CompletedProcess], tiny_onnx: Path) -> None:
    """reference.npz holds real inputs and the reference's outputs; the manifest says how to judge them."""
    import onnxruntime as ort

    out, _ = built
    folder = out / "ort-int8"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["schema"] == "edgecomp.manifest/1" and manifest["backend"] == "onnxruntime"
    assert manifest["files"] == {"model": "model.onnx"} and manifest["reference"] == "reference.npz"
    assert manifest["budget"]["cosine_mean"] == pytest.approx(0.995) and manifest["threads"] == 2
    with np.load(folder / "reference.npz") as z:
        assert sorted(z.files) == ["input/x", "output/y"]
        x, y = z["input/x"], z["output/y"]
    assert x.shape == (8, 16) and y.shape == (8, 4)
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], y, atol=1e-5)  # outputs are the source model's


def test_build_without_samples_says_synthetic(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    r = run_cli("build", tiny_onnx, "-t", "ort-fp32", "--out", out, "--no-bench")
    assert r.returncode == 0, r.stderr
    assert "synthetic" in r.stderr and "--samples" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["synthetic"] is True and report["data"]["origin"] == "synthetic"
    assert "synthetic" in report["data"]["note"]
    assert report["targets"][0]["latency"] is None  # --no-bench
    assert "Warning" in (out / "report.md").read_text()


def test_build_json_and_budget_failure(tiny_onnx: Path, tiny_samples: Path, tmp_path: Path) -> None:
    """A profile given as a path, with a budget no model can meet: built, reported, exit 1."""
    profile = tmp_path / "impossible.toml"
    profile.write_text('schema = 1\nbackend = "onnxruntime"\nprecision = "fp32"\nthreads = 1\n\n'
                       "[budget]\ncosine_mean = 1.1\nmax_abs = 1.0\n")
    out = tmp_path / "over-budget"
    r = run_cli("build", tiny_onnx, "--target", profile, "--samples", tiny_samples, "--out", out, "--json", "--no-bench")
    assert r.returncode == 1, r.stderr
    line = _one_line(r.stderr)
    assert "over budget" in line and "impossible cosine_mean" in line
    report = json.loads(r.stdout)  # --json: the report itself on stdout
    assert report["ok"] is False and report["targets"][0]["target"] == "impossible"
    checks = {c["metric"]: c["ok"] for c in report["targets"][0]["verdict"]["checks"]}
    assert checks == {"cosine_mean": False, "max_abs": True}
    assert json.loads((out / "report.json").read_text())["ok"] is False  # the build is kept: it is evidence


# --- validate, bench --------------------------------------------------------------------------------

def test_validate_built_artifact(built: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = built
    r = run_cli("validate", out / "ort-int8", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "PASS on 8 reference samples" in r.stdout
    j = run_cli("validate", out / "ort-fp32", "--json", "--threads", "1", timeout=120)
    assert j.returncode == 0, j.stderr
    result = json.loads(j.stdout)
    assert result["verdict"]["ok"] is True and result["runtime"]["threads"] == 1
    assert result["parity"]["samples"] == 8 and result["parity"]["outputs"]["y"]["max_abs"] <= 1e-5


def test_validate_fails_on_tampered_reference(built: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    folder = tmp_path / "ort-int8"
    shutil.copytree(built[0] / "ort-int8", folder)
    with np.load(folder / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output/y"] = arrays["output/y"] + 1.0
    np.savez(folder / "reference.npz", **arrays)
    r = run_cli("validate", folder, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "FAIL" in r.stdout


def test_validate_on_a_folder_without_manifest(tmp_path: Path) -> None:
    r = run_cli("validate", tmp_path, timeout=60)
    assert r.returncode == 2
    assert "manifest.json" in _one_line(r.stderr)


def test_bench_built_artifacts(built: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = built
    r = run_cli("bench", out / "ort-int8", out / "ort-fp32", "--json", "--runs", "30", "--warmup", "2",
                "--min-seconds", "0.05", "--threads", "1", timeout=120)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [Path(x["artifact"]).name for x in results] == ["ort-int8", "ort-fp32"]
    assert results[0]["latency"]["ratio_to_first"] == 1.0 and results[1]["latency"]["ratio_to_first"] > 0
    for x in results:
        lat = x["latency"]
        assert lat["runs"] >= 30 and lat["warmup"] == 2 and 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert x["runtime"]["threads"] == 1
    text = run_cli("bench", out / "ort-fp32", "--runs", "10", "--min-seconds", "0", timeout=120)
    assert text.returncode == 0, text.stderr
    assert "1.00x" in text.stdout
