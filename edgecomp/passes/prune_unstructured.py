"""Unstructured magnitude pruning: zero the smallest-|w| weights of Linear / Conv layers to a sparsity.

Mask M keeps the largest |w| over all pruned layers (scope="global", the default: small sensitive
layers such as a first conv keep more of their weights: on the digits CNN, already 25% channel-pruned,
30% global sparsity kept 98.9% accuracy where 30% in every layer fell to 88%) or within each layer (scope="layer"); the model computes
with W * M. Schedules:
  oneshot    prune once to `sparsity`
  iterative  `iterations` rounds of prune -> fine-tune, sparsity following the cubic schedule
             s_k = s * (1 - (1 - k/n)^3) (Zhu & Gupta), fine-tuning by distillation from the dense
             model with the mask re-applied after every optimizer step
  rewind     (lottery ticket) after each prune the surviving weights go back to their values at
             `rewind_step` of the first fine-tune (0: the weights given), then retrain.
Tensors keep their dense shape: on dense kernels the file size and latency do not change (the
record says so); the sparsity is real and reported per layer, with the non-zero counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle
from edgecomp.passes import choice
from edgecomp.passes._torch_util import Clock, Recovery, clone, cubic_goal, record, stats, torch_module
from edgecomp.passes.context import PassContext


@dataclass(frozen=True)
class Params(Recovery):
    sparsity: float = 0.5
    scope: str = "global"  # global: one threshold over all pruned layers; layer: the same sparsity in each
    schedule: str = "oneshot"  # oneshot | iterative
    iterations: int = 3
    rewind: bool = False
    rewind_step: int = 0
    exclude: tuple[str, ...] = ()  # module-name substrings left dense (e.g. "classifier")

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("scope", self.scope, ("layer", "global"))
        choice("schedule", self.schedule, ("oneshot", "iterative"))
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity = {self.sparsity} must be in [0, 1)")
        if self.iterations < 1 or self.rewind_step < 0:
            raise ValueError("iterations must be >= 1 and rewind_step >= 0")


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    import torch

    clock = Clock()
    teacher = torch_module(model, "prune-unstructured")
    before = stats(teacher)
    student = clone(teacher).eval()
    targets = prunable(student, params.exclude)
    if not targets:
        raise UsageError("prune-unstructured: the model has no Linear / Conv weights to prune")
    rounds = params.iterations if params.schedule == "iterative" else 1
    tune = params.tunes
    if (rounds > 1 or params.rewind) and not tune:
        raise UsageError("prune-unstructured: iterative pruning and rewinding retrain between prunes: "
                         "give recover_epochs or recover_steps")
    rewind_to = {n: w.detach().clone() for n, w in targets.items()} if params.rewind else None
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in targets.items()}
    history, training = [], []
    for k in range(1, rounds + 1):
        goal = cubic_goal(params.sparsity, k, rounds)
        masks = magnitude_masks(targets, masks, goal, params.scope)
        with torch.no_grad():
            for n, w in targets.items():
                if rewind_to is not None:
                    w.copy_(rewind_to[n])
                w.mul_(masks[n])
        history.append({"round": k, "target": round(goal, 6), "reached": round(reached(masks), 6)})
        if tune:
            from edgecomp.passes.distill import recover

            snap = _Snapshot(targets, rewind_to, params.rewind_step if k == 1 and params.rewind else 0)

            def enforce() -> None:
                with torch.no_grad():
                    for n, w in targets.items():
                        w.mul_(masks[n])
                snap.step()

            training.append(recover(teacher, student, model, ctx, params, "prune-unstructured",
                                    scratch=f"round-{k}", after_step=enforce))
    after = stats(student)
    per_layer = {n: round(1 - int(m.sum()) / m.numel(), 4) for n, m in masks.items()}
    pruned_total = sum(m.numel() for m in masks.values())
    rec = record("prune-unstructured", params, before, after, clock,
                 target_sparsity=params.sparsity, sparsity_reached=round(reached(masks), 6),
                 pruned_weights=pruned_total, zeroed=int(sum(int((~m).sum()) for m in masks.values())),
                 layer_sparsity=dict(list(per_layer.items())[:200]), rounds=history,
                 **({"training": training} if training else {}),
                 effect="weights zeroed in dense tensors: file size and dense-kernel latency do not change; "
                        "the gain needs a sparse runtime or compression of the file")
    return model.with_pass(rec, onnx_path=None, torch_module=student.eval())


def prunable(module: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """name -> weight Parameter of every Linear / ConvNd (each shared Parameter once)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    out, seen = {}, set()
    for name, m in module.named_modules():
        if isinstance(m, kinds) and not any(x in name for x in exclude) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out[name] = m.weight
    return out


def magnitude_masks(weights: dict[str, Any], masks: dict[str, Any], sparsity: float, scope: str) -> dict[str, Any]:
    """Keep the largest |w| so that exactly round(sparsity * size) weights are zero (per layer or global);
    weights already pruned have |w| = 0 and stay pruned."""
    import torch

    def mask_of(values: Any, k: int) -> Any:
        m = torch.ones(values.numel(), dtype=torch.bool)
        if k > 0:
            m[torch.topk(values.flatten(), k, largest=False).indices] = False
        return m

    with torch.no_grad():
        if scope == "layer":
            return {n: mask_of((w * masks[n]).abs(), round(sparsity * w.numel())).view_as(w) for n, w in weights.items()}
        flat = torch.cat([(w * masks[n]).abs().flatten() for n, w in weights.items()])
        m = mask_of(flat, round(sparsity * flat.numel()))
        out, i = {}, 0
        for n, w in weights.items():
            out[n] = m[i:i + w.numel()].view_as(w)
            i += w.numel()
        return out


def reached(masks: dict[str, Any]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / max(1, total)


class _Snapshot:
    """Lottery-ticket rewinding point: the weights after `at` steps of the first fine-tune (0: none taken)."""

    def __init__(self, weights: dict[str, Any], store: dict[str, Any] | None, at: int) -> None:
        self.weights, self.store, self.at, self.n = weights, store, at, 0

    def step(self) -> None:
        self.n += 1
        if self.store is not None and self.at and self.n == self.at:
            for name, w in self.weights.items():
                self.store[name] = w.detach().clone()
