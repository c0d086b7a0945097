"""Streaming activation calibration: one sample in memory at a time, fixed-size statistics.

ONNX Runtime's calibrators keep every intermediate output of every sample until the end (the
histogram ones even grow their bin count with the range), so memory grows with the calibration
set. Here an augmented copy of the graph exposes the tensors that need ranges, each sample is run
once, and its outputs are folded into per-tensor running statistics, then dropped:

* running min / max, and
* a histogram of B bins over [-E, E]. When a sample exceeds E, E doubles (k times) and the old
  counts are merged 2^k bins into one. With B even the old edges are new edges, so re-binning is
  exact (no counts are smeared); resolution is at worst half of a fresh histogram's.

Memory: one sample's exposed outputs plus B * 8 bytes per tensor, whatever the sample count.

A tensor's range [lo, hi] then comes from its method. With centres c_i and counts n_i:

Exact zeros (half of a ReLU's output) are counted apart and left out of entropy and mse: zero is
exact on every grid ONNX Runtime builds, and the spike would otherwise pull KL towards tiny
thresholds.

* minmax: the observed [min, max].
* percentile p: two-sided quantiles (100 - p)/2 and (100 + p)/2 of the histogram (of |x|, with
  symmetric activations), clipped to [min, max].
* entropy: TensorRT's KL calibration on the histogram of |x|: for each candidate threshold t
  (a bin edge), P = the counts below t with the tail folded into the last bin, Q = the same counts
  merged into as many bins as the int8 grid has levels and spread back over their non-empty
  bins; t* = argmin KL(P || Q). Range = [max(min, -t*), min(max, t*)].
* mse: t* minimizes the expected squared error of quantizing the histogram to the int8 grid on
  [max(min, -t), min(max, t)]: clipped values cost (c_i - bound)^2, kept values the rounding
  noise step^2 / 12 (step = range / 255, or max|bound| / 127 when symmetric). Prefix sums make
  this O(B) for all candidates at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import numpy as np

from edgecomp.errors import UsageError

METHODS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048
Feed = dict[str, np.ndarray]


class HistogramStats:
    """Per-tensor running min/max and a fixed B-bin histogram over [-edge, edge]."""

    def __init__(self, bins: int = BINS) -> None:
        if bins < 512 or bins % 2:
            raise UsageError(f"calibration: bins = {bins} must be even and >= 512")
        self.bins = bins
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.edge: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}
        self.zeros: dict[str, int] = {}  # exact zeros (ReLU's spike): exact on any int8 grid, so left out of entropy/mse

    @property
    def nbytes(self) -> int:
        """Bytes of statistics held: the histograms plus three floats and a count per tensor."""
        return sum(h.nbytes for h in self.hist.values()) + 32 * len(self.hist)

    def update(self, name: str, value: np.ndarray) -> None:
        x = np.asarray(value).ravel()
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN / inf say nothing about a range
            x = x[np.isfinite(x)]
            if not x.size:
                return
            lo, hi = float(x.min()), float(x.max())
        if name not in self.hist:
            self.lo[name], self.hi[name], self.edge[name] = lo, hi, 0.0
            self.hist[name] = np.zeros(self.bins, np.int64)
            self.zeros[name] = 0
        else:
            self.lo[name], self.hi[name] = min(self.lo[name], lo), max(self.hi[name], hi)
        hist, half = self.hist[name], self.bins // 2
        self.zeros[name] += int(np.count_nonzero(x == 0))
        amax = max(-lo, hi)
        edge = self.edge[name]
        if amax > edge:
            if edge == 0.0:  # so far only zeros, counted in the bin [0, w)
                edge = amax
            else:
                k = max(1, math.ceil(math.log2(amax / edge)))
                while edge * 2.0 ** k < amax:  # guard against log2 rounding
                    k += 1
                kk = min(k, int(math.log2(self.bins)))  # beyond this every merge looks alike
                old = np.arange(self.bins, dtype=np.int64)
                target = (old + ((1 << kk) - 1) * half) >> kk
                hist = np.bincount(target, weights=hist, minlength=self.bins).astype(np.int64)
                edge *= 2.0 ** k
            self.edge[name] = edge
        if edge == 0.0:
            hist[half] += x.size
        else:
            idx = np.floor(x * np.float32(half / edge)) + half
            np.clip(idx, 0, self.bins - 1, out=idx)
            hist += np.bincount(idx.astype(np.int64), minlength=self.bins)
        self.hist[name] = hist

    def range(self, name: str, method: str, percentile: float = 99.99, symmetric: bool = False) -> tuple[float, float]:
        """[lo, hi] of one tensor by `method`; always inside the observed [min, max]."""
        lo, hi, edge, hist = self.lo[name], self.hi[name], self.edge[name], self.hist[name]
        if method == "minmax" or edge == 0.0 or hi <= lo:
            return lo, hi
        half = self.bins // 2
        width = edge / half
        folded = hist[half:] + hist[:half][::-1]  # |x| in bins [j w, (j + 1) w)
        if method in ("entropy", "mse"):
            hist = hist.copy()
            hist[half] -= self.zeros[name]  # zeros land in bin [0, w)
            folded = folded.copy()
            folded[0] -= self.zeros[name]
        if method == "percentile":
            if symmetric:
                t = _quantile_edge(folded, percentile / 100.0) * width
                return max(lo, -t), min(hi, t)
            tail = (100.0 - percentile) / 200.0
            low = -edge + _quantile_edge(hist, tail, lower=True) * width
            high = -edge + _quantile_edge(hist, 1.0 - tail) * width
            return max(lo, low), min(hi, high)
        if method == "entropy":
            levels = 256 if lo >= 0 and not symmetric else 128
            t = _kl_threshold(folded, levels) * width
        elif method == "mse":
            t = _mse_threshold(hist, edge, lo, hi, symmetric)
        else:
            raise UsageError(f"calibration: method {method!r} is not one of {', '.join(METHODS)}")
        return max(lo, -t), min(hi, t)


def _quantile_edge(counts: np.ndarray, q: float, lower: bool = False) -> int:
    """The bin edge (an index 0..len) at which the cumulative share first reaches q: the right edge
    of that bin for an upper tail, its left edge for a lower tail (both keep the quantile inside)."""
    cdf = np.cumsum(counts) / max(counts.sum(), 1)
    i = int(np.searchsorted(cdf, q, side="left"))
    i = min(i, len(counts) - 1)
    return i if lower else i + 1


def _kl_threshold(folded: np.ndarray, levels: int) -> int:
    """TensorRT entropy calibration on a histogram of |x|: the edge index i minimizing KL(P || Q)."""
    n = len(folded)
    if n <= levels or folded.sum() == 0:
        return n
    counts = folded.astype(np.float64)
    tail = np.cumsum(counts[::-1])[::-1]  # tail[i] = sum counts[i:]
    step = max(1, (n - levels) // 384)  # at most ~400 candidates
    best_i, best_kl = n, math.inf
    for i in range(levels, n + 1, step):
        p = counts[:i].copy()
        if i < n:
            p[-1] += tail[i]
        groups = (np.arange(i) * levels) // i
        nonzero = counts[:i] > 0
        total = np.bincount(groups, weights=counts[:i], minlength=levels)
        used = np.bincount(groups, weights=nonzero, minlength=levels)
        q = np.where(nonzero, total[groups] / np.maximum(used[groups], 1), 0.0)
        mask = p > 0
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-30)
        kl = float(np.sum(ps[mask] * np.log(ps[mask] / np.maximum(qs[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def _mse_threshold(hist: np.ndarray, edge: float, lo: float, hi: float, symmetric: bool) -> float:
    """The threshold t (a bin edge) minimizing expected quantization MSE over the histogram."""
    b = len(hist)
    half = b // 2
    width = edge / half
    centres = -edge + (np.arange(b) + 0.5) * width
    n = hist.astype(np.float64)
    s0, s1, s2 = (np.concatenate([[0.0], np.cumsum(n * centres ** p)]) for p in (0, 1, 2))  # prefix sums
    t = np.arange(1, half + 1) * width
    r_lo, r_hi = np.minimum(np.maximum(lo, -t), 0.0), np.maximum(np.minimum(hi, t), 0.0)
    below = np.searchsorted(centres, r_lo, side="left")  # bins [0, below) are clipped to r_lo
    above = np.searchsorted(centres, r_hi, side="right")  # bins [above, b) are clipped to r_hi
    err_lo = s2[below] - 2 * r_lo * s1[below] + r_lo ** 2 * s0[below]
    err_hi = (s2[b] - s2[above]) - 2 * r_hi * (s1[b] - s1[above]) + r_hi ** 2 * (s0[b] - s0[above])
    step = np.maximum(-r_lo, r_hi) / 127.0 if symmetric else (r_hi - r_lo) / 255.0
    err_in = (s0[above] - s0[below]) * step ** 2 / 12.0
    return float(t[int(np.argmin(err_lo + err_hi + err_in))])


class ChannelMax:
    """Per-tensor running max|x| over every axis but the last (SmoothQuant's per-channel statistic)."""

    def __init__(self) -> None:
        self.amax: dict[str, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.amax.values())

    def update(self, name: str, value: np.ndarray) -> None:
        x = np.abs(np.asarray(value, dtype=np.float32))
        m = x.reshape(-1, x.shape[-1]).max(axis=0) if x.ndim else x.reshape(1)
        self.amax[name] = np.maximum(self.amax[name], m) if name in self.amax else m


def default_op_types() -> list[str]:
    """Every op type ONNX Runtime's quantizers can handle (what `quantize_static` uses by default)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def select_tensors(model: object, op_types: Collection[str]) -> list[str]:
    """Float activations (not initializers) read or written by a node of a quantizable op type,
    the tensors ONNX Runtime's own calibrator selects. `model` must carry shape-inferred value_info:
    a tensor whose type is unknown cannot be quantized anyway."""
    from onnx import TensorProto

    graph = model.graph  # type: ignore[attr-defined]
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output, *graph.input]
             if v.type.HasField("tensor_type")}
    inits = {i.name for i in graph.initializer}
    chosen: dict[str, None] = {}
    for node in graph.node:
        if node.op_type in op_types:
            for name in [*node.input, *node.output]:
                if name and name not in inits and types.get(name) in (TensorProto.FLOAT, TensorProto.FLOAT16):
                    chosen[name] = None
    return list(chosen)


def stream_tensors(model: object, names: list[str], feeds: Iterable[Feed], consume: Callable[[str, np.ndarray], None]) -> int:
    """Run `model` with `names` exposed as outputs on one feed at a time, handing each value to
    `consume` and keeping none; returns the number of samples run."""
    import copy

    import onnx
    import onnxruntime as ort

    graph = model.graph  # type: ignore[attr-defined]
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    augmented = copy.deepcopy(model)
    augmented.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in inputs | outputs)  # type: ignore[attr-defined]
    fetch = [n for n in names if n not in inputs]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every exposed tensor as written
    opts.log_severity_level = 3
    session = ort.InferenceSession(augmented.SerializeToString(), opts, providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    del augmented
    count = 0
    for feed in feeds:
        for name in names:
            if name in inputs:
                consume(name, feed[name])
        for name, value in zip(fetch, session.run(fetch, feed)):
            consume(name, value)
        count += 1
    return count


@dataclass
class Calibration:
    ranges: dict[str, tuple[float, float]]
    samples: int
    stats_bytes: int  # the statistics' size, independent of the sample count


def calibrate(model: object, feeds: Iterable[Feed], op_types: Collection[str], method: str = "minmax",
              percentile: float = 99.99, symmetric: bool = False, bins: int = BINS) -> Calibration:
    """Activation ranges of `model` (an onnx.ModelProto with value_info) over `feeds`, streamed."""
    if method not in METHODS:
        raise UsageError(f"calibration: method {method!r} is not one of {', '.join(METHODS)}")
    if not 0 < percentile <= 100:
        raise UsageError(f"calibration: percentile = {percentile} must be in (0, 100]")
    names = select_tensors(model, op_types)
    stats = HistogramStats(bins)
    count = stream_tensors(model, names, feeds, stats.update)
    if count == 0:
        raise UsageError("calibration: no samples to calibrate on")
    ranges = {n: stats.range(n, method, percentile, symmetric) for n in stats.hist}
    return Calibration(ranges, count, stats.nbytes)
