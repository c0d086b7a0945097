"""What tools/distill_minilm.py and tools/prune_minilm.py share: running edgecomp's commands, and judging a
compressed MiniLM artifact against the teacher's on the validation split (similarity ranking, embedding
cosine, interleaved latency)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
