"""The ONNX -> .tflite conversion, run as a child process: `python -m edgecomp.backends.tflite_convert SPEC.json`.

Converters are native code that can abort or segfault the whole process, so the parent
(`edgecomp.backends.tflite`) runs this module with a timeout and turns a crash into a clean error.
Steps, all inside the spec's work folder:
  1. fix every input to the sample's static shape and simplify with onnxslim until the node count
     stops falling (one pass leaves Shape->Gather->Reshape chains that onnx2tf mis-converts), then
     fuse exported GELUs into one node that becomes TFLite's builtin GELU (`tflite_gelu`);
  2. onnx2tf to a Keras model (NCHW inputs become NHWC; a remaining Erf may become a builtin-op
     polynomial, `pseudo_ops`);
  3. tf.lite.TFLiteConverter with the requested quantization, builtin ops first; Select TF (Flex)
     ops stay allowed here so the parent can list them by name instead of getting a converter error;
  4. match each ONNX output to a .tflite output (onnx2tf renames them) and the transpose back to
     the source layout, by running both on one real sample.
Exit 0 with result.json on success; exit 3 with result.json {"error": ...} on a conversion error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.backends.tflite_gelu import fuse_gelu
from edgecomp.backends.tflite_io import dequantize, interpreter, quantize

CHANNEL_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}  # what onnx2tf does to rank-3..5 inputs


class ConversionError(Exception):
    def __init__(self, message: str, op: str | None = None, node: str | None = None) -> None:
        super().__init__(message)
        self.op, self.node = op, node


def static_slim(src: Path, dst: Path, shapes: dict[str, list[int]]) -> dict[str, int]:
    """Pin the inputs to `shapes`, drop stale shape annotations, slim until nothing changes, fuse GELUs."""
    import onnx
    import onnxslim

    m = onnx.load(str(src))
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, size in zip(dims, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(size)
    for vi in m.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    del m.graph.value_info[:]
    before = len(m.graph.node)
    count = before + 1
    for _ in range(4):
        if len(m.graph.node) >= count:
            break
        count = len(m.graph.node)
        m = onnxslim.slim(m)
    m, gelus = fuse_gelu(m)
    onnx.save(m, str(dst))
    return {"nodes_before": before, "nodes_after": len(m.graph.node), "gelu_fused": gelus}


def to_keras(onnx_path: Path, workdir: Path, pseudo_ops: list[str]) -> Any:
    import onnx
    import onnx2tf

    try:
        return onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(workdir / "tf"),
                               disable_model_save=True, replace_to_pseudo_operators=[p.lower() for p in pseudo_ops],
                               not_use_onnxsim=True, non_verbose=True, verbosity="error")
    except (Exception, SystemExit) as e:  # onnx2tf reports some failures with sys.exit(1)
        node = getattr(e, "onnx_op_name", None)
        node = node[2:] if node and node.startswith("wa/") else node  # onnx2tf prefixes "wa" to names starting with "/"
        op = next((n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node
                   if node and n.name in (node, f"/{node}")), None)
        where = f"op {op} (node {node})" if op else f"node {node}" if node else "the graph"
        raise ConversionError(f"onnx2tf cannot convert {where}: {_summary(e)}", op, node) from None


def _summary(e: BaseException) -> str:
    """One line from a converter's multi-line exception: the first that says what went wrong."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines if any(w in ln for w in ("Error", "error", "not ", "cannot", "must", "Dimensions"))]
    return ((said or lines or [type(e).__name__])[0])[:200]


def layer_nodes(keras_model: Any) -> dict[str, str]:
    """Keras layer name (what .tflite tensor names carry) -> the ONNX node it came from."""
    out = {}
    for layer in keras_model.layers:
        for node in getattr(layer, "inbound_nodes", []):
            name = (getattr(node, "call_kwargs", None) or {}).get("name")
            if isinstance(name, str):
                out[layer.name] = name[2:] if name.startswith("wa/") else name
    return out


def input_layout(keras_model: Any, shapes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """For each ONNX input: the .tflite-side name, and the transpose onnx2tf applied (None: same layout)."""
    by_name = {t.name.split(":")[0]: t for t in keras_model.inputs}
    result = []
    for name, shape in shapes.items():
        t = by_name.get(name, by_name.get(name.replace(":", "__").lstrip("/")))  # (Keras tensors have no truth value)
        if t is None:
            raise ConversionError(f"onnx2tf dropped input {name!r}")
        got = [int(d) for d in t.shape]
        perm = CHANNEL_LAST.get(len(shape))
        if got == list(shape) and (perm is None or [shape[p] for p in perm] != got):
            perm = None
        elif perm is None or [shape[p] for p in perm] != got:
            raise ConversionError(f"input {name!r}: onnx2tf made shape {got} from {shape}, which is no known layout change")
        result.append({"name": name, "artifact_name": t.name.split(":")[0], "transpose": list(perm) if perm else None})
    return result


def convert(keras_model: Any, spec: dict[str, Any], layout: list[dict[str, Any]]) -> bytes:
    import tensorflow as tf

    run = tf.function(lambda *inputs: keras_model(inputs),
                      input_signature=[tf.TensorSpec(t.shape, t.dtype, t.name) for t in keras_model.inputs])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([run.get_concrete_function()], keras_model)
    builtins = tf.lite.OpsSet.TFLITE_BUILTINS
    mode = spec["quantize"]
    if mode == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "int8":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        builtins = tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        conv.representative_dataset = _calibration(spec, keras_model, layout)
        if spec.get("io_dtype") == "int8":
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
    conv._experimental_disable_per_channel = not spec.get("per_channel", True)
    conv.target_spec.supported_ops = [builtins, tf.lite.OpsSet.SELECT_TF_OPS]
    try:
        return conv.convert()
    except Exception as e:
        raise ConversionError(f"TFLite converter failed: {_summary(e)}") from None


def _calibration(spec: dict[str, Any], keras_model: Any, layout: list[dict[str, Any]]) -> Any:
    """A representative dataset in the artifact's layout, one real calibration sample at a time."""
    with np.load(spec["calibration"]) as z:
        data = {k: z[k] for k in z.files}
    order = {e["artifact_name"]: e for e in layout}
    n = len(next(iter(data.values())))

    def gen() -> Any:
        for i in range(n):
            feed = []
            for t in keras_model.inputs:
                e = order[t.name.split(":")[0]]
                x = data[e["name"]][i:i + 1]
                feed.append((x.transpose(e["transpose"]) if e["transpose"] else x).astype(t.dtype.as_numpy_dtype))
            yield feed

    return gen


def io_table(tflite_path: Path, spec: dict[str, Any], layout: list[dict[str, Any]], static_onnx: Path) -> dict[str, Any]:
    """The artifact's I/O as an app sees it, with outputs matched to the ONNX outputs on one real sample.

    The sample runs on the interpreter the Runner will use (XNNPACK included), so a model that the
    runtime cannot load (an op without a kernel for its types aborts some kernels' Prepare) dies
    here, in the child, where the parent reports it, and not in the build process."""
    import onnxruntime as ort

    from edgecomp.backends.tflite_ops import read_ops

    ops = read_ops(tflite_path)
    flex, custom = any(o.flex for o in ops), any(not o.builtin and not o.flex for o in ops)
    runnable = not custom and (not flex or spec.get("allow_flex", False))  # else the parent fails the build
    _, _, interp_cls = interpreter(need_flex=flex)
    it = interp_cls(model_path=str(tflite_path), num_threads=1)
    sig = it.get_signature_runner()
    in_details, out_details = sig.get_input_details(), sig.get_output_details()

    def entry(name: str, d: dict[str, Any]) -> dict[str, Any]:
        scale, zero = d["quantization"]
        return {"artifact_name": name, "index": int(d["index"]), "shape": [int(s) for s in d["shape"]],
                "dtype": np.dtype(d["dtype"]).name, "quantization": {"scale": float(scale), "zero_point": int(zero)} if scale else None}

    inputs = []
    for e in layout:
        if e["artifact_name"] not in in_details:
            raise ConversionError(f"input {e['name']!r} is missing from the .tflite signature {sorted(in_details)}")
        inputs.append({"name": e["name"], **entry(e["artifact_name"], in_details[e["artifact_name"]]), "transpose": e["transpose"]})
    outs = {n: entry(n, d) for n, d in out_details.items()}
    with np.load(spec["check"]) as z:
        feed = {k: z[k] for k in z.files}
    sess = ort.InferenceSession(str(static_onnx), providers=["CPUExecutionProvider"])
    onnx_names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(onnx_names, sess.run(None, {k: v.astype(_ort_dtype(sess, k)) for k, v in feed.items()})))
    got = {}
    if runnable:
        _stage(spec, "smoke-test")
        args = {e["artifact_name"]: quantize(feed[e["name"]].transpose(e["transpose"]) if e["transpose"] else feed[e["name"]],
                                             e["quantization"], e["dtype"]) for e in inputs}
        try:
            got = {n: dequantize(y, outs[n]["quantization"]) for n, y in sig(**args).items()}
        except (RuntimeError, ValueError) as e:
            raise ConversionError(f"the LiteRT interpreter cannot run the converted model: {_summary(e)}") from None
    outputs, free = [], dict(outs)
    for name in onnx_names:
        out, perm, cos = _match(ref[name], got, {n: e["shape"] for n, e in free.items()}, name)
        outputs.append({"name": name, **free.pop(out), "transpose": perm, "check_cosine": cos})
    return {"inputs": inputs, "outputs": outputs}


def check_scales(path: Path, nodes: dict[str, str]) -> None:
    """Fail with the tensor named, not with the runtime aborting, when int8 calibration broke a scale."""
    from edgecomp.backends.tflite_ops import broken_scales

    bad = broken_scales(path)
    if bad:
        tensor, scale = bad[0]
        node = next((nodes[p] for p in tensor.replace(";", "/").split("/") if p in nodes), None)
        raise ConversionError(f"int8 calibration gave tensor {tensor}{f' (ONNX node {node})' if node else ''} the scale "
                              f"{scale:g} ({len(bad)} tensors in all): its values span a float-min/inf constant such as "
                              "an attention mask; use quantize = 'dynamic' (tflite-arm) for this model")


def _stage(spec: dict[str, Any], stage: str) -> None:
    """Where the child is, for the parent's message if it dies there."""
    Path(spec["workdir"], "stage").write_text(stage)


def _ort_dtype(sess: Any, name: str) -> Any:
    t = next(i.type for i in sess.get_inputs() if i.name == name)
    return {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(t, np.float32)


def _match(ref: np.ndarray, got: dict[str, np.ndarray], shapes: dict[str, list[int]], name: str) -> tuple[str, list[int] | None, float | None]:
    """The free .tflite output (and transpose to the ONNX layout) closest to `ref`; a same-named one wins ties."""
    best: tuple[float, str, list[int] | None] | None = None
    for out, shape in shapes.items():
        for perm in (None, *([_inverse(CHANNEL_LAST[ref.ndim])] if ref.ndim in CHANNEL_LAST else [])):
            if ([shape[p] for p in perm] if perm else shape) != list(ref.shape):
                continue
            score = _cos(got[out].transpose(perm) if perm else got[out], ref) if out in got else 0.0
            score += 1e-6 * (out == name)
            if best is None or score > best[0]:
                best = (score, out, perm)
    if best is None:
        raise ConversionError(f"output {name!r} {list(ref.shape)}: no .tflite output of that shape ({shapes})")
    return best[1], best[2], (round(best[0], 6) if got else None)


def _inverse(perm: tuple[int, ...]) -> list[int]:
    return [perm.index(i) for i in range(len(perm))]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / d) if d else float(np.allclose(a, b))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnx2tf", "tensorflow", "onnxslim", "onnx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    work, result_path = Path(spec["workdir"]), Path(spec["result"])
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        _stage(spec, "onnxslim")
        static = work / "static.onnx"
        slim = static_slim(Path(spec["onnx"]), static, spec["input_shapes"])
        timings["slim_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _stage(spec, "onnx2tf")
        keras_model = to_keras(static, work, spec.get("pseudo_ops", []))
        timings["onnx2tf_s"] = time.perf_counter() - t
        layout = input_layout(keras_model, spec["input_shapes"])
        t = time.perf_counter()
        _stage(spec, "tflite-converter")
        tflite = convert(keras_model, spec, layout)
        timings["tflite_convert_s"] = time.perf_counter() - t
        Path(spec["out"]).write_bytes(tflite)
        check_scales(Path(spec["out"]), layer_nodes(keras_model))
        io = io_table(Path(spec["out"]), spec, layout, static)
    except ConversionError as e:
        result_path.write_text(json.dumps({"error": str(e), "op": e.op, "node": e.node}))
        return 3
    result = {"io": io, "layer_nodes": layer_nodes(keras_model), "slim": slim, "timings": timings, "versions": versions()}
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    sys.exit(main(sys.argv[1]))
