"""Loaders: one small function per input format, each returning a `ModelHandle`.

`load_model` only dispatches on what the path is. Every loader fails with a `UsageError`
(one line, exit 2) on a missing, corrupt or unsafe file; none writes outside `workdir`.
"""

from __future__ import annotations

from pathlib import Path

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle, TensorSpec
from edgecomp.recipe import Recipe, is_recipe, load_recipe

FORMATS = {
    ".onnx": "ONNX (external data kept inside the model's folder)",
    ".pt/.pth": "TorchScript, or a pickled nn.Module with --trust-remote-code",
    ".pt2": "torch.export ExportedProgram",
    "directory": "Hugging Face model directory (config.json + weights), or a folder holding model.onnx",
    "name": "a recipe from models/ (e.g. minilm, digits)",
}


def load_model(spec: str, workdir: Path, *, trust_remote_code: bool = False,
               inputs: tuple[TensorSpec, ...] | None = None) -> tuple[ModelHandle, Recipe | None]:
    """Resolve MODEL as given on the command line. `inputs` supplies a signature the file lacks
    (TorchScript and pickled modules carry no shapes)."""
    path = Path(spec)
    if not path.exists() and is_recipe(spec):
        from edgecomp.load.recipe import load_from_recipe

        recipe = load_recipe(spec)
        return load_from_recipe(recipe), recipe
    if not path.exists():
        raise UsageError(f"{spec}: no such file or directory, and not a recipe name (see `edgecomp inspect --help`)")
    if path.is_dir():
        if (path / "model.onnx").is_file():
            path = path / "model.onnx"
        elif (path / "config.json").is_file():
            from edgecomp.load.hf import load_hf_dir

            return load_hf_dir(path, workdir), None
        else:
            raise UsageError(f"{spec}: directory holds no model (expected model.onnx, or a Hugging Face config.json)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from edgecomp.load.onnx import load_onnx

        return load_onnx(path), None
    if suffix in (".pt", ".pth", ".pt2", ".ts"):
        from edgecomp.load.torch import load_torch_file

        return load_torch_file(path, inputs, trust_remote_code=trust_remote_code), None
    raise UsageError(f"{spec}: unsupported model format {suffix or '(no suffix)'!r} (supported: .onnx, .pt, .pth, .pt2, a directory, a recipe name)")


def parse_input_specs(items: tuple[str, ...]) -> tuple[TensorSpec, ...] | None:
    """`--input NAME:1x3x224x224[:float32]` -> TensorSpec; dims may be names (batch)."""
    if not items:
        return None
    out = []
    for item in items:
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise UsageError(f"--input {item!r}: expected NAME:DIMxDIM[:DTYPE], e.g. image:1x1x8x8:float32")
        dims = tuple(int(d) if d.isdigit() else d for d in parts[1].split("x"))
        dtype = parts[2] if len(parts) == 3 else "float32"
        try:
            import numpy as np

            np.dtype(dtype)
        except TypeError:
            raise UsageError(f"--input {item!r}: unknown dtype {dtype!r}") from None
        out.append(TensorSpec(parts[0], dtype, dims))
    return tuple(out)
