"""`fuse_sibling_linears`: linear layers that read the same secret input become one.

Why: a linear layer with a fixed weight opens its input against a fresh mask (E = X - A,
runtime/protocols/arith.py), so attention's query, key and value projections of the same
hidden states opened three masked copies of one matrix. As one linear layer over the
concatenated weight [W_q; W_k; W_v] they open it once: for BERT-base at seq 128 that is
2 x 128 x 768 ring values (1.5 MiB) fewer per layer and party, and one ring product of
(128 x 768) @ (768 x 2304) instead of three. Security is unchanged: what is opened is still
one input minus one fresh uniform mask, and each output is the same ring value as before.
The outputs are sliced back apart (local), so every later op sees the values it saw.

Fused: two or more `linear` nodes with the same secret input whose weights (and biases,
all or none) are `weight` nodes read by nothing else. The fused weight is a new model
weight, `<common prefix>.{query,key,value}.weight` for attention; the originals leave the
program (`eliminate_dead_code`). graph.meta["fused_weights"] records which model weights
make up each fused one, row by row, so the training view still trains (and
`trained_state_dict` still returns) the model's own parameters.
"""

from __future__ import annotations

import os

import torch

from ..ir import Graph, Node, Rewriter
from .registry import register_pass

FUSED_WEIGHTS = "fused_weights"  # graph.meta: fused weight name -> [[model weight name, rows], ...]


def _fusable(graph: Graph, n: Node, users: dict[str, list[Node]]) -> bool:
    if n.op != "linear" or not graph[n.inputs[0]].secret:
        return False
    for name in n.inputs[1:]:
        src = graph[name]
        if src.op != "weight" or len(users[name]) != 1:
            return False
    return True


def _fused_name(names: list[str]) -> str:
    """`a.b.query.weight`, `a.b.key.weight` -> `a.b.{query,key}.weight` (names kept apart
    by `+` where they share no dotted prefix and suffix)."""
    parts = [n.split(".") for n in names]
    pre = os.path.commonprefix(parts)
    suf = os.path.commonprefix([p[len(pre):][::-1] for p in parts])[::-1]
    middles = [".".join(p[len(pre):len(p) - len(suf)]) for p in parts]
    if all(middles):
        return ".".join(pre + ["{" + ",".join(middles) + "}"] + suf)
    return "+".join(names)


@register_pass("fuse_sibling_linears")
def fuse_sibling_linears(graph: Graph) -> Graph:
    """Linear layers reading the same secret input become one over concatenated weights."""
    users = graph.users()
    groups: dict[tuple, list[Node]] = {}
    for n in graph:
        if _fusable(graph, n, users):
            groups.setdefault((n.inputs[0], len(n.inputs)), []).append(n)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return graph
    first = {v[0].name: v for v in groups.values()}
    fused = {n.name for v in groups.values() for n in v}
    rw = Rewriter(graph)
    rw.dst.meta[FUSED_WEIGHTS] = dict(graph.meta.get(FUSED_WEIGHTS, {}))
    rw.dst.weights = dict(graph.weights)
    for n in graph:
        if n.name in first:
            _emit_fused(rw, graph, first[n.name])
        elif n.name not in fused:
            rw.copy(n)
    return rw.finish()


def _emit_fused(rw: Rewriter, graph: Graph, group: list[Node]) -> None:
    """One linear over the concatenated weights (and biases), then one slice per member.
    Emitted where the group's first member stood: every member's input exists by then, and
    the slices only have to precede the members' users, which follow their members."""
    like = group[0]
    x = rw.env[like.inputs[0]]
    ins = [x]
    for pos in range(1, len(like.inputs)):
        names = [graph[m.inputs[pos]].attrs["name"] for m in group]
        name = _fused_name(names)
        # where its rows came from: the training view trains the model's own parameters
        # (training.py), and artifacts keep the map
        rw.dst.meta.setdefault(FUSED_WEIGHTS, {})[name] = [[k, int(graph.weights[k].shape[0])] for k in names]
        ins.append(rw.weight(name, torch.cat([graph.weights[k] for k in names], dim=0).contiguous(),
                             like=graph[like.inputs[pos]]))
    paths = [m.module_path.split(".") for m in group]
    path = ".".join(os.path.commonprefix(paths))
    out = rw.emit("linear", ins, like=like, name=f"{like.name}_fused", module_path=path)
    start = 0
    dim = len(rw.dst[out].shape) - 1
    for m in group:
        width = m.shape[-1]
        rw.bind(m.name, rw.emit("slice", [out], {"dim": dim, "start": start, "end": start + width, "step": 1},
                                like=m, name=m.name))
        start += width
