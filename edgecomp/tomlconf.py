"""Strict reading of the flat TOML files (profiles, recipes): unknown keys are errors that name the key."""

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from edgecomp.errors import UsageError

T = TypeVar("T")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML: {e}") from None


def check_keys(where: str, table: dict[str, Any], allowed: set[str], required: set[str] = frozenset()) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(table))
    if missing:
        raise UsageError(f"{where}: missing required key {missing[0]!r}")


def typed(cls: type[T], table: dict[str, Any], where: str) -> T:
    """A frozen dataclass (a backend's `Options`, a pass's `Params`) from a TOML table or CLI options.

    Unknown keys, wrong types and invalid values (the dataclass's `__post_init__` raises ValueError)
    are one UsageError that names `where` and the key; TOML arrays become tuples."""
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        if key not in fields:
            raise UsageError(f"{where}: unknown option {key!r} (allowed: {', '.join(sorted(fields))})")
        want = typing.get_origin(hints[key]) or hints[key]
        if want in (types.UnionType, typing.Union):  # e.g. `bool | str`: any member type; __post_init__ checks values
            ok, name = isinstance(value, typing.get_args(hints[key])), " or ".join(a.__name__ for a in typing.get_args(hints[key]))
        elif want in (tuple, list):
            ok, name = isinstance(value, (list, tuple)), "a list"
        elif want is float:
            ok, name = isinstance(value, (int, float)) and not isinstance(value, bool), "float"
        elif isinstance(want, type):
            ok, name = isinstance(value, want) and not (want is int and isinstance(value, bool)), want.__name__
        else:
            ok, name = True, ""
        if not ok:
            raise UsageError(f"{where}: option {key!r} must be {name}, not {value!r}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def options_where(profile: Any) -> str:
    """How errors name a profile's [options] table: the file when there is one."""
    path = getattr(profile, "path", None)
    return f"{path.name if path else profile.name} [options]"
