"""ort-int8's graph: transformer fusion, SmoothQuant on the fused graph, dynamic INT8 with QAttention.

A randomly initialised 2-layer BERT with mean pooling (MiniLM's structure in miniature, exported
the way the pipeline exports it) and real onnxruntime; every figure asserted could fail.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import int8_peak, make_tiny_onnx

from edgecomp.data import SampleSet
from edgecomp.load.onnx import load_onnx
from edgecomp.passes import make_params, pass_module
from edgecomp.passes._int8 import saturating_cpu
from edgecomp.passes.context import PassContext

SEQ, VOCAB = 16, 100
NAMES = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64)
            self.bert = BertModel(cfg, add_pooling_layer=False).eval()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    feed = _feed(np.random.default_rng(0), 10)
    with torch.no_grad():
        torch.onnx.export(Pooled().eval(), tuple(torch.from_numpy(feed[n]) for n in NAMES), str(path), input_names=list(NAMES),
                          output_names=["sentence_embedding"], opset_version=17, dynamo=False, do_constant_folding=True,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in NAMES})
    return path


def _feed(rng: np.random.Generator, length: int, left: bool = False) -> dict[str, np.ndarray]:
    mask = np.zeros((1, SEQ), np.int64)
    if left:
        mask[0, SEQ - length:] = 1
    else:
        mask[0, :length] = 1
    return {"input_ids": rng.integers(0, VOCAB, (1, SEQ)).astype(np.int64) * mask, "attention_mask": mask,
            "token_type_ids": np.zeros((1, SEQ), np.int64)}


def _feeds(n: int, seed: int = 1, left: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [_feed(rng, int(rng.integers(3, SEQ + 1)), left) for _ in range(n)]


def _ctx(tmp_path: Path, tag: str) -> PassContext:
    return PassContext(tmp_path / tag, SampleSet(_feeds(16), _feeds(8, seed=2), None, "synthetic"))


def _chain(src: Path, tmp_path: Path, *specs: tuple[str, dict]) -> tuple[Path, list[dict]]:
    m = load_onnx(src)
    for i, (name, opts) in enumerate(specs):
        m = pass_module(name).run(m, make_params(name, opts), _ctx(tmp_path, f"{i}-{name}"))
    return m.onnx_path, list(m.history[-len(specs):])


def _session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    s = _session(path)
    names = {i.name for i in s.get_inputs()}
    return [s.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds]


def _max_diff(a: Path, b: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(_outputs(a, feeds), _outputs(b, feeds)))


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _ops_at_load(path: Path, tmp_path: Path) -> collections.Counter:
    """The op histogram ONNX Runtime actually runs (after its own load-time fusions)."""
    out = tmp_path / f"{path.stem}-{len(list(tmp_path.iterdir()))}-optimized.onnx"
    _session(path, out)
    return _ops(out)


def test_fusion_is_exact_for_any_padding_and_keeps_layernorm_apart(bert: Path, tmp_path: Path) -> None:
    fused, (rec,) = _chain(bert, tmp_path, ("fuse-transformer", {}))
    assert rec["fused"].get("Attention") == 2 and rec["fused"].get("Gelu") == 2
    assert rec["add_to_sum"] == 2 * 2 + 1  # after attention, after the FFN, in each layer; the embeddings' sum
    loaded = _ops_at_load(fused, tmp_path)
    assert loaded["Attention"] == 2 and loaded["Transpose"] == 0 and loaded["Softmax"] == 0
    # once int8, ONNX Runtime fuses an exported residual Add + LayerNorm into its (scalar, slower)
    # SkipLayerNormalization at load time; the fused graph's Sum + LayerNorm stays as it is
    plain, _ = _chain(bert, tmp_path, ("quantize-dynamic", {}))
    ours, _ = _chain(fused, tmp_path / "q", ("quantize-dynamic", {}))
    assert _ops_at_load(plain, tmp_path)["SkipLayerNormalization"] >= 1
    loaded = _ops_at_load(ours, tmp_path)
    assert loaded["SkipLayerNormalization"] == 0 and loaded["LayerNormalization"] == 2 * 2 + 1
    for left in (False, True):  # right padding, and left padding, which a lengths-only mask gets wrong
        assert _max_diff(bert, fused, _feeds(8, left=left)) < 1e-4


def test_a_lengths_mask_is_only_right_for_right_padding(bert: Path, tmp_path: Path) -> None:
    fused, _ = _chain(bert, tmp_path, ("fuse-transformer", {"mask": "lengths"}))
    assert _max_diff(bert, fused, _feeds(8)) < 1e-4
    assert _max_diff(bert, fused, _feeds(8, left=True)) > 1e-2  # why `mask = "raw"` is the default


def test_smoothquant_after_fusion_folds_into_layernorm_and_smooths_attention(bert: Path, tmp_path: Path) -> None:
    from onnx import numpy_helper

    fused, _ = _chain(bert, tmp_path / "f", ("fuse-transformer", {}))
    smoothed, (_, rec) = _chain(bert, tmp_path, ("fuse-transformer", {}), ("smoothquant", {"alpha": 0.7}))
    readers = collections.Counter(layer.split("_")[0] for norm in rec["norms"] for layer in norm["layers"])
    assert readers["Attention"] == 2  # the packed QKV weight of each layer
    assert rec["layers_smoothed"] == 4 and not rec["skipped"]  # + the FFN input after each attention LayerNorm

    def qkv(path: Path) -> list[np.ndarray]:
        g = onnx.load(str(path)).graph
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        return [inits[n.input[1]] for n in g.node if n.op_type == "Attention"]

    for before, after in zip(qkv(fused), qkv(smoothed)):  # row j of [K, 3N] scaled by s_j, the same s for Q, K, V
        s = after / before
        assert np.allclose(s, s[:, :1], rtol=1e-4) and s.max() / s.min() > 1.2
    assert _max_diff(bert, smoothed, _feeds(8, left=True)) < 1e-4


def test_fused_smoothed_int8_runs_qattention_and_stays_close(bert: Path, tmp_path: Path) -> None:
    from edgecomp.backends.onnxruntime import executed_precision, quantized_share

    q, _ = _chain(bert, tmp_path, ("fuse-transformer", {}), ("smoothquant", {"alpha": 0.7}), ("quantize-dynamic", {}))
    m = onnx.load(str(q))
    assert _ops(q)["QAttention"] == 2 and executed_precision(m) == "int8-dynamic"
    assert quantized_share(m) == {"int8_compute_ops": 2 + 2 * 3, "float_compute_ops": 0}  # QAttention + O, FFN in, FFN out
    feeds = _feeds(16, seed=5)
    cos = [float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(_outputs(bert, feeds), _outputs(q, feeds))]
    assert np.mean(cos) >= 0.995 and min(cos) >= 0.98


def test_a_graph_without_attention_passes_through(tmp_path: Path) -> None:
    src = make_tiny_onnx(tmp_path / "mlp.onnx")
    out, (rec,) = _chain(src, tmp_path, ("fuse-transformer", {}))
    assert "Attention" not in rec["fused"] and rec["add_to_sum"] == 0
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 16)).astype(np.float32)} for i in range(3)]
    assert _max_diff(src, out, feeds) < 1e-6


def test_bad_options_name_the_key() -> None:
    with pytest.raises(Exception, match="mask"):
        make_params("fuse-transformer", {"mask": "padding"})
    with pytest.raises(Exception, match="num_heads"):
        make_params("fuse-transformer", {"num_heads": -1})


def test_symmetric_weights_lose_their_zero_points_and_nothing_else(bert: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused, _ = _chain(bert, tmp_path / "f", ("fuse-transformer", {}))
    ours, (rec,) = _chain(fused, tmp_path, ("quantize-dynamic", {}))
    assert rec["zero_points_dropped"] == 2 * 3 + 2  # every MatMulInteger and QAttention: qint8 weights are symmetric
    graph = onnx.load(str(ours)).graph
    assert all(len(n.input) == 3 for n in graph.node if n.op_type == "MatMulInteger")
    assert all(n.input[7] == "" for n in graph.node if n.op_type == "QAttention")
    ref = tmp_path / "with-zero-points.onnx"  # the same quantizer, zero points kept
    quantize_dynamic(str(fused), str(ref), weight_type=QuantType.QInt8, per_channel=True, reduce_range=saturating_cpu(),
                     op_types_to_quantize=["MatMul", "Gemm", "Attention", "LSTM"], extra_options={"DefaultTensorType": 1})
    assert len(onnx.load(str(ref)).graph.initializer) == len(graph.initializer) + 2 * 3 + 2
    assert _max_diff(ref, ours, _feeds(8)) == 0.0  # bit-identical
    _, (asym,) = _chain(fused, tmp_path / "u8", ("quantize-dynamic", {"weight_type": "quint8"}))
    assert asym["zero_points_dropped"] == 0  # unsigned weights have real zero points


@pytest.mark.parametrize("name", ["quantize-dynamic", "quantize-static"])
def test_int8_weights_are_7_bit_where_int8_saturates(bert: Path, tmp_path: Path, name: str) -> None:
    """x86 CPUs without VNNI add uint8 x int8 products in pairs into a saturating int16: exact only for
    |w| <= 64 (2 x 255 x 64 = 32640). `auto` takes 7 bits there, 8 elsewhere; either can be forced."""
    fused, _ = _chain(bert, tmp_path / "f", ("fuse-transformer", {}))
    peaks, records = {}, {}
    for rr in ("auto", True, False):
        q, (records[rr],) = _chain(fused, tmp_path / str(rr), (name, {"reduce_range": rr}))
        peaks[rr] = int8_peak(onnx.load(str(q)).graph)
        if records[rr]["weight_bits"] == 7:
            seven = q
    assert peaks[True] == 64 and peaks[False] == 127 and peaks["auto"] == (64 if saturating_cpu() else 127)
    assert [records[rr]["weight_bits"] for rr in ("auto", True, False)] == [7 if saturating_cpu() else 8, 7, 8]
    assert records["auto"]["weight_bits_why"].startswith("auto: this")
    feeds = _feeds(8)  # (an 8-bit graph is only exact on this machine if it has VNNI)
    cos = [float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(_outputs(bert, feeds), _outputs(seven, feeds))]
    assert min(cos) >= 0.98
    with pytest.raises(Exception, match="reduce_range"):
        make_params(name, {"reduce_range": "sometimes"})


def test_which_cpus_saturate() -> None:
    flags = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {}\n"
    assert saturating_cpu("x86_64", flags.format("avx512f avx512bw"))  # Skylake-SP, Zen 2/3
    assert not saturating_cpu("x86_64", flags.format("avx512f avx512_vnni"))  # Cascade Lake on, Zen 4
    assert not saturating_cpu("x86_64", flags.format("avx_vnni"))  # Alder Lake
    assert saturating_cpu("AMD64", "")  # flags unreadable: the safe side
    assert not saturating_cpu("aarch64", "")
