"""ONNX files, with external data. A tensor's external location must stay inside the model's
folder: an ONNX file is untrusted input, and `../../etc/...` must not be read."""

from __future__ import annotations

from pathlib import Path

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle, onnx_signature, sha256_file


def check_external_data(model: object, folder: Path, where: str) -> None:
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    root = folder.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        loc = ExternalDataInfo(tensor).location
        target = (root / loc).resolve()
        if Path(loc).is_absolute() or not target.is_relative_to(root):
            raise UsageError(f"{where}: tensor {tensor.name!r} points outside the model's folder ({loc!r}); refusing to read it")
        if not target.is_file():
            raise UsageError(f"{where}: external data file {loc!r} for tensor {tensor.name!r} is missing")


def load_onnx(path: Path) -> ModelHandle:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UsageError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'parse error'})") from None
    if not model.graph.node and not model.graph.output:
        raise UsageError(f"{path}: not a valid ONNX model (empty graph; the file may be truncated)")
    check_external_data(model, path.parent, str(path))
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise UsageError(f"{path}: ONNX checker rejected the model: {str(e).splitlines()[0][:200]}") from None
    inputs, outputs = onnx_signature(model)
    prov = {"path": str(path), "format": "onnx", "sha256": sha256_file(path), "opset": _opset(model)}
    return ModelHandle(path.stem, inputs, outputs, prov, onnx_path=path)


def _opset(model: object) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
