"""Target profiles (`targets/NAME.toml`): data only. `--target NAME` picks one.

A profile says which backend lowers the model, at what precision, with which graph passes
(quantization settings live there), how many threads, how latency is measured, and the parity
budget the artifact must meet. A new device is a new file, not new code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.paths import TARGETS_DIR
from edgecomp.tomlconf import check_keys, read_toml

BUDGET_KEYS = {
    "max_abs": "max absolute error over all outputs and samples (<=)",
    "mean_abs": "mean absolute error (<=)",
    "cosine_mean": "mean per-sample cosine similarity (>=)",
    "cosine_min": "worst per-sample cosine similarity (>=)",
    "top1_agreement": "share of samples whose argmax matches the reference (>=, classifiers only)",
    "accuracy_drop": "task accuracy lost against the reference, in points of [0, 1] (<=, labelled data only)",
    "latency_ratio": "p50 latency / reference p50 latency (<=)",
}
BENCH_KEYS = {"warmup", "runs", "min_seconds"}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    backend: str
    precision: str
    threads: int
    passes: tuple[dict[str, Any], ...]
    budget: dict[str, float]
    bench: dict[str, float] = field(default_factory=lambda: {"warmup": 10, "runs": 100, "min_seconds": 1.0})
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    diff: bool = False  # also compare the artifact layer by layer with the source graph (`edgecomp diff`)


def profile_names() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


OVERRIDABLE = {"threads", "passes", "budget", "bench", "options", "description", "diff"}


def load_profile(name: str, overrides: dict[str, Any] | None = None, alias: str | None = None,
                 where: str | None = None) -> Profile:
    """A profile by name (or path to a .toml). `overrides` (a build file's per-target table) replace
    `threads`, `passes` and `description`, and are merged key by key into `budget`, `bench` and
    `options`; the result is checked exactly like a profile file, so a bad override is named too."""
    path = Path(name) if name.endswith(".toml") else TARGETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown target {name!r} (known: {', '.join(profile_names())})")
    d = read_toml(path)
    where = where or path.name
    if overrides:
        check_keys(where, overrides, OVERRIDABLE)
        for key, value in overrides.items():
            if key in ("budget", "bench", "options"):
                if not isinstance(value, dict):
                    raise UsageError(f"{where}: {key} must be a table, not {value!r}")
                d[key] = d.get(key, {}) | value
            else:
                d[key] = value
    if alias:
        d["name"] = alias
    check_keys(where, d, {"schema", "name", "description", "backend", "precision", "threads", "passes", "budget", "bench",
                          "options", "diff"}, {"schema", "backend", "precision", "budget"})
    if not isinstance(d.get("diff", False), bool):
        raise UsageError(f"{where}: diff must be true or false, not {d['diff']!r}")
    if d["schema"] != 1:
        raise UsageError(f"{where}: unsupported schema {d['schema']!r} (this edgecomp reads schema 1)")
    from edgecomp.backends import BACKENDS

    if d["backend"] not in BACKENDS:
        raise UsageError(f"{where}: unknown backend {d['backend']!r} (known: {', '.join(BACKENDS)})")
    check_keys(f"{where} [budget]", d["budget"], set(BUDGET_KEYS))
    bench = {"warmup": 10, "runs": 100, "min_seconds": 1.0} | d.get("bench", {})
    check_keys(f"{where} [bench]", bench, BENCH_KEYS)
    passes = tuple(d.get("passes", ()))
    from edgecomp.passes import make_params

    for i, p in enumerate(passes):
        if "name" not in p:
            raise UsageError(f"{where}: passes[{i}] has no name")
        make_params(p["name"], {k: v for k, v in p.items() if k != "name"}, where=f"{where} passes[{i}]")
    threads = d.get("threads", 2)
    if not isinstance(threads, int) or threads < 1:
        raise UsageError(f"{where}: threads must be a positive integer, not {threads!r}")
    return Profile(d.get("name", path.stem), d.get("description", ""), d["backend"], d["precision"], threads,
                   passes, {k: float(v) for k, v in d["budget"].items()}, bench, d.get("options", {}), path,
                   d.get("diff", False))
