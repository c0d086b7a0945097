"""The reference a build is judged against: PyTorch eager when the source is PyTorch (the model as
trained), else the fp32 source ONNX on ONNX Runtime. It is a Runner like any target's, so parity
and latency ratios come from the same code and the same run."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecomp.backends.base import Feed
from edgecomp.model import ModelHandle


class TorchRunner:
    def __init__(self, module: Any, input_names: list[str], output_names: list[str], threads: int) -> None:
        import torch

        if isinstance(module, torch.export.ExportedProgram):
            module = module.module()
        self.module = module
        self.input_names = input_names
        self.output_names = output_names
        self.threads = threads
        torch.set_num_threads(threads)

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {name: o.detach().numpy() for name, o in zip(self.output_names, outs)}

    def info(self) -> dict[str, Any]:
        import torch

        return {"runtime": "torch-eager", "version": torch.__version__, "threads": self.threads, "executed_precision": "fp32"}


def reference_runner(model: ModelHandle, threads: int) -> Any:
    """PyTorch eager for torch sources, ONNX Runtime fp32 on the source graph otherwise."""
    if model.torch_module is not None:
        return TorchRunner(model.torch_module, model.input_names, model.output_names, threads)
    from edgecomp.backends.onnxruntime import OrtRunner

    return OrtRunner(model.onnx_path, threads)
