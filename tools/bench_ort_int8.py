#!/usr/bin/env python
"""MiniLM on ONNX Runtime: edgecomp's ort-int8 against the plain recipe everyone starts from.

The plain baseline is what Olive's and Optimum's default INT8 recipes produce: `torch.onnx.export`
then `onnxruntime.quantization.quantize_dynamic` with default (per-tensor) settings. Everything
is measured in this one process, same input, same threads, same latency protocol, and printed as
one JSON object with ratios, so figures from different machines are never compared directly.
Timed runs cycle through the validation sentences (right-padded to 128 tokens). The target's graph
trims that padding (the trim-padding pass), so the same artifact with the trimming taken out is
measured too (`...-untrimmed`, every position computed, like the plain baseline): the output keeps
apart what INT8 + fusion give (`median_untrimmed_p50_ratio`) and what the whole profile gives.

    .venv/bin/python tools/bench_ort_int8.py [--threads 2] [--target ort-int8] [--out build/bench-ort-int8] [--rounds 30] [--repeat 1]

On a shared machine the load moves within seconds, so the runners alternate in many short rounds
(`--rounds`), and besides the ratio of the overall p50s the output has the median of the per-round
ratios (each round's p50s come from the same second or so). `--repeat N` measures N times in a row
(after one build) and reports each ratio and their median.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="ort-int8")
    ap.add_argument("--out", type=Path, default=Path("build/bench-ort-int8"))
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    import logging

    logging.disable(logging.WARNING)
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgecomp.backends.onnxruntime import OrtRunner
    from edgecomp.bench import interleaved
    from edgecomp.pipeline import BuildRequest, build
    from edgecomp.reference import TorchRunner
    from edgecomp.validate import parity, run_all

    report = build(BuildRequest(model="minilm", targets=(args.target,), out=args.out, threads=args.threads,
                                bench=False, command=sys.argv))
    target = report["targets"][0]
    artifact = Path(target["artifact"]["folder"]) / "model.onnx"

    from edgecomp.load.recipe import load_from_recipe
    from edgecomp.recipe import load_recipe

    recipe = load_recipe("minilm")
    model = load_from_recipe(recipe)
    samples = recipe.module().samples(recipe)
    eager = TorchRunner(model.torch_module, model.input_names, ["sentence_embedding"], args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        plain_fp32, plain_int8 = Path(tmp) / "plain.onnx", Path(tmp) / "plain-int8.onnx"
        import torch

        feed = samples.validation[0]
        torch.onnx.export(model.torch_module, tuple(torch.from_numpy(feed[n]) for n in model.input_names), str(plain_fp32),
                          input_names=model.input_names, output_names=["sentence_embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in model.input_names})
        quantize_dynamic(str(plain_fp32), str(plain_int8), weight_type=QuantType.QInt8)
        runners = {"pytorch-eager": eager, "plain-quantize-dynamic": OrtRunner(plain_int8, args.threads),
                   f"edgecomp-{args.target}": OrtRunner(artifact, args.threads)}
        untrimmed = Path(tmp) / "untrimmed.onnx"
        if untrim(artifact, untrimmed):  # the same artifact computing all 128 positions: what trimming adds
            runners[f"edgecomp-{args.target}-untrimmed"] = OrtRunner(untrimmed, args.threads)
        ref = run_all(eager, samples.validation)
        tokens = [int(f["attention_mask"].sum()) for f in samples.validation]
        result: dict = {"threads": args.threads, "validation_samples": len(samples.validation),
                        "real_tokens": {"mean": sum(tokens) / len(tokens), "min": min(tokens), "max": max(tokens),
                                        "of": int(samples.validation[0]["attention_mask"].shape[1])},
                        "cpu": report["environment"]["cpu"], "versions": report["environment"]["versions"], "runners": {}}
        settings = {"warmup": 20, "runs": args.runs, "min_seconds": 3.0}
        repeats = [interleaved([(r, settings) for r in runners.values()], [samples.validation] * len(runners), rounds=args.rounds)  # ratios from one stretch of time
                   for _ in range(max(1, args.repeat))]
        lats = repeats[0]  # the per-runner figures; every repeat is in speedup_over_plain
        for (name, runner), lat in zip(runners.items(), lats):
            par = parity(ref, run_all(runner, samples.validation))["outputs"]["sentence_embedding"]
            result["runners"][name] = {"cosine_mean": par["cosine_mean"], "cosine_min": par["cosine_min"],
                                       "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "runs": lat["runs"],
                                       "size_mb": (artifact.stat().st_size if name.startswith("edgecomp") else
                                                   plain_int8.stat().st_size if name.startswith("plain") else 0) / 2**20}
    r = result["runners"]
    base, ours, torch_p50 = r["plain-quantize-dynamic"]["p50_ms"], r[f"edgecomp-{args.target}"]["p50_ms"], r["pytorch-eager"]["p50_ms"]
    result["ratios"] = {"edgecomp_speedup_over_plain": base / ours, "edgecomp_vs_eager": ours / torch_p50,
                        "plain_vs_eager": base / torch_p50}
    import numpy as np

    def per_repeat(lat: list[dict]) -> dict:
        b, o = lat[1], lat[2]
        out = {"p50_ratio": b["p50_ms"] / o["p50_ms"],
               "round_ratio_median": float(np.median([x / y for x, y in zip(b["round_p50_ms"], o["round_p50_ms"])]))}
        if len(lat) > 3:  # INT8 + fusion alone, every position computed
            out["untrimmed_p50_ratio"] = b["p50_ms"] / lat[3]["p50_ms"]
        return out

    measured = [per_repeat(lat) for lat in repeats]
    result["speedup_over_plain"] = {"rounds": args.rounds, "repeats": measured,
                                    "median_p50_ratio": float(np.median([m["p50_ratio"] for m in measured])),
                                    "median_round_ratio": float(np.median([m["round_ratio_median"] for m in measured]))}
    if all("untrimmed_p50_ratio" in m for m in measured):
        result["speedup_over_plain"]["median_untrimmed_p50_ratio"] = float(np.median([m["untrimmed_p50_ratio"] for m in measured]))
    print(json.dumps(result, indent=2))
    return 0


def untrim(src: Path, out: Path) -> bool:
    """Write `src` without the trim-padding pass's nodes (every position computed again); False if it has none."""
    import onnx

    from edgecomp.passes.trim_padding import PREFIX

    proto = onnx.load(str(src))
    keep = [n for n in proto.graph.node if not n.name.startswith(PREFIX)]
    if len(keep) == len(proto.graph.node):
        return False
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            if name.startswith(PREFIX):
                node.input[k] = name[len(PREFIX):]
    inits = [i for i in proto.graph.initializer if not i.name.startswith(PREFIX)]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    onnx.save(proto, str(out))
    return True


if __name__ == "__main__":
    sys.exit(main())
