"""Release manifests and the regression gate.

`OUT/manifest.json` (schema `edgecomp.release/1`) is what a release pipeline keeps and compares:
each artifact's files with sha256 and size, the target, the precision it ran at, runtime and tool
versions, seeds, the passes, parity, latency and the verdict, and the build file's own hash. It
holds nothing that changes from run to run for the same inputs (no build times, no cache events)
except `created` and the latency figures when they are measured afresh.

The gate compares a release with a previous manifest (`--baseline`), per target:
- parity: each higher-is-better metric (cosine_mean, cosine_min, top1_agreement, accuracy) of each
  output may fall by at most `parity_drop` (absolute);
- latency: the target's p50 as a ratio to the reference's, both measured in one interleaved run,
  so a different machine or a busier one moves both alike. Each run gives one ratio per round; with
  m and h the mean and the confidence half-width of those ratios,
      slowdown = m_new / m_old - 1,   noise = sqrt(h_new^2 + h_old^2) / m_old,
  and the target regresses when slowdown - noise > latency_regression: only a slowdown that noise
  alone cannot explain fails.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecomp.errors import UsageError

SCHEMA = "edgecomp.release/1"
PARITY_KEYS = ("cosine_mean", "cosine_min", "top1_agreement", "accuracy")
_LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "runs", "rounds", "ratio_to_reference", "round_ratios", "ratio_ci95")


@dataclass(frozen=True)
class Gate:
    parity_drop: float = 0.002
    latency_regression: float = 0.10
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0 <= self.parity_drop < 1:
            raise ValueError(f"parity_drop must be in [0, 1), not {self.parity_drop}")
        if self.latency_regression < 0:
            raise ValueError(f"latency_regression must be >= 0, not {self.latency_regression}")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), not {self.confidence}")


def manifest(report: dict[str, Any]) -> dict[str, Any]:
    env = report["environment"]
    targets = []
    for t in report["targets"]:
        lat = t.get("latency")
        targets.append({
            "target": t["target"], "backend": t["backend"], "precision_requested": t["precision_requested"],
            "precision_executed": t["precision_executed"], "threads": t["threads"],
            "runtime": {k: v for k, v in t["runtime"].items() if k in ("runtime", "version", "device", "executed_precision")},
            "files": t["artifact"]["files"], "size_bytes": t["artifact"]["size_bytes"],
            "passes": [{k: v for k, v in p.items() if k != "seconds"} for p in t["passes"]],
            "parity": t["parity"], "verdict": t["verdict"],
            "latency": {k: lat[k] for k in _LATENCY_KEYS if k in lat} if lat else None,
        })
    ref_lat = report["reference"].get("latency")
    return {
        "schema": SCHEMA, "edgecomp_version": report["edgecomp_version"], "created": report["created"],
        "build_file": report.get("build_file"), "seeds": report["seeds"],
        "model": {"name": report["model"]["name"], "source_onnx_sha256": report["model"]["source_onnx_sha256"],
                  "provenance": report["model"]["provenance"]},
        "data": report["data"],
        "tools": {"python": env["python"], **env["versions"]},
        "machine": {"cpu": env["cpu"], "cores": env["cores"], "platform": env["platform"]},
        "reference": {"kind": report["reference"]["kind"], "runtime": report["reference"]["runtime"],
                      "latency": {k: ref_lat[k] for k in _LATENCY_KEYS if k in ref_lat} if ref_lat else None},
        "targets": targets,
        "ok": all(t["verdict"]["ok"] for t in report["targets"]),
    }


def read_baseline(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--baseline {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--baseline {path}: not a readable manifest ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UsageError(f"--baseline {path}: not an edgecomp release manifest (schema {SCHEMA})")
    return data


def _spread(lat: dict[str, Any], confidence: float) -> tuple[float, float] | None:
    """Mean and confidence half-width of the per-round ratios to the reference."""
    from edgecomp.bench import mean_ci

    ratios = lat.get("round_ratios") or ([lat["ratio_to_reference"]] if "ratio_to_reference" in lat else [])
    if not ratios:
        return None
    mean, lo, hi = mean_ci(ratios, confidence)
    return mean, (hi - lo) / 2


def compare(baseline: dict[str, Any], current: dict[str, Any], gate: Gate, where: str = "baseline") -> dict[str, Any]:
    """Per-target checks of `current` against `baseline`; targets absent from the baseline are listed, not failed."""
    old = {t["target"]: t for t in baseline["targets"]}
    checks: list[dict[str, Any]] = []
    new_targets = []
    for t in current["targets"]:
        b = old.get(t["target"])
        if b is None:
            new_targets.append(t["target"])
            continue
        for out, metrics in t["parity"]["outputs"].items():
            for key in PARITY_KEYS:
                before = b["parity"]["outputs"].get(out, {}).get(key)
                if key in metrics and before is not None:
                    drop = before - metrics[key]
                    checks.append({"target": t["target"], "check": f"{out} {key}", "baseline": before, "value": metrics[key],
                                   "change": -drop, "limit": gate.parity_drop, "ok": drop <= gate.parity_drop + 1e-12})
        if t.get("latency") and b.get("latency"):
            now, then = _spread(t["latency"], gate.confidence), _spread(b["latency"], gate.confidence)
            if now and then:
                slowdown = now[0] / then[0] - 1
                noise = math.hypot(now[1], then[1]) / then[0]
                checks.append({"target": t["target"], "check": "latency ratio to reference", "baseline": then[0],
                               "value": now[0], "change": slowdown, "noise": noise, "limit": gate.latency_regression,
                               "ok": slowdown - noise <= gate.latency_regression})
    return {"baseline": where, "baseline_created": baseline.get("created"), "settings": vars(gate), "checks": checks,
            "new_targets": new_targets, "missing_targets": sorted(set(old) - {t["target"] for t in current["targets"]}),
            "ok": all(c["ok"] for c in checks)}


def failures(report: dict[str, Any]) -> list[str]:
    """One phrase per failed check (budget or gate), naming the target: for the one-line error."""
    out = [f"{t['target']} {c['metric']} {c['value']:.4g} (limit {c['op']} {c['limit']:g})"
           for t in report["targets"] for c in t["verdict"]["checks"] if not c["ok"]]
    for c in (report.get("gate") or {}).get("checks", []):
        if c["ok"]:
            continue
        if c["check"].startswith("latency"):
            out.append(f"{c['target']} latency regressed {c['change'] * 100:+.1f} % (noise ±{c['noise'] * 100:.1f} %, "
                       f"allowed {c['limit'] * 100:.0f} %) against the baseline")
        else:
            out.append(f"{c['target']} {c['check']} fell {c['baseline']:.4g} -> {c['value']:.4g} "
                       f"(allowed drop {c['limit']:g}) against the baseline")
    return out
