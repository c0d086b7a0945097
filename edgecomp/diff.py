"""`edgecomp diff`: where, layer by layer, two versions of a model part ways.

Both graphs run on the same real input with every intermediate tensor exposed as an output;
tensors are matched by name (quantizers and optimizers keep the float tensor names they
rewrite around; a graph that trims padding is compared on the real positions). For each matched
tensor, in the first graph's execution order:
  cosine, max_abs, and SQNR = 10 log10(|a|^2 / |a - b|^2) in dB.
A "jump" is a tensor whose SQNR falls more than `jump_db` below the lowest SQNR seen before
it (tensors above EXACT_DB, float rounding between kernels, count as exact): a layer where error is introduced, not merely carried
forward. The first jump is where the two models start to part; the largest drops are the
layers to keep in higher precision.

ONNX graphs (files, or artifact folders of ONNX Runtime targets) are read directly; an artifact
of another backend joins when its module offers `intermediates(artifact, feed, threads)`
(OpenVINO does: its ONNX frontend keeps the ONNX tensor names, so ONNX vs IR matches by name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.errors import UsageError

Feed = dict[str, np.ndarray]
EXACT_DB = 90.0  # fp32 rounding between runtimes (different kernels, fusion order) stays above this: not a jump


def tensors(spec: Path, feed: Feed, threads: int = 2) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every intermediate float tensor of an ONNX file or an artifact folder, in execution order."""
    if not spec.is_dir():
        if spec.suffix != ".onnx" or not spec.is_file():
            raise UsageError(f"{spec}: not an ONNX file or an artifact folder")
        return intermediates(spec, feed, threads)
    from edgecomp.artifact import read_manifest
    from edgecomp.backends import require
    from edgecomp.backends.base import Artifact

    manifest = read_manifest(spec)
    if manifest["backend"] == "onnxruntime":
        return intermediates(spec / manifest["files"]["model"], feed, threads)
    module = require(manifest["backend"], lowering=False)
    if not hasattr(module, "intermediates"):
        raise UsageError(f"{spec}: diff cannot look inside {manifest['backend']} artifacts (only ONNX and OpenVINO IR)")
    artifact = Artifact(spec, manifest["backend"], manifest["files"], manifest.get("meta", {}))
    return module.intermediates(artifact, feed, threads)


def intermediates(path: Path, feed: Feed, threads: int = 2) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every float activation the graph computes, in execution order (not constant weight subgraphs)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    model = onnx.shape_inference.infer_shapes(model)
    floats = {vi.name for vi in list(model.graph.value_info) + list(model.graph.output)
              if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # weights dequantized or reshaped from initializers are not activations
        if all(i in constant or not i for i in node.input):
            constant.update(node.output)
    order = [o for node in model.graph.node for o in node.output if o in floats and o not in constant]
    existing = {o.name for o in model.graph.output}
    for name in order:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor observable
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(order, {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}})
    return order, dict(zip(order, outs))


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], order: list[str], jump_db: float = 6.0) -> dict[str, Any]:
    rows, level, jumps = [], float("inf"), []
    for name in order:
        pair = _aligned(a[name], b[name]) if name in b else None
        if pair is None:
            continue
        x, y = (t.astype(np.float64).ravel() for t in pair)
        noise, signal = float(((x - y) ** 2).sum()), float((x ** 2).sum())
        sqnr = 10 * np.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        cos = float(x @ y / (nx * ny)) if nx and ny else float(nx == ny)
        row = {"tensor": name, "shape": list(pair[0].shape), "cosine": cos, "max_abs": float(np.abs(x - y).max(initial=0)),
               "sqnr_db": sqnr}
        seen = sqnr if sqnr < EXACT_DB else float("inf")
        if seen < level - jump_db:
            row["jump_db"] = (level - seen) if np.isfinite(level) else None
            jumps.append(name)
        level = min(level, seen)
        rows.append(row)
    return {"matched": len(rows), "first_jump": jumps[0] if jumps else None, "jumps": jumps, "tensors": rows}


def _aligned(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The two tensors, comparable: as they are when the shapes agree; cut to their common leading part
    when one graph trims padding (the trim-padding pass) and the other does not, so the sequence axes
    are L in one and S > L in the other (the same pair on every such axis): the real positions
    compare, the padded ones are not computed by both. Otherwise None (not comparable)."""
    if x.shape == y.shape:
        return x, y
    if x.ndim != y.ndim or len({tuple(sorted((p, q))) for p, q in zip(x.shape, y.shape) if p != q}) != 1:
        return None
    cut = tuple(slice(0, min(p, q)) for p, q in zip(x.shape, y.shape))
    return x[cut], y[cut]


def diff(a: Path, b: Path, feed: Feed, threads: int = 2, jump_db: float = 6.0) -> dict[str, Any]:
    order, ta = tensors(a, feed, threads)
    _, tb = tensors(b, feed, threads)
    result = compare(ta, tb, order, jump_db)
    if not result["matched"]:
        raise UsageError(f"{a} and {b} share no tensor names: they cannot be compared layer by layer")
    return {"a": str(a), "b": str(b), **result}


def first_feed(a: Path, samples: Path | None) -> Feed:
    """The input to compare on: a sample from --samples, else the first input of the artifact's reference.npz."""
    if samples is not None:
        with np.load(samples, allow_pickle=False) as z:
            return {k: z[k][:1] for k in z.files if k != "labels"}
    folder = a if a.is_dir() else a.parent
    if (folder / "reference.npz").is_file():
        from edgecomp.artifact import reference_set

        return reference_set(folder)[0][0]
    raise UsageError(f"{a}: no reference.npz beside it; give real inputs with --samples FILE.npz")
