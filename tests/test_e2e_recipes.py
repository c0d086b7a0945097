"""End-to-end builds of both recipes through the CLI, judged on their real validation splits.

Each recipe is built once per module (the builds are the slow part); the tests read its report.
Figures asserted are the issue's: fp32 max abs <= 1e-4 against PyTorch, MiniLM dynamic INT8
cosine >= 0.995 mean and >= 0.98 min, digits static INT8 top-1 agreement >= 99 %.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def _build(recipe: str, targets: list[str], out: Path) -> tuple[dict[str, Any], subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = run_cli("build", recipe, *[a for t in targets for a in ("--target", t)], "--out", out, timeout=900)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, f"exit {r.returncode} after {seconds:.0f} s: {r.stderr[-2000:]}"
    return json.loads((out / "report.json").read_text()), r, seconds


def _targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in report["targets"]}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("e2e") / "digits"
    report, _, _ = _build("digits", ["ort-fp32", "ort-int8", "ort-int8-static"], out)
    return out, report


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], float]:
    out = tmp_path_factory.mktemp("e2e") / "minilm"
    report, _, seconds = _build("minilm", ["ort-fp32", "ort-int8"], out)
    return out, report, seconds


# --- digits: a labelled image task --------------------------------------------------------------

def test_digits_report(digits: tuple[Path, dict[str, Any]]) -> None:
    _, report = digits
    assert report["ok"] is True
    assert report["data"] == {"origin": "recipe:digits", "synthetic": False, "note": "", "calibration_samples": 200,
                              "validation_samples": 360, "task": "classification"}
    assert report["reference"]["kind"] == "torch-eager" and report["seeds"] == {"build": 0, "recipe": 0}
    assert [t["target"] for t in report["targets"]] == ["ort-fp32", "ort-int8", "ort-int8-static"]


def test_digits_fp32_matches_pytorch(digits: tuple[Path, dict[str, Any]]) -> None:
    t = _targets(digits[1])["ort-fp32"]
    logits = t["parity"]["outputs"]["logits"]
    assert t["precision_executed"] == "fp32"
    assert logits["max_abs"] <= 1e-4
    assert logits["top1_agreement"] == 1.0
    assert logits["reference_accuracy"] >= 0.9  # the CNN really learned the task
    assert logits["accuracy"] == logits["reference_accuracy"]


def test_digits_static_int8_keeps_top1(digits: tuple[Path, dict[str, Any]]) -> None:
    t = _targets(digits[1])["ort-int8-static"]
    logits = t["parity"]["outputs"]["logits"]
    assert t["precision_executed"] == "int8-qdq"
    assert logits["top1_agreement"] >= 0.99
    assert logits["accuracy_drop"] <= 0.01
    # QDQ convs and the classifier are fused into int8 kernels: the report must not call them float
    assert t["meta"]["int8_compute_ops"] == 4 and t["meta"]["float_compute_ops"] == 0
    export, record, trim = t["passes"]  # the torch -> ONNX export, then the target's passes
    assert trim["pass"] == "trim-padding" and trim["applied"] is False  # an image model has no padding
    assert export["pass"] == "export" and export["exporter"] == "torchscript"
    assert record["pass"] == "quantize-static" and record["calibration_samples"] == 200 and record["method"] == "minmax"
    assert t["verdict"]["ok"] is True


def test_digits_dynamic_int8(digits: tuple[Path, dict[str, Any]]) -> None:
    t = _targets(digits[1])["ort-int8"]
    assert t["precision_executed"] == "int8-dynamic"
    assert t["meta"]["int8_compute_ops"] == 1  # dynamic quantization covers the Gemm, not the convs
    assert t["parity"]["outputs"]["logits"]["top1_agreement"] >= 0.99
    assert t["verdict"]["ok"] is True


def test_digits_artifact_revalidates(digits: tuple[Path, dict[str, Any]]) -> None:
    """The artifact folder alone (manifest, model, reference.npz with labels) is enough to re-check it."""
    out, _ = digits
    r = run_cli("validate", out / "ort-int8-static", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    logits = result["parity"]["outputs"]["logits"]
    assert result["parity"]["samples"] == 8 and "accuracy" in logits and logits["top1_agreement"] >= 0.875


# --- minilm: the default sentence-embedding model -------------------------------------------------

def test_minilm_report(minilm: tuple[Path, dict[str, Any], float]) -> None:
    out, report, seconds = minilm
    assert report["ok"] is True
    assert report["data"]["origin"] == "recipe:minilm" and report["data"]["synthetic"] is False
    assert report["data"]["calibration_samples"] == 64 and report["data"]["validation_samples"] == 96
    assert report["reference"]["kind"] == "torch-eager" and report["reference"]["latency"]["p50_ms"] > 0
    assert report["model"]["outputs"] == [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 384]}]
    assert {t["name"] for t in report["model"]["inputs"]} == {"input_ids", "attention_mask", "token_type_ids"}
    print(f"\nminilm build (ort-fp32 + ort-int8, with validation and latency): {seconds:.1f} s wall")


def test_minilm_fp32_matches_pytorch(minilm: tuple[Path, dict[str, Any], float]) -> None:
    t = _targets(minilm[1])["ort-fp32"]
    emb = t["parity"]["outputs"]["sentence_embedding"]
    assert t["precision_executed"] == "fp32"
    assert emb["max_abs"] <= 1e-4
    assert emb["cosine_min"] >= 0.9999


def test_minilm_int8_cosine_and_latency(minilm: tuple[Path, dict[str, Any], float]) -> None:
    t = _targets(minilm[1])["ort-int8"]
    emb = t["parity"]["outputs"]["sentence_embedding"]
    assert t["precision_executed"] == "int8-dynamic"
    assert t["parity"]["samples"] == 96  # the whole validation split
    assert emb["cosine_mean"] >= 0.995 and emb["cosine_min"] >= 0.98  # SmoothQuant + per-channel (issue 6)
    assert [p["pass"] for p in t["passes"]] == ["export", "fuse-transformer", "smoothquant", "quantize-dynamic", "trim-padding"]
    assert t["passes"][4]["applied"] and t["latency"]["inputs"] == 96  # timed over every validation sentence
    assert t["passes"][3]["per_channel"] is True and t["passes"][1]["fused"]["Attention"] == 6  # one per layer
    assert t["meta"]["int8_compute_ops"] > 0
    lat = t["latency"]
    assert lat["ratio_to_reference"] > 0 and 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    fp32 = _targets(minilm[1])["ort-fp32"]
    assert t["artifact"]["size_bytes"] < 0.8 * fp32["artifact"]["size_bytes"]  # int8 weights really are smaller
    print(f"\nminilm ort-int8: cosine mean {emb['cosine_mean']:.4f}, p50 {lat['p50_ms']:.2f} ms, "
          f"{lat['ratio_to_reference']:.2f}x PyTorch eager; ort-fp32 p50 {fp32['latency']['p50_ms']:.2f} ms")
