"""Peak memory of static-INT8 calibration on MiniLM: edgecomp's streaming calibrator vs ONNX
Runtime's own entropy calibrator, each in a fresh child process, at two sample counts.

    .venv/bin/python tools/bench_calibration.py --counts 100 1000 [--onnx model.onnx] [--ort-limit-gb 6]
        [--calibrators edgecomp onnxruntime]

Feeds are real sentences (models/data/sentences.txt, repeated to reach the count) through the
recipe's tokenizer at its sequence length, generated one at a time so the inputs themselves cost
nothing. ONNX Runtime's calibrator keeps every exposed tensor of every sample, so its run is
skipped (and says so) when that estimate exceeds --ort-limit-gb. Prints one JSON object: peak RSS
per (calibrator, count) in MiB and the ratio of the largest count's peak to the smallest's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def feeds(n: int) -> Iterator[dict]:
    from edgecomp.paths import MODELS_DIR
    from edgecomp.recipe import load_recipe
    from edgecomp.recipes import minilm

    recipe = load_recipe("minilm")
    seq_len = int(recipe.options.get("seq_len", 128))
    lines = [s.strip() for s in (MODELS_DIR / "data" / "sentences.txt").read_text().splitlines() if s.strip()]
    tok = minilm.tokenizer()
    for i in range(n):
        yield minilm.encode([lines[i % len(lines)]], seq_len, tok)[0]


def child(which: str, onnx_path: str, n: int) -> None:
    """Calibrate once and print the process's peak RSS (KiB, Linux)."""
    import atexit
    import shutil

    private = Path(tempfile.mkdtemp())  # shape inference writes next to the model: no sharing between runs
    atexit.register(shutil.rmtree, private, True)
    onnx_path = str(shutil.copy(onnx_path, private / "model.onnx"))
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    from edgecomp.passes.calibrate import calibrate, default_op_types

    if which == "edgecomp":
        model = load_model_with_shape_infer(Path(onnx_path))
        cal = calibrate(model, feeds(n), default_op_types(), "entropy")
        extra = {"stats_bytes": cal.stats_bytes, "tensors": len(cal.ranges)}
    else:
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

        class Reader:
            def __init__(self) -> None:
                self.it = feeds(n)

            def get_next(self) -> dict | None:
                return next(self.it, None)

        with tempfile.TemporaryDirectory() as tmp:
            cal = create_calibrator(Path(onnx_path), default_op_types(), str(Path(tmp) / "aug.onnx"),
                                    CalibrationMethod.Entropy)
            try:  # every sample's outputs are kept first, then histogrammed: the peak comes before any error
                cal.collect_data(Reader())
                extra = {"tensors": len(cal.compute_data().data)}
            except Exception as e:
                extra = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, **extra}))


def sample_bytes(onnx_path: str) -> int:
    """Bytes of the tensors one sample exposes (what ONNX Runtime's calibrator keeps per sample)."""
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    from edgecomp.passes.calibrate import default_op_types, select_tensors, stream_tensors

    total = [0]
    model = load_model_with_shape_infer(Path(onnx_path))
    stream_tensors(model, select_tensors(model, default_op_types()), feeds(1), lambda _, v: total.__setitem__(0, total[0] + v.nbytes))
    return total[0]


def export_minilm(out: Path) -> Path:
    r = subprocess.run([sys.executable, "-m", "edgecomp", "build", "minilm", "-t", "ort-fp32", "-o", str(out), "--no-bench"],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"exporting MiniLM failed: {r.stderr[-2000:]}")
    return out / "ort-fp32" / "model.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs=2, default=[100, 1000])
    ap.add_argument("--onnx", help="MiniLM fp32 ONNX (default: exported with `edgecomp build minilm -t ort-fp32`)")
    ap.add_argument("--ort-limit-gb", type=float, default=6.0, help="skip ORT's calibrator above this estimated memory")
    ap.add_argument("--calibrators", nargs="+", choices=["edgecomp", "onnxruntime"], default=["edgecomp", "onnxruntime"])
    ap.add_argument("--child", nargs=3, metavar=("WHICH", "ONNX", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = args.onnx or str(export_minilm(Path(tmp) / "export"))
        per_sample = sample_bytes(onnx_path)
        result: dict = {"model": "minilm", "method": "entropy", "counts": args.counts,
                        "exposed_mib_per_sample": round(per_sample / 2**20, 1), "peak_rss_mib": {}, "ratio": {}}
        for which in args.calibrators:
            peaks = {}
            for n in args.counts:
                if which == "onnxruntime" and per_sample * n > args.ort_limit_gb * 2**30:
                    peaks[n] = f"skipped: would keep ~{per_sample * n / 2**30:.1f} GiB of activations"
                    continue
                r = subprocess.run([sys.executable, __file__, "--child", which, onnx_path, str(n)],
                                   capture_output=True, text=True, cwd=ROOT)
                if r.returncode != 0:
                    peaks[n] = f"failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:] or ''}"
                    continue
                info = json.loads(r.stdout.strip().splitlines()[-1])
                peaks[n] = round(info.pop("peak_rss_kib") / 1024, 1)
                result.setdefault("details", {})[f"{which}@{n}"] = info
            result["peak_rss_mib"][which] = peaks
            lo, hi = (peaks[n] for n in args.counts)
            result["ratio"][which] = round(hi / lo, 3) if isinstance(lo, float) and isinstance(hi, float) else None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
