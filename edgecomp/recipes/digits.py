"""A small CNN trained on scikit-learn's digits (8x8 grey images, 10 classes): a labelled image task.

Training takes a few seconds and is deterministic (fixed seed, one thread); the checkpoint is
cached by a hash of the training settings and reloaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from edgecomp.data import SampleSet
from edgecomp.paths import cache_dir
from edgecomp.recipe import Recipe


def dataset(recipe: Recipe) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images scaled to [0, 1] as (N, 1, 8, 8) float32; a seeded split into train / calibration / validation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(recipe.seed).permutation(len(x))
    v, c = recipe.validation, recipe.calibration
    val, cal, train = order[:v], order[v:v + c], order[v:]  # calibration is drawn from the training part
    return {"train": (x[train], y[train]), "calibration": (x[cal], y[cal]), "validation": (x[val], y[val])}


def _net() -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def build(recipe: Recipe) -> Any:
    import torch

    epochs = int(recipe.options.get("epochs", 30))
    key = hashlib.sha256(json.dumps({"v": 1, "seed": recipe.seed, "epochs": epochs, "val": recipe.validation,
                                     "torch": torch.__version__}, sort_keys=True).encode()).hexdigest()[:16]
    ckpt = cache_dir() / f"digits_cnn-{key}.pt"
    net = _net()
    if ckpt.is_file():
        try:
            net.load_state_dict(torch.load(ckpt, weights_only=True))
            return net.eval()
        except Exception:  # a corrupt cache entry is retrained, never trusted
            ckpt.unlink(missing_ok=True)
            net = _net()
    x, y = dataset(recipe)["train"]
    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit reproducible training
    try:
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(xt), generator=g).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    tmp = ckpt.with_suffix(f".tmp{id(net)}")
    torch.save(net.state_dict(), tmp)
    tmp.replace(ckpt)
    return net


def samples(recipe: Recipe) -> SampleSet:
    parts = dataset(recipe)
    (xc, _), (xv, yv) = parts["calibration"], parts["validation"]
    return SampleSet([{"image": xc[i:i + 1]} for i in range(len(xc))], [{"image": xv[i:i + 1]} for i in range(len(xv))],
                     yv, f"recipe:{recipe.name}")
