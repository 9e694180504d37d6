"""`fold_layernorm_affine` and `commute_layernorm_scaling`: trade bytes for rounds at each
SecFormer LayerNorm (compile(fewer_rounds=True) runs both, in that order).

Why: a LayerNorm's output is Z r + beta with r = 1/sigma per row, and r comes last (its
table lookup and Newton step, or Goldschmidt's iterations, take most of the LayerNorm's
rounds). The linear layer after it can run on Z instead, beside the rsqrt, with r applied
after its product, since a row scaling commutes with a product on the right:
LN(x) W = r (Z W) + beta W (runtime/protocols/nonlinear.py, `layernorm_goldschmidt(commute=
...)`). The linear's output is then ready with the LayerNorm's own, one round sooner: two
rounds per Transformer layer (FFN1 and the next layer's query/key/value).

With a table seed the rsqrt takes only 2 rounds (lookup, Newton), and Z = gamma n (x -
mean) / 2^j needs a product and a truncation after the variance round, so Z W could not
open before the rsqrt ends. Hence `fold_layernorm_affine` first: it moves gamma and beta
into the linear layers' weights and biases (W diag(gamma), b + W beta: known to the
compiler, which holds the model's weights), so the LayerNorm those layers read has no gain
and its Z is a truncation only, finished in round 2 beside the lookup; Z W opens in round
3 beside the Newton step and r (Z W) is the linear's output in round 4. The residual add
still reads LN(x), now as N(x) gamma + beta (a product by the gain, off the critical path).
BERT-base at seq 128 with table seeds (and GeLU's lookups, which fewer_rounds implies):
230 rounds instead of 253.

The price is bytes and CPU: r (Z W) opens Z W, the linear's output width (2304 for the
fused Q/K/V, 3072 for FFN1), where the linear would open LN(x) (768), and the gain's
product opens N(x) once more. Each saved round is worth RTT, each extra byte 8 /
bandwidth, so it pays off only where RTT x bandwidth is large (README, "Fewer rounds").
Hence a compile option (`compile(fewer_rounds=True)`, `secformer compile --fewer-rounds`),
not a default.

`commute_layernorm_scaling` only marks the LayerNorms (attribute commute = 1, kept in
artifacts); where the rewrite applies is decided with the other deferrals
(secformer_compiler/deferral.py): a `layernorm.secformer` over the last dim whose output is
left raw for the linear layers after it (and for its gain's product), with a table seed and
no gain, or 3 or more Goldschmidt rsqrt iterations.
"""

from __future__ import annotations

import torch

from ..ir import Graph, Node, Rewriter
from .registry import register_pass

LN_FOLDS = "ln_folds"  # graph.meta: folded weight -> {"kind", "weight", "gain", "bias", "shift"}
FOLD_PREFIX = "folded.ln."  # training.FOLDED_PREFIX: the training view keeps them frozen


@register_pass("commute_layernorm_scaling")
def commute_layernorm_scaling(graph: Graph) -> Graph:
    """Mark every SecFormer LayerNorm to compute the linear layers after it (fewer rounds,
    more bytes: see the module docstring)."""
    for n in graph:
        if n.op == "layernorm" and n.attrs.get("method") == "layernorm.secformer":
            n.attrs["commute"] = 1
    return graph


def _foldable_linear(graph: Graph, ln: Node, u: Node) -> bool:
    """A linear layer reading the LayerNorm as its input, with model weights (and bias) that the
    fold can read (it makes new ones: any other reader of W keeps the original)."""
    if u.op != "linear" or u.inputs[0] != ln.name or ln.name in u.inputs[1:]:
        return False
    return all(graph[i].op == "weight" for i in u.inputs[1:])


@register_pass("fold_layernorm_affine")
def fold_layernorm_affine(graph: Graph) -> Graph:
    """Fold each SecFormer LayerNorm's gain and shift into the linear layers after it, so that
    they read the plain normalized value (what `commute_layernorm_scaling` needs with a table seed).

    LN(x) W^T + b = N(x) (W diag(gamma))^T + (b + W beta) for N(x) = (x - mean) / sigma, so a
    linear layer reading LN(x) becomes one reading N(x) with weight W * gamma and bias
    b + W beta (new `folded.ln.*` weights; graph.meta["ln_folds"] says how each was made, so
    `training.with_weights` can redo it). The LayerNorm's other users (the residual add) read
    N(x) * gamma + beta: a product by the gain and an add, off the critical path. Why: the
    commuted LayerNorm computes r (Z W) with Z = n (x - mean) / 2^j; without a gain, Z needs
    only a truncation (finished in round 2, beside the table lookup), not a product and a
    truncation (round 3), so Z W opens in round 3 and r (Z W) is the linear's output in round
    4, when the LayerNorm's own output would be ready (runtime/protocols/nonlinear.py).
    """
    users = graph.users()
    targets = {}
    for n in graph:
        if n.op != "layernorm" or n.attrs.get("method") != "layernorm.secformer" or n.attrs.get("dims") != 1 \
                or len(n.inputs) < 2 or any(graph[i].op != "weight" for i in n.inputs[1:]) \
                or n.name in graph.outputs:
            continue
        lins = [u for u in users.get(n.name, []) if _foldable_linear(graph, n, u)]
        if lins:
            targets[n.name] = lins
    if not targets:
        return graph
    rw = Rewriter(graph)
    rw.dst.weights = weights = dict(graph.weights)
    rw.dst.meta = dict(graph.meta)
    folds = dict(graph.meta.get(LN_FOLDS, {}))
    folded_linears = {u.name: ln for ln, us in targets.items() for u in us}
    plain: dict[str, str] = {}
    for n in graph:
        if n.name in targets:
            ln = n
            p = rw.emit("layernorm", [rw.env[ln.inputs[0]]], dict(ln.attrs), like=ln, name=f"{ln.name}_plain")
            plain[ln.name] = p
            # the other users read N(x) * gamma + beta (bound below, as the old name)
            y = rw.emit("mul", [p, rw.env[ln.inputs[1]]], like=ln, name=f"{ln.name}_gain")
            if len(ln.inputs) > 2:
                y = rw.emit("add", [y, rw.env[ln.inputs[2]]], like=ln, name=f"{ln.name}_shift")
            rw.bind(ln.name, y)
        elif n.name in folded_linears:
            ln = graph[folded_linears[n.name]]
            ins = [plain[ln.name]]
            w_name = graph[n.inputs[1]].attrs["name"]
            b_name = graph[n.inputs[2]].attrs["name"] if len(n.inputs) > 2 else None
            gain = graph[ln.inputs[1]].attrs["name"]
            shift = graph[ln.inputs[2]].attrs["name"] if len(ln.inputs) > 2 else None
            new_w = FOLD_PREFIX + w_name
            folds[new_w] = {"kind": "weight", "weight": w_name, "gain": gain}
            ins.append(rw.weight(new_w, fold_value(folds[new_w], weights), like=graph[n.inputs[1]]))
            if b_name is not None or shift is not None:
                new_b = FOLD_PREFIX + (b_name or w_name + ".bias")
                folds[new_b] = {"kind": "bias", "weight": w_name, "bias": b_name, "shift": shift}
                ins.append(rw.weight(new_b, fold_value(folds[new_b], weights),
                                     like=graph[n.inputs[2]] if b_name else graph[n.inputs[1]]))
            rw.bind(n.name, rw.emit("linear", ins, dict(n.attrs), like=n, name=n.name))
        else:
            rw.copy(n)
    rw.dst.meta[LN_FOLDS] = folds
    return rw.finish()


def fold_value(recipe: dict, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """A folded weight from its sources: W * gamma (a column scaling), or b + W beta."""
    w = weights[recipe["weight"]].double()
    if recipe["kind"] == "weight":
        return (w * weights[recipe["gain"]].double()).float().contiguous()
    b = weights[recipe["bias"]].double() if recipe.get("bias") else torch.zeros(w.shape[0], dtype=torch.float64)
    if recipe.get("shift"):
        b = b + w @ weights[recipe["shift"]].double()
    return b.float().contiguous()

