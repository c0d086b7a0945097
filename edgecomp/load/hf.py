"""Hugging Face model directories, exported to ONNX by optimum's exporter (it knows each
architecture's inputs and dynamic axes); `torch.onnx.export` through transformers' AutoModel
when optimum does not support the architecture."""

from __future__ import annotations

import logging
from pathlib import Path

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle, onnx_signature, sha256_file


def load_hf_dir(path: Path, workdir: Path) -> ModelHandle:
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}/config.json: unreadable ({e})") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UsageError(f"{path}: Hugging Face directory without weights (*.safetensors or *.bin)")
    out = workdir / "hf-export"
    out.mkdir(parents=True, exist_ok=True)
    exporter = "optimum"
    try:
        from optimum.exporters.onnx import main_export

        logging.getLogger("optimum").setLevel(logging.ERROR)
        main_export(str(path), output=str(out), task="feature-extraction", library_name="transformers",
                    opset=17, device="cpu", do_validation=False, local_files_only=True)
        onnx_path = out / "model.onnx"
    except (ImportError, ValueError, KeyError, NotImplementedError) as e:
        exporter = f"torch.onnx.export (optimum: {type(e).__name__})"
        onnx_path = _torch_export(path, out)
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs = onnx_signature(model)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    prov = {"path": str(path), "format": "huggingface", "model_type": config.get("model_type"),
            "exporter": exporter, "sha256": sha256_file(weights[0])}
    return ModelHandle(path.name, inputs, outputs, prov, onnx_path=onnx_path)


def _torch_export(path: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    except Exception as e:
        raise UsageError(f"{path}: transformers could not load this model ({type(e).__name__}: {str(e)[:120]})") from None

    class Positional(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(1, 16, dtype=torch.long)
    onnx_path = out / "model.onnx"
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
    torch.onnx.export(Positional(model), (ids, ids), str(onnx_path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return onnx_path
