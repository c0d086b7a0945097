"""Model recipes (`models/NAME.toml`): where a model comes from, its signature, its data, its task.

A recipe names a builder module in `edgecomp.recipes` that makes the torch module and the real
calibration/validation samples. The TOML is data only, so a recipe's sizes and splits can be
changed without touching code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.model import TensorSpec
from edgecomp.paths import MODELS_DIR
from edgecomp.tomlconf import check_keys, read_toml

TASKS = ("embedding", "classification", "regression")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    builder: str
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    calibration: int
    validation: int
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def module(self) -> Any:
        """The builder module (`edgecomp.recipes.<builder>`)."""
        return importlib.import_module(f"edgecomp.recipes.{self.builder}")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.toml"))


def is_recipe(name: str) -> bool:
    return "/" not in name and "." not in name and (MODELS_DIR / f"{name}.toml").is_file()


def load_recipe(name: str) -> Recipe:
    path = MODELS_DIR / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown recipe {name!r} (known: {', '.join(recipe_names())})")
    d = read_toml(path)
    where = f"models/{name}.toml"
    check_keys(where, d, {"schema", "name", "description", "builder", "task", "inputs", "outputs", "data", "options"},
               {"schema", "builder", "task", "inputs", "outputs", "data"})
    if d["schema"] != 1:
        raise UsageError(f"{where}: unsupported schema {d['schema']!r} (this edgecomp reads schema 1)")
    if d["task"] not in TASKS:
        raise UsageError(f"{where}: task {d['task']!r} is not one of {', '.join(TASKS)}")
    data = d["data"]
    check_keys(f"{where} [data]", data, {"calibration", "validation", "seed"}, {"calibration", "validation"})

    def specs(key: str) -> tuple[TensorSpec, ...]:
        out = []
        for i, t in enumerate(d[key]):
            check_keys(f"{where} {key}[{i}]", t, {"name", "dtype", "shape"}, {"name", "dtype", "shape"})
            out.append(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])))
        return tuple(out)

    return Recipe(
        name=d.get("name", name), description=d.get("description", ""), builder=d["builder"], task=d["task"],
        inputs=specs("inputs"), outputs=specs("outputs"), calibration=int(data["calibration"]),
        validation=int(data["validation"]), seed=int(data.get("seed", 0)), options=d.get("options", {}), path=path,
    )
