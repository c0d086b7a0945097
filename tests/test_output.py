"""Atomic output folders: a failed build leaves nothing, a good one replaces the previous output whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgecomp.errors import UsageError
from edgecomp.output import MARKER, atomic_dir, check_destination


def _leftovers(parent: Path, out: Path) -> list[str]:
    """Staging (`.OUT.tmp-*`) or swap (`.OUT.old-*`) folders left beside the output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def _previous_output(out: Path) -> Path:
    out.mkdir()
    (out / MARKER).write_text('{"previous": true}')
    (out / "old-target").mkdir()
    (out / "old-target" / "model.onnx").write_bytes(b"old")
    return out


def test_success_moves_the_stage_into_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.tmp-")
        assert not out.exists()  # nothing visible until the build is complete
        (stage / MARKER).write_text("{}")
    assert (out / MARKER).read_text() == "{}"
    assert _leftovers(tmp_path, out) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        with atomic_dir(out) as stage:
            (stage / "half-written.onnx").write_bytes(b"partial")
            raise exc
    assert not out.exists()
    assert _leftovers(tmp_path, out) == []


def test_exception_keeps_the_previous_output(tmp_path: Path) -> None:
    out = _previous_output(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as stage:
            (stage / MARKER).write_text("{}")
            raise RuntimeError("boom")
    assert (out / MARKER).read_text() == '{"previous": true}'
    assert (out / "old-target" / "model.onnx").read_bytes() == b"old"
    assert _leftovers(tmp_path, out) == []


def test_success_replaces_a_previous_edgecomp_output(tmp_path: Path) -> None:
    out = _previous_output(tmp_path / "out")
    with atomic_dir(out) as stage:
        (stage / MARKER).write_text('{"new": true}')
        (stage / "new-target").mkdir()
    assert (out / MARKER).read_text() == '{"new": true}'
    assert {p.name for p in out.iterdir()} == {MARKER, "new-target"}  # nothing of the old one survives
    assert _leftovers(tmp_path, out) == []


def test_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UsageError, match="not an edgecomp output"):
        with atomic_dir(out):
            pytest.fail("the body must not run")
    assert (out / "holiday.jpg").read_bytes() == b"precious"
    assert _leftovers(tmp_path, out) == []


def test_accepts_an_empty_existing_folder(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    with atomic_dir(out) as stage:
        (stage / MARKER).write_text("{}")
    assert (out / MARKER).is_file()


def test_refuses_a_file_as_destination(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder")
    with pytest.raises(UsageError, match="is a file"):
        check_destination(out)
    assert out.read_text() == "not a folder"


def test_refuses_a_destination_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="--out"):
        check_destination(blocker / "out")


def test_creates_missing_parent_folders(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with atomic_dir(out) as stage:
        (stage / MARKER).write_text("{}")
    assert (out / MARKER).is_file()


def test_a_killed_build_is_swept_by_the_next(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abc123"
    (stale / "ort-fp32").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{os.getpid()}-def456"  # a build still running in this process: left alone
    live.mkdir()
    with atomic_dir(tmp_path / "out") as stage:
        (stage / "report.json").write_text("{}")
    assert not stale.exists() and live.is_dir() and (tmp_path / "out" / "report.json").is_file()


def test_a_swallowed_interrupt_still_stops_the_commit(tmp_path: Path) -> None:
    """A library that catches the KeyboardInterrupt raised by Ctrl-C cannot make the build move into place."""
    import edgecomp.output as output

    out = tmp_path / "out"
    try:
        with pytest.raises(KeyboardInterrupt):
            with output.atomic_dir(out) as stage:
                (stage / "report.json").write_text("{}")
                try:
                    output.on_signal(2, None)
                except KeyboardInterrupt:
                    pass  # swallowed, as some imports do
        assert not out.exists() and list(tmp_path.iterdir()) == []
    finally:
        output._signalled.clear()
