"""Sample sets: the real inputs a build calibrates on and proves parity on.

Three origins, in order of preference: a recipe's own data (real, split into calibration and
validation), an `.npz` the user supplies, and, only when neither exists, synthetic inputs drawn
from the signature. The origin travels into the report so a synthetic-only check is never
mistaken for a real one.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecomp.errors import UsageError
from edgecomp.model import TensorSpec

Feed = dict[str, np.ndarray]


@dataclass
class SampleSet:
    calibration: list[Feed]
    validation: list[Feed]
    labels: np.ndarray | None  # one label per validation sample, for classifiers
    origin: str  # "recipe:NAME", "npz:PATH" or "synthetic"
    note: str = ""

    @property
    def synthetic(self) -> bool:
        return self.origin == "synthetic"


def check_against(feeds: list[Feed], inputs: tuple[TensorSpec, ...], what: str) -> None:
    """Fail early, naming the tensor, when samples do not fit the model's inputs."""
    want = {t.name: t for t in inputs}
    for feed in feeds[:1]:
        if set(feed) != set(want):
            raise UsageError(f"{what}: inputs {sorted(feed)} do not match the model's inputs {sorted(want)}")
        for name, arr in feed.items():
            spec = want[name]
            if arr.ndim != len(spec.shape):
                raise UsageError(f"{what}: input {name!r} has rank {arr.ndim}, the model expects {len(spec.shape)} {list(spec.shape)}")
            for got, exp in zip(arr.shape, spec.shape):
                if isinstance(exp, int) and got != exp:
                    raise UsageError(f"{what}: input {name!r} has shape {list(arr.shape)}, the model expects {list(spec.shape)}")
            if not spec.dtype.startswith("onnx:") and np.dtype(spec.dtype).kind != arr.dtype.kind:
                raise UsageError(f"{what}: input {name!r} is {arr.dtype}, the model expects {spec.dtype}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise UsageError(f"{path}: no such samples file") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"{path}: not a readable .npz of arrays ({e})") from None


def npz_signature(path: Path) -> tuple[TensorSpec, ...]:
    """The input signature implied by a samples file: one batch-1 sample per row of each array."""
    return tuple(TensorSpec(k, str(a.dtype), ("batch", *a.shape[1:])) for k, a in _read_npz(path).items()
                 if k != "labels" and a.ndim)


def from_npz(path: Path, inputs: tuple[TensorSpec, ...]) -> SampleSet:
    """Arrays keyed by input name, first axis = samples; an optional `labels` array for classifiers.

    The first half calibrates and the second half validates, so parity is not measured on the
    very inputs the quantizer was tuned on (with one sample, both use it, and the note says so).
    """
    arrays = _read_npz(path)
    labels = arrays.pop("labels", None)
    if not arrays:
        raise UsageError(f"{path}: holds no input arrays")
    counts = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1:
        raise UsageError(f"{path}: input arrays disagree on the number of samples ({sorted(counts)})")
    n = counts.pop()
    if n == 0:
        raise UsageError(f"{path}: the sample set is empty (0 samples): nothing to calibrate or validate on")
    feeds = [{k: a[i:i + 1] for k, a in arrays.items()} for i in range(n)]
    check_against(feeds, inputs, str(path))
    half = (n + 1) // 2
    calib, valid = (feeds, feeds) if n == 1 else (feeds[:half], feeds[half:])
    vlabels = None if labels is None else (labels if n == 1 else labels[half:])
    note = "one sample used for both calibration and validation" if n == 1 else ""
    return SampleSet(calib, valid, vlabels, f"npz:{path}", note)


def synthetic(inputs: tuple[TensorSpec, ...], n_calib: int = 16, n_valid: int = 16, seed: int = 0) -> SampleSet:
    """Inputs drawn from the signature. Floats ~ N(0, 1); integers in [0, 2) (ids, masks, types)."""
    rng = np.random.default_rng(seed)

    def one() -> Feed:
        feed = {}
        for t in inputs:
            shape = t.concrete()
            dt = np.dtype(t.dtype)
            if dt.kind == "f":
                feed[t.name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind == "b":
                feed[t.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                feed[t.name] = rng.integers(0, 2, shape).astype(dt)
        return feed

    return SampleSet([one() for _ in range(n_calib)], [one() for _ in range(n_valid)], None, "synthetic",
                     "parity was checked on synthetic inputs only: supply real samples with --samples FILE.npz")


def stack(feeds: list[Feed]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
