"""Shared fixtures: tiny real models built in code, and the real recipes built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent
EDGECOMP = [sys.executable, "-m", "edgecomp"]


def run_cli(*args: str, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess:
    """Run the real `edgecomp` CLI in a child process (exit codes and stderr as a user sees them)."""
    return subprocess.run([*EDGECOMP, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def make_tiny_onnx(path: Path, seed: int = 0) -> Path:
    """A real 2-layer MLP (x: [batch, 16] -> y: [batch, 4]) exported from torch, for fast plumbing tests."""
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    torch.onnx.export(net, (torch.randn(1, 16),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def int8_peak(graph: object) -> int:
    """The largest |value| among an ONNX graph's int8 initializers (the quantized weights)."""
    import onnx

    return max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max())
               for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32))
    return path
