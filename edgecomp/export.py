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
    folded = fold_weight_quantization(path)
    onnx_model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = onnx_signature(onnx_model)
    record = {"pass": "export", "exporter": "dynamo" if isinstance(module, torch.export.ExportedProgram) else "torchscript",
              "opset": next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))}
    if folded:
        record["weights_stored_int8"] = folded
    return model.with_pass(record, onnx_path=path, inputs=inputs, outputs=outputs)


def fold_weight_quantization(path: Path) -> int:
    """Store fake-quantized weights (QAT) as integers: a QuantizeLinear whose input, scale and zero
    point are all constants becomes the int8 initializer it would compute, read by its
    DequantizeLinear as before. Same numbers, a quarter of the bytes. Returns how many were folded."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    folded = []
    for node in m.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or not all(i in consts for i in node.input):
            continue
        w, scale, zp = (consts[i] for i in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and w.ndim > 1:  # per channel: broadcast along `axis`
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / scale) + zp.astype(np.int64), info.min, info.max).astype(zp.dtype)  # rint: half to even, as ONNX
        m.graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded.append(node)
    if not folded:
        return 0
    for node in folded:
        m.graph.node.remove(node)
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    onnx.save(m, str(path))
    return len(folded)
