"""Fake-quantized Linear / Conv2d for quantization-aware training, written so that they export as QDQ.

Weights: symmetric int8 per output channel, s_c = max|w_c| / q, z = 0, recomputed from the current
weights at every training step (held in a buffer, so the exported graph reads a constant). q = 127,
or 63 with `reduce_range` (7-bit weights that x86 CPUs without VNNI multiply without saturating; see
`_int8`). The fake-quant op keeps the range [-128, 127], the one ONNX's QuantizeLinear
export accepts: with s_c = max|w_c| / 63 no weight rounds outside [-63, 63] anyway.
Activations (the layer's input): per tensor, from a range [lo, hi] (widened to include 0) that an
observer takes as an exponential moving average of each batch's min / max:
  uint8 asymmetric  s = (hi - lo) / 255, z = clamp(round(-lo / s), 0, 255)
  int8 symmetric    s = max(-lo, hi) / 127, z = 0
Forward: x' = (clamp(round(x / s) + z, qmin, qmax) - z) * s, with the straight-through estimator
(gradient 1 inside the range, 0 outside) built into torch.fake_quantize_per_*_affine. With
`act_range="learned"` the activation scale is a parameter trained with the LSQ gradient
(torch._fake_quantize_learnable_per_tensor_affine, grad scaled by 1 / sqrt(numel * qmax)).

Eval mode uses the buffers only, so torch.onnx.export (TorchScript exporter, opset >= 13) writes
each layer as  x -> QuantizeLinear -> DequantizeLinear -> MatMul/Conv <- DequantizeLinear <-
QuantizeLinear <- W. A Linear computes x @ W^T with W^T quantized per column (axis 1), so the
exporter folds the transpose into the initializer and DequantizeLinear feeds the MatMul directly:
the pattern ONNX Runtime, OpenVINO and TensorRT fuse into int8 kernels.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
import torch.nn.functional as F

SCHEMES = {"uint8": (0, 255), "int8": (-128, 127)}
EPS = 1e-8


class ActQuant(torch.nn.Module):
    """Per-tensor fake quantization of an activation with an EMA min/max observer."""

    def __init__(self, scheme: str, mode: str, momentum: float) -> None:
        super().__init__()
        self.scheme, self.mode, self.momentum = scheme, mode, momentum
        self.qmin, self.qmax = SCHEMES[scheme]
        self.observing = False  # calibration: record ranges, pass the float input through
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.learned = torch.nn.Parameter(torch.ones(())) if mode == "learned" else None

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if int(self.seen) == 0:
            self.lo.copy_(lo)
            self.hi.copy_(hi)
        else:
            self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
            self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)
        self.seen += 1

    @torch.no_grad()
    def update_qparams(self) -> None:
        """Scale and zero point from the observed range (the learned scale, once it exists, wins)."""
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        if self.qmin == 0:
            scale = max((hi - lo) / 255, EPS)
            zp = min(255, max(0, round(-lo / scale)))
        else:
            scale, zp = max(max(-lo, hi) / 127, EPS), 0
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)

    @torch.no_grad()
    def start_learning(self) -> None:
        if self.learned is not None:
            self.learned.fill_(float(self.scale))

    @torch.no_grad()
    def finish(self) -> None:
        """Freeze for eval and export: the learned scale goes into the buffer the exported graph reads."""
        if self.learned is not None:
            self.scale.fill_(max(abs(float(self.learned)), EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if self.training and self.mode == "ema":
            self.observe(x)
            self.update_qparams()
        if self.training and self.learned is not None:
            grad = 1.0 / math.sqrt(x.numel() * self.qmax)
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.learned.abs().clamp_min(EPS).reshape(1), self.zero_point.float().reshape(1),
                self.qmin, self.qmax, grad)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)


class _QuantLayer(torch.nn.Module):
    """Shared part: the original weight / bias Parameters (same names, so state dicts stay compatible),
    the input quantizer and the per-channel weight scale."""

    axis = 0

    def __init__(self, layer: Any, act: ActQuant, w_qmax: int = 127) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.w_qmax = w_qmax
        self.act = act
        object.__setattr__(self, "original", layer)  # not a child: for `unwrap`, never saved twice
        channels = layer.weight.shape[0]
        self.register_buffer("w_scale", torch.ones(channels))
        self.register_buffer("w_zero", torch.zeros(channels, dtype=torch.int32))
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """s_c = max|w_c| / w_qmax from the current weights."""
        w = self.weight.detach()
        self.w_scale.copy_((w.abs().flatten(1).amax(1) / self.w_qmax).clamp_min(EPS))

    def quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.refresh()
        return torch.fake_quantize_per_channel_affine(w, self.w_scale, self.w_zero, self.axis, -128, 127)


class QuantLinear(_QuantLayer):
    axis = 1  # of W^T: one scale per output feature

    def __init__(self, layer: torch.nn.Linear, act: ActQuant, w_qmax: int = 127) -> None:
        super().__init__(layer, act, w_qmax)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(self.act(x), self.quant_weight(self.weight.t()))
        return y + self.bias if self.bias is not None else y


class QuantConv2d(_QuantLayer):
    def __init__(self, layer: torch.nn.Conv2d, act: ActQuant, w_qmax: int = 127) -> None:
        super().__init__(layer, act, w_qmax)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.act(x), self.quant_weight(self.weight), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


KINDS = {"Linear": (torch.nn.Linear, QuantLinear), "Conv2d": (torch.nn.Conv2d, QuantConv2d)}


def fold_batchnorm(module: torch.nn.Module) -> list[str]:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d inside an nn.Sequential into the
    conv (W' = W * g / sqrt(v + e), b' = (b - m) * g / sqrt(v + e) + beta; the BN becomes Identity), so
    the weights that get quantized are the ones the deployed conv uses. Names of the folded BNs."""
    folded = []
    for pname, parent in module.named_modules():
        if not isinstance(parent, torch.nn.Sequential):
            continue
        keys = list(parent._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if not (type(conv) is torch.nn.Conv2d and isinstance(bn, torch.nn.BatchNorm2d)
                    and bn.num_features == conv.out_channels and bn.track_running_stats):
                continue
            with torch.no_grad():
                k = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / (bn.running_var + bn.eps).sqrt()
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                new_bias = (bias - bn.running_mean) * k + shift
                conv.weight.mul_(k.reshape(-1, 1, 1, 1))
                if conv.bias is None:
                    conv.bias = torch.nn.Parameter(new_bias.clone())
                else:
                    conv.bias.copy_(new_bias)
            parent._modules[b] = torch.nn.Identity()
            folded.append(f"{pname}.{b}" if pname else b)
    return folded


def wrap(module: torch.nn.Module, ops: tuple[str, ...], exclude: tuple[str, ...], scheme: str, mode: str,
         momentum: float, w_qmax: int = 127) -> tuple[dict[str, _QuantLayer], list[dict[str, str]]]:
    """Replace (in place) every Linear / Conv2d of the chosen kinds whose name matches no `exclude` glob;
    a layer reused in several places gets one wrapper. (wrappers by name, skipped layers with why)."""
    kinds = tuple(KINDS[o][0] for o in ops)
    wrappers: dict[int, _QuantLayer] = {}
    names: dict[str, _QuantLayer] = {}
    skipped: list[dict[str, str]] = []
    for name, m in list(module.named_modules()):
        if type(m) not in kinds or id(m) in wrappers:
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in exclude):
            skipped.append({"layer": name, "reason": "excluded"})
            continue
        if isinstance(m, torch.nn.Conv2d) and m.padding_mode != "zeros":
            skipped.append({"layer": name, "reason": f"padding_mode {m.padding_mode!r}"})
            continue
        cls = dict(KINDS.values())[type(m)]
        wrappers[id(m)] = names[name] = cls(m, ActQuant(scheme, mode, momentum), w_qmax)
    for parent in list(module.modules()):
        if isinstance(parent, torch.nn.MultiheadAttention):
            continue  # it reads out_proj.weight directly: the wrapper would never run
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in wrappers:
                parent._modules[key] = wrappers[id(child)]
    return names, skipped


def unwrap(module: torch.nn.Module, layers: dict[str, _QuantLayer]) -> None:
    """Put the original modules back in place of the given wrappers (layers the model never calls)."""
    back = {id(w): w.original for w in layers.values()}
    for parent in list(module.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in back:
                parent._modules[key] = back[id(child)]


def set_observing(layers: dict[str, _QuantLayer], on: bool) -> None:
    for layer in layers.values():
        layer.act.observing = on


def finish(layers: dict[str, _QuantLayer]) -> None:
    """After training: weight scales from the final weights, learned activation scales into buffers."""
    for layer in layers.values():
        layer.refresh()
        layer.act.finish()
