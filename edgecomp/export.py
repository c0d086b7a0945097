"""Export a torch-sourced handle to ONNX: the lingua franca every graph pass and backend reads.

nn.Module and TorchScript go through the TorchScript-based exporter (stable, fast, fully
static graphs with named dynamic axes); a torch.export program goes through the dynamo exporter,
which is the only one that accepts it. The output names come from the handle's signature when it
has one, so a recipe's `sentence_embedding` is what every artifact calls it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle, onnx_signature

OPSET = 17


def export_onnx(model: ModelHandle, feed: dict[str, np.ndarray], path: Path) -> ModelHandle:
    """Return a handle whose `onnx_path` is a fresh fp32 ONNX export of `model.torch_module`."""
    import onnx
    import torch

    module = model.torch_module
    args = tuple(torch.from_numpy(np.ascontiguousarray(feed[t.name])) for t in model.inputs)
    named_out = [t.name for t in model.outputs if t.name != "output" or len(model.outputs) > 1]
    axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in model.inputs + model.outputs}
    axes = {k: v for k, v in axes.items() if v}
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = contextlib.redirect_stdout(io.StringIO())
    try:
        with warnings.catch_warnings(), quiet:
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            if isinstance(module, torch.export.ExportedProgram):
                torch.onnx.export(module, args, str(path), input_names=model.input_names,
                                  output_names=named_out or None, dynamo=True, opset_version=18, optimize=True)
            else:
                with torch.no_grad():
                    torch.onnx.export(module, args, str(path), input_names=model.input_names,
                                      output_names=named_out or None, dynamic_axes=axes or None,
                                      opset_version=OPSET, dynamo=False, do_constant_folding=True)
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UsageError(f"could not export {model.name} to ONNX: {msg}") from None
    onnx_model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = onnx_signature(onnx_model)
    return model.with_pass({"pass": "export", "exporter": "dynamo" if isinstance(module, torch.export.ExportedProgram) else "torchscript",
                            "opset": next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))},
                           onnx_path=path, inputs=inputs, outputs=outputs)
