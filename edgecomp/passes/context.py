"""What a pass or a backend's lowering may use besides the model: a scratch folder, the real
samples (calibration and validation splits), the seed, and the recipe when there is one
(training passes read its corpus)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecomp.data import SampleSet


@dataclass
class PassContext:
    workdir: Path
    samples: SampleSet
    seed: int = 0
    recipe: Any = None  # edgecomp.recipe.Recipe | None
    progress: Callable[[str], None] | None = None  # a status line for long passes (training); None: silent

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
