#!/usr/bin/env python
"""MiniLM structured pruning (40 % of heads and FFN neurons) with a recovery fine-tune, judged against the teacher.

Steps, all with edgecomp's own commands:
  1. `edgecomp build minilm --pass prune-structured:OPTIONS --target ort-fp32` (prune, then the recovery
     distillation from the unpruned model on the recipe's train split, in the build's process);
  2. `edgecomp build minilm --target ort-fp32` (the teacher, same runtime, same precision, padding trimmed too);
  3. on the validation split (never trained on): the mean and minimum embedding cosine of the pruned model
     against the teacher, and the Spearman rank correlation of all pairwise similarities, both run on ONNX
     Runtime; latency: both artifacts benchmarked alternately in this one process, the median of the
     per-round p50 ratios.
The pruned build exits 1 on ort-fp32's conversion budget (max abs error 1e-4 to the teacher): a pruned model
is a different model, so this script judges it by the figures above. Prints one JSON object (also written to
OUT/summary.json); exit 0 when cosine >= 0.98 and speed-up >= 1.4 (the issue's targets).

    .venv/bin/python tools/prune_minilm.py [--out build/prune-minilm] [--steps 10000]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_judge import evaluate, finish, parse, parser, run  # noqa: E402

# the recovery loss of tools/distill_minilm.py; 45,175-sentence corpus, EPYC: 8000 steps in fp32 cosine 0.9737,
# 10000 steps in bf16 0.9747 (46 min of recovery, part of it sharing the cores). 3000 steps in all, bf16, Zen 4:
# one-shot 0.9673, schedule=iterative with 3 rounds of 1000 steps 0.9643 (and 28 % more recovery time): after the
# least-squares refit, cutting everything at once and spending every step on the final shape is better.
# The figures above removed 4 of 12 heads per layer (ratio rounded down: 33 %); with 5 (41.7 %, the nearest to 40 %),
# 10000 bf16 steps, 2-core Xeon: cosine 0.9710, Spearman 0.964, 1.44x (0.865 with no fine-tune, 4 heads: 0.884).
# 1000 steps on the 57k train split, bf16, EPYC (default 0.9491; Spearman 0.935): lr 2e-4 0.9417, lr 1e-3 0.9484,
# hidden 5 0.9480, embed_cos 30 0.9486: the distillation defaults hold here too. scope=global (29 heads, not 30) with
# no fine-tune: 0.8654 against 0.8665. Sets of 96 sentences differ by up to 0.012 in cosine at 1000 steps (validation
# 0.949, calibration 0.953, two sets of sentences.txt's train lines, mostly not yet seen by then, 0.954 and 0.961):
# the validation split is a slightly hard sample, so part of a held-out vs trained-on gap is the sample, not overfitting.
# 20000 bf16 steps, 57k train split, EPYC (86 min, part of it sharing the cores): cosine 0.9751 (0.897 worst),
# Spearman 0.968, 1.45x; 1000 / 10000 / 20000 steps: 0.949 / 0.971 / 0.975, about +0.004 a doubling by now. After those
# 11 epochs, trained-on sentences score 0.983-0.985 (two sets of sentences.txt's train lines, one of the added corpus),
# held-out ones 0.975 (validation) and 0.977 (calibration): a real generalization gap, larger than the sets' spread.
# With the error-correcting refit after the cut (refit_samples=4096, now the default; 0.863 -> 0.921 before any
# fine-tune), EPYC: 1000 steps 0.9542 (Spearman 0.941) against 0.9491; 20000 steps 0.9753 (0.898 worst), Spearman
# 0.969, 1.50x, 90 min of recovery (part of it sharing the cores) against 0.9751: the better start is worth about
# 1000 steps early on and nothing by 20000, where the recovery alone sets the figure.
# With the teacher's targets cached in fp16 (the whole train split fits), EPYC: the first epoch 0.234 s/step, the next
# nine 0.183 s/step (stop 21's 20000-step run averaged 0.257 s/step, part of it contended).
DEFAULT_OPTIONS = "ratio=0.4,lr=5e-4,embed_cos=10,hidden=20,relation=20,augment=0.3,precision=auto"


def main() -> int:
    args, out = parse(parser(__doc__, "prune-minilm", 10000,
                             "recovery steps (2 cores, bf16: 0.23 s each in the first epoch, 0.18 s once the teacher "
                             "cache is full)", DEFAULT_OPTIONS, "prune-structured"))
    options = f"{args.options},recover_steps={args.steps}"
    cli = [sys.executable, "-m", "edgecomp"]
    pruned, teacher = out / "pruned", out / "teacher"
    t0 = time.perf_counter()
    run([*cli, "build", "minilm", "--pass", f"prune-structured:{options}", "--target", "ort-fp32", "--out", str(pruned)],
        ok=(0, 1))
    wall = time.perf_counter() - t0
    run([*cli, "build", "minilm", "--target", "ort-fp32", "--out", str(teacher)])
    summary = evaluate(teacher / "ort-fp32", pruned / "ort-fp32", args.threads, args.rounds, args.runs)
    rep = json.loads((pruned / "report.json").read_text())
    rec = next(p for p in rep["targets"][0]["passes"] if p["pass"] == "prune-structured")
    runs = rec.get("recovery") or []  # none with --steps 0; schedule=iterative: one per round
    runs = runs if isinstance(runs, list) else [runs]
    summary |= {
        "options": options, "build_wall_seconds": round(wall, 1),
        **{f"recovery_{k}": sum(r[key] for r in runs) for k, key in (("steps", "steps"), ("seconds", "train_seconds"),
                                                                      ("samples", "samples"))},
        "heads_removed": sum(len(v) for v in rec["removed"]["heads_removed"].values()),
        "heads_before": rec["removed"]["heads_before"],
        "neurons_removed": sum(rec["removed"]["neurons_removed"].values()),
        "neurons_before": rec["removed"]["neurons_before"], "shares_removed": rec["shares_removed"],
        "params_teacher": rec["params_before"], "params_pruned": rec["params_after"],
        "linear_conv_macs_ratio": round(rec["linear_conv_macs_before"] / rec["linear_conv_macs_after"], 3),
        "machine": rep["environment"]["cpu"], "cores": rep["environment"]["cores"],
    }
    return finish(summary, summary["embedding_cosine_mean"] >= 0.98 and summary["speedup_p50"] >= 1.4, out)


if __name__ == "__main__":
    raise SystemExit(main())
