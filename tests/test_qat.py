"""The qat pass on tiny real models (the 4-layer BERT of test_passes_compress and the digits CNN): the
export is QDQ around every quantized layer with the trained scales, ONNX Runtime computes what the torch
fake-quant model computes, training is seeded and resumable, and a CLI build with it passes a budget."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import int8_peak  # noqa: E402
from test_passes_compress import bert, digits, digits_recipe, one_thread, run_pass, state  # noqa: E402,F401

from edgecomp.errors import UsageError  # noqa: E402
from edgecomp.export import export_onnx  # noqa: E402
from edgecomp.passes import make_params  # noqa: E402
from edgecomp.passes._int8 import saturating_cpu  # noqa: E402

COMPUTE = ("MatMul", "Gemm", "Conv")


def _const(g, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant node output (through Identity), else None."""
    from onnx import numpy_helper

    for init in g.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
        if n.op_type == "Identity" and n.output[0] == name:
            return _const(g, n.input[0])
    return None


def qdq_layers(path: Path) -> tuple[int, int, list[float]]:
    """(compute ops with a constant weight, those whose two inputs both come from DequantizeLinear, the
    scalar scales of the activation QuantizeLinear nodes)."""
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    dequantized = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}

    def constant_weight(name: str) -> bool:  # DQ <- Q <- initializer, or an initializer itself
        n = producer.get(name)
        while n is not None and n.op_type in ("DequantizeLinear", "QuantizeLinear", "Transpose"):
            name = n.input[0]
            n = producer.get(name)
        return n is None and _const(g, name) is not None or (n is not None and n.op_type == "Constant")

    weighted = [n for n in g.node if n.op_type in COMPUTE and constant_weight(n.input[1])]
    around = [n for n in weighted if n.input[0] in dequantized and n.input[1] in dequantized]
    scales = [float(_const(g, n.input[1])) for n in g.node if n.op_type == "QuantizeLinear"
              and _const(g, n.input[0]) is None and _const(g, n.input[1]).ndim == 0]
    return len(weighted), len(around), scales


def ort_run(path: Path, feeds: dict[str, np.ndarray], optimize: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def stacked(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def torch_out(module, arrays: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(v) for v in arrays.values())).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_qat_bert_exports_qdq_that_onnxruntime_matches(bert, tmp_path: Path):
    handle, ctx = bert
    out = run_pass("qat", handle, ctx, epochs=1, batch_size=16, lr=1e-3)
    rec = out.history[-1]
    assert rec["layers_quantized"] == 25 and rec["calibration_samples"] == 64 and rec["steps"] == 4
    assert len(rec["loss_curve"]) == 4 and rec["seed"] == 0 and rec["resumed_from"] is None
    exported = export_onnx(out, ctx.samples.validation[0], tmp_path / "m.onnx")
    weighted, around, scales = qdq_layers(exported.onnx_path)
    # 4 layers x (q, k, v, o, FFN in, FFN out); the pooler runs in torch but its output is unused (not exported)
    assert weighted == around == 24
    trained = {n: float(q["act_scale"]) for n, q in ((r["layer"], r) for r in rec["layers"]) if "pooler" not in n}
    np.testing.assert_allclose(sorted(scales), sorted(trained.values()), rtol=1e-5)
    arrays = stacked(ctx.samples.validation)
    ref = torch_out(out.torch_module, arrays)
    # 1e-4: an activation within float rounding of a quantization step's midpoint may round the other way
    # in ONNX Runtime than in torch (seen on a Xeon with AMX: 12 of 512 values off by 3e-5)
    np.testing.assert_allclose(ort_run(exported.onnx_path, arrays, optimize=False), ref, atol=1e-4)
    fused = ort_run(exported.onnx_path, arrays, optimize=True)  # int8 kernels (MatMulIntegerToFloat)
    assert cosine(fused, ref).min() > 0.9999
    assert cosine(ref, torch_out(handle.torch_module, arrays)).mean() > 0.99  # still close to the fp32 model


def test_qat_digits_folds_batchnorm_and_keeps_accuracy(digits, tmp_path: Path):
    handle, ctx = digits
    out = run_pass("qat", handle, ctx, steps=10, batch_size=64, lr=1e-4)
    rec = out.history[-1]
    assert rec["bn_folded"] == ["1", "4"] and [r["layer"] for r in rec["layers"]] == ["0", "3", "7", "11"]
    assert rec["training"]["terms"] == ["kd"] and rec["training"]["data"] == "recipe:digits:train"
    exported = export_onnx(out, ctx.samples.validation[0], tmp_path / "m.onnx")
    weighted, around, scales = qdq_layers(exported.onnx_path)
    assert weighted == around == 4  # 3 Conv + the classifier MatMul
    bits = 7 if saturating_cpu() else 8
    assert rec["weight_bits"] == bits and int8_peak(onnx.load(str(exported.onnx_path)).graph) == {7: 63, 8: 127}[bits]
    np.testing.assert_allclose(sorted(scales), sorted(r["act_scale"] for r in rec["layers"]), rtol=1e-5)
    arrays = stacked(ctx.samples.validation)
    ref = torch_out(out.torch_module, arrays)
    plain = ort_run(exported.onnx_path, arrays, optimize=False)  # Q/DQ run as float ops: the same function,
    per_sample = np.abs(plain - ref).max(1)  # but a conv output at a rounding boundary may land one step over
    assert (per_sample > 1e-4).mean() <= 0.01 and cosine(plain, ref).min() > 0.9999
    fused = ort_run(exported.onnx_path, arrays, optimize=True)  # QLinearConv: requantized in integers
    assert cosine(fused, ref).min() > 0.999 and (fused.argmax(1) == ref.argmax(1)).mean() >= 0.99
    fp32 = torch_out(handle.torch_module, arrays)
    acc = lambda o: float((o.argmax(1) == ctx.samples.labels).mean())  # noqa: E731
    assert acc(fused) >= acc(fp32) - 0.01 and (fused.argmax(1) == fp32.argmax(1)).mean() >= 0.98


def test_qat_options_select_layers_and_schemes(digits, tmp_path: Path):
    handle, ctx = digits
    out = run_pass("qat", handle, ctx, ops=["Conv2d"], exclude=["0"], activations="int8", act_range="learned",
                   fold_bn=False, steps=3, batch_size=32, lr=1e-2, reduce_range=True)
    rec = out.history[-1]
    assert [r["layer"] for r in rec["layers"]] == ["3", "7"] and rec["skipped"] == [{"layer": "0", "reason": "excluded"}]
    assert rec["bn_folded"] == [] and all(r["act_zero_point"] == 0 for r in rec["layers"])
    assert isinstance(out.torch_module[0], torch.nn.Conv2d) and isinstance(out.torch_module[11], torch.nn.Linear)
    learned = out.torch_module[3].act
    assert float(learned.scale) == pytest.approx(abs(float(learned.learned)))  # the learned scale is what exports
    exported = export_onnx(out, ctx.samples.validation[0], tmp_path / "m.onnx")
    graph = onnx.load(str(exported.onnx_path)).graph
    q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(q) == 2 and len(dq) == 4  # input and weight of two convs; weights are stored as int8, not re-quantized
    assert exported.history[-1]["weights_stored_int8"] == 2
    assert rec["weight_bits"] == 7 and int8_peak(graph) == 63  # x86 without VNNI sums int8 pairs in int16
    for bad in ({"activations": "int4"}, {"ops": ["LSTM"]}, {"act_range": "minmax"}, {"momentum": 1.5}):
        with pytest.raises(UsageError, match="pass qat"):
            make_params("qat", bad)


def test_qat_same_seed_same_weights(bert):
    handle, ctx = bert
    opts = dict(steps=3, batch_size=16, lr=1e-3, act_range="ema")
    a, b = (state(run_pass("qat", handle, ctx, seed=5, **opts).torch_module) for _ in range(2))
    c = state(run_pass("qat", handle, ctx, seed=6, **opts).torch_module)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_qat_resume_ends_where_an_uninterrupted_run_ends(bert, tmp_path: Path):
    handle, ctx = bert
    opts = dict(epochs=2, batch_size=16, lr=1e-3, seed=3, act_range="ema")
    full = run_pass("qat", handle, ctx, checkpoint_dir=str(tmp_path / "a"), keep_checkpoints=True, **opts)
    assert (tmp_path / "a" / "step-000004.pt").is_file()
    ckpt = str(tmp_path / "a" / "step-000004.pt")
    resumed = run_pass("qat", handle, ctx, checkpoint_dir=str(tmp_path / "b"), resume=ckpt, **opts)
    a, b = full.history[-1], resumed.history[-1]
    assert b["resumed_from"] == ckpt and b["training"]["start_step"] == 4 and b["steps"] == 8
    np.testing.assert_allclose(a["loss_curve"], b["loss_curve"], rtol=1e-3)
    sa, sb = state(full.torch_module), state(resumed.torch_module)
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


def test_cli_build_with_qat(tmp_path: Path):
    from conftest import run_cli

    profile = tmp_path / "ort-loose.toml"
    profile.write_text('schema = 1\nname = "ort-qat"\nbackend = "onnxruntime"\nprecision = "int8"\nthreads = 1\n'
                       '[budget]\ntop1_agreement = 0.98\naccuracy_drop = 0.02\n')
    out = tmp_path / "out"
    proc = run_cli("build", "digits", "--pass", "qat:steps=20,batch_size=64,lr=1e-4", "--target", str(profile),
                   "--out", str(out), "--no-bench", timeout=300)
    assert proc.returncode == 0, proc.stderr
    target = json.loads((out / "report.json").read_text())["targets"][0]
    assert [p["pass"] for p in target["passes"]] == ["qat", "export"]
    assert target["passes"][0]["layers_quantized"] == 4 and target["passes"][0]["steps"] == 20
    assert target["precision_executed"] == "int8-qdq" and target["meta"]["int8_compute_ops"] == 4
    assert target["parity"]["outputs"]["logits"]["top1_agreement"] >= 0.98
    ops = Counter(n.op_type for n in onnx.load(str(out / "ort-qat" / "model.onnx")).graph.node)
    assert ops["QuantizeLinear"] == 4 and ops["DequantizeLinear"] == 8  # weights folded to int8 initializers
    model = onnx.load(str(out / "ort-qat" / "model.onnx"))
    assert sum(t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1 for t in model.graph.initializer) == 4
