"""The two shapes every backend shares.

`Artifact`: the files a backend wrote for one target, plus what the runtime needs to load them.
`Runner`: `runner(feed) -> outputs`, numpy in and out. Validation and benchmarking only ever
talk to a Runner, so they are written once for every runtime; runners never compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Feed = dict[str, np.ndarray]


@dataclass
class Artifact:
    folder: Path
    backend: str
    files: dict[str, str]  # role -> file name inside folder ("model": "model.onnx")
    meta: dict[str, Any] = field(default_factory=dict)  # layout, executed precision hints, converter path
    # How long lowering steps took: the report keeps them, the manifest does not, so that the same
    # inputs give the same manifest.json byte for byte.
    timings: dict[str, float] = field(default_factory=dict)

    def path(self, role: str = "model") -> Path:
        return self.folder / self.files[role]


class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]: ...

    def info(self) -> dict[str, Any]:
        """Runtime name and version, threads, and the precision the runtime actually executes."""
        ...
