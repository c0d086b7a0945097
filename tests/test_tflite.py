"""The TFLite / LiteRT target: real conversions (onnxslim + onnx2tf + TFLiteConverter in a child process)
run on the real LiteRT interpreter with XNNPACK. Digits and tiny models only: MiniLM takes minutes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import run_cli
from edgecomp.backends import availability

ok, why = availability("tflite")
pytestmark = pytest.mark.skipif(not ok, reason=f"tflite backend unavailable: {why}")

INT8_IO = """\
schema = 1
name = "tflite-int8-io"
backend = "tflite"
precision = "int8"
threads = 2

[options]
quantize = "int8"
io_dtype = "int8"

[budget]
top1_agreement = 0.98
"""


def _profile(tmp_path: Path, name: str, options: str, budget: str = "cosine_mean = 0.9") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'schema = 1\nname = "{name}"\nbackend = "tflite"\nprecision = "fp32"\n\n[options]\n{options}\n\n[budget]\n{budget}\n')
    return path


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] + ([out] if out.exists() else [])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One build, three TFLite targets: fp32, full-integer int8 (float I/O) and int8 with int8 I/O."""
    tmp = tmp_path_factory.mktemp("tflite")
    (tmp / "tflite-int8-io.toml").write_text(INT8_IO)
    out = tmp / "digits"
    r = run_cli("build", "digits", "-t", "tflite-fp32", "-t", "tflite-int8", "-t", tmp / "tflite-int8-io.toml",
                "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    return out, {t["target"]: t for t in json.loads(r.stdout)["targets"]}


def test_digits_fp32_matches_pytorch(digits: tuple[Path, dict[str, Any]]) -> None:
    _, t = digits
    par = t["tflite-fp32"]["parity"]["outputs"]["logits"]
    assert par["max_abs"] < 1e-4 and par["top1_agreement"] == 1.0
    assert t["tflite-fp32"]["precision_executed"] == "fp32"
    info = t["tflite-fp32"]["runtime"]
    assert info["runtime"] in ("litert", "tflite-runtime", "tensorflow-lite") and info["threads"] == 2
    assert info["delegate"] == "xnnpack"


def test_digits_full_integer_int8(digits: tuple[Path, dict[str, Any]]) -> None:
    _, t = digits
    for name in ("tflite-int8", "tflite-int8-io"):
        assert t[name]["precision_executed"] == "int8", name  # every conv / FC runs on int8 activations
        assert t[name]["parity"]["outputs"]["logits"]["top1_agreement"] >= 0.98
        assert t[name]["meta"]["float_compute_ops"] == 0 and t[name]["meta"]["int8_compute_ops"] == 4
        assert t[name]["meta"]["quantization"]["calibration_samples"] == 200  # the recipe's calibration split
    assert t["tflite-int8"]["artifact"]["size_bytes"] < t["tflite-fp32"]["artifact"]["size_bytes"] / 2


def test_manifest_records_layout_and_ops(digits: tuple[Path, dict[str, Any]]) -> None:
    out, _ = digits
    meta = json.loads((out / "tflite-fp32" / "manifest.json").read_text())["meta"]
    inp, = meta["layout"]["inputs"]
    assert (inp["source_layout"], inp["artifact_layout"]) == ("NCHW", "NHWC")
    assert inp["transpose"] == [0, 2, 3, 1] and inp["shape"] == [1, 8, 8, 1] and inp["source_shape"] == [1, 1, 8, 8]
    outp, = meta["layout"]["outputs"]
    assert outp["name"] == "logits" and outp["transpose"] is None and outp["shape"] == [1, 10]
    assert meta["builtin_ops_only"] is True and meta["non_builtin_ops"] == []
    assert meta["ops"]["CONV_2D"] == 3 and meta["converter"]["path"] == "onnx2tf"
    io = json.loads((out / "tflite-int8-io" / "manifest.json").read_text())["meta"]["layout"]
    assert io["inputs"][0]["dtype"] == "int8" and io["inputs"][0]["quantization"]["scale"] > 0
    assert io["outputs"][0]["dtype"] == "int8" and io["outputs"][0]["quantization"]["scale"] > 0


def test_an_app_following_the_manifest_gets_the_reference(digits: tuple[Path, dict[str, Any]]) -> None:
    """Feed the .tflite directly, as an app would: transpose (and quantize) as meta.layout says."""
    from ai_edge_litert.interpreter import Interpreter

    out, _ = digits
    for target in ("tflite-fp32", "tflite-int8-io"):
        folder = out / target
        layout = json.loads((folder / "manifest.json").read_text())["meta"]["layout"]
        ref = np.load(folder / "reference.npz")
        it = Interpreter(model_path=str(folder / "model.tflite"), num_threads=1)
        runner = it.get_signature_runner()
        inp, outp = layout["inputs"][0], layout["outputs"][0]
        x = ref["input/image"].transpose(inp["transpose"])
        agree = []
        for i in range(len(x)):
            xi = x[i:i + 1]
            if inp["quantization"]:
                q = inp["quantization"]
                xi = np.clip(np.round(xi / q["scale"]) + q["zero_point"], -128, 127).astype(np.int8)
            y = runner(**{inp["artifact_name"]: xi})[outp["artifact_name"]]
            if outp["quantization"]:
                y = (y.astype(np.float32) - outp["quantization"]["zero_point"]) * outp["quantization"]["scale"]
            agree.append(y.argmax() == ref["output/logits"][i].argmax())
        assert np.mean(agree) >= 0.98, target


def test_validate_re_checks_a_tflite_artifact(digits: tuple[Path, dict[str, Any]]) -> None:
    out, _ = digits
    r = run_cli("validate", out / "tflite-int8", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verdict"]["ok"]


def test_read_ops_lists_builtin_ops_of_a_real_model(digits: tuple[Path, dict[str, Any]]) -> None:
    from edgecomp.backends.tflite_ops import histogram, precision, read_ops

    ops = read_ops(digits[0] / "tflite-int8" / "model.tflite")
    assert all(o.builtin for o in ops) and histogram(ops)["QUANTIZE"] == 1
    assert precision(ops)[0] == "int8"


def _export(net: Any, path: Path) -> Path:
    import torch

    torch.onnx.export(net.eval(), (torch.randn(1, 16),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real MLPs from torch: one with GELU (exported as Div, Erf, Add, Mul, Mul) and one with a lone
    erf, which TFLite has only as a Flex (Select TF) op; plus real-valued samples for both."""
    import torch

    class ErfNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.erf(self.a(x)))

    class MaskNet(torch.nn.Module):
        """A softmax masked the Hugging Face way: masked logits get float32's minimum added."""

        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.a(x) + (x < 0).float() * torch.finfo(torch.float32).min, -1)

    tmp = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    gelu = _export(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)), tmp / "gelu.onnx")
    erf = _export(ErfNet(), tmp / "erf.onnx")
    mask = _export(MaskNet(), tmp / "mask.onnx")
    np.savez(tmp / "samples.npz", x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    return {"gelu": gelu, "erf": erf, "mask": mask, "samples": tmp / "samples.npz"}


def test_a_flex_op_fails_the_build_naming_op_and_node(small_models: dict[str, Path], tmp_path: Path) -> None:
    profile = _profile(tmp_path, "tflite-no-pseudo", "pseudo_ops = []")
    out = tmp_path / "out"
    r = run_cli("build", small_models["erf"], "-t", profile, "--samples", small_models["samples"], "--out", out, "--no-bench")
    assert r.returncode == 2, r.stderr
    assert "FlexErf" in r.stderr and "/Erf" in r.stderr and "allow_flex" in r.stderr
    assert not _leftovers(out)


def test_gelu_becomes_the_builtin_gelu_op(small_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli("build", small_models["gelu"], "-t", "tflite-fp32", "-t", "tflite-int8", "--samples", small_models["samples"],
                "--out", out, "--no-bench", "--json")
    assert r.returncode == 0, r.stderr
    t = {t["target"]: t for t in json.loads(r.stdout)["targets"]}
    for name in t:
        assert t[name]["meta"]["builtin_ops_only"] and t[name]["meta"]["ops"]["GELU"] == 1, name
        assert t[name]["meta"]["converter"]["slim"]["gelu_fused"] == 1
    assert t["tflite-fp32"]["parity"]["outputs"]["y"]["max_abs"] < 1e-5  # exact GELU, not an approximation
    assert t["tflite-int8"]["parity"]["outputs"]["y"]["cosine_mean"] > 0.99  # int8 GELU has a kernel


def test_int8_of_a_float_min_mask_fails_naming_the_tensor(small_models: dict[str, Path], tmp_path: Path) -> None:
    """Full-integer calibration of a float-min mask gives scales of ~1e36 or inf; LiteRT's int8 kernels
    abort the process on such a model, so the build must stop first, with the tensor named."""
    out = tmp_path / "out"
    r = run_cli("build", small_models["mask"], "-t", "tflite-int8", "--samples", small_models["samples"], "--out", out, "--no-bench")
    assert r.returncode == 2, r.stderr
    assert "int8 calibration gave tensor" in r.stderr and "quantize = 'dynamic'" in r.stderr
    assert not _leftovers(out)


@pytest.mark.parametrize("form", ["x*(1+erf)*0.5", "(x*0.5)*(1+erf)", "mul-by-1/sqrt2"])
def test_fuse_gelu_matches_every_exported_form_exactly(form: str, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgecomp.backends.tflite_gelu import fuse_gelu

    c = {k: numpy_helper.from_array(np.array(v, np.float32), k) for k, v in
         {"sqrt2": 2 ** 0.5, "inv_sqrt2": 2 ** -0.5, "one": 1.0, "half": 0.5}.items()}
    scale = helper.make_node("Mul", ["x", "inv_sqrt2"], ["s"]) if form == "mul-by-1/sqrt2" else helper.make_node("Div", ["x", "sqrt2"], ["s"])
    head = [scale, helper.make_node("Erf", ["s"], ["e"], name="the_erf"), helper.make_node("Add", ["one", "e"], ["a"])]
    tail = [helper.make_node("Mul", ["x", "half"], ["h"]), helper.make_node("Mul", ["h", "a"], ["g"])] if form.startswith("(x*0.5)") \
        else [helper.make_node("Mul", ["a", "x"], ["m"]), helper.make_node("Mul", ["half", "m"], ["g"])]
    graph = helper.make_graph(head + tail + [helper.make_node("Relu", ["g"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], list(c.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fused, n = fuse_gelu(model)
    assert n == 1 and [x.op_type for x in fused.graph.node] == ["Gelu", "Relu"] and fused.graph.node[0].name == "the_erf"
    assert not fused.graph.initializer  # the pattern's constants are gone
    x = np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run(fused), run(model), atol=1e-6)
    onnx.checker.check_model(fused)


def test_an_op_the_converter_lacks_fails_fast(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT32, name="to_int"),
         helper.make_node("BitwiseNot", ["xi"], ["ni"], name="flip_bits"),
         helper.make_node("Cast", ["ni"], ["y"], to=TensorProto.FLOAT, name="to_float")],
        "bits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "bits.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    out = tmp_path / "out"
    r = run_cli("build", path, "-t", "tflite-fp32", "--out", out, "--no-bench")
    assert r.returncode == 2, r.stderr
    assert "BitwiseNot" in r.stderr and "flip_bits" in r.stderr
    assert not _leftovers(out)


def test_an_unknown_option_names_the_key(tiny_onnx: Path, tiny_samples: Path, tmp_path: Path) -> None:
    profile = _profile(tmp_path, "typo", 'quantise = "int8"')
    r = run_cli("build", tiny_onnx, "-t", profile, "--samples", tiny_samples, "--out", tmp_path / "out", "--no-bench")
    assert r.returncode == 2 and "quantise" in r.stderr and "typo.toml" in r.stderr


def test_converter_timeout_is_exit_2_and_writes_nothing(tiny_onnx: Path, tiny_samples: Path, tmp_path: Path) -> None:
    profile = _profile(tmp_path, "hurry", "timeout_s = 0.5")
    out = tmp_path / "out"
    r = run_cli("build", tiny_onnx, "-t", profile, "--samples", tiny_samples, "--out", out, "--no-bench")
    assert r.returncode == 2, r.stderr
    assert "timeout_s" in r.stderr and "Traceback" not in r.stderr
    assert not _leftovers(out)


def test_converter_crash_is_a_clean_usage_error(tiny_onnx: Path, tiny_samples: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A converter that segfaults (a real SIGSEGV in the child) ends the build with UsageError, nothing written."""
    from edgecomp.backends import tflite
    from edgecomp.errors import UsageError
    from edgecomp.pipeline import BuildRequest, build

    segfault = "import ctypes; ctypes.string_at(0)"
    monkeypatch.setattr(tflite, "_child_command", lambda spec: [sys.executable, "-c", segfault])
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="crashed.*SIGSEGV") as e:
        build(BuildRequest(model=str(tiny_onnx), targets=("tflite-fp32",), out=out, samples=tiny_samples, bench=False))
    assert e.value.exit_code == 2
    assert not _leftovers(out)
