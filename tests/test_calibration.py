"""Streaming calibration (edgecomp.passes.calibrate), static INT8 built from its ranges, and SmoothQuant.

The memory claims are checked two ways: the statistics' size does not depend on the sample count,
and a child process's peak RSS barely moves when it calibrates on 10x the samples.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, make_tiny_onnx, run_cli

from edgecomp.data import SampleSet
from edgecomp.load.onnx import load_onnx
from edgecomp.passes import make_params, pass_module
from edgecomp.passes.context import PassContext

METHODS = ("minmax", "percentile", "entropy", "mse")


def _feeds(n: int, rows: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, 16)).astype(np.float32)} for _ in range(n)]


def _inferred(path: Path) -> onnx.ModelProto:
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    return load_model_with_shape_infer(path)


def test_statistics_size_does_not_grow_with_samples_and_ranges_are_sane(tiny_onnx: Path) -> None:
    import onnxruntime as ort

    from edgecomp.passes.calibrate import calibrate, default_op_types, select_tensors

    model = _inferred(tiny_onnx)
    names = select_tensors(model, default_op_types())
    assert names == ["x", "/0/Gemm_output_0", "/1/Relu_output_0", "y"]
    sizes = {n: calibrate(model, iter(_feeds(n)), default_op_types()).stats_bytes for n in (20, 200)}
    assert sizes[20] == sizes[200] > 0

    feeds = _feeds(200)
    aug = onnx.load(str(tiny_onnx))
    aug.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names[1:-1])
    sess = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}  # every observed value, to check minmax against
    out_names = [o.name for o in sess.get_outputs()]
    for f in feeds:
        values["x"].append(f["x"])
        for n, v in zip(out_names, sess.run(out_names, f)):
            values[n].append(v)
    ranges = {m: calibrate(model, iter(feeds), default_op_types(), m).ranges for m in METHODS}
    for n in names:
        lo, hi = ranges["minmax"][n]
        allv = np.concatenate([v.ravel() for v in values[n]])
        assert lo == float(allv.min()) and hi == float(allv.max())
        for m in METHODS[1:]:
            a, b = ranges[m][n]
            assert lo <= a <= 0 <= b <= hi or (lo >= 0 and lo <= a <= b <= hi), (m, n, (a, b), (lo, hi))
            assert b - a > 0.25 * (hi - lo), (m, n)  # clipping, not collapse


def test_histogram_clips_outliers_and_rebins_exactly() -> None:
    from edgecomp.passes.calibrate import HistogramStats

    rng = np.random.default_rng(1)
    stats = HistogramStats()
    for scale in (0.1, 1.0, 30.0):  # the range grows twice: counts are merged, never lost
        stats.update("t", (rng.standard_normal(50_000) * scale / 30).astype(np.float32))
    stats.update("t", np.array([40.0], np.float32))  # one far outlier
    assert stats.hist["t"].sum() == 150_001 and stats.nbytes == stats.bins * 8 + 32
    assert stats.range("t", "minmax")[1] == 40.0
    for m in ("percentile", "entropy"):
        lo, hi = stats.range("t", m)
        assert 3.0 < hi < 10.0 and lo < 0, (m, lo, hi)
    lo, hi = stats.range("t", "mse")  # one value's squared clipping error outweighs a lot of rounding noise
    assert 3.0 < hi < 40.0 and lo < 0, (lo, hi)


def test_bad_options_are_usage_errors() -> None:
    for opts, word in [({"method": "kl"}, "method"), ({"percentile": 120.0}, "percentile"),
                       ({"activation_type": "qint8", "weight_type": "quint8"}, "weight_type")]:
        with pytest.raises(Exception, match=word):
            make_params("quantize-static", opts)
    with pytest.raises(Exception, match="alpha"):
        make_params("smoothquant", {"alpha": 1.5})
    with pytest.raises(Exception, match="op_types"):
        make_params("smoothquant", {"op_types": ["Conv"]})


_RSS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
    from pathlib import Path
    from edgecomp.passes.calibrate import calibrate, default_op_types
    model = load_model_with_shape_infer(Path(sys.argv[1]))
    n = int(sys.argv[2])
    rng = np.random.default_rng(0)
    feeds = ({"x": rng.standard_normal((256, 16)).astype(np.float32)} for _ in range(n))
    cal = calibrate(model, feeds, default_op_types(), "entropy")
    assert cal.samples == n
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_peak_memory_does_not_grow_with_samples(tiny_onnx: Path) -> None:
    """256 rows a sample: 1000 samples would hold ~85 MB of activations if they were kept."""
    def peak(n: int) -> int:
        r = subprocess.run([sys.executable, "-c", _RSS, str(tiny_onnx), str(n)], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])

    small, large = peak(100), peak(1000)
    assert large / small <= 1.5 and large - small < 40_000, (small, large)  # KiB


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_digits_static_int8_by_method(tmp_path: Path, method: str) -> None:
    profile = tmp_path / "static.toml"
    base = (ROOT / "targets" / "ort-int8-static.toml").read_text()
    profile.write_text(base.replace('method = "minmax"', f'method = "{method}"').replace('name = "ort-int8-static"', 'name = "static"'))
    proc = run_cli("build", "digits", "-t", profile, "-o", tmp_path / "out", "--no-bench")
    assert proc.returncode == 0, proc.stderr[-2000:]
    t = json.loads((tmp_path / "out" / "report.json").read_text())["targets"][0]
    assert t["parity"]["outputs"]["logits"]["top1_agreement"] >= 0.99
    rec = next(p for p in t["passes"] if p["pass"] == "quantize-static")
    assert rec["pass"] == "quantize-static" and rec["method"] == method and rec["calibration_samples"] == 200
    assert rec["calibrated_tensors"] > 0 and rec["calibration_stats_bytes"] > 0 and rec["seed"] == 0


# --- SmoothQuant -----------------------------------------------------------------------------------

def _layernorm_model(path: Path) -> Path:
    """Linear -> LayerNorm (with outlier channels) read by two Linears and a residual Add."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.norm = torch.nn.Linear(16, 32), torch.nn.LayerNorm(32)
            self.q, self.k, self.out = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)
            with torch.no_grad():
                self.norm.weight[:3] *= 20  # outlier channels, as transformers have
                self.norm.bias.uniform_(-0.5, 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.inp(x))
            return self.out(torch.relu(self.q(h)) * self.k(h) + h)

    torch.onnx.export(Net().eval(), (torch.randn(1, 16),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def _bert_model(path: Path) -> Path:
    """A randomly initialised 2-layer BERT: MiniLM's first layers in miniature (MatMul, post-LN, residuals)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (1, 12))
    torch.onnx.export(bert, (ids,), str(path), input_names=["input_ids"], output_names=["hidden"],
                      opset_version=17, dynamo=False)
    return path


def _smooth(path: Path, feeds: list[dict[str, np.ndarray]], tmp_path: Path, alpha: float) -> tuple[Path, dict]:
    ctx = PassContext(tmp_path / f"work{alpha}", SampleSet(feeds[:16], feeds[16:], None, "synthetic"))
    out = pass_module("smoothquant").run(load_onnx(path), make_params("smoothquant", {"alpha": alpha}), ctx)
    onnx.checker.check_model(onnx.load(str(out.onnx_path)), full_check=True)
    return out.onnx_path, out.history[-1]


def _max_diff(a: Path, b: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    import onnxruntime as ort

    sa, sb = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (a, b))
    return max(float(np.abs(sa.run(None, f)[0] - sb.run(None, f)[0]).max()) for f in feeds)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothquant_is_exact_in_float_on_a_layernorm_mlp(tmp_path: Path, alpha: float) -> None:
    src = _layernorm_model(tmp_path / "ln.onnx")
    feeds = _feeds(32, rows=4)
    out, rec = _smooth(src, feeds, tmp_path, alpha)
    assert rec["layers_smoothed"] == 2 and rec["alpha"] == alpha and len(rec["norms"]) == 1
    assert rec["norms"][0]["s_max"] > rec["norms"][0]["s_min"]  # the outlier channels got their own scale
    assert sum(n.op_type == "Mul" and n.name.endswith("smoothquant_unscale") for n in onnx.load(str(out)).graph.node) == 1
    assert _max_diff(src, out, feeds[16:]) < 1e-4


def test_smoothquant_is_exact_in_float_on_bert_layers(tmp_path: Path) -> None:
    src = _bert_model(tmp_path / "bert.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 100, (1, 12)).astype(np.int64)} for _ in range(24)]
    out, rec = _smooth(src, feeds, tmp_path, 0.5)
    assert rec["layers_smoothed"] == 2 * 3 + 2  # Q, K, V after each input LayerNorm; FFN-in after attention's
    assert _max_diff(src, out, feeds[16:]) < 1e-4


def test_smoothquant_then_static_int8_on_the_tiny_model_runs(tmp_path: Path) -> None:
    """Composition as a profile lists it: the smoothed graph quantizes and stays close to fp32."""
    src = _layernorm_model(tmp_path / "ln.onnx")
    feeds = _feeds(48, rows=4)
    ctx = PassContext(tmp_path / "work", SampleSet(feeds[:32], feeds[32:], None, "synthetic"))
    m = load_onnx(src)
    for name, opts in [("smoothquant", {"alpha": 0.5}), ("quantize-static", {"method": "mse"})]:
        m = pass_module(name).run(m, make_params(name, opts), ctx)
    assert [h["pass"] for h in m.history][-2:] == ["smoothquant", "quantize-static"]
    import onnxruntime as ort

    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(m.onnx_path), providers=["CPUExecutionProvider"])
    for f in feeds[32:]:
        a, b = ref.run(None, f)[0].ravel(), got.run(None, f)[0].ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98
