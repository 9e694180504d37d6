"""Which products leave their truncation to the next op's first round (2PC and cost model).

A product's result is truncated (one round, runtime/protocols/trunc.py), and when the next
interactive op opens that value in a Beaver product, the truncation can share that round
(runtime/protocols/fused.py): the producer hands a `trunc.Pending` to its consumer instead
of a finished share. This module decides statically, from the graph alone, where that is
done, so the 2PC interpreter and the static cost model agree:

* linear -> [add] -> layernorm (method layernorm.secformer, one normalized dim): the output
  projection and FFN2 of every Transformer layer feed a residual add and a LayerNorm whose
  first round opens x (variance products); saves one round per LayerNorm.
* linear -> gelu (gelu.secformer): FFN1. GeLU's comparisons read x mod 2^bits, which the
  pending value's local base already equals (bits <= 64 - f), and its series path has
  rounds to spare for finishing x; saves one round per GeLU.
* matmul (secret x secret) -> [scale by 2^-s] -> softmax (softmax.2quad): the attention
  scores; a power-of-two scale (1/sqrt(d) for d = 4^m: BERT-base/large's 64) folds into
  the same truncation (by f + s instead of f, then s), and 2Quad's first round opens
  x + c; saves two rounds per softmax (one where the scale is not a power of two is kept).

* softmax (softmax.2quad over the last dim) -> matmul by a secret V: the attention
  probabilities' only use. 2Quad hands over its first round's result (`nonlinear.QuadRows`:
  the unnormalized (x + c)^2 and the pending row sum) and the matmul computes (q V) / sum,
  its product beside the reciprocal (`nonlinear.softmax_2quad_matmul`); saves two rounds
  per attention layer and scales (rows, d_v) instead of (rows, rows). Marks: softmax
  "unnormalized", matmul "normalizes".

* layernorm (layernorm.secformer) -> the linear layers after it: the LayerNorm's last product
  is not truncated (`trunc.Raw` at 2f + RAW_EXTRA bits, runtime/protocols/nonlinear.py) and
  each linear truncates its product by f + (f + RAW_EXTRA) instead of f, so the LayerNorm's
  last round goes; the residual add that also reads it adds the raw value to the untruncated
  product of the linear before it (that linear marked "defer_raw" instead of "defer"), and
  the next LayerNorm's first round truncates the sum by f + RAW_EXTRA. Only where every user
  is such a linear or such an add, the output is not a graph output, and
  `nonlinear.layernorm_raw_frac` allows it (f <= 16, prescale >= 2^-6); saves one round per
  LayerNorm. Marks: layernorm "raw", linear "raw_in", add "raw_add", and the
  pending_shift of the consumers grows by the raw bits.
* ... and where it is marked commute (passes/rounds.py: compile(fewer_rounds=True), which
  trades bytes for rounds) and its rsqrt takes 3 or more Goldschmidt iterations (not a
  table seed's one or two Newton steps), it computes those linear
  layers' products itself, with its row scaling 1/sigma moved after them:
  LN(x) W = r (Z W) + beta W (`nonlinear.layernorm_goldschmidt(commute=...)`), so Z W runs
  beside the rsqrt and each linear's output is ready with the LayerNorm's own, one round
  sooner (it opens Z W, the linear's output width, instead of LN(x)). The linear only adds
  its bias and truncates (or defers that) as after a raw output. Saves one round per
  such LayerNorm (two per Transformer layer: FFN1 and the next layer's Q/K/V). Marks:
  layernorm "commute_into" = {linear: (its fixed operand key, its output width)}, linear
  "commuted".

Only chains whose every intermediate value has that single user and is not a graph output
qualify: nothing else ever sees a pending value. Marks (node.meta, not saved in artifacts:
recomputed on load): producer "defer" = extra shift s, a passing add/scale "pending_in" =
the input position carrying the pending value, the consumer "pending_in" = 0 and
"pending_shift" = s.
"""

from __future__ import annotations

import math

from .ir import Graph, Node

_KEYS = ("defer", "pending_in", "pending_shift", "folded", "unnormalized", "normalizes",
         "raw", "raw_in", "raw_add", "defer_raw", "commute_into", "commuted")


def _power_of_two_shift(factor: float) -> int | None:
    """s with factor = 2^-s, s >= 0; None otherwise."""
    if not factor > 0:
        return None
    m, e = math.frexp(factor)
    return 1 - e if m == 0.5 and e <= 1 else None


def plan_deferred(graph: Graph, frac_bits: int = 16) -> list[str]:
    """Mark the deferred truncations (see the module docstring) for f = frac_bits; returns the
    producers."""
    users: dict[str, list[Node]] = {}
    for n in graph:
        for k in _KEYS:
            n.meta.pop(k, None)
        for i in n.inputs:
            users.setdefault(i, []).append(n)
    outputs = set(graph.outputs)
    nodes = {n.name: n for n in graph}

    def sole_user(name: str, user: Node) -> bool:
        us = users.get(name, [])
        return name not in outputs and len(us) == 1 and us[0] is user

    producers = []
    for n in graph:
        method = n.attrs.get("method")
        if n.op == "layernorm" and method == "layernorm.secformer" and n.attrs.get("dims") == 1:
            src = nodes[n.inputs[0]]
            if not sole_user(src.name, n):
                continue
            chain = [(n, 0, None)]
            if src.op == "add":
                for pos in (0, 1):
                    p = nodes[src.inputs[pos]]
                    if p.op == "linear" and p.secret and sole_user(p.name, src):
                        chain, src = [(n, 0, None), (src, pos, None)], p
                        break
            if src.op != "linear" or not src.secret:
                continue
            _mark(chain, src, 0)
            producers.append(src.name)
        elif n.op == "gelu" and method in ("gelu.secformer", "gelu.secformer_erf"):
            src = nodes[n.inputs[0]]
            if src.op == "linear" and src.secret and sole_user(src.name, n):
                _mark([(n, 0, None)], src, 0)
                producers.append(src.name)
        elif n.op == "softmax" and method == "softmax.2quad":
            src = nodes[n.inputs[0]]
            if not sole_user(src.name, n):
                continue
            chain, shift = [(n, 0, None)], 0
            if src.op == "scale":
                s = _power_of_two_shift(float(src.attrs["factor"]))
                p = nodes[src.inputs[0]]
                if s is None or not sole_user(p.name, src):
                    continue
                chain, shift, src = [(n, 0, None), (src, 0, "folded")], s, p
            if src.op != "matmul" or not all(nodes[i].secret for i in src.inputs) \
                    or nodes[src.inputs[1]].op == "weight":
                continue
            _mark(chain, src, shift)
            producers.append(src.name)
    for n in graph:
        if n.op == "matmul" and len(n.inputs) == 2:
            sm, v = nodes[n.inputs[0]], nodes[n.inputs[1]]
            if (sm.op == "softmax" and sm.attrs.get("method") == "softmax.2quad"
                    and sm.attrs.get("dim") in (-1, len(sm.shape) - 1) and sole_user(sm.name, n)
                    and v.secret and v.op != "weight" and n.inputs[0] != n.inputs[1]):
                sm.meta["unnormalized"] = True
                n.meta["normalizes"] = True
    _plan_raw_layernorms(graph, users, outputs, nodes, frac_bits)
    return producers


def _plan_raw_layernorms(graph: Graph, users: dict, outputs: set, nodes: dict, f: int) -> None:
    from .runtime.protocols.nonlinear import layernorm_commutes, layernorm_raw_frac

    for n in graph:
        if n.op != "layernorm" or n.attrs.get("method") != "layernorm.secformer" \
                or n.attrs.get("dims") != 1 or n.name in outputs:
            continue
        raw_frac = layernorm_raw_frac(float((n.attrs.get("params") or {}).get("prescale", 0.0)), f)
        us = users.get(n.name, [])
        if raw_frac is None or not us:
            continue
        linears, adds, gains = [], [], []
        for u in us:
            if u.op == "linear" and u.inputs[0] == n.name and n.name not in u.inputs[1:] \
                    and u.meta.get("fixed", {}).get(1) is not None:
                linears.append(u)
            elif u.op == "mul" and u.inputs[0] == n.name and n.name not in u.inputs[1:] \
                    and u.meta.get("fixed", {}).get(1) is not None:
                gains.append(u)  # N(x) gamma after fold_layernorm_affine: truncates by more
            elif u.op == "add" and u.meta.get("pending_in") is not None \
                    and u.inputs[1 - u.meta["pending_in"]] == n.name \
                    and "defer" in nodes[u.inputs[u.meta["pending_in"]]].meta \
                    and nodes[u.inputs[u.meta["pending_in"]]].meta["defer"] == 0:
                adds.append(u)
            else:
                break
        else:
            if not linears:
                continue
            params = n.attrs.get("params") or {}
            # a table-seeded 1/sqrt (2 rounds) finishes before Z W could open unless Z is
            # ready in round 2: no gain to multiply first (passes/rounds.py)
            if params.get("table_bits"):
                gainful = len(n.inputs) == 1
            else:
                gainful = layernorm_commutes(int(params.get("iterations", 0)))
            commute = bool(n.attrs.get("commute")) and gainful
            extra = raw_frac - f  # bits above f (a commuted product carries as many)
            n.meta["raw"] = raw_frac
            if commute:
                n.meta["commute_into"] = {u.name: (u.meta["fixed"][1], u.shape[-1]) for u in linears}
            for u in linears:
                u.meta["raw_in"] = raw_frac
                if commute:
                    u.meta["commuted"] = True
                if "defer" in u.meta:  # its consumer (GeLU) finishes a truncation by more
                    for c in users.get(u.name, []):
                        if c.meta.get("pending_in") == 0:
                            c.meta["pending_shift"] = c.meta.get("pending_shift", 0) + extra
            for g in gains:
                g.meta["raw_in"] = raw_frac
            for a in adds:
                lin = nodes[a.inputs[a.meta["pending_in"]]]
                del lin.meta["defer"]
                lin.meta["defer_raw"] = True
                a.meta["raw_add"] = raw_frac
                for c in users.get(a.name, []):  # the LayerNorm after it
                    c.meta["pending_shift"] = raw_frac - 2 * f


def _mark(chain: list, producer: Node, shift: int) -> None:
    producer.meta["defer"] = shift
    for node, pos, flag in chain:
        node.meta["pending_in"] = pos
        if flag:
            node.meta[flag] = True
    chain[0][0].meta["pending_shift"] = shift
