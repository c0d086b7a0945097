"""`edgecomp inspect`: what a model is, before building it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgecomp.model import TensorSpec


def inspect_model(spec: str, inputs: tuple[TensorSpec, ...] | None, trust_remote_code: bool) -> dict[str, Any]:
    import numpy as np
    import onnx

    from edgecomp.backends.onnxruntime import op_histogram
    from edgecomp.data import synthetic
    from edgecomp.load import load_model

    with tempfile.TemporaryDirectory(prefix="edgecomp-inspect-") as tmp:
        work = Path(tmp)
        model, recipe = load_model(spec, work, trust_remote_code=trust_remote_code, inputs=inputs)
        fmt = model.provenance.get("format")
        if model.onnx_path is None:
            from edgecomp.export import export_onnx

            feed = (recipe.module().samples(recipe).validation[0] if recipe else synthetic(model.inputs, 1, 1).validation[0])
            model = export_onnx(model, feed, work / "model.onnx")
        m = onnx.load(str(model.onnx_path))
        params = int(sum(np.prod(t.dims) for t in m.graph.initializer))
        size = sum(p.stat().st_size for p in model.onnx_path.parent.iterdir() if p.is_file()) \
            if fmt == "huggingface" else model.onnx_path.stat().st_size
        return {"name": model.name, "format": fmt, "provenance": model.provenance,
                "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0),
                "inputs": [t.to_json() for t in model.inputs], "outputs": [t.to_json() for t in model.outputs],
                "parameters": params, "size_bytes": size, "ops": op_histogram(m)}
