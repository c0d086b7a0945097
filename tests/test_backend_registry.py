"""The backend registry: what lowering needs versus what running an artifact needs."""

from __future__ import annotations

import importlib.util

import pytest

from edgecomp.backends import BACKENDS, availability, require
from edgecomp.errors import UsageError


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make modules look uninstalled to the registry's import check (the runtimes themselves stay real)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_a_tflite_artifact_runs_without_the_converters(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "onnx2tf", "tensorflow")
    ok, why = availability("tflite")
    assert not ok and "onnx2tf is not installed" in why and BACKENDS["tflite"].install in why
    assert availability("tflite", lowering=False) == (True, "")  # ai_edge_litert is enough to run one


def test_no_runtime_at_all_is_one_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "ai_edge_litert", "tflite_runtime", "tensorflow")
    with pytest.raises(UsageError, match=r"none of ai_edge_litert, tflite_runtime, tensorflow is installed: pip install"):
        require("tflite", lowering=False)


def test_every_backend_module_imports_without_its_runtime_loaded() -> None:
    import sys

    for name, info in BACKENDS.items():
        importlib.import_module(info.module)
    assert "tensorrt" not in sys.modules  # importing the backend module must not import the runtime
