"""Where the repository's data folders live: `targets/` and `models/` beside the package.

`EDGECOMP_HOME` overrides the root, so an installed (non-editable) copy can point at a checkout.
"""

import os
from pathlib import Path

ROOT = Path(os.environ.get("EDGECOMP_HOME", Path(__file__).resolve().parent.parent))
TARGETS_DIR = ROOT / "targets"
MODELS_DIR = ROOT / "models"


def cache_dir() -> Path:
    """A per-user cache for things that are slow to make and safe to reuse (trained checkpoints)."""
    base = Path(os.environ.get("EDGECOMP_CACHE", Path.home() / ".cache" / "edgecomp"))
    base.mkdir(parents=True, exist_ok=True)
    return base
