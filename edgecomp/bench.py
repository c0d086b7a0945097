"""Latency, measured the same way for every Runner.

Protocol: `warmup` untimed runs (caches, lazy kernel selection), then timed runs until both
`runs` iterations and `min_seconds` have passed, so percentiles rest on enough samples even for
fast models. The input is one real sample or a list of them, cycled through run after run (the
builds use the whole validation split: a graph whose cost depends on the input, such as one that
trims padding, is then timed on the real mix of lengths, not on whichever sample comes first);
threads are whatever the runner was built with (explicit).
A build measures the reference and every target together, interleaved in rounds (`interleaved`),
after they are all built: ratios come from one stretch of time, not from minutes apart.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


Feeds = dict[str, np.ndarray] | list[dict[str, np.ndarray]]  # one input, or inputs to cycle through


def latency(runner: Any, feed: Feeds, warmup: int = 10, runs: int = 100,
            min_seconds: float = 1.0, max_seconds: float = 30.0) -> dict[str, float]:
    _warm(runner, feed, warmup)
    return _summary(_timed(runner, feed, runs, min_seconds, max_seconds), warmup)


def interleaved(runners: list[tuple[Any, dict[str, Any]]], feeds: list[Feeds], rounds: int = 5) -> list[dict[str, float]]:
    """Latency of several runners (each with its profile's bench settings) measured in alternation:
    each round gives every runner 1/rounds of its runs. A machine that slows down during the
    measurement (another process, a noisy neighbour) slows them all alike, so the ratios between
    them hold even where the absolute figures drift. `feeds`: one per runner (an input, or a list of
    inputs to cycle through)."""
    if len(feeds) != len(runners):
        raise ValueError(f"{len(runners)} runners but {len(feeds)} feeds")
    for (runner, b), f in zip(runners, feeds):
        _warm(runner, f, int(b["warmup"]))
    per_round: list[list[list[float]]] = [[] for _ in runners]
    for _ in range(rounds):
        for i, (runner, b) in enumerate(runners):
            per_round[i].append(_timed(runner, feeds[i], -(-int(b["runs"]) // rounds), float(b["min_seconds"]) / rounds,
                                       float(b.get("max_seconds", 30.0)) / rounds))
    out = []
    for r, (_, b) in zip(per_round, runners):
        o = _summary([t for ts in r for t in ts], int(b["warmup"]))
        o["rounds"] = rounds
        o["round_p50_ms"] = [float(np.percentile(np.array(ts) * 1e3, 50)) for ts in r]
        out.append(o)
    return out


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided confidence interval (Student's t): how far repeated rounds let a figure move
    by noise alone. One value gives an interval of zero width."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float(v.mean()), float(v.mean())
    from scipy.special import stdtrit  # Student's t quantile; lighter to import than scipy.stats

    half = float(stdtrit(len(v) - 1, 0.5 + confidence / 2) * v.std(ddof=1) / np.sqrt(len(v)))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def _warm(runner: Any, feed: Feeds, warmup: int) -> None:
    cycle = feed if isinstance(feed, list) else [feed]
    for i in range(max(int(warmup), min(len(cycle), 100))):  # every input at least once (up to 100): shapes differ
        runner(cycle[i % len(cycle)])


def _timed(runner: Any, feed: Feeds, runs: int, min_seconds: float, max_seconds: float) -> list[float]:
    cycle = feed if isinstance(feed, list) else [feed]
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        runner(cycle[len(times) % len(cycle)])
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 10:
            break
    return times


DISTRIBUTION_POINTS = 101  # quantiles kept of every measurement: enough for a histogram or box plot


def _summary(times: list[float], warmup: int) -> dict[str, Any]:
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "runs": len(times), "warmup": int(warmup),
            "distribution_ms": [round(float(q), 4) for q in np.percentile(ms, np.linspace(0, 100, DISTRIBUTION_POINTS))]}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """The process's high-water mark (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_load(load: Any) -> tuple[Any, dict[str, float]]:
    """Call `load()` and return (runner, cold-start seconds and resident memory it added)."""
    before = rss_mb()
    t0 = time.perf_counter()
    runner = load()
    seconds = time.perf_counter() - t0
    return runner, {"load_s": seconds, "rss_added_mb": max(0.0, rss_mb() - before)}
