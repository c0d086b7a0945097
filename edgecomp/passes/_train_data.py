"""Training data for the torch passes: the recipe's train split, as tensors sharing their first axis.

- minilm: the shipped corpus's train part (neither calibration nor validation sentences),
  tokenized at the recipe's static length; padding is trimmed per batch during training.
- digits: the labelled train images (`labels` is used by the hard-label term of distillation).
- a recipe module with `train_data(recipe) -> dict[str, np.ndarray]`: that.
- anything else: the build's calibration split (real inputs, no labels), said so in the record.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecomp.model import ModelHandle
from edgecomp.passes.context import PassContext


def training_data(model: ModelHandle, ctx: PassContext) -> tuple[dict[str, Any], str]:
    """(tensors keyed by input name, plus `labels` when known; where they came from)."""
    import torch

    arrays, origin = _arrays(model, ctx)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, origin


def _arrays(model: ModelHandle, ctx: PassContext) -> tuple[dict[str, np.ndarray], str]:
    recipe = ctx.recipe
    if recipe is not None:
        mod = recipe.module()
        if hasattr(mod, "train_data"):
            return dict(mod.train_data(recipe)), f"recipe:{recipe.name}:train"
        if recipe.builder == "minilm":
            from edgecomp.recipes.minilm import corpus, encode

            feeds = encode(corpus(recipe)["train"], int(recipe.options.get("seq_len", 128)))
            return {k: np.concatenate([f[k] for f in feeds]) for k in model.input_names}, f"recipe:{recipe.name}:train"
        if recipe.builder == "digits":
            from edgecomp.recipes.digits import dataset

            x, y = dataset(recipe)["train"]
            return {model.input_names[0]: x, "labels": y}, f"recipe:{recipe.name}:train"
    feeds = ctx.samples.calibration
    return {k: np.concatenate([f[k] for f in feeds]) for k in model.input_names}, f"{ctx.samples.origin}:calibration"


def is_classifier(ctx: PassContext) -> bool:
    if ctx.recipe is not None:
        return ctx.recipe.task == "classification"
    return ctx.samples.labels is not None


def word_vocab(ctx: PassContext) -> Any:
    """Token ids of whole alphabetic words in the recipe's tokenizer (augmentation swaps words for these);
    None when the recipe has no tokenizer."""
    import torch

    recipe = ctx.recipe
    if recipe is None or not hasattr(recipe.module(), "tokenizer"):
        return None
    vocab = recipe.module().tokenizer().get_vocab()
    ids = sorted(i for t, i in vocab.items() if t.isalpha() and t.isascii() and len(t) > 1)
    return torch.tensor(ids, dtype=torch.long) if ids else None
