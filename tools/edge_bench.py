#!/usr/bin/env python3
"""On-device check and benchmark of one edgecomp artifact folder (OUT/TARGET), in one file.

Needs only numpy and the runtime the artifact is for: LiteRT (ai-edge-litert), tflite-runtime or
TensorFlow Lite for `tflite`; onnxruntime for `onnxruntime`; openvino for `openvino`. It never
imports edgecomp, so copy this file and the folder to the device and run:

    python3 edge_bench.py OUT/TARGET [--threads N] [--warmup 10] [--runs 100] [--min-seconds 1]

It (1) loads the artifact, timing the load; (2) runs the bundled reference.npz inputs and checks the
outputs against the reference outputs within the manifest's budget (max_abs, mean_abs: worst |y - ref|;
cosine_mean / cosine_min: per-sample cosine; top1_agreement and accuracy_drop for classifiers);
(3) runs `warmup` untimed then timed runs until both `runs` and `min_seconds` are reached; and prints
ONE JSON object: device, runtime, threads, parity, p50/p90/p99, load time, peak memory.
Exit status: 0 ok, 1 parity outside the budget, 2 the artifact or the runtime is missing/unusable.

TFLite artifacts are fed in the source (ONNX) layout like everywhere else in edgecomp: the
manifest's meta.layout gives each tensor's transpose and quantization, applied here as
  inputs:  artifact = source.transpose(transpose); q = round(x / scale) + zero_point
  outputs: x = (q - zero_point) * scale; source = artifact.transpose(transpose)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib import import_module, util
from pathlib import Path
from typing import Any, Callable

import numpy as np

SCHEMA = "edgecomp.edge_bench/1"
LOWER_IS_BETTER = {"max_abs", "mean_abs", "accuracy_drop"}


class Unusable(Exception):
    """The artifact or the runtime cannot be used here (exit 2)."""


def _version(dist: str, module: Any = None) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return str(getattr(module, "__version__", "unknown"))


# ---------------------------------------------------------------- runtimes: load(folder, manifest, threads) -> (run, info)
def load_tflite(folder: Path, manifest: dict, threads: int) -> tuple[Callable, dict]:
    layout = manifest.get("meta", {}).get("layout")
    if not layout:
        raise Unusable("manifest.json has no meta.layout (built by an older edgecomp?)")
    candidates = [("litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
                  ("tflite-runtime", "tflite_runtime.interpreter", "tflite-runtime"),
                  ("tensorflow-lite", "tensorflow.lite", "tensorflow")]
    if manifest.get("meta", {}).get("non_builtin_ops"):
        candidates = candidates[2:]  # Flex ops: only full TensorFlow links the Flex delegate
    for name, mod, dist in candidates:
        if util.find_spec(mod.split(".")[0]) is None:
            continue
        module = import_module(mod)
        interp = module.Interpreter(model_path=str(folder / manifest["files"]["model"]), num_threads=threads)
        interp.allocate_tensors()
        break
    else:
        raise Unusable("no TFLite interpreter: pip install ai-edge-litert (or tflite-runtime)")
    sig = interp.get_signature_runner()
    idx_in = {k: d["index"] for k, d in sig.get_input_details().items()}
    idx_out = {k: d["index"] for k, d in sig.get_output_details().items()}
    ins = [(e["name"], idx_in[e["artifact_name"]], e["transpose"], np.dtype(e["dtype"]), e["quantization"])
           for e in layout["inputs"]]
    outs = [(e["name"], idx_out[e["artifact_name"]], e["transpose"], e["quantization"]) for e in layout["outputs"]]

    def run(feed: dict) -> dict:
        for name, index, perm, dtype, q in ins:
            x = feed[name].transpose(perm) if perm else feed[name]
            if q and dtype.kind in "iu" and x.dtype.kind == "f":
                lim = np.iinfo(dtype)
                x = np.clip(np.round(x / q["scale"]) + q["zero_point"], lim.min, lim.max)
            interp.set_tensor(index, np.ascontiguousarray(x, dtype=dtype))
        interp.invoke()
        result = {}
        for name, index, perm, q in outs:
            y = interp.get_tensor(index)
            y = (y.astype(np.float32) - q["zero_point"]) * np.float32(q["scale"]) if q else y
            result[name] = y.transpose(perm) if perm else y
        return result

    try:
        partitions = sum(o["op_name"] == "DELEGATE" for o in interp._get_ops_details())
    except Exception:
        partitions = None
    return run, {"name": name, "version": _version(dist, module), "threads": threads,
                 "delegate": None if partitions is None else ("xnnpack" if partitions else "none"),
                 "delegate_partitions": partitions}


def load_onnxruntime(folder: Path, manifest: dict, threads: int) -> tuple[Callable, dict]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise Unusable("onnxruntime is not installed: pip install onnxruntime") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / manifest["files"]["model"]), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def run(feed: dict) -> dict:
        return dict(zip(names, sess.run(None, feed)))

    return run, {"name": "onnxruntime", "version": ort.__version__, "threads": threads, "providers": sess.get_providers()}


def load_openvino(folder: Path, manifest: dict, threads: int) -> tuple[Callable, dict]:
    try:
        import openvino as ov
    except ImportError:
        raise Unusable("openvino is not installed: pip install openvino") from None
    files = manifest["files"]
    core = ov.Core()
    model = core.read_model(str(folder / files["model"]), str(folder / files["weights"]) if "weights" in files else None)
    hint = manifest.get("meta", {}).get("inference_precision", "f32")  # pinned: CPUs with bf16 would pick bf16
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
                                                 "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    wanted = [o["name"] for o in manifest.get("outputs", [])]
    ports = []
    for i, port in enumerate(compiled.outputs):
        names = port.get_names()
        ports.append((next((w for w in wanted if w in names), wanted[i] if i < len(wanted) else port.get_any_name()), port))

    def run(feed: dict) -> dict:
        res = request.infer(feed)
        return {name: np.asarray(res[port]) for name, port in ports}

    return run, {"name": "openvino", "version": ov.__version__, "threads": threads,
                 "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()}


LOADERS = {"tflite": load_tflite, "onnxruntime": load_onnxruntime, "openvino": load_openvino}


# ---------------------------------------------------------------- parity, latency, device
def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def parity(run: Callable, ref: dict, manifest: dict) -> dict:
    ins = {k[6:]: v for k, v in ref.items() if k.startswith("input/")}
    outs = {k[7:]: v for k, v in ref.items() if k.startswith("output/")}
    if not ins or not outs:
        raise Unusable("reference.npz holds no input/ and output/ arrays")
    n = len(next(iter(ins.values())))
    got = [run({k: v[i:i + 1] for k, v in ins.items()}) for i in range(n)]
    labels, classify = ref.get("labels"), manifest.get("task") == "classification"
    metrics = {}
    for name, expected in outs.items():
        if name not in got[0]:
            raise Unusable(f"the artifact has no output {name!r} (it has {sorted(got[0])})")
        y = [np.asarray(g[name], dtype=np.float64).reshape(expected[i:i + 1].shape) for i, g in enumerate(got)]
        r = [expected[i:i + 1].astype(np.float64) for i in range(n)]
        diff = np.concatenate([(a - b).ravel() for a, b in zip(y, r)])
        cos = [_cos(a, b) for a, b in zip(y, r)]
        m = {"max_abs": float(np.abs(diff).max()), "mean_abs": float(np.abs(diff).mean()),
             "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos))}
        if classify:
            top_y = np.array([a.reshape(1, -1).argmax(-1)[0] for a in y])
            top_r = np.array([b.reshape(1, -1).argmax(-1)[0] for b in r])
            m["top1_agreement"] = float((top_y == top_r).mean())
            if labels is not None:
                m["accuracy"] = float((top_y == labels[:n]).mean())
                m["accuracy_drop"] = float((top_r == labels[:n]).mean()) - m["accuracy"]
        metrics[name] = m
    checks, skipped = [], []
    for key, limit in manifest.get("budget", {}).items():
        values = [m[key] for m in metrics.values() if key in m]
        if not values:
            skipped.append(key)
            continue
        worst = max(values) if key in LOWER_IS_BETTER else min(values)
        ok = worst <= limit if key in LOWER_IS_BETTER else worst >= limit
        checks.append({"metric": key, "value": worst, "limit": limit, "op": "<=" if key in LOWER_IS_BETTER else ">=", "ok": bool(ok)})
    return {"samples": n, "outputs": metrics, "checks": checks, "not_applicable": skipped, "ok": all(c["ok"] for c in checks)}


def latency(run: Callable, feeds: list, warmup: int, runs: int, min_seconds: float, max_seconds: float) -> dict:
    """Timed runs cycling through the reference inputs (a graph that trims padding costs what its input holds)."""
    for i in range(max(warmup, min(len(feeds), 100))):
        run(feeds[i % len(feeds)])
    times = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run(feeds[len(times) % len(feeds)])
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 10:
            break
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "runs": len(times), "warmup": warmup}


def rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        return None


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB


def device() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model", "cpu model") and value.strip():
                    cpu = value.strip()
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "system": platform.system(), "release": platform.release(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}


# ---------------------------------------------------------------- main
def bench(folder: Path, threads: int | None, warmup: int, runs: int, min_seconds: float, max_seconds: float) -> dict:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        with np.load(folder / manifest.get("reference", "reference.npz"), allow_pickle=False) as z:
            ref = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise Unusable(f"{folder}: not a readable edgecomp artifact folder ({e})") from None
    backend = manifest.get("backend")
    if backend not in LOADERS:
        raise Unusable(f"backend {backend!r} is not supported here (supported: {', '.join(LOADERS)})")
    for role, name in manifest.get("files", {}).items():
        if "/" in name or not (folder / name).is_file():
            raise Unusable(f"{folder}: the manifest's {role} file {name!r} is missing")
    threads = threads or int(manifest.get("threads", 2))
    before = rss_mb()
    t0 = time.perf_counter()
    run, runtime = LOADERS[backend](folder, manifest, threads)
    load_s = time.perf_counter() - t0
    after = rss_mb()
    par = parity(run, ref, manifest)
    inputs = {k[6:]: v for k, v in ref.items() if k.startswith("input/")}
    feeds = [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(len(next(iter(inputs.values()))))]
    lat = latency(run, feeds, warmup, runs, min_seconds, max_seconds)
    return {"schema": SCHEMA, "artifact": str(folder), "target": manifest.get("target"), "backend": backend,
            "precision": manifest.get("precision"),
            "executed_precision": manifest.get("meta", {}).get("executed_precision"), "device": device(),
            "runtime": runtime, "threads": threads,
            "load": {"load_s": load_s, "rss_added_mb": None if before is None or after is None else max(0.0, after - before)},
            "parity": par, "latency": lat, "peak_rss_mb": peak_rss_mb(), "ok": par["ok"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check an edgecomp artifact against its reference.npz and time it on this device.")
    ap.add_argument("artifact", type=Path, help="an artifact folder OUT/TARGET (with manifest.json and reference.npz)")
    ap.add_argument("--threads", type=int, help="threads (default: the manifest's)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        result = bench(args.artifact, args.threads, args.warmup, args.runs, args.min_seconds, args.max_seconds)
    except Unusable as e:
        print(json.dumps({"schema": SCHEMA, "artifact": str(args.artifact), "ok": False, "error": str(e)}))
        print(f"edge_bench: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    if not result["ok"]:
        failed = [f"{c['metric']} {c['value']:.4g} (limit {c['op']} {c['limit']:g})" for c in result["parity"]["checks"] if not c["ok"]]
        print("edge_bench: parity outside the budget: " + "; ".join(failed), file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
