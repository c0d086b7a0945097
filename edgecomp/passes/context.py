"""What a pass may use besides the model: a scratch folder, the sample set, the seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgecomp.data import SampleSet


@dataclass
class PassContext:
    workdir: Path
    samples: SampleSet
    seed: int = 0

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
