"""Transformer fusion for ONNX Runtime's CPU kernels (onnxruntime.transformers.optimizer).

The exported attention block (three MatMuls, Reshape/Transpose per head, scaled QK^T, mask Add,
Softmax, a second MatMul, Transpose back) becomes one `Attention` contrib op with a packed
[hidden, 3 * hidden] QKV weight; the erf formula becomes `Gelu`. Results are equal in float up to rounding. The attention mask is
passed as given (`mask = "raw"`); the optimizer's BERT default, one length per row, is only right
for right-padded masks and is an option (`mask = "lengths"`). Each removed node is
one fewer dispatch to the intra-op thread pool, which at 2 threads costs more than the work of a
small Transpose or Add; after `quantize-dynamic` the Attention becomes `QAttention` (int8 QKV).

What it deliberately leaves unfused, measured on MiniLM (onnxruntime 1.32, 2 threads, AVX-512 VNNI):
- Add + LayerNormalization stays two ops: the CPU `SkipLayerNormalization` kernel is a scalar loop,
  5x slower than the two (270 us against 56 us on 128 x 384 at 1 thread). ONNX Runtime would fuse
  them again at load time, so each Add that feeds a LayerNormalization is written as the
  equivalent two-input `Sum`, which that fusion does not match.
- The embeddings stay Gathers + Add + LayerNormalization unless `embed_layer_norm = true`
  (EmbedLayerNormalization): no speed difference measurable, and after SmoothQuant + INT8 the
  unfused form gave the better worst case (validation cosine min 0.9877 against 0.9866).
- Bias + Gelu stays Add + Gelu: `quantize-dynamic` folds the bias into DynamicQuantizeMatMul, and
  the fused BiasGelu kernel is slower than Gelu alone.

Run it before `smoothquant`: SmoothQuant folds into LayerNormalization, SkipLayerNormalization and
EmbedLayerNormalization and smooths the Attention's packed weight, whereas its un-scaling Mul on
the residual path would stop the attention pattern from matching if it ran first. A graph with no
transformer pattern passes through unchanged apart from the Add -> Sum rewrite (the record says
what was fused).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from edgecomp.model import ModelHandle
from edgecomp.passes import choice
from edgecomp.passes.context import PassContext

MODEL_TYPES = ("bert",)


@dataclass(frozen=True)
class Params:
    model_type: str = "bert"  # onnxruntime.transformers' pattern set (BERT, RoBERTa, MiniLM, DistilBERT-style encoders)
    num_heads: int = 0  # 0: read from the graph's Reshape shapes
    hidden_size: int = 0  # 0: read from the graph
    attention: bool = True
    mask: str = "raw"  # raw: the 0/1 attention mask as given (any padding); lengths: its row sums (right padding only)
    embed_layer_norm: bool = False  # see the module docstring
    gelu_approximation: bool = False  # tanh FastGelu instead of erf Gelu: not exact, off by default
    skip_layer_norm: bool = False  # leave Add + LayerNormalization apart (faster on CPU, see above)
    bias_gelu: bool = False

    def __post_init__(self) -> None:
        choice("model_type", self.model_type, MODEL_TYPES)
        choice("mask", self.mask, ("raw", "lengths"))
        if self.num_heads < 0 or self.hidden_size < 0:
            raise ValueError(f"num_heads = {self.num_heads}, hidden_size = {self.hidden_size} must be >= 0 (0: from the graph)")
        if self.num_heads and self.hidden_size and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size = {self.hidden_size} is not a multiple of num_heads = {self.num_heads}")


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(params.model_type)
    opts.enable_attention = params.attention
    opts.use_raw_attention_mask(params.mask == "raw")
    opts.enable_embed_layer_norm = params.embed_layer_norm
    opts.enable_gelu_approximation = params.gelu_approximation
    opts.enable_skip_layer_norm = params.skip_layer_norm
    opts.enable_bias_skip_layer_norm = params.skip_layer_norm
    opts.enable_bias_gelu = params.bias_gelu
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:  # opt_level 0: Python fusions only, nothing specific to this machine's CPU is baked into the file
        fused = optimizer.optimize_model(str(model.onnx_path), model_type=params.model_type, num_heads=params.num_heads,
                                         hidden_size=params.hidden_size, optimization_options=opts, opt_level=0,
                                         use_gpu=False)
    finally:
        quiet.setLevel(level)
    stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
    sums = 0 if params.skip_layer_norm else unfusable_residual_adds(fused.model)
    out = ctx.scratch("fuse-transformer") / "model.onnx"
    # sorts the nodes and declares the com.microsoft opset the fused ops need
    fused.save_model_to_file(str(out), use_external_data_format=fused.model.ByteSize() > 1_800_000_000)
    record = {"pass": "fuse-transformer", **dataclasses.asdict(params), "fused": stats, "add_to_sum": sums}
    return model.with_pass(record, onnx_path=out)


def unfusable_residual_adds(proto: Any) -> int:
    """Write each two-input float Add that feeds a LayerNormalization as Sum (same broadcasting,
    same result), so ONNX Runtime's load-time SkipLayerNormFusion leaves the pair apart. Returns
    how many were rewritten."""
    readers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    count = 0
    for node in proto.graph.node:
        if (node.op_type == "Add" and node.domain in ("", "ai.onnx") and len(node.input) == 2 and len(node.output) == 1
                and any(r.op_type == "LayerNormalization" for r in readers.get(node.output[0], []))):
            node.op_type = "Sum"
            count += 1
    return count
