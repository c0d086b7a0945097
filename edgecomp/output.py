"""Atomic output folders: build into a hidden sibling, move into place only when complete.

A failed or interrupted build leaves nothing behind and never touches a previous good output.
The sibling lives on the same filesystem as the destination, so the final move is a rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgecomp.errors import UsageError

MARKER = "report.json"  # an existing folder is replaced only if edgecomp wrote it
_signalled: list[int] = []  # SIGINT / SIGTERM received by this process (see `on_signal`)


def on_signal(signum: int, frame: object) -> None:
    """Handler for SIGINT and SIGTERM: remember the signal, then interrupt. A library that swallows the
    KeyboardInterrupt (some catch everything around their imports) cannot make the build commit: the
    staging folder is only moved into place while no signal has arrived."""
    _signalled.append(signum)
    raise KeyboardInterrupt


def check_destination(out: Path) -> None:
    """Everything that can be known about the destination before any work starts."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UsageError(f"--out {out}: exists, is not empty, and is not an edgecomp output; choose another folder")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create its parent folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: folder {parent} is not writable")


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh staging folder; on normal exit it replaces `out`, on any exception it is removed."""
    check_destination(out)
    out = out.resolve()
    _sweep_stale(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write in {out.parent} ({e.strerror})") from None
    stage.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield stage
        if _signalled:
            raise KeyboardInterrupt
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rename(out, old / "prev")
    os.rename(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sweep_stale(out: Path) -> None:
    """A build killed outright (SIGKILL, power loss) cannot clean up after itself; the next build into
    the same place does. Staging folders carry their process id, and only those of dead processes go."""
    for stale in list(out.parent.glob(f".{out.name}.tmp-*")) + list(out.parent.glob(f".{out.name}.old-*")):
        pid = stale.name.rsplit(".", 1)[-1].split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
