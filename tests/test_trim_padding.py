"""trim-padding: the graph computes the real tokens only, and its output does not change (a real BERT
encoder with masked mean pooling, exported to ONNX with a dynamic sequence axis, run on ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgecomp.data import SampleSet  # noqa: E402
from edgecomp.diff import compare, intermediates  # noqa: E402
from edgecomp.model import ModelHandle, TensorSpec  # noqa: E402
from edgecomp.passes import make_params, pass_module  # noqa: E402
from edgecomp.passes.context import PassContext  # noqa: E402
from test_passes_compress import SEQ, token_arrays, tiny_encoder  # noqa: E402

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def encoder_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trim") / "encoder.onnx"
    arrays = token_arrays(1, 0)
    torch.onnx.export(tiny_encoder(), tuple(torch.from_numpy(arrays[n]) for n in NAMES), str(path), input_names=NAMES,
                      output_names=["embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in NAMES})
    return path


def trimmed(path: Path, tmp_path: Path) -> tuple[Path, dict]:
    specs = tuple(TensorSpec(n, "int64", ("batch", "seq")) for n in NAMES)
    handle = ModelHandle("enc", specs, (TensorSpec("embedding", "float32", ("batch", 32)),), {}, onnx_path=path)
    out = pass_module("trim-padding").run(handle, make_params("trim-padding", {}), PassContext(tmp_path, SampleSet([], [], None, "t")))
    return out.onnx_path, out.history[-1]


def run(path: Path, feed: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_output_unchanged_and_only_real_tokens_computed(encoder_onnx: Path, tmp_path: Path) -> None:
    path, rec = trimmed(encoder_onnx, tmp_path)
    assert rec["applied"] and rec["inputs_trimmed"] == NAMES
    arrays = token_arrays(6, 5)  # right-padded rows of 8..13 real tokens
    real = int(arrays["attention_mask"].sum(1).max())
    assert real < SEQ
    for i in range(6):
        feed = {k: v[i:i + 1] for k, v in arrays.items()}
        np.testing.assert_allclose(run(path, feed), run(encoder_onnx, feed), atol=1e-5)
    batch = {k: v for k, v in arrays.items()}  # a batch is cut to its longest row
    np.testing.assert_allclose(run(path, batch), run(encoder_onnx, batch), atol=1e-5)
    order, inside = intermediates(path, batch)
    hidden = [inside[n] for n in order if inside[n].ndim == 3 and inside[n].shape[-1] == 32]
    assert hidden and all(h.shape[1] == real for h in hidden)  # every hidden state: the real positions only
    _, full = intermediates(encoder_onnx, batch)
    cmp = compare(full, inside, order)  # diff lines up the real positions of both
    assert cmp["matched"] > 20 and min(r["sqnr_db"] for r in cmp["tensors"]) > 60


def test_left_padding_is_left_whole(encoder_onnx: Path, tmp_path: Path) -> None:
    path, _ = trimmed(encoder_onnx, tmp_path)
    arrays = token_arrays(1, 4)
    n = int(arrays["attention_mask"].sum())
    left = {k: np.roll(v, SEQ - n, axis=1) for k, v in arrays.items()}  # padding first, real tokens last
    _, inside = intermediates(path, left)
    assert max(t.shape[1] for t in inside.values() if t.ndim == 3) == SEQ
    np.testing.assert_allclose(run(path, left), run(encoder_onnx, left), atol=1e-5)


def test_a_graph_without_a_mask_passes_through(tiny_onnx: Path, tmp_path: Path) -> None:
    handle = ModelHandle("tiny", (TensorSpec("x", "float32", ("batch", 16)),), (TensorSpec("y", "float32", ("batch", 4)),),
                         {}, onnx_path=tiny_onnx)
    out = pass_module("trim-padding").run(handle, make_params("trim-padding", {}), PassContext(tmp_path, SampleSet([], [], None, "t")))
    assert out.onnx_path == tiny_onnx and out.history[-1]["applied"] is False
    assert "no input 'attention_mask'" in out.history[-1]["reason"]
