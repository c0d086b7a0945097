"""report.html: a real build and a real layer diff, rendered and opened in headless Chromium.

The browser is Debian's chromium driven by playwright (never `playwright install`: it downloads a
browser, and this machine is offline). A missing browser is installed with apt when we can, and
is a failure, not a skip, when we cannot: the page is only known to work if a browser shows it.
"""

from __future__ import annotations

import copy
import os
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from edgecomp.diff import diff, first_feed
from edgecomp.pipeline import BuildRequest, build
from edgecomp.report_html import render

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = '<script>alert("t")</script>&amp;'


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get on first use when we are root (a couple of minutes)."""
    if not CHROMIUM.exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found and could not be installed: run `apt-get install chromium` as root")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path, tiny_samples: Path) -> tuple[dict, dict]:
    """A real two-target build and the real per-layer diff of its two artifacts."""
    out = tmp_path_factory.mktemp("html") / "out"
    report = build(BuildRequest(model=str(tiny_onnx), targets=("ort-fp32", "ort-int8"), out=out, samples=tiny_samples))
    d = diff(out / "ort-fp32", out / "ort-int8", first_feed(out / "ort-fp32", tiny_samples))
    return report, d


def open_page(browser: Any, path: Path, html: str) -> tuple[Any, list[str], list[str]]:
    """Load the page from file://; collect console errors/warnings, page errors and every request URL."""
    path.write_text(html)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    return page, problems, requests


def distinct_colours(page: Any, png: bytes) -> int:
    """The screenshot decoded by the browser itself (no imaging library here): colours on a 64x64 grid."""
    import base64

    return page.evaluate("""async (src) => {
        const img = new Image(); img.src = src; await img.decode();
        const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0); const seen = new Set();
        for (let i = 0; i < 64; i++) for (let j = 0; j < 64; j++) {
            const d = g.getImageData(Math.floor(i * img.width / 64), Math.floor(j * img.height / 64), 1, 1).data;
            seen.add(d.join(','));
        }
        return seen.size; }""", "data:image/png;base64," + base64.b64encode(png).decode())


def test_report_html_in_chromium(built: tuple[dict, dict], browser: Any, tmp_path: Path) -> None:
    report, d = built
    page, problems, requests = open_page(browser, tmp_path / "report.html", render(report, {"ort-int8": d}))
    assert problems == []
    assert requests == [(tmp_path / "report.html").as_uri()], "the page fetched something besides itself"

    rows = {r.locator("td").first.inner_text(): r.locator("td").last.inner_text()
            for r in page.locator("#summary tr.target").all()}
    assert rows == {t["target"]: "PASS" if t["verdict"]["ok"] else "FAIL" for t in report["targets"]}

    charts = page.locator("svg.chart")
    assert charts.count() == 3  # latency boxes, accuracy-vs-latency scatter, the diff's SQNR line
    assert charts.nth(0).locator("g.box").count() == 3  # the reference and both targets
    assert charts.nth(1).locator("g.pt").count() == 2
    assert charts.nth(2).locator("circle.pt").count() == len(d["tensors"])
    assert charts.nth(2).locator("line.mark").count() == (d["first_jump"] is not None)
    for i in range(3):
        box = charts.nth(i).bounding_box()
        assert box and box["width"] > 500 and box["height"] > 100

    shot = tmp_path / "report.png"
    png = page.screenshot(path=str(shot), full_page=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1100 and height > 900  # the full page, longer than one screen
    assert distinct_colours(page, png) >= 8  # text, PASS/FAIL colours, chart strokes: not a blank page
    page.close()


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_hostile_strings_are_escaped(built: tuple[dict, dict], browser: Any, tmp_path: Path) -> None:
    report, d = copy.deepcopy(built)
    report["targets"][0]["target"] = HOSTILE
    report["command"] = ["edgecomp", "<img src=x onerror=alert(1)>"]
    d["tensors"][0]["tensor"] = "</title><script>x()</script>"
    d["first_jump"] = d["tensors"][0]["tensor"]
    html = render(report, {HOSTILE: d})

    parsed = _Tags()
    parsed.feed(html)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert HOSTILE in "".join(parsed.text)  # shown as text, & included, not dropped

    page, problems, _ = open_page(browser, tmp_path / "hostile.html", html)
    assert problems == []
    assert page.locator("script, img").count() == 0
    assert page.locator("#summary tr.target td").first.inner_text() == HOSTILE
    assert "</title><script>x()</script>" in page.locator("svg.chart").nth(2).inner_html().replace("&lt;", "<").replace("&gt;", ">")
    page.close()


def test_old_and_unbenched_reports_render(built: tuple[dict, dict], browser: Any, tmp_path: Path) -> None:
    """A report from before `distribution_ms`, and one whose bench was skipped, still make a page."""
    old = copy.deepcopy(built[0])
    for lat in [old["reference"]["latency"], *(t["latency"] for t in old["targets"])]:
        for key in ("distribution_ms", "ratio_ci95", "min_ms"):
            lat.pop(key, None)
    fail = old["targets"][1]["verdict"]  # the tiny build passes; a failed budget must show as well
    fail["ok"] = fail["checks"][0]["ok"] = False
    unbenched = copy.deepcopy(built[0])
    unbenched["reference"].pop("latency")
    for t in unbenched["targets"]:
        t["latency"] = None
    unbenched["data"].update(synthetic=True, note="random inputs <b>")

    page, problems, _ = open_page(browser, tmp_path / "old.html", render(old))
    assert problems == []
    assert page.locator("svg.chart").count() == 2 and page.locator("g.box rect").count() == 0  # p50/p90/p99 only: no box
    assert page.locator("g.box").count() == 3 and page.locator("g.pt.fail").count() == 1
    verdicts = page.locator("#summary tr.target td:last-child")
    assert [v.inner_text() for v in verdicts.all()] == ["PASS", "FAIL"]
    colour = "el => getComputedStyle(el).backgroundColor"
    assert [v.evaluate(colour) for v in verdicts.all()] == ["rgb(26, 127, 55)", "rgb(207, 34, 46)"]

    page, problems, _ = open_page(browser, tmp_path / "unbenched.html", render(unbenched))
    assert problems == []
    assert page.locator("svg.chart").count() == 0
    assert "No latency was measured" in page.inner_text("body")
    assert "random inputs <b>" in page.locator(".warn").inner_text()
    assert [c.inner_text() for c in page.locator("#summary tr.target td:nth-child(6)").all()] == ["-", "-"]
    page.close()


def test_training_loss_curve_is_drawn_once_per_pass(built: tuple[dict, dict]) -> None:
    """A build-level pass trains once for all targets: one chart, titled with every target it fed."""
    report = copy.deepcopy(built[0])
    for t in report["targets"]:
        t["passes"].insert(0, {"pass": "prune-structured", "recovery": {"loss_curve": [3.0, 2.5, 2.0, 1.8]}})
    report["targets"][1]["passes"].append({"pass": "qat", "training": {"loss_curve": [1.0, 0.5]}})
    parsed = _Tags()
    parsed.feed(render(report))
    text = "".join(parsed.text)
    assert parsed.tags.count("svg") == 4  # boxes, scatter, two loss curves
    assert "ort-fp32, ort-int8: prune-structured training loss (4 points)" in text
    assert "ort-int8: qat training loss (2 points)" in text
