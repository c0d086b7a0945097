"""`report.html`: the build report as one self-contained page, charts drawn as inline SVG.

The page is read on machines without network, so nothing is fetched: no script, no font, no
image, no stylesheet from elsewhere (a Content-Security-Policy says so to the browser). Every
string that comes from the report is escaped; target, tensor and command text is user input.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecomp.report import headline, loss_curve

PASS_C, FAIL_C, REF_C = "#1a7f37", "#cf222e", "#6e7781"
PALETTE = ("#0969da", "#8250df", "#bf8700", "#1b7c83", "#bc4c00", "#a40e26", "#4d2d00", "#116329")
W = 760  # chart width in SVG units; charts scale down to the page width
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;padding:0 16px;color:#1f2328}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #d0d7de}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.PASS{color:#fff;background:#1a7f37;font-weight:600}.FAIL{color:#fff;background:#cf222e;font-weight:600}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;font-weight:600}
.ref td{color:#57606a}dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px}dt{font-weight:600}
dd{margin:0;overflow-wrap:anywhere}code{font-size:12px;background:#f6f8fa;padding:1px 4px}
svg.chart{width:100%;height:auto;max-width:760px;display:block;margin:8px 0 16px}
svg text{font:11px system-ui,sans-serif;fill:#1f2328}.small{font-size:12px;color:#57606a}
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


# ---- scales and the frame every chart shares ----

@dataclass
class _Scale:
    """Maps data [lo, hi] to pixels [a, b], linearly or by log10 (latency spans decades)."""
    lo: float
    hi: float
    a: float
    b: float
    log: bool = False
    integer: bool = False  # an index axis: no tick between two tensors

    def __call__(self, v: float) -> float:
        f = math.log10 if self.log else float
        lo, hi = f(self.lo), f(self.hi)
        return self.a + (f(v) - lo) / ((hi - lo) or 1.0) * (self.b - self.a)

    def step(self) -> float:
        raw = (self.hi - self.lo) / 5 or 1.0
        step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
        return max(step, 1.0) if self.integer else step

    def label(self, v: float) -> str:
        """As many decimals as the tick step needs: 0.9975 and 0.998 must not both read 1."""
        return _num(v) if self.log else f"{v:.{max(0, -math.floor(math.log10(self.step())))}f}"

    def ticks(self) -> list[float]:
        """1-2-5 per decade on a log axis; within less than a decade, evenly stepped ticks instead."""
        if self.log:
            k0, k1 = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            mults = (1,) if k1 - k0 > 4 else (1, 2, 5)
            ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in mults if self.lo <= m * 10.0**k <= self.hi]
            if len(ticks) >= 3:
                return ticks
        step = self.step()
        return [float(x) for x in np.arange(math.ceil(self.lo / step) * step, self.hi + step * 1e-9, step)]


def _domain(values: list[float], log: bool) -> tuple[float, float]:
    """A padded [lo, hi] around the data that is never empty (all-equal values still get an axis)."""
    lo, hi = min(values), max(values)
    if log:
        lo, hi = max(lo, 1e-6), max(hi, 1e-6)
        return lo / 1.5, hi * 1.5
    pad = (hi - lo) * 0.08 or abs(hi) * 0.01 or 1.0
    return lo - pad, hi + pad


def _frame(h: int, xs: _Scale, ys: _Scale | None, title: str, xlabel: str, ylabel: str, body: list[str],
           ytick_text: dict[float, str] | None = None) -> str:
    """One <svg class="chart">: title, grid, ticks, axis labels, then the chart's own marks."""
    out = [f'<svg class="chart" viewBox="0 0 {W} {h}" role="img" aria-label="{_e(title)}">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="600">{_e(title)}</text>']
    y0, y1 = (ys.a, ys.b) if ys else (h - 40, 28)
    for t in xs.ticks():
        x = xs(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1}" y2="{y0}" stroke="#eaeef2"/>'
                   f'<text x="{x:.1f}" y="{y0 + 14}" text-anchor="middle">{xs.label(t)}</text>')
    if ys:
        labels = ytick_text or {}
        near = [ys(t) for t in labels]  # a named tick (e.g. "exact") hides numeric ticks it would overlap
        for t in [*(t for t in ys.ticks() if all(abs(ys(t) - y) > 12 for y in near)), *labels]:
            y = ys(t)
            out.append(f'<line x1="{xs.a}" x2="{xs.b}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>'
                       f'<text x="{xs.a - 5}" y="{y + 4:.1f}" text-anchor="end">{_e(labels.get(t, ys.label(t)))}</text>')
        out.append(f'<text transform="translate(14 {(y0 + y1) / 2:.0f}) rotate(-90)" text-anchor="middle">{_e(ylabel)}</text>')
    out.append(f'<rect x="{xs.a}" y="{y1}" width="{xs.b - xs.a}" height="{y0 - y1}" fill="none" stroke="#8c959f"/>')
    out.append(f'<text x="{(xs.a + xs.b) / 2}" y="{h - 6}" text-anchor="middle">{_e(xlabel)}</text>')
    return "\n".join([*out, *body, "</svg>"])


# ---- the three chart kinds ----

def _svg_box(rows: list[tuple[str, dict[str, float], str]], title: str) -> str:
    """Horizontal box plots on a log ms axis: box p25-p75, median, whisker min-p99, dot at max.

    A row without quantiles (older report) has only min/p50/p90/p99: drawn as a dashed whisker.
    """
    h = 60 + 34 * len(rows)
    xs = _Scale(*_domain([v for _, s, _ in rows for v in s.values()], log=True), 170, W - 20, log=True)
    body = []
    for i, (name, s, colour) in enumerate(rows):
        y = 40 + 34 * i
        tip = _e(f"{name}: " + ", ".join(f"{k} {v:.4g} ms" for k, v in s.items()))
        dash = "" if "p25" in s else ' stroke-dasharray="4 3"'
        body.append(f'<g class="box"><title>{tip}</title>'
                    f'<text x="164" y="{y + 4}" text-anchor="end">{_e(name)}</text>'
                    f'<line x1="{xs(s["min"]):.1f}" x2="{xs(s["p99"]):.1f}" y1="{y}" y2="{y}" stroke="{colour}"{dash}/>')
        if "p25" in s:
            body.append(f'<rect x="{xs(s["p25"]):.1f}" y="{y - 10}" width="{max(xs(s["p75"]) - xs(s["p25"]), 1):.1f}" '
                        f'height="20" fill="{colour}" fill-opacity="0.25" stroke="{colour}"/>')
        if "max" in s:
            body.append(f'<circle cx="{xs(s["max"]):.1f}" cy="{y}" r="3" fill="none" stroke="{colour}"/>')
        for k, half in (("p50", 11), ("p90", 5)):
            body.append(f'<line x1="{xs(s[k]):.1f}" x2="{xs(s[k]):.1f}" y1="{y - half}" y2="{y + half}" stroke="{colour}" stroke-width="2"/>')
        body.append("</g>")
    return _frame(h, xs, None, title, "latency per run, ms (log scale)", "", body)


def _svg_scatter(points: list[tuple[str, float, float, bool]], title: str, xlabel: str, ylabel: str,
                 vline: tuple[float, str] | None = None, ymax: float | None = None) -> str:
    """Labelled points on log x; FAIL points are red crosses, PASS points green dots.
    `ymax` caps the padded axis where the metric cannot go (100 %, cosine 1)."""
    h = 340
    xv = [p[1] for p in points] + ([vline[0]] if vline else [])
    xs = _Scale(*_domain(xv, log=True), 70, W - 20, log=True)
    lo, hi = _domain([p[2] for p in points], log=False)
    ys = _Scale(lo, min(hi, ymax) if ymax is not None and lo < ymax else hi, h - 40, 28)
    body, placed = [], []
    if vline:
        x = xs(vline[0])
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="28" y2="{h - 40}" stroke="{REF_C}" stroke-dasharray="5 4"/>'
                    f'<text x="{x - 4:.1f}" y="{h - 46}" fill="{REF_C}" text-anchor="end">{_e(vline[1])}</text>')
    for name, x, y, ok in points:
        px, py = xs(x), ys(y)
        tip = f"<title>{_e(f'{name}: {x:.4g}, {y:.6g}, ' + ('PASS' if ok else 'FAIL'))}</title>"
        if ok:
            body.append(f'<g class="pt pass">{tip}<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{PASS_C}"/></g>')
        else:
            body.append(f'<g class="pt fail">{tip}<path d="M{px - 5:.1f} {py - 5:.1f}l10 10m0 -10l-10 10" '
                        f'stroke="{FAIL_C}" stroke-width="3"/></g>')
        lx, ly, anchor = _place_label(px, py, len(name) * 6.2, placed)
        body.append(f'<text x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}">{_e(name)}</text>')
    body.append(f'<circle cx="{W - 120}" cy="12" r="5" fill="{PASS_C}"/><text x="{W - 110}" y="16">PASS</text>'
                f'<path d="M{W - 65} 7l10 10m0 -10l-10 10" stroke="{FAIL_C}" stroke-width="3"/><text x="{W - 50}" y="16">FAIL</text>')
    return _frame(h, xs, ys, title, xlabel, ylabel, body)


def _place_label(x: float, y: float, width: float, placed: list[tuple[float, float, float, float]]) -> tuple[float, float, str]:
    """First of right/left/above/below of the point whose box overlaps no label placed before."""
    for dx, dy, anchor in ((8, 4, "start"), (-8, 4, "end"), (0, -10, "middle"), (0, 17, "middle"), (8, 17, "start"), (8, -9, "start")):
        left = x + dx - {"start": 0, "end": width, "middle": width / 2}[anchor]
        box = (left, y + dy - 10, left + width, y + dy + 2)
        if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
            break
    placed.append(box)
    return x + dx, y + dy, anchor


def _svg_line(values: list[float], title: str, xlabel: str, ylabel: str, names: list[str] | None = None,
              marks: dict[int, str] | None = None, cap: str | None = None, include: tuple[float, ...] = ()) -> str:
    """A line over index; with `names`, one marker per point (hover shows it); `marks` draws labelled
    vertical lines; with `cap`, +inf values sit on a top gridline labelled `cap` (e.g. "exact");
    `include` widens the y axis to those values (0 dB, so a small SQNR looks small)."""
    h = 300
    finite = [v for v in values if v is not None and math.isfinite(v)] or [0.0]
    lo, hi = _domain(finite + list(include), log=False)
    top = hi + (hi - lo) * 0.12 if cap and any(v == math.inf for v in values) else None
    xs = _Scale(0, max(len(values) - 1, 1), 70, W - 20, integer=True)
    ys = _Scale(lo, hi if top is None else top, h - 40, 28)
    pts = [(xs(i), ys(top if v == math.inf else v)) for i, v in enumerate(values)
           if v is not None and (math.isfinite(v) or (v == math.inf and top is not None))]
    body = [f'<polyline fill="none" stroke="{PALETTE[0]}" stroke-width="1.5" points="'
            + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>']
    for i, label in (marks or {}).items():
        x = xs(i)
        body.append(f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="28" y2="{h - 40}" stroke="{FAIL_C}" stroke-dasharray="5 3"/>'
                    f'<text x="{x + (4 if x < W / 2 else -4):.1f}" y="{h - 46}" fill="{FAIL_C}" '
                    f'text-anchor="{"start" if x < W / 2 else "end"}">{_e(label)}</text>')
    if names:
        for i, (name, v) in enumerate(zip(names, values)):
            if v is None or math.isnan(v) or v == -math.inf:
                continue
            y, exact = (ys(top), True) if v == math.inf else (ys(v), False)
            colour = FAIL_C if i in (marks or {}) else PALETTE[0]
            body.append(f'<circle class="pt" cx="{xs(i):.1f}" cy="{y:.1f}" r="3.5" fill="{"#fff" if exact else colour}" '
                        f'stroke="{colour}"><title>{_e(f"{i}: {name}: " + ("exact" if exact else f"{v:.4g}"))}</title></circle>')
    return _frame(h, xs, ys, title, xlabel, ylabel, body, {top: cap} if top is not None else None)


# ---- report sections ----

def _parity_value(t: dict[str, Any]) -> tuple[str, float]:
    """The headline figure as a number: top-1 agreement for classifiers, else the worst cosine mean."""
    outs = t["parity"]["outputs"].values()
    if any("top1_agreement" in m for m in outs):
        return "top-1 agreement %", 100 * min(m["top1_agreement"] for m in outs if "top1_agreement" in m)
    return "cosine mean", min(m["cosine_mean"] for m in outs)


def _box_stats(lat: dict[str, Any]) -> dict[str, float]:
    """Quantiles from `distribution_ms` when the report has them, else the few percentiles it has."""
    q = lat.get("distribution_ms")
    if q and len(q) >= 2:
        at = np.linspace(0, 100, len(q))
        return {k: float(np.interp(p, at, q)) for k, p in
                (("min", 0), ("p25", 25), ("p50", 50), ("p75", 75), ("p90", 90), ("p99", 99), ("max", 100))}
    s = {"p50": float(lat["p50_ms"])}
    s["p90"] = float(lat.get("p90_ms") or s["p50"])
    s["p99"] = float(lat.get("p99_ms") or s["p90"])
    s["min"] = float(lat.get("min_ms") or s["p50"])
    return s


def _ratio(lat: dict[str, Any]) -> str:
    s = f"{lat['ratio_to_reference']:.2f}x" if lat.get("ratio_to_reference") is not None else "-"
    ci = lat.get("ratio_ci95")
    return s + (f" <span class=small>[{ci[0]:.2f}, {ci[1]:.2f}]</span>" if ci else "")


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} kB" if n >= 1024 else f"{n} B"


def _summary(report: dict[str, Any]) -> str:
    """The table a reader decides on: one row per target, the reference's latency first for scale."""
    head = ["target", "backend", "precision", "size", "parity", "p50 ms", "p90 ms", "p99 ms", "vs reference [95 % CI]", "verdict"]
    rows = ["<table id=summary><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    ref = report.get("reference") or {}
    if ref.get("latency"):
        lat = ref["latency"]
        rows.append(f"<tr class=ref><td>reference</td><td>{_e(ref.get('kind', ''))}</td><td>fp32</td><td></td><td></td>"
                    + "".join(f"<td class=n>{lat[k]:.3f}</td>" for k in ("p50_ms", "p90_ms", "p99_ms")) + "<td class=n>1.00x</td><td></td></tr>")
    for t in report["targets"]:
        lat, ok = t.get("latency"), t["verdict"]["ok"]
        cells = "".join(f"<td class=n>{lat[k]:.3f}</td>" for k in ("p50_ms", "p90_ms", "p99_ms")) if lat else "<td>-</td>" * 3
        failed = ", ".join(c["metric"] for c in t["verdict"]["checks"] if not c["ok"])
        rows.append(f"<tr class=target><td>{_e(t['target'])}</td><td>{_e(t.get('backend', ''))}</td>"
                    f"<td>{_e(t['precision_executed'])}</td><td class=n>{_size(t['artifact']['size_bytes'])}</td>"
                    f"<td>{_e(headline(t))}</td>{cells}<td class=n>{_ratio(lat) if lat else '-'}</td>"
                    f"<td class={'PASS' if ok else 'FAIL'} title=\"{_e(failed)}\">{'PASS' if ok else 'FAIL'}</td></tr>")
    return "\n".join([*rows, "</table>"])


def _metadata(report: dict[str, Any]) -> str:
    m, d, env = report["model"], report["data"], report.get("environment", {})
    prov = m.get("provenance", {})
    ref = report.get("reference") or {}
    items = [("model", f"{m['name']} ({prov.get('format', '?')}: {prov.get('recipe') or prov.get('path', '')})"),
             ("source ONNX sha256", m.get("source_onnx_sha256", "")),
             ("data", f"{d['origin']}: {d.get('calibration_samples')} calibration, {d.get('validation_samples')} validation samples"),
             ("reference", f"{ref.get('kind', '?')}, {ref.get('runtime', {}).get('threads', '?')} threads"),
             ("machine", f"{env.get('cpu', '?')} ({env.get('cores', '?')} cores), {env.get('platform', '')}, python {env.get('python', '')}"),
             ("versions", ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())),
             ("seeds", ", ".join(f"{k} {v}" for k, v in report.get("seeds", {}).items())),
             ("created", f"{report['created']} by edgecomp {report['edgecomp_version']}")]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    cmd = _e(" ".join(report.get("command") or ["(not recorded)"]))
    warn = (f"<p class=warn>Warning: synthetic data. Parity was measured on random inputs, not real samples; "
            f"accuracy figures mean nothing. {_e(d.get('note', ''))}</p>") if d.get("synthetic") else ""
    return f"{warn}<dl>{dl}<dt>command</dt><dd><code>{cmd}</code></dd></dl>"


def _target_detail(t: dict[str, Any]) -> str:
    """What report.md says per target: artifact, passes, every parity metric, every budget check."""
    ok = t["verdict"]["ok"]
    rt, art = t.get("runtime", {}), t["artifact"]
    passes = "".join(f"<li><b>{_e(p['pass'])}</b> <span class=small>"
                     + _e(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items()
                                    if k != "pass" and isinstance(v, (int, float, str)) and v != ""))
                     + "</span></li>" for p in t.get("passes", []))
    parity = "".join(f"<tr><td>{_e(o)}</td><td>{_e(k)}</td><td class=n>{v:.6g}</td></tr>"
                     for o, ms in t["parity"]["outputs"].items() for k, v in ms.items() if isinstance(v, (int, float)))
    checks = "".join(f"<tr><td>{_e(c['metric'])}</td><td class=n>{c['value']:.6g}</td><td>{_e(c['op'])} {c['limit']:g}</td>"
                     f"<td class={'PASS' if c['ok'] else 'FAIL'}>{'yes' if c['ok'] else 'no'}</td></tr>" for c in t["verdict"]["checks"])
    na = t["verdict"].get("not_applicable") or []
    return (f"<h3>{_e(t['target'])} <span class={'PASS' if ok else 'FAIL'}>&nbsp;{'PASS' if ok else 'FAIL'}&nbsp;</span></h3>"
            f"<p>{_e(t.get('description', ''))}<br><span class=small>artifact <code>{_e(art['folder'])}</code> "
            f"({art['size_bytes']:,} bytes); precision {_e(t.get('precision_requested'))} requested, "
            f"{_e(t['precision_executed'])} executed; {_e(rt.get('runtime', ''))} {_e(rt.get('version', ''))}, "
            f"{_e(t.get('threads', '?'))} threads</span></p><ul>{passes}</ul>"
            f"<table><tr><th>output</th><th>metric</th><th>value</th></tr>{parity}</table>"
            f"<table><tr><th>budget</th><th>value</th><th>limit</th><th>ok</th></tr>{checks}</table>"
            + (f"<p class=small>not applicable: {_e(', '.join(map(str, na)))}</p>" if na else ""))


def _latency_charts(report: dict[str, Any]) -> list[str]:
    timed = [t for t in report["targets"] if t.get("latency")]
    ref = (report.get("reference") or {}).get("latency")
    rows = ([("reference", _box_stats(ref), REF_C)] if ref else []) + \
        [(t["target"], _box_stats(t["latency"]), PALETTE[i % len(PALETTE)]) for i, t in enumerate(timed)]
    if not rows:
        return ["<p class=small>No latency was measured (bench skipped).</p>"]
    charts = [_svg_box(rows, "Latency distribution per target"),
              "<p class=small>box p25 to p75, long tick p50, short tick p90, whisker min to p99, circle max; "
              "dashed: only p50/p90/p99 recorded</p>"]
    if timed:
        metric = _parity_value(timed[0])[0]
        pts = [(t["target"], t["latency"]["p50_ms"], _parity_value(t)[1], t["verdict"]["ok"]) for t in timed]
        charts.append(_svg_scatter(pts, f"Accuracy vs latency ({metric} vs p50)", "p50 latency, ms (log scale)", metric,
                                   (ref["p50_ms"], "reference p50") if ref else None, 100.0 if "%" in metric else 1.0))
    return charts


def _diff_chart(name: str, d: dict[str, Any]) -> str:
    rows = d["tensors"]
    names = [r["tensor"] for r in rows]
    vals = [None if r.get("sqnr_db") is None else float(r["sqnr_db"]) for r in rows]
    jump = d.get("first_jump")
    marks = {names.index(jump): f"first jump: {jump}"} if jump in names else {}
    note = (f"<p class=small>{_e(d.get('a', ''))} vs {_e(d.get('b', ''))}: {d.get('matched', len(rows))} tensors matched; "
            f"jumps: {_e(', '.join(d.get('jumps') or []) or 'none')}</p>")
    return note + _svg_line(vals, f"{name}: SQNR per tensor, graph order", "tensor index (graph order)", "SQNR dB",
                            names, marks, cap="exact", include=(0.0,))


def _loss_curves(targets: list[dict[str, Any]]) -> list[str]:
    """Every training loss a pass recorded (`loss_curve`, as report.md reads it); a build-level
    pass shared by several targets trained once, so one curve is drawn once, titled with all of them."""
    curves: dict[tuple[str, tuple[float, ...]], list[str]] = {}
    for t in targets:
        for p in t.get("passes", []):
            curve = loss_curve(p)
            if curve:
                curves.setdefault((p["pass"], tuple(curve)), []).append(t["target"])
    charts = []
    for (name, curve), owners in curves.items():
        v = np.asarray(curve, dtype=float)
        if len(v) > 1000:  # chunk means keep the trend and a small page
            v = np.array([c.mean() for c in np.array_split(v, 1000)])
        charts.append(_svg_line(v.tolist(), f"{', '.join(owners)}: {name} training loss ({len(curve)} points)",
                                "point of the curve", "loss"))
    return charts


def _gate(g: dict[str, Any]) -> str:
    """The regression gate against the baseline release, one row per check (as report.md)."""
    rows = "".join(
        f"<tr><td>{_e(c['target'])}</td><td>{_e(c['check'])}</td><td class=n>{c['baseline']:.5g}</td>"
        f"<td class=n>{c['value']:.5g}</td><td class=n>{c['change']:+.4g}"
        + (f" &plusmn; {c['noise']:.3g}" if "noise" in c else "")
        + f"</td><td class=n>{c['limit']:g}</td><td class={'PASS' if c['ok'] else 'FAIL'}>{'yes' if c['ok'] else 'no'}</td></tr>"
        for c in g["checks"])
    new = f"<p class=small>not in the baseline: {_e(', '.join(g['new_targets']))}</p>" if g.get("new_targets") else ""
    return (f"<h2>Regression gate <span class={'PASS' if g['ok'] else 'FAIL'}>&nbsp;{'PASS' if g['ok'] else 'FAIL'}&nbsp;</span></h2>"
            f"<p class=small>against <code>{_e(g['baseline'])}</code> ({_e(g.get('baseline_created'))})</p>"
            "<table><tr><th>target</th><th>check</th><th>baseline</th><th>now</th><th>change</th><th>limit</th><th>ok</th></tr>"
            f"{rows}</table>{new}")


def render(report: dict[str, Any], diffs: dict[str, dict[str, Any]] | None = None) -> str:
    """The whole page as one string; `diffs` maps a target name to an `edgecomp.diff.diff()` result."""
    diffs = dict(diffs or {})
    for t in report["targets"]:
        if t.get("diff") and t["target"] not in diffs:
            diffs[t["target"]] = t["diff"]
    ok = report.get("ok", all(t["verdict"]["ok"] for t in report["targets"]))
    parts = [f"<h1>edgecomp build: {_e(report['model']['name'])} <span class={'PASS' if ok else 'FAIL'}>"
             f"&nbsp;{'PASS' if ok else 'FAIL'}&nbsp;</span></h1>", _metadata(report),
             "<h2>Summary</h2>", _summary(report)]
    if report.get("gate"):
        parts.append(_gate(report["gate"]))
    parts += ["<h2>Latency and parity</h2>", *_latency_charts(report)]
    if diffs:
        parts += ["<h2>Per-layer error</h2>", *(_diff_chart(n, d) for n, d in diffs.items() if d.get("tensors"))]
    losses = _loss_curves(report["targets"])
    if losses:
        parts += ["<h2>Training loss</h2>", *losses]
    parts += ["<h2>Targets</h2>", *(_target_detail(t) for t in report["targets"])]
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name=viewport content="width=device-width,initial-scale=1"><link rel=icon href="data:,">'
            f"<title>edgecomp report: {_e(report['model']['name'])}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
