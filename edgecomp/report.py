"""The build report: `report.json` (schema below, versioned) and `report.md` (for people).

Schema `edgecomp.report/1` (stable keys; new keys may be added, none removed without a bump):
  schema, edgecomp_version, created (UTC ISO 8601), command (argv), ok (all verdicts passed)
  model:       name, provenance {format, path|recipe, sha256, ...}, inputs/outputs [{name, dtype, shape}],
               source_onnx_sha256
  data:        origin ("recipe:NAME" | "npz:PATH" | "synthetic"), synthetic (bool), note,
               calibration_samples, validation_samples
  seeds:       {build, recipe}
  environment: python, platform, machine, cpu, cores, versions {numpy, onnx, onnxruntime, torch, ...}
  build_file:  {path, sha256} when the build came from a build file (edgecomp release), else null
  cache:       {root, stages {"source/source" | "target/NAME" | "latency/all": "hit" | "miss" | "off"}}
  gate:        (with --baseline) {baseline, baseline_created, settings, checks [{target, check, baseline, value,
               change, limit, ok, [noise]}], new_targets, missing_targets, ok}; see edgecomp/release.py
  reference:   kind ("torch-eager" | "onnxruntime-fp32"), runtime {...}, latency {p50_ms, p90_ms, p99_ms, ...}
  targets[]:   target, backend, description, precision_requested, precision_executed, threads,
               artifact {folder, size_bytes, files [{name, bytes, sha256}]}, passes [{pass, ...params}],
               runtime {runtime, version, ...}, load {load_s, rss_added_mb}, peak_rss_mb,
               parity {samples, outputs {NAME: {max_abs, mean_abs, cosine_mean, cosine_min, sqnr_db,
                       [top1_agreement, accuracy, reference_accuracy, accuracy_drop]}}},
               latency {p50_ms, p90_ms, p99_ms, mean_ms, min_ms, runs, warmup, rounds, round_p50_ms [per round],
                        inputs (validation samples the timed runs cycle through),
                        distribution_ms [101 quantiles, 0..100 %], ratio_to_reference, round_ratios,
                        ratio_ci95 [lo, hi] (95 % interval of the per-round ratios)},
               verdict {ok, checks [{metric, value, limit, op, ok}], not_applicable [..]},
               build_seconds, meta {backend-specific: layout, converter, ...}, cache ("hit" | "miss" | "off"),
               stage_key (the target stage's cache key)
Beside it, OUT/manifest.json (schema edgecomp.release/1, edgecomp/release.py): the same, less what
changes from run to run.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from edgecomp import __version__

SCHEMA = "edgecomp.report/1"
_VERSIONED = ("numpy", "onnx", "onnxruntime", "torch", "transformers", "optimum", "openvino", "nncf",
              "tensorflow", "onnx2tf", "ai-edge-litert", "tensorrt")


def environment() -> dict[str, Any]:
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "cpu": _cpu_name(), "cores": _cores(), "versions": versions}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def new_report(command: list[str]) -> dict[str, Any]:
    return {"schema": SCHEMA, "edgecomp_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command}


def headline(target: dict[str, Any]) -> str:
    """The one parity figure a person looks at first: top-1 for classifiers, cosine otherwise."""
    outs = target["parity"]["outputs"]
    if any("top1_agreement" in m for m in outs.values()):
        return f"top1 {min(m['top1_agreement'] for m in outs.values()) * 100:.2f}%"
    cos = min(m["cosine_mean"] for m in outs.values())
    mx = max(m["max_abs"] for m in outs.values())
    return f"cos {cos:.4f} / max {mx:.1e}"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in report["targets"]:
        lat = t["latency"]
        rows.append([t["target"], t["precision_executed"], f"{t['artifact']['size_bytes'] / 2**20:.1f} MB", headline(t),
                     f"{lat['p50_ms']:.2f} ms" if lat else "-",
                     f"{lat['ratio_to_reference']:.2f}x" if lat else "-", "PASS" if t["verdict"]["ok"] else "FAIL"])
    return rows


SUMMARY_HEADER = ["target", "precision", "size", "parity", "p50", "vs ref", "verdict"]


def write(report: dict[str, Any], folder: Path) -> None:
    from edgecomp.release import manifest

    (folder / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (folder / "manifest.json").write_text(json.dumps(manifest(report), indent=2, default=_json_default) + "\n")
    (folder / "report.md").write_text(markdown(report))
    from edgecomp import report_html  # imports this module: not at the top

    (folder / "report.html").write_text(report_html.render(report))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def markdown(report: dict[str, Any]) -> str:
    m, d, ref = report["model"], report["data"], report["reference"]
    lines = [f"# edgecomp build: {m['name']}", "",
             f"- edgecomp {report['edgecomp_version']}, {report['created']}, `{' '.join(report['command'])}`",
             f"- data: {d['origin']} ({d['calibration_samples']} calibration, {d['validation_samples']} validation samples)",
             f"- reference: {ref['kind']}, p50 {ref['latency']['p50_ms']:.2f} ms on {ref['runtime']['threads']} threads"
             if ref.get("latency") else f"- reference: {ref['kind']}",
             f"- machine: {report['environment']['cpu']} ({report['environment']['cores']} cores)",
             f"- verdict: **{'PASS' if report['ok'] else 'FAIL'}**", ""]
    if d["synthetic"]:
        lines += [f"> **Warning:** {d['note']}", ""]
    stages = (report.get("cache") or {}).get("stages") or {}
    if report.get("cache", {}).get("root"):
        hits = sorted(k for k, v in stages.items() if v == "hit")
        lines += [f"- cache: {report['cache']['root']}: {len(hits)} of {len(stages)} stages reused"
                  + (f" ({', '.join(hits)})" if hits else ""), ""]
    if report.get("gate"):
        g = report["gate"]
        lines += [f"## Regression gate: {'PASS' if g['ok'] else '**FAIL**'} against `{g['baseline']}` ({g['baseline_created']})", "",
                  "| target | check | baseline | now | change | limit | ok |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['target']} | {c['check']} | {c['baseline']:.5g} | {c['value']:.5g} | {c['change']:+.4g}"
                  f"{' ± ' + format(c['noise'], '.3g') if 'noise' in c else ''} | {c['limit']:g} | {'yes' if c['ok'] else '**no**'} |"
                  for c in g["checks"]]
        if g["new_targets"]:
            lines.append(f"\nnot in the baseline (nothing to compare): {', '.join(g['new_targets'])}")
        lines.append("")
    lines += ["| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(report)]
    for t in report["targets"]:
        lines += ["", f"## {t['target']}", "", t.get("description", ""), "",
                  f"- artifact: `{t['artifact']['folder']}` ({t['artifact']['size_bytes']:,} bytes)",
                  f"- precision requested / executed: {t['precision_requested']} / {t['precision_executed']}",
                  f"- runtime: {t['runtime']['runtime']} {t['runtime']['version']}, {t['threads']} threads",
                  f"- passes: {', '.join(p['pass'] for p in t['passes']) or 'none'}"]
        lines += [line for p in t["passes"] for line in _pass_lines(p)]
        if t["latency"]:
            lat = t["latency"]
            lines.append(f"- latency: p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms "
                         f"({lat['runs']} runs over {lat.get('inputs', 1)} inputs), {lat['ratio_to_reference']:.2f}x the reference; "
                         f"load {t['load']['load_s']:.2f} s")
        lines += ["", "| output | metric | value |", "|---|---|---|"]
        for name, metrics in t["parity"]["outputs"].items():
            lines += [f"| {name} | {k} | {v:.6g} |" for k, v in metrics.items()]
        lines += ["", "| budget | value | limit | ok |", "|---|---|---|---|"]
        lines += [f"| {c['metric']} | {c['value']:.6g} | {c['op']} {c['limit']:g} | {'yes' if c['ok'] else '**no**'} |"
                  for c in t["verdict"]["checks"]]
    return "\n".join(lines) + "\n"


_KEYS = ("params_before", "params_after", "params_ratio", "sparsity", "sparsity_reached", "shares_removed", "layers_factorized", "float_layers", "target_met",
         "weight_bits", "seconds")


def _pass_lines(p: dict[str, Any]) -> list[str]:
    """What a pass did, in one line, and its training loss as a sparkline (the numbers are in report.json)."""
    facts = [f"{k} {p[k]:.4g}" if isinstance(p[k], float) else f"{k} {p[k]}" for k in _KEYS if k in p and p[k] not in (None, [])]
    lines = [f"  - {p['pass']}: {', '.join(facts)}"] if facts else []
    curve = loss_curve(p)
    if curve:
        lines.append(f"  - {p['pass']} loss {curve[0]:.4g} `{sparkline(curve)}` {curve[-1]:.4g} ({len(curve)} points)")
    return lines


def loss_curve(p: dict[str, Any]) -> list[float]:
    """A pass record's training loss: its own curve, its training's or its recovery's. An iterative pass
    trains once per round (a list of summaries): its curve is the rounds' curves end to end."""
    if p.get("loss_curve"):
        return list(p["loss_curve"])
    for key in ("training", "recovery"):
        runs = p.get(key) or []
        runs = [runs] if isinstance(runs, dict) else runs
        curve = [x for r in runs if isinstance(r, dict) for x in r.get("loss_curve") or []]
        if curve:
            return curve
    return []


def sparkline(values: list[float], width: int = 60) -> str:
    """A loss curve in one line of text: every report reader has a plot, no plotting library needed."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) > width:  # mean of equal chunks, so a noisy curve keeps its trend
        v = np.array([c.mean() for c in np.array_split(v, width)])
    lo, hi = float(v.min()), float(v.max())
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[int((x - lo) / (hi - lo) * 7) if hi > lo else 0] for x in v)
