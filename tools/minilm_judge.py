"""What tools/distill_minilm.py and tools/prune_minilm.py share: running edgecomp's commands, and judging a
compressed MiniLM artifact against the teacher's on the validation split (similarity ranking, embedding
cosine, interleaved latency)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def parser(doc: str, name: str, steps: int, steps_help: str, options: str, pass_name: str) -> argparse.ArgumentParser:
    """The options both tools take: output folder, training steps, the pass's options, benchmark settings."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / name)
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--options", default=options, help=f"more {pass_name} options, k=v,k=v")
    ap.add_argument("--threads", type=int, default=2, help="threads of both ONNX Runtime sessions when benchmarking")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200)
    return ap


def parse(ap: argparse.ArgumentParser) -> tuple[Any, Path]:
    """The parsed arguments and the output folder, created."""
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    return args, out


def finish(summary: dict[str, Any], ok: bool, out: Path) -> int:
    """Print the summary and write it to OUT/summary.json; the exit code: 0 when the targets are met."""
    summary["ok"] = bool(ok)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if ok else 1


def run(cmd: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode not in ok:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def evaluate(teacher: Path, student: Path, threads: int, rounds: int, runs: int) -> dict[str, float]:
    import numpy as np
    from scipy.stats import spearmanr

    from edgecomp.artifact import load_runner
    from edgecomp.bench import latency
    from edgecomp.recipe import load_recipe

    recipe = load_recipe("minilm")
    feeds = recipe.module().samples(recipe).validation
    rt, _, _ = load_runner(teacher, threads)
    rs, _, _ = load_runner(student, threads)
    et = np.concatenate([rt(f)["sentence_embedding"] for f in feeds])
    es = np.concatenate([rs(f)["sentence_embedding"] for f in feeds])

    def pair_sims(e: np.ndarray) -> np.ndarray:
        z = e / np.linalg.norm(e, axis=1, keepdims=True)
        return (z @ z.T)[np.triu_indices(len(z), 1)]

    cos = (et * es).sum(1) / (np.linalg.norm(et, axis=1) * np.linalg.norm(es, axis=1))
    ratios, p50 = [], {"teacher": [], "student": []}
    for _ in range(rounds):
        lt = latency(rt, feeds, warmup=10, runs=runs, min_seconds=1.0)["p50_ms"]
        ls = latency(rs, feeds, warmup=10, runs=runs, min_seconds=1.0)["p50_ms"]
        p50["teacher"].append(lt)
        p50["student"].append(ls)
        ratios.append(lt / ls)
    return {"validation_sentences": len(feeds), "pairs": int(len(feeds) * (len(feeds) - 1) / 2),
            "spearman": float(spearmanr(pair_sims(et), pair_sims(es)).statistic),
            "embedding_cosine_mean": float(cos.mean()), "embedding_cosine_min": float(cos.min()),
            "speedup_p50": float(np.median(ratios)), "speedup_per_round": [round(r, 3) for r in ratios],
            "p50_ms_teacher": float(np.median(p50["teacher"])), "p50_ms_student": float(np.median(p50["student"])),
            "bench_threads": threads}
