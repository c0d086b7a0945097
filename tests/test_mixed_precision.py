"""Mixed precision to a budget: error attribution picks the layers that go back to fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from conftest import make_tiny_onnx, run_cli

from edgecomp.data import SampleSet
from edgecomp.load.onnx import load_onnx
from edgecomp.passes import make_params, pass_module
from edgecomp.passes.context import PassContext


def _ctx(tmp_path: Path) -> PassContext:
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(16)]
    return PassContext(tmp_path / "work", SampleSet(feeds[:8], feeds[8:], None, "synthetic"))


def _float_matmuls(path: Path) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(path)).graph.node)


def test_search_keeps_the_fewest_layers_in_fp32(tmp_path: Path) -> None:
    model = load_onnx(make_tiny_onnx(tmp_path / "tiny.onnx"))
    ctx = _ctx(tmp_path)
    params = make_params("mixed-precision", {"target_cosine": 0.999999, "max_float_layers": 2, "eval_samples": 8})
    out = pass_module("mixed-precision").run(model, params, ctx)
    rec = out.history[-1]
    steps = rec["steps"]
    assert steps[0]["float_layers"] == [] and steps[0]["cosine_mean"] < 0.999999  # all-int8 misses the target
    assert [len(s["float_layers"]) for s in steps] == list(range(len(steps)))  # one layer per step
    assert len(rec["sensitivity_db"]) == 2 and rec["sensitivity_db"][0]["added_noise_db"] >= rec["sensitivity_db"][1]["added_noise_db"]
    assert rec["float_layers"] == [s["node"] for s in rec["sensitivity_db"]][: len(rec["float_layers"])]
    assert _float_matmuls(out.onnx_path) == len(rec["float_layers"])  # the kept layers really are float
    assert rec["target_met"] == (steps[-1]["cosine_mean"] >= 0.999999)
    assert steps[-1]["cosine_mean"] >= steps[0]["cosine_mean"]


def test_target_already_met_quantizes_everything(tmp_path: Path) -> None:
    model = load_onnx(make_tiny_onnx(tmp_path / "tiny.onnx"))
    params = make_params("mixed-precision", {"target_cosine": 0.5, "eval_samples": 8})
    rec = pass_module("mixed-precision").run(model, params, _ctx(tmp_path)).history[-1]
    assert rec["float_layers"] == [] and rec["target_met"] and len(rec["steps"]) == 1


def test_cli_build_reports_the_search(tmp_path: Path) -> None:
    profile = tmp_path / "mixed.toml"
    profile.write_text('schema = 1\nname = "mixed"\nbackend = "onnxruntime"\nprecision = "int8"\nthreads = 1\n'
                       '[[passes]]\nname = "mixed-precision"\nbase = "quantize-static"\ntarget_cosine = 0.999999\nmax_float_layers = 2\n'
                       '[budget]\ntop1_agreement = 0.99\n')
    proc = run_cli("build", "digits", "-t", profile, "-o", tmp_path / "out", "--no-bench", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    search = next(p for p in report["targets"][0]["passes"] if p["pass"] == "mixed-precision")
    assert search["steps"][0]["cosine_mean"] < 0.999999 and 2 <= len(search["steps"]) <= 3 and search["sensitivity_db"]
    assert report["targets"][0]["parity"]["outputs"]["logits"]["top1_agreement"] >= 0.99
