"""The stage cache: each pipeline stage's output kept under a key derived from everything it was made from.

A key is the sha256 of the stage's inputs written as canonical JSON: the model source's content
hash, the sample file's hash, pass and profile settings, the seed, edgecomp's own code and every
installed distribution's version. Change one target's settings and only that target's key moves,
so only that target is rebuilt. Nothing is keyed by a path or a time.

An entry is a folder `ROOT/STAGE/KEY/` holding the stage's files and `entry.json` (its metadata and
the sha256 of every file). It is written under a temporary name and renamed into place, so a reader
never sees half an entry, and two releases that race on one key both succeed: the second rename
fails, and its copy is discarded. An entry whose files no longer match their hashes is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

ENTRY = "entry.json"


def key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def sha256_path(path: Path) -> str:
    """Content hash of a file (`sha256_file`), or of a folder: its files' relative names and hashes, sorted."""
    from edgecomp.model import sha256_file

    if path.is_file():
        return sha256_file(path)
    listing = "".join(f"{f.relative_to(path)}\0{sha256_file(f)}\n" for f in sorted(path.rglob("*")) if f.is_file())
    return hashlib.sha256(listing.encode()).hexdigest()


@lru_cache(maxsize=1)
def toolchain() -> dict[str, str]:
    """What a stage's output also depends on: edgecomp's own code (hashed, so an edited checkout
    never reuses a stale entry) and every installed distribution's version."""
    from importlib import metadata

    import edgecomp

    versions = {d.metadata["Name"].lower(): d.version for d in metadata.distributions() if d.metadata["Name"]}
    versions.pop("edgecomp", None)  # an editable install's version says nothing of its code
    return {"edgecomp_code": _code_hash(Path(edgecomp.__file__).parent), **dict(sorted(versions.items()))}


def host() -> dict[str, Any]:
    """What a target stage also depends on beyond the toolchain: the CPU family, and whether its int8
    kernels saturate full-range weights (that decides `reduce_range = "auto"`, and what int8 parity
    measures here), so a cache shared by unlike machines keeps their target stages apart."""
    import platform

    from edgecomp.passes._int8 import saturating_cpu

    return {"machine": platform.machine(), "int8_saturates": saturating_cpu()}


def _code_hash(package: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def default_root() -> Path:
    return Path(os.environ.get("EDGECOMP_CACHE", Path.home() / ".cache" / "edgecomp")) / "stages"


class Cache:
    """Get and put stage outputs; `Cache(None)` is a cache that is always empty and keeps nothing."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.events: dict[str, str] = {}  # "stage/name" -> "hit" | "miss", for the report

    def _folder(self, stage: str, k: str) -> Path:
        assert self.root is not None
        return self.root / stage / k

    def get(self, stage: str, k: str, label: str) -> tuple[Path, dict[str, Any]] | None:
        """The entry's folder and metadata, or None (absent, or its files changed since it was written)."""
        hit = self._read(stage, k) if self.root is not None else None
        self.events[f"{stage}/{label}"] = "hit" if hit else ("miss" if self.root is not None else "off")
        return hit

    def _read(self, stage: str, k: str) -> tuple[Path, dict[str, Any]] | None:
        folder = self._folder(stage, k)
        try:
            entry = json.loads((folder / ENTRY).read_text())
        except (OSError, ValueError):
            return None
        for name, digest in entry["files"].items():
            f = folder / name
            if not f.is_file() or sha256_path(f) != digest:
                return None
        return folder, entry["meta"]

    def put(self, stage: str, k: str, files: dict[str, Path], meta: dict[str, Any]) -> None:
        """Store `files` (name in the entry -> source file) and `meta`; a no-op without a root."""
        if self.root is None:
            return
        final = self._folder(stage, k)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{k[:16]}.tmp-", dir=final.parent))
        try:
            digests = {}
            for name, src in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / name)
                digests[name] = sha256_path(tmp / name)
            (tmp / ENTRY).write_text(json.dumps({"files": digests, "meta": meta}, indent=1, default=str))
            if final.exists():
                if self._read(stage, k) is not None:  # another release wrote it meanwhile: keep theirs
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                shutil.rmtree(final, ignore_errors=True)  # a corrupt entry under the same key: replace it
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy first (or the disk is full): ours is not needed
            shutil.rmtree(tmp, ignore_errors=True)
