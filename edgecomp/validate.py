"""Parity: the metrics every target is judged by, written once against Runner outputs.

For each output tensor, over the validation samples:
  max_abs / mean_abs   |y - y_ref|
  cosine               y . y_ref / (|y| |y_ref|) per sample (flattened); mean and worst
  sqnr_db              10 log10(sum y_ref^2 / sum (y - y_ref)^2)
  top1_agreement       argmax(y) == argmax(y_ref), classifiers only
  accuracy             argmax(y) == label, when labels exist (and the reference's, for the drop)
The verdict takes the worst output for each budget key, so a model with several outputs passes
only when all of them do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Outputs = dict[str, np.ndarray]


def run_all(runner: Any, feeds: list[dict[str, np.ndarray]]) -> list[Outputs]:
    return [runner(f) for f in feeds]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def parity(reference: list[Outputs], got: list[Outputs], task: str | None = None,
           labels: np.ndarray | None = None) -> dict[str, Any]:
    per_output: dict[str, dict[str, float]] = {}
    for name in reference[0]:
        if name not in got[0]:
            raise KeyError(f"output {name!r} missing from the artifact's outputs {sorted(got[0])}")
        ref = [np.asarray(r[name], dtype=np.float64) for r in reference]
        out = [np.asarray(g[name], dtype=np.float64).reshape(r.shape) for g, r in zip(got, ref)]
        diff = np.concatenate([(o - r).ravel() for o, r in zip(out, ref)])
        cos = [_cos(o, r) for o, r in zip(out, ref)]
        signal = float(sum((r ** 2).sum() for r in ref))
        noise = float((diff ** 2).sum())
        m = {"max_abs": float(np.abs(diff).max()), "mean_abs": float(np.abs(diff).mean()),
             "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
             "sqnr_db": float(10 * np.log10(signal / noise)) if noise > 0 else float("inf")}
        if task == "classification":
            top_o = np.array([o.reshape(o.shape[0], -1).argmax(-1) for o in out]).ravel()
            top_r = np.array([r.reshape(r.shape[0], -1).argmax(-1) for r in ref]).ravel()
            m["top1_agreement"] = float((top_o == top_r).mean())
            if labels is not None:
                m["accuracy"] = float((top_o == labels).mean())
                m["reference_accuracy"] = float((top_r == labels).mean())
                m["accuracy_drop"] = m["reference_accuracy"] - m["accuracy"]
        per_output[name] = m
    return {"samples": len(reference), "outputs": per_output}


_LOWER_IS_BETTER = {"max_abs", "mean_abs", "accuracy_drop", "latency_ratio"}


def verdict(par: dict[str, Any], budget: dict[str, float], latency_ratio: float | None = None) -> dict[str, Any]:
    """Check each budget key against the worst output; keys a model cannot have are listed, not failed."""
    checks, skipped = [], []
    for key, limit in budget.items():
        if key == "latency_ratio":
            values = [latency_ratio] if latency_ratio is not None else []
        else:
            values = [m[key] for m in par["outputs"].values() if key in m]
        if not values:
            skipped.append(key)
            continue
        worst = max(values) if key in _LOWER_IS_BETTER else min(values)
        ok = worst <= limit if key in _LOWER_IS_BETTER else worst >= limit
        checks.append({"metric": key, "value": worst, "limit": limit, "ok": bool(ok),
                       "op": "<=" if key in _LOWER_IS_BETTER else ">="})
    return {"ok": all(c["ok"] for c in checks), "checks": checks, "not_applicable": skipped}
