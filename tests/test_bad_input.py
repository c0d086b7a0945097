"""Bad input through the real CLI: exit 2, one readable line on stderr, no traceback, nothing written,
and a previous good output left exactly as it was.

Every bad build below targets the same `--out` as one good build made at the start, so "a previous
good output untouched" is checked on every case: the whole folder around it (the output, and any
staging or swap folder beside it) must be byte-for-byte what it was.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import EDGECOMP, ROOT, run_cli


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones included) with the sha256 of each file's bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="session")
def good_out(tiny_onnx: Path, tiny_samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good build; every bad build below aims at the same folder."""
    out = tmp_path_factory.mktemp("good") / "out"
    r = run_cli("build", tiny_onnx, "-t", "ort-fp32", "--samples", tiny_samples, "--out", out, "--no-bench")
    assert r.returncode == 0, r.stderr
    assert (out / "report.json").is_file() and (out / "ort-fp32" / "model.onnx").is_file()
    return out


@dataclass
class Files:
    """Bad inputs made on disk once per module."""

    dir: Path
    tiny: Path
    samples: Path


@pytest.fixture(scope="module")
def files(tiny_onnx: Path, tiny_samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Files:
    import onnx
    import torch

    d = tmp_path_factory.mktemp("bad")
    data = tiny_onnx.read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (d / "noise.onnx").write_bytes(np.random.default_rng(1).bytes(2048))
    (d / "noise.pt").write_bytes(np.random.default_rng(2).bytes(4096))
    (d / "empty-dir").mkdir()
    (d / "empty-dir" / "README.txt").write_text("no model in here")
    torch.save(torch.nn.Linear(16, 4).state_dict(), d / "state_dict.pt")
    torch.save(_RunsCode(d / "pwned.txt"), d / "evil.pt")
    np.savez(d / "empty.npz", x=np.zeros((0, 16), np.float32))
    np.savez(d / "wrong-name.npz", image=np.zeros((4, 16), np.float32))
    np.savez(d / "wrong-shape.npz", x=np.zeros((4, 15), np.float32))
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "a-file").write_text("I am a file, not a folder")
    (d / "foreign").mkdir()
    (d / "foreign" / "thesis.tex").write_text("precious")
    # an ONNX model whose external data points outside its folder
    (d / "escape").mkdir()
    m = onnx.load(str(tiny_onnx))
    onnx.save_model(m, str(d / "escape" / "model.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (d / "escape" / "w.bin").rename(d / "w.bin")
    m = onnx.load(str(d / "escape" / "model.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.bin"
    (d / "escape" / "model.onnx").write_bytes(m.SerializeToString())
    return Files(d, tiny_onnx, tiny_samples)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


Args = Callable[[Files], list]
# (id, arguments before --out, a phrase the one stderr line must contain)
CASES: list[tuple[str, Args, str]] = [
    ("missing file", lambda f: [f.dir / "nope.onnx", "-t", "ort-fp32"], "no such file or directory"),
    ("directory without a model", lambda f: [f.dir / "empty-dir", "-t", "ort-fp32"], "holds no model"),
    ("truncated onnx", lambda f: [f.dir / "truncated.onnx", "-t", "ort-fp32"], "not a valid ONNX model"),
    ("random bytes as onnx", lambda f: [f.dir / "noise.onnx", "-t", "ort-fp32"], "not a valid ONNX model"),
    ("random bytes as pt", lambda f: [f.dir / "noise.pt", "-t", "ort-fp32", "--input", "x:1x16"], "not a PyTorch file"),
    ("pickle that runs code", lambda f: [f.dir / "evil.pt", "-t", "ort-fp32", "--input", "x:1x16"], "refusing to unpickle"),
    ("state dict only", lambda f: [f.dir / "state_dict.pt", "-t", "ort-fp32", "--input", "x:1x16"], "state dict"),
    ("external data escapes", lambda f: [f.dir / "escape" / "model.onnx", "-t", "ort-fp32"], "outside the model's folder"),
    ("unknown target", lambda f: [f.tiny, "-t", "ort-int4"], "unknown target 'ort-int4'"),
    ("unknown option value", lambda f: [f.tiny, "-t", "ort-fp32", "--pass", "quantize-static:method=foo"],
     "method = 'foo' is not one of"),
    ("unknown option", lambda f: [f.tiny, "-t", "ort-fp32", "--pass", "quantize-static:methd=minmax"], "unknown option 'methd'"),
    ("unknown pass", lambda f: [f.tiny, "-t", "ort-fp32", "--pass", "prune"], "unknown pass 'prune'"),
    ("bad input dtype", lambda f: [f.tiny, "-t", "ort-fp32", "--input", "x:1x16:float99"], "unknown dtype 'float99'"),
    ("threads out of range", lambda f: [f.tiny, "-t", "ort-fp32", "--threads", "0"], "--threads"),
    ("inputs do not match the recipe", lambda f: [f.tiny, "-t", "ort-fp32", "--recipe", "digits"], "do not match"),
    ("unknown recipe", lambda f: [f.tiny, "-t", "ort-fp32", "--recipe", "resnet"], "unknown recipe 'resnet'"),
    ("empty calibration set", lambda f: [f.tiny, "-t", "ort-int8-static", "--samples", f.dir / "empty.npz"], "empty"),
    ("samples file missing", lambda f: [f.tiny, "-t", "ort-fp32", "--samples", f.dir / "nope.npz"], "no such file"),
    ("samples corrupt", lambda f: [f.tiny, "-t", "ort-fp32", "--samples", f.dir / "corrupt.npz"], "not a readable .npz"),
    ("samples name mismatch", lambda f: [f.tiny, "-t", "ort-fp32", "--samples", f.dir / "wrong-name.npz"], "do not match"),
    ("samples shape mismatch", lambda f: [f.tiny, "-t", "ort-fp32", "--samples", f.dir / "wrong-shape.npz"], "has shape"),
]


def _check_failure(r: subprocess.CompletedProcess, phrase: str, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("edgecomp: "), lines[0]
    assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name, args, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_build_into_a_good_output(name: str, args: Args, phrase: str, files: Files, good_out: Path) -> None:
    report = (good_out / "report.json").read_bytes()
    before = snapshot(good_out.parent)
    r = run_cli("build", *args(files), "--out", good_out, timeout=300)
    _check_failure(r, phrase)
    assert (good_out / "report.json").read_bytes() == report
    assert snapshot(good_out.parent) == before  # nothing added beside it, nothing changed inside it
    assert not (files.dir / "pwned.txt").exists()  # no case may ever run a pickle's code


def _unwritable_parent(tmp_path: Path) -> Path:
    """A folder this process cannot create anything in. chmod does not stop root, so as root use /proc."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").mkdir()
    except PermissionError:
        return locked  # chmod works here (not root)
    (locked / "probe").rmdir()
    locked.chmod(0o700)
    return Path("/proc")  # procfs: no new entries, whoever asks


@pytest.mark.parametrize("case", ["output is a file", "output under a file", "unwritable output", "foreign folder"])
def test_bad_output_destination(case: str, files: Files, good_out: Path, tmp_path: Path) -> None:
    before_good = snapshot(good_out.parent)
    if case == "output is a file":
        out, phrase = files.dir / "a-file", "is a file"
    elif case == "output under a file":
        out, phrase = files.dir / "a-file" / "out", "--out"
    elif case == "unwritable output":
        out, phrase = _unwritable_parent(tmp_path) / f"edgecomp-out-{os.getpid()}", "--out"
    else:
        out, phrase = files.dir / "foreign", "not an edgecomp output"
    parent = out.parent if out.parent.is_dir() else files.dir
    before = snapshot(parent) if parent != Path("/proc") else None
    r = run_cli("build", files.tiny, "-t", "ort-fp32", "--samples", files.samples, "--out", out, timeout=300)
    _check_failure(r, phrase)
    if before is not None:
        assert snapshot(parent) == before
    if case == "unwritable output":
        assert not out.exists()
        if parent != Path("/proc"):
            parent.chmod(0o700)
    assert (files.dir / "a-file").read_text() == "I am a file, not a folder"
    assert (files.dir / "foreign" / "thesis.tex").read_text() == "precious"
    assert snapshot(good_out.parent) == before_good


def test_missing_target_option(files: Files, good_out: Path) -> None:
    before = snapshot(good_out.parent)
    r = run_cli("build", files.tiny, "--out", good_out, timeout=60)
    _check_failure(r, "--target")
    assert snapshot(good_out.parent) == before


@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 0.1), (signal.SIGTERM, 1.0)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_build(sig: signal.Signals, delay: float, good_out: Path) -> None:
    """Interrupt a real build of the digits recipe once its staging folder exists: exit 2, nothing left.

    0.1 s after staging the build is still importing (scipy runs `exec` on strings there, which once
    turned the exit status into -SIGINT); 1 s after, it is exporting and calibrating."""
    before = snapshot(good_out.parent)
    report = (good_out / "report.json").read_bytes()
    proc = subprocess.Popen([*EDGECOMP, "build", "digits", "-t", "ort-int8-static", "--out", str(good_out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(f".{good_out.name}.tmp-") for p in good_out.parent.iterdir()):
            assert proc.poll() is None, f"the build ended before it was interrupted: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the build ended before it was interrupted"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    _check_failure(r, "interrupted")
    assert (good_out / "report.json").read_bytes() == report
    assert snapshot(good_out.parent) == before  # no staging leftovers, the previous output as it was
