#!/usr/bin/env python
"""What the stage cache saves: one build file released twice into a fresh cache, then once more clean.

Prints one JSON object: the wall time of the first release (every stage made), of the second
(nothing changed: every stage read back), their ratio, whether the two manifests agree apart from
`created`, and whether a third, clean release (`--no-cache`) gives the same sha256 for every file.

    .venv/bin/python tools/bench_release.py [tools/release/edgecomp.toml] [--work build/bench-release]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def release(build_file: Path, out: Path, *args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgecomp", "release", str(build_file), "--out", str(out), *args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"release failed ({r.returncode}): {r.stderr.strip()}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build_file", type=Path, nargs="?", default=Path("tools/release/edgecomp.toml"))
    ap.add_argument("--work", type=Path, default=Path("build/bench-release"))
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    cache = ["--cache-dir", str(args.work / "cache")]
    first = release(args.build_file, args.work / "out", *cache)
    m1 = json.loads((args.work / "out" / "manifest.json").read_text())
    second = release(args.build_file, args.work / "out", *cache)
    m2 = json.loads((args.work / "out" / "manifest.json").read_text())
    release(args.build_file, args.work / "clean", "--no-cache", "--no-bench")
    m3 = json.loads((args.work / "clean" / "manifest.json").read_text())

    def files(m: dict) -> dict:
        return {t["target"]: {f["name"]: f["sha256"] for f in t["files"]} for t in m["targets"]}

    same = {k: v for k, v in m1.items() if k != "created"} == {k: v for k, v in m2.items() if k != "created"}
    print(json.dumps({"build_file": str(args.build_file), "targets": [t["target"] for t in m1["targets"]],
                      "first_s": round(first, 2), "second_s": round(second, 2), "second_over_first": round(second / first, 4),
                      "manifest_identical_but_created": same, "clean_release_same_sha256": files(m1) == files(m3),
                      "machine": m1["machine"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
