"""`bound_gelu_inputs`: each SecFormer GeLU's comparison range, from the layers before it.

Why: GeLU's segment tests are comparisons whose carry trees are as wide as the input's
range allows (`runtime.protocols.nonlinear.gelu_cmp_plan`): the approximation declares
|x| <= 1024 (`approx.gelu.GELU_CMP_INPUT_BOUND`), a guess that cannot be checked on secret
data. In a Transformer the GeLU reads FFN1, a linear layer on a LayerNorm's output, and that
is bounded by construction: the normalized vector u = (x - mean) / sqrt(var + eps) has
|u|_2 <= sqrt(n), so output j of u * gamma + beta through W, b is at most

    sqrt(n) |gamma * W_j|_2 + |(W beta + b)_j|      (Cauchy-Schwarz)

whatever the input. The pass sets input_bound to the largest such value over the outputs,
widened by 2^-6 relative and 2^-4 absolute for the 2PC LayerNorm's own error (its
Goldschmidt steps meet 1e-4 inside their calibrated range, and under-converge below it,
which only shrinks the output), rounded up to 1/16, and never above the declared 1024.
BERT-base with random weights: 17; all-MiniLM-L6-v2: 22 to 64 per layer. With the
default GeLU's 2^-3 window, a bound below about 28 makes the comparisons 8-bit carry trees:
3 rounds instead of 4, and about half their bytes.

Only a GeLU whose input is exactly such a linear layer (weights known at compile time) on
a `layernorm.secformer` or exact LayerNorm over the last dim is tightened; any other keeps
the declared bound. The bound is the model owner's weights' (compile time, in the clear);
a program whose weights are replaced later gets it recomputed (`training.with_weights`).
"""

from __future__ import annotations

import math

import torch

from ..ir import Graph, Node
from .registry import register_pass

_METHODS = ("gelu.secformer", "gelu.secformer_erf")
_LAYERNORMS = ("layernorm.secformer", "layernorm.exact", None)
REL_SLACK = 2.0 ** -6
ABS_SLACK = 2.0 ** -4


def _weight(graph: Graph, node: Node, pos: int) -> torch.Tensor | None:
    """The weight at input `pos` of `node` (None: absent, not a weight, or not known)."""
    if len(node.inputs) <= pos:
        return None
    src = graph[node.inputs[pos]]
    if src.op != "weight":
        return None
    w = graph.weights.get(src.attrs["name"])
    return None if w is None or w.device.type == "meta" else w.detach().double()


def layernorm_linear_bound(graph: Graph, gelu: Node) -> float | None:
    """The bound of the module docstring for `gelu`'s input, or None where it does not apply."""
    lin = graph[gelu.inputs[0]]
    if lin.op != "linear":
        return None
    ln = graph[lin.inputs[0]]
    if ln.op != "layernorm" or ln.attrs.get("dims") != 1 or ln.attrs.get("method") not in _LAYERNORMS:
        return None
    w = _weight(graph, lin, 1)
    if w is None or w.dim() != 2 or (len(lin.inputs) > 2 and _weight(graph, lin, 2) is None):
        return None
    n = w.shape[1]
    gamma = _weight(graph, ln, 1) if len(ln.inputs) > 1 else torch.ones(n, dtype=torch.float64)
    beta = _weight(graph, ln, 2) if len(ln.inputs) > 2 else torch.zeros(n, dtype=torch.float64)
    if gamma is None or beta is None or gamma.shape != (n,) or beta.shape != (n,):
        return None
    b = _weight(graph, lin, 2) if len(lin.inputs) > 2 else torch.zeros(w.shape[0], dtype=torch.float64)
    per_out = math.sqrt(n) * (w * gamma).norm(dim=1) + (w @ beta + b).abs()
    return float(per_out.max())


@register_pass("bound_gelu_inputs")
def bound_gelu_inputs(graph: Graph) -> Graph:
    """Tighten each SecFormer GeLU's input_bound (its comparisons' range) to what the
    LayerNorm and linear layer before it allow: fewer bits, and fewer rounds below ~28."""
    from ..approx import get_approx

    for n in graph:
        if n.op != "gelu" or n.attrs.get("method") not in _METHODS:
            continue
        params = dict(n.attrs.get("params") or {})
        if "input_bound" not in params or "bits" in params:
            continue
        declared = float(get_approx(n.attrs["method"]).params["input_bound"])
        b = layernorm_linear_bound(graph, n)
        if b is not None:
            b = math.ceil((b * (1 + REL_SLACK) + ABS_SLACK) * 16) / 16
        params["input_bound"] = declared if b is None else min(declared, b)
        n.attrs["params"] = params
    return graph
