"""PyTorch files: TorchScript archives, torch.export `.pt2` programs, and (only when the user
says so) full pickles.

Unpickling runs arbitrary code, so `torch.load` is always called with `weights_only=True`;
a pickled `nn.Module` needs `--trust-remote-code`. A bare state dict is refused with a hint:
without the class that made it, there is no model to compile.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle, TensorSpec, sha256_file

_SIGNATURE_HINT = "pass its inputs with --input NAME:1x3x224x224[:dtype] (or real samples with --samples FILE.npz)"


def _handle(path: Path, module: Any, fmt: str, inputs: tuple[TensorSpec, ...] | None) -> ModelHandle:
    if inputs is None:
        raise UsageError(f"{path}: a {fmt} file carries no input signature; {_SIGNATURE_HINT}")
    prov = {"path": str(path), "format": fmt, "sha256": sha256_file(path)}
    outputs = (TensorSpec("output", "float32", ()),)  # filled in by the export
    return ModelHandle(path.stem, inputs, outputs, prov, torch_module=module)


def load_torch_file(path: Path, inputs: tuple[TensorSpec, ...] | None, *, trust_remote_code: bool = False) -> ModelHandle:
    import torch

    if path.suffix == ".pt2":
        return _load_exported(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            is_script = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
        if is_script:
            try:
                module = torch.jit.load(str(path), map_location="cpu").eval()
            except Exception as e:
                raise UsageError(f"{path}: corrupt TorchScript archive ({type(e).__name__})") from None
            return _handle(path, module, "torchscript", inputs)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path) and not _is_pickle(path):
            raise UsageError(f"{path}: not a PyTorch file (neither a zip archive nor a pickle)") from None
        if not trust_remote_code:
            raise UsageError(f"{path}: refusing to unpickle: loading it could run arbitrary code ({_unsafe_reason(e)}); "
                             "re-run with --trust-remote-code only if you trust its author") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise UsageError(f"{path}: could not load the pickled model ({type(e2).__name__}: {str(e2)[:120]})") from None
    except Exception as e:
        raise UsageError(f"{path}: not a PyTorch file ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else 'unreadable'})") from None
    if isinstance(obj, torch.nn.Module):
        return _handle(path, obj.eval(), "pickle", inputs)
    if isinstance(obj, dict):
        raise UsageError(f"{path}: holds a state dict (weights without the model's code); "
                         "save the model with torch.jit.script/trace, torch.export.save, or export it to ONNX")
    raise UsageError(f"{path}: holds a {type(obj).__name__}, not a model")


def _is_pickle(path: Path) -> bool:
    """Whether the file starts with a well-formed pickle. Parsing opcodes executes nothing."""
    import pickletools

    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
    except Exception:
        return False
    return True


def _unsafe_reason(e: Exception) -> str:
    """The one useful clause of torch's weights-only error (`GLOBAL builtins.exec`), without its advice or colours."""
    match = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"it imports {match.group(1)}" if match else "it is not a weights-only file"


def _load_exported(path: Path) -> ModelHandle:
    import torch

    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise UsageError(f"{path}: not a torch.export program ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else 'unreadable'})") from None
    user_inputs = set(ep.graph_signature.user_inputs)
    specs = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            shape = tuple(int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in val.shape)
            specs.append(TensorSpec(node.name, str(val.dtype).removeprefix("torch."), shape))
    prov = {"path": str(path), "format": "torch.export", "sha256": sha256_file(path)}
    outputs = tuple(TensorSpec(n, "float32", ()) for n in ep.graph_signature.user_outputs)
    return ModelHandle(path.stem, tuple(specs), outputs, prov, torch_module=ep)
