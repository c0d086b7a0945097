"""Fuse exported GELU subgraphs into one `Gelu` node, so TFLite gets its builtin GELU op.

PyTorch exports exact GELU, gelu(x) = x * 0.5 * (1 + erf(x / sqrt(2))), as five ONNX nodes
(Div or Mul by a constant, Erf, Add 1, and two Muls in either order). TFLite has no builtin Erf:
left alone, that Erf becomes a Flex op (a phone cannot run it) or, with onnx2tf's pseudo Erf, a
dozen elementwise ops including a division x / (|x| + eps) that breaks under int8 (its quantized
denominator can be zero). One ONNX `Gelu` node (opset 20; onnx2tf lowers it to tf.nn.gelu) becomes
TFLite's builtin GELU: exact, one kernel, with an int8 lookup-table kernel. Matched forms (c1 = sqrt(2) for Div, 1/sqrt(2) for Mul):
  a) ((x * (1 + erf(x op c1))) * 0.5        b) (x * 0.5) * (1 + erf(x op c1))
Multiplications match with either operand order; every intermediate must have a single consumer.
The graph moves to opset 20 only when it has a GELU: onnx2tf re-exports the graph and checks it with
ONNX Runtime, which rejects a Gelu below opset 20 (and a com.microsoft Gelu loses its domain there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


GELU_OPSET = 20  # the first ONNX opset with a Gelu operator


def fuse_gelu(model: Any) -> tuple[Any, int]:
    """(model with each GELU subgraph as one Gelu node, how many). A model with any is first converted
    to opset 20 (onnx.version_converter), the first with Gelu; one without any is returned as is."""
    from onnx import helper, version_converter

    if not _matches(model):
        return model, 0
    if _opset(model) < GELU_OPSET:
        try:
            model = version_converter.convert_version(model, GELU_OPSET)
        except Exception:  # an op the converter cannot move: keep the graph, Erf goes the pseudo-op way
            return model, 0
    g = model.graph
    matches = _matches(model)
    for nodes, x, out, name in matches:
        position = list(g.node).index(nodes[-1])
        g.node.insert(position, helper.make_node("Gelu", [x], [out], name=name))
        for n in nodes:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | {v.name for v in g.input} | {v.name for v in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    alive = used | {o for n in g.node for o in n.output}
    for vi in [v for v in g.value_info if v.name not in alive]:
        g.value_info.remove(vi)
    return model, len(matches)


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _matches(model: Any) -> list[tuple[list[Any], str, str, str]]:
    """(nodes to replace, x, output, name) for each GELU subgraph."""
    from onnx import numpy_helper

    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
               if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def is_const(name: str, value: float) -> bool:
        v = consts.get(name)
        return v is not None and v.size == 1 and abs(float(np.ravel(v)[0]) - value) < 1e-4 * max(1.0, abs(value))

    def sole(name: str, op: str) -> Any:
        """The single consumer of `name` if it is an `op` node and `name` is not a graph output."""
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and name not in graph_outputs else None

    def other(node: Any, name: str) -> str:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else ""

    matches = []
    for erf in (n for n in g.node if n.op_type == "Erf"):
        pre = producer.get(erf.input[0])
        if pre is None or sole(pre.output[0], "Erf") is not erf or len(pre.input) != 2:
            continue
        if pre.op_type == "Div" and is_const(pre.input[1], math.sqrt(2)):
            x = pre.input[0]
        elif pre.op_type == "Mul" and is_const(pre.input[1], 1 / math.sqrt(2)):
            x = pre.input[0]
        elif pre.op_type == "Mul" and is_const(pre.input[0], 1 / math.sqrt(2)):
            x = pre.input[1]
        else:
            continue
        add = sole(erf.output[0], "Add")
        if add is None or not is_const(other(add, erf.output[0]), 1.0):
            continue
        mul = sole(add.output[0], "Mul")
        if mul is None:
            continue
        partner = other(mul, add.output[0])
        if partner == x:  # form a
            last = sole(mul.output[0], "Mul")
            if last is None or not is_const(other(last, mul.output[0]), 0.5):
                continue
            nodes = [pre, erf, add, mul, last]
        else:  # form b
            half = producer.get(partner)
            if half is None or half.op_type != "Mul" or x not in half.input or not is_const(other(half, x), 0.5) \
                    or sole(half.output[0], "Mul") is not mul:
                continue
            nodes = [pre, erf, add, half, mul]
        matches.append((nodes, x, nodes[-1].output[0], erf.name))

    return matches
