"""Quantization-aware training: fine-tune the model with int8 fake quantization, export it as QDQ ONNX.

Post-training INT8 fixes the rounding error after the fact; QAT lets the weights adapt to it. Each
Linear / Conv2d (chosen by `ops`, minus `exclude` globs on module names) computes with
  W' = fq(W; s_c = max|w_c| / 127, per output channel, symmetric int8; / 63 with `reduce_range`,
       where this CPU's int8 kernels would saturate full-range weights, see `_int8`), recomputed every step
  x' = fq(x; per-tensor uint8 asymmetric or int8 symmetric, range from an EMA of batch min / max)
where fq(v; s, z) = (clamp(round(v / s) + z, qmin, qmax) - z) * s and the backward pass is the
straight-through estimator (see `_fakequant`). Steps:
  1. Conv2d -> BatchNorm2d pairs are folded (`fold_bn`), so the quantized weights are the deployed ones;
  2. calibration warm-up: the float model runs on the calibration split and each layer's input
     observer takes the EMA of min / max; layers the model never calls are left float;
  3. fine-tune by distillation from the fp32 model (`_train.train`: seeded, checkpointed, resumable,
     torchrun-ready): KL on softened logits, plus cross-entropy when the data has labels
     (loss = (1 - alpha) CE + alpha T^2 KL); 1 - cosine of the embedding (+ hidden-state MSE) for
     encoders. Activation ranges stay `frozen`, keep following the `ema`, or are `learned` (LSQ);
  4. the scales are frozen into buffers and the model's eval forward exports (TorchScript exporter)
     as QuantizeLinear / DequantizeLinear pairs around every quantized MatMul / Conv, a QDQ graph that
     ONNX Runtime, OpenVINO and TensorRT lower to int8 kernels. The pipeline's own export step does
     this: the pass returns the fake-quantized module with `onnx_path=None`, like every torch pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle
from edgecomp.passes import _int8, choice
from edgecomp.passes._torch_util import Clock, clone, record, stats, torch_module
from edgecomp.passes.context import PassContext

OPS = ("Linear", "Conv2d")
RECORD_LAYERS = 500  # per-layer scales listed in the record (a report stays readable)


@dataclass(frozen=True)
class Params:
    # what is quantized, and how
    ops: tuple[str, ...] = OPS
    exclude: tuple[str, ...] = ()  # fnmatch globs on module names left float, e.g. "*.classifier"
    activations: str = "uint8"  # uint8 (asymmetric) | int8 (symmetric)
    reduce_range: bool | str = "auto"  # 7-bit weights; auto: where int8 saturates (x86 without VNNI)
    act_range: str = "frozen"  # frozen: calibrated once | ema: keeps observing while training | learned: LSQ scale
    momentum: float = 0.9  # EMA weight of the old range per observed batch
    calibration_samples: int = 0  # 0: the whole calibration split
    calibration_batch: int = 16
    fold_bn: bool = True
    # the loss (as in distill: kd for classifiers, embed_cos / embed_mse / hidden for encoders; 0 turns off)
    kd: float = 1.0
    alpha: float = 0.5
    temperature: float = 2.0
    embed_cos: float = 1.0
    embed_mse: float = 0.0
    hidden: float = 1.0
    relation: float = 0.0
    # training
    epochs: int = 1
    steps: int = 0
    batch_size: int = 32
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup: float = 0.1
    seed: int = -1  # -1: the build's seed
    threads: int = 0  # torch threads while training (0: unchanged)
    checkpoint_dir: str = ""  # "": the build's scratch folder (deleted with it); a path keeps them
    keep_checkpoints: bool = False
    resume: str = ""

    def __post_init__(self) -> None:
        choice("activations", self.activations, ("uint8", "int8"))
        choice("act_range", self.act_range, ("frozen", "ema", "learned"))
        choice("reduce_range", self.reduce_range, _int8.CHOICES)
        if not self.ops:
            raise ValueError(f"ops is empty: give some of {', '.join(OPS)}")
        for op in self.ops:
            choice("ops entry", op, OPS)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum = {self.momentum} must be in [0, 1)")
        if self.calibration_samples < 0 or self.calibration_batch < 1:
            raise ValueError("calibration_samples must be >= 0 and calibration_batch >= 1")
        if self.epochs < 1 and self.steps < 1:
            raise ValueError("give epochs >= 1 or steps >= 1")
        if self.lr <= 0 or self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise ValueError("lr and temperature must be > 0 and alpha in [0, 1]")


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    from edgecomp.passes import _fakequant as fq
    from edgecomp.passes.distill import distill_student, train_config, weights_for

    clock = Clock()
    teacher = torch_module(model, "qat")
    before = stats(teacher)
    student = clone(teacher).eval()
    folded = fq.fold_batchnorm(student) if params.fold_bn else []
    reduce_range, why = _int8.resolve(params.reduce_range)
    w_qmax = 63 if reduce_range else 127
    layers, skipped = fq.wrap(student, params.ops, params.exclude, params.activations, params.act_range,
                              params.momentum, w_qmax)
    if not layers:
        raise UsageError(f"qat: no {' / '.join(params.ops)} layer left to quantize (exclude={list(params.exclude)})")
    n_cal = calibrate(student, layers, model, ctx, params)
    unused = [n for n, layer in layers.items() if int(layer.act.seen) == 0]
    fq.unwrap(student, {n: layers.pop(n) for n in unused})
    if not layers:
        raise UsageError("qat: the calibration run called none of the quantizable layers")
    for layer in layers.values():
        layer.act.update_qparams()
        layer.act.start_learning()
    cfg = train_config(params, ctx, "qat")
    summary = distill_student(teacher, student, model, ctx, weights=weights_for(params, ctx), cfg=cfg,
                              label="qat", threads=params.threads)
    fq.finish(layers)
    student.eval()
    curve = summary.pop("loss_curve")
    scales = [{"layer": n, "act_scale": float(f"{float(q.act.scale):.6g}"), "act_zero_point": int(q.act.zero_point),
               "weight_scale_max": float(f"{float(q.w_scale.max()):.6g}")} for n, q in list(layers.items())[:RECORD_LAYERS]]
    symmetric = params.activations == "int8"
    rec = record("qat", params, before, stats(student), clock,
                 layers_quantized=len(layers), layers=scales, skipped=skipped, unused_left_float=unused,
                 bn_folded=folded,
                 weight_scheme=f"int8 symmetric per output channel, scale = max|w|/{w_qmax} recomputed every step",
                 **_int8.record(reduce_range, why),
                 activation_scheme=(f"{params.activations} {'symmetric' if symmetric else 'asymmetric'} per tensor, "
                                    f"EMA(momentum {params.momentum}) of batch min/max on the calibration split, "
                                    f"then {params.act_range}"),
                 calibration_samples=n_cal, seed=cfg.seed, steps=summary["steps"], loss_curve=curve,
                 resumed_from=params.resume or None, training=summary,
                 export="eval forward exports as QuantizeLinear/DequantizeLinear pairs (QDQ) with these scales")
    return model.with_pass(rec, onnx_path=None, torch_module=student)


def calibrate(student: Any, layers: dict[str, Any], model: ModelHandle, ctx: PassContext, params: Params) -> int:
    """Run the float model on the calibration split with every input observer recording (EMA of each
    batch's min / max); the number of samples seen. Inputs keep their padding: the deployed graph sees it too."""
    import numpy as np
    import torch

    from edgecomp.passes import _fakequant as fq

    feeds = ctx.samples.calibration
    if params.calibration_samples > 0:
        feeds = feeds[:params.calibration_samples]
    if not feeds:
        raise UsageError("qat: the calibration split is empty")
    if ctx.progress is not None:
        ctx.progress(f"qat: calibrating {len(layers)} layers on {len(feeds)} samples")
    fq.set_observing(layers, True)
    try:
        with torch.no_grad():
            for i in range(0, len(feeds), params.calibration_batch):
                chunk = feeds[i:i + params.calibration_batch]
                student(*(torch.from_numpy(np.ascontiguousarray(np.concatenate([f[n] for f in chunk])))
                          for n in model.input_names))
    finally:
        fq.set_observing(layers, False)
    return len(feeds)
