"""Built artifacts on disk: `manifest.json` + model files + `reference.npz`, re-checked anywhere.

`edgecomp validate` and `edgecomp bench` work from the folder alone, with the same Runner,
metrics and latency protocol as the build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.backends.base import Artifact
from edgecomp.errors import UsageError


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise UsageError(f"{folder}: not an artifact folder (expected a folder with manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{folder}: no manifest.json; pass a target folder of an edgecomp build (OUT/TARGET)") from None
    except ValueError as e:
        raise UsageError(f"{path}: corrupt manifest ({e})") from None
    for role, name in manifest.get("files", {}).items():
        if "/" in name or name.startswith(".") or not (folder / name).is_file():
            raise UsageError(f"{folder}: manifest names a missing or unsafe {role} file {name!r}")
    return manifest


def load_runner(folder: Path, threads: int | None) -> tuple[Any, dict[str, Any], dict[str, float]]:
    from edgecomp.backends import require
    from edgecomp.bench import timed_load

    manifest = read_manifest(folder)
    backend = require(manifest["backend"], lowering=False)
    artifact = Artifact(folder, manifest["backend"], manifest["files"], manifest.get("meta", {}))
    runner, load = timed_load(lambda: backend.load(artifact, threads or manifest.get("threads", 2)))
    return runner, manifest, load


def reference_set(folder: Path) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], np.ndarray | None]:
    try:
        with np.load(folder / "reference.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"{folder}/reference.npz: unreadable ({e})") from None
    ins = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("input/")}
    outs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("output/")}
    n = len(next(iter(ins.values())))
    feeds = [{k: v[i:i + 1] for k, v in ins.items()} for i in range(n)]
    refs = [{k: v[i:i + 1] for k, v in outs.items()} for i in range(n)]
    return feeds, refs, arrays.get("labels")


def validate_artifact(folder: Path, threads: int | None = None) -> dict[str, Any]:
    from edgecomp.validate import parity, run_all, verdict

    runner, manifest, load = load_runner(folder, threads)
    feeds, refs, labels = reference_set(folder)
    par = parity(refs, run_all(runner, feeds), manifest.get("task"), labels)
    return {"artifact": str(folder), "runtime": runner.info(), "load": load, "parity": par,
            "verdict": verdict(par, manifest.get("budget", {}))}


def bench_artifacts(folders: list[Path], threads: int | None, warmup: int, runs: int, min_seconds: float) -> list[dict[str, Any]]:
    """Latency of several artifacts, all loaded, measured interleaved in rounds (each cycling through the
    inputs of its own reference.npz), so the ratios between them come from one stretch of time."""
    from edgecomp.bench import interleaved, peak_rss_mb

    loaded = [(folder, *load_runner(folder, threads)) for folder in folders]
    feeds = [reference_set(folder)[0] for folder in folders]
    settings = {"warmup": warmup, "runs": runs, "min_seconds": min_seconds}
    lats = interleaved([(runner, settings) for _, runner, _, _ in loaded], feeds)
    return [{"artifact": str(folder), "runtime": runner.info(), "load": load, "latency": lat, "peak_rss_mb": peak_rss_mb()}
            for (folder, runner, _, load), lat in zip(loaded, lats)]
