"""Each loader on real files made here: ONNX (with external data), TorchScript, torch.export,
a Hugging Face directory, a recipe name, and the pickle-safety rules for `.pt` files."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgecomp.backends import onnxruntime as ort_backend
from edgecomp.errors import UsageError
from edgecomp.export import export_onnx
from edgecomp.load import load_model, parse_input_specs
from edgecomp.model import TensorSpec

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 16)).astype(np.float32)


class Tiny(torch.nn.Module):
    """x: [batch, 16] -> y: [batch, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _ort(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return ort_backend.OrtRunner(path, threads=1)(feed)


def _torch(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


# --- ONNX -------------------------------------------------------------------------------------

def test_onnx_file(tiny_onnx: Path, tmp_path: Path) -> None:
    model, recipe = load_model(str(tiny_onnx), tmp_path)
    assert recipe is None
    assert model.inputs == (TensorSpec("x", "float32", ("batch", 16)),)
    assert model.outputs == (TensorSpec("y", "float32", ("batch", 4)),)
    assert model.onnx_path == tiny_onnx and model.torch_module is None
    assert model.provenance["format"] == "onnx" and len(model.provenance["sha256"]) == 64
    assert model.provenance["opset"] == 17


def test_directory_holding_model_onnx(tiny_onnx: Path, tmp_path: Path) -> None:
    folder = tmp_path / "exported"
    folder.mkdir()
    shutil.copy(tiny_onnx, folder / "model.onnx")
    model, _ = load_model(str(folder), tmp_path / "work")
    assert model.onnx_path == folder / "model.onnx" and model.input_names == ["x"]


def _with_external_data(tiny_onnx: Path, folder: Path, location: str) -> Path:
    """The tiny model with every initializer stored in `folder/location`."""
    m = onnx.load(str(tiny_onnx))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    assert (folder / location).is_file()
    return path


@pytest.mark.parametrize("location", ["weights.bin", "data/weights.bin"])
def test_onnx_external_data_inside_the_folder(tiny_onnx: Path, tmp_path: Path, location: str) -> None:
    (tmp_path / "m" / "data").mkdir(parents=True)
    path = _with_external_data(tiny_onnx, tmp_path / "m", location)
    assert path.stat().st_size < tiny_onnx.stat().st_size  # the weights really are outside the .onnx
    model, _ = load_model(str(path), tmp_path / "work")
    assert model.input_names == ["x"] and model.output_names == ["y"]
    # Lowering inlines the weights: the artifact is one self-contained file with the same numbers.
    art = ort_backend.lower(model, None, tmp_path / "artifact", None)
    assert art.files == {"model": "model.onnx"}
    (tmp_path / "m" / location).unlink()  # the artifact must not need the source's data any more
    got = ort_backend.load(art, 1)({"x": X})["y"]
    np.testing.assert_allclose(got, _ort(tiny_onnx, {"x": X})["y"], rtol=0, atol=1e-6)


def _retarget_external_data(path: Path, location: str) -> None:
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(m.SerializeToString())


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_onnx_external_data_escaping_the_folder_is_refused(tiny_onnx: Path, tmp_path: Path, escape: str) -> None:
    folder = tmp_path / "m"
    path = _with_external_data(tiny_onnx, folder, "weights.bin")
    outside = tmp_path / "secret.bin"
    shutil.move(folder / "weights.bin", outside)  # a real file, so only the location can be the problem
    if escape == "parent":
        _retarget_external_data(path, "../secret.bin")
    elif escape == "absolute":
        _retarget_external_data(path, str(outside))
    else:
        os.symlink(outside, folder / "weights.bin")
    with pytest.raises(UsageError, match="outside the model's folder"):
        load_model(str(path), tmp_path / "work")


def test_onnx_missing_external_data_is_named(tiny_onnx: Path, tmp_path: Path) -> None:
    path = _with_external_data(tiny_onnx, tmp_path / "m", "weights.bin")
    (tmp_path / "m" / "weights.bin").unlink()
    with pytest.raises(UsageError, match="'weights.bin'.*missing"):
        load_model(str(path), tmp_path / "work")


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage" * 10], ids=["empty", "garbage"])
def test_onnx_corrupt(tmp_path: Path, content: bytes, tiny_onnx: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="not a valid ONNX model"):
        load_model(str(path), tmp_path)


def test_onnx_truncated(tmp_path: Path, tiny_onnx: Path) -> None:
    path = tmp_path / "truncated.onnx"
    data = tiny_onnx.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="not a valid ONNX model"):
        load_model(str(path), tmp_path)


# --- TorchScript, torch.export ----------------------------------------------------------------

@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript(tmp_path: Path, how: str) -> None:
    net = Tiny().eval()
    ts = torch.jit.script(net) if how == "script" else torch.jit.trace(net, (torch.randn(1, 16),))
    path = tmp_path / "net.pt"
    ts.save(str(path))
    sig = parse_input_specs(("x:batchx16",))
    model, _ = load_model(str(path), tmp_path, inputs=sig)
    assert model.provenance["format"] == "torchscript"
    assert model.inputs == (TensorSpec("x", "float32", ("batch", 16)),)
    np.testing.assert_allclose(_torch(model.torch_module, X), _torch(net, X), rtol=0, atol=1e-6)
    # and it exports to an ONNX graph that ONNX Runtime runs with the same numbers, any batch size
    exported = export_onnx(model, {"x": X[:1]}, tmp_path / "ts.onnx")
    assert exported.onnx_path.is_file() and exported.history[-1]["exporter"] == "torchscript"
    np.testing.assert_allclose(_ort(exported.onnx_path, {"x": X})[exported.output_names[0]], _torch(net, X), atol=1e-5)


def test_torchscript_without_a_signature_asks_for_one(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.jit.script(Tiny().eval()).save(str(path))
    with pytest.raises(UsageError, match="--input"):
        load_model(str(path), tmp_path)


def test_torch_export_program(tmp_path: Path) -> None:
    net = Tiny().eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 16),)), str(path))
    model, _ = load_model(str(path), tmp_path)
    assert model.provenance["format"] == "torch.export"
    assert model.inputs == (TensorSpec("x", "float32", (1, 16)),)  # the signature comes from the program itself
    assert isinstance(model.torch_module, torch.export.ExportedProgram)
    exported = export_onnx(model, {"x": X[:1]}, tmp_path / "ep.onnx")
    assert exported.history[-1]["exporter"] == "dynamo"
    got = _ort(exported.onnx_path, {"x": X[:1]})
    np.testing.assert_allclose(next(iter(got.values())), _torch(net, X[:1]), atol=1e-5)


def test_pt2_that_is_not_a_program(tmp_path: Path) -> None:
    path = tmp_path / "net.pt2"
    path.write_bytes(os.urandom(256))
    with pytest.raises(UsageError, match="not a torch.export program"):
        load_model(str(path), tmp_path)


# --- pickles: weights-only unless the user trusts the file ---------------------------------------

class _RunsCode:
    """Unpickling this object calls exec: the classic malicious-checkpoint payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(_RunsCode(marker), path)
    else:
        with open(path, "wb") as f:
            pickle.dump(_RunsCode(marker), f)
    with pytest.raises(UsageError) as e:
        load_model(str(path), tmp_path, inputs=parse_input_specs(("x:1x16",)))
    assert not marker.exists(), "the pickle's code ran"
    assert "refusing to unpickle" in str(e.value) and "--trust-remote-code" in str(e.value)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)  # one plain line, not torch's coloured advice


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    path = tmp_path / "full.pt"
    torch.save(net, path)
    sig = parse_input_specs(("x:1x16",))
    with pytest.raises(UsageError, match=r"it imports torch\.nn\.modules\.container\.Sequential.*--trust-remote-code"):
        load_model(str(path), tmp_path, inputs=sig)
    model, _ = load_model(str(path), tmp_path, inputs=sig, trust_remote_code=True)
    assert model.provenance["format"] == "pickle"
    np.testing.assert_allclose(_torch(model.torch_module, X), _torch(net, X), rtol=0, atol=0)


def test_state_dict_only_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(Tiny().state_dict(), path)
    with pytest.raises(UsageError, match="state dict") as e:
        load_model(str(path), tmp_path, inputs=parse_input_specs(("x:1x16",)))
    assert "torch.jit" in str(e.value) or "ONNX" in str(e.value)  # it says what to do instead


def test_random_bytes_as_pt(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    for trust in (False, True):  # garbage is not a pickle: no talk of trusting it
        with pytest.raises(UsageError, match="noise.pt: not a PyTorch file"):
            load_model(str(path), tmp_path, inputs=parse_input_specs(("x:1x16",)), trust_remote_code=trust)


# --- Hugging Face directory ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    model = BertModel(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    model.save_pretrained(folder)
    return folder, model


def test_hugging_face_directory_exports_through_optimum(tiny_bert: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    folder, bert = tiny_bert
    model, recipe = load_model(str(folder), tmp_path)
    assert recipe is None
    assert model.provenance["format"] == "huggingface" and model.provenance["model_type"] == "bert"
    assert model.provenance["exporter"] == "optimum"
    assert model.onnx_path.is_file() and model.onnx_path.is_relative_to(tmp_path)  # written only in the workdir
    assert {"input_ids", "attention_mask"} <= set(model.input_names)
    assert "last_hidden_state" in model.output_names
    ids = np.random.default_rng(0).integers(0, 100, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    feed = {k: v for k, v in feed.items() if k in model.input_names}
    got = _ort(model.onnx_path, feed)["last_hidden_state"]
    with torch.no_grad():
        want = bert(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_hugging_face_directory_without_weights(tiny_bert: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_bert[0] / "config.json", folder / "config.json")
    with pytest.raises(UsageError, match="without weights"):
        load_model(str(folder), tmp_path / "work")


# --- recipes, dispatch, signatures -------------------------------------------------------------

def test_recipe_name(tmp_path: Path) -> None:
    model, recipe = load_model("digits", tmp_path)
    assert recipe is not None and recipe.name == "digits" and recipe.task == "classification"
    assert model.provenance["format"] == "recipe"
    assert model.inputs == recipe.inputs and model.onnx_path is None
    image = recipe.module().samples(recipe).validation[0]["image"]
    assert image.shape == (1, 1, 8, 8)
    assert _torch(model.torch_module, image).shape == (1, 10)


@pytest.mark.parametrize("spec, match", [
    ("no/such/model.onnx", "no such file or directory"),
    ("not_a_recipe", "not a recipe name"),
])
def test_missing_model(tmp_path: Path, spec: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        load_model(spec, tmp_path)


def test_directory_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="holds no model"):
        load_model(str(tmp_path / "empty"), tmp_path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(UsageError, match="unsupported model format '.h5'"):
        load_model(str(path), tmp_path)


def test_parse_input_specs() -> None:
    assert parse_input_specs(()) is None
    assert parse_input_specs(("image:1x3x224x224", "ids:batchx128:int64")) == (
        TensorSpec("image", "float32", (1, 3, 224, 224)), TensorSpec("ids", "int64", ("batch", 128)))
    with pytest.raises(UsageError, match="NAME:DIMxDIM"):
        parse_input_specs(("image",))
    with pytest.raises(UsageError, match="unknown dtype 'floaty'"):
        parse_input_specs(("image:1x3:floaty",))
