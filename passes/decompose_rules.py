"""Decomposition rules for linear algebra, layout, reductions, selection and attention.

Registered into `decompose.RULES`; see `decompose.py` for the pass itself.
"""

from __future__ import annotations

import math

import torch

from ..ir import Graph, Node
from .decompose import Ctx, _combine, _dim, _scalar, bind_args, rule

# -- linear algebra ---------------------------------------------------------------------


@rule("aten.linear.default")
def _linear(c: Ctx) -> str:
    ins = [c.a["input"], c.a["weight"]] + ([c.a["bias"]] if c.a["bias"] is not None else [])
    return c.emit("linear", ins, last=True).name


def _matmul(c: Ctx, a: Node, b: Node) -> str:
    if len(a.shape) >= 2 and len(b.shape) >= 2:
        return c.emit("matmul", [a, b], last=True).name
    a2 = c.emit("unsqueeze", [a], {"dim": 0}) if len(a.shape) == 1 else a
    b2 = c.emit("unsqueeze", [b], {"dim": 1}) if len(b.shape) == 1 else b
    y = c.emit("matmul", [a2, b2])
    dims = ([len(y.shape) - 2] if len(a.shape) == 1 else []) + ([len(y.shape) - 1] if len(b.shape) == 1 else [])
    return c.emit("squeeze", [y], {"dims": dims}, last=True).name


@rule("aten.matmul.default", "aten.mm.default", "aten.bmm.default")
def _mm(c: Ctx) -> str:
    return _matmul(c, c.a["self"], c.a["other"] if "other" in c.a else c.a["mat2"])


@rule("aten.addmm.default")
def _addmm(c: Ctx) -> str:
    b, x, w = c.a["self"], c.a["mat1"], c.a["mat2"]
    beta, alpha = c.a["beta"], c.a["alpha"]
    wt = c.weight_fn(w, ".T", lambda t: t.t())  # GPT-2's Conv1D stores [in, out]
    if wt is not None and beta == 1 and alpha == 1:
        return c.emit("linear", [x, wt, b], last=True).name
    y = c.emit("matmul", [x, w])
    y = _combine(c, "mul", y, alpha) if alpha != 1 else y
    b = _combine(c, "mul", b, beta) if beta != 1 else b
    return _combine(c, "add", y, b).name


@rule("aten.embedding.default")
def _embedding(c: Ctx) -> str:
    return c.emit("embedding", [c.a["indices"], c.a["weight"]], last=True).name


def _public_index(node: Node, g: Graph) -> str | None:
    idx = g[node.inputs[-1]]
    return None if not idx.secret else "index_select with a secret index"


@rule("aten.index_select.default", check=_public_index)
def _index_select(c: Ctx) -> str:
    x = c.a["self"]
    return c.emit("index_select", [x, c.a["index"]], {"dim": _dim(c.a["dim"], len(x.shape))}, last=True).name


def _conv_check(node: Node, g: Graph) -> str | None:
    a = bind_args(node, lambda r: g[node.inputs[r.index]])
    w, stride = a["weight"], list(a["stride"])
    k = list(w.shape[2:])
    ok = (k == stride and list(a["padding"]) in ([0, 0], [0]) and list(a["dilation"]) in ([1, 1], [1])
          and a["groups"] == 1 and all(s % kk == 0 for s, kk in zip(a["input"].shape[2:], k)))
    return None if ok else f"conv2d with kernel {k}, stride {stride} (only patch embeddings: kernel = stride, no padding)"


@rule("aten.conv2d.default", check=_conv_check)
def _conv2d_patches(c: Ctx) -> str:
    """Non-overlapping patches (ViT): reshape/permute into [B, patches, C*p*q] and one linear."""
    x, w, b = c.a["input"], c.a["weight"], c.a["bias"]
    (bsz, ch, h, wd), (out, _, p, q) = x.shape, w.shape
    gh, gw = h // p, wd // q
    y = c.emit("reshape", [x], {"shape": [bsz, ch, gh, p, gw, q]})
    y = c.emit("permute", [y], {"dims": [0, 2, 4, 1, 3, 5]})
    y = c.emit("reshape", [y], {"shape": [bsz, gh * gw, ch * p * q]})
    wf = c.weight_fn(w, ".patches", lambda t: t.reshape(out, ch * p * q))
    if wf is None:
        wf = c.emit("reshape", [w], {"shape": [out, ch * p * q]})
    y = c.emit("linear", [y, wf] + ([b] if b is not None else []))
    y = c.emit("reshape", [y], {"shape": [bsz, gh, gw, out]})
    return c.emit("permute", [y], {"dims": [0, 3, 1, 2]}, last=True).name


# -- layout -----------------------------------------------------------------------------


@rule("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.flatten.using_ints",
      "aten.unflatten.int", "aten.view_as.default", "aten.reshape_as.default")
def _reshape(c: Ctx) -> str:
    x = c.a["self"]
    if x.shape == c.node.shape:
        return x.name
    return c.emit("reshape", [x], {"shape": list(c.node.shape)}, last=True).name


@rule("aten.permute.default")
def _permute(c: Ctx) -> str:
    x = c.a["self"]
    dims = [_dim(d, len(x.shape)) for d in c.a["dims"]]
    if dims == sorted(dims):
        return x.name
    return c.emit("permute", [x], {"dims": dims}, last=True).name


@rule("aten.transpose.int", "aten.t.default")
def _transpose(c: Ctx) -> str:
    x = c.a["self"]
    nd = len(x.shape)
    d0, d1 = (c.a["dim0"], c.a["dim1"]) if "dim0" in c.a else (0, 1 if nd > 1 else 0)
    d0, d1 = sorted((_dim(d0, nd), _dim(d1, nd)))
    if d0 == d1:
        return x.name
    return c.emit("transpose", [x], {"dim0": d0, "dim1": d1}, last=True).name


@rule("aten.expand.default", "aten.expand_as.default")
def _expand(c: Ctx) -> str:
    x = c.a["self"]
    if x.shape == c.node.shape:
        return x.name
    return c.emit("expand", [x], {"shape": list(c.node.shape)}, last=True).name


@rule("aten.slice.Tensor")
def _slice(c: Ctx) -> str:
    x = c.a["self"]
    dim = _dim(c.a["dim"], len(x.shape))
    step = c.a["step"]
    r = range(x.shape[dim])[slice(c.a["start"], c.a["end"], step)]
    start, end = r.start, max(r.stop, r.start)
    if start == 0 and end == x.shape[dim] and step == 1:
        return x.name
    return c.emit("slice", [x], {"dim": dim, "start": start, "end": end, "step": step}, last=True).name


@rule("aten.narrow.default")
def _narrow(c: Ctx) -> str:
    x = c.a["self"]
    dim = _dim(c.a["dim"], len(x.shape))
    start = c.a["start"] % x.shape[dim]
    return c.emit("slice", [x], {"dim": dim, "start": start, "end": start + c.a["length"], "step": 1},
                  last=True).name


@rule("aten.select.int")
def _select(c: Ctx) -> str:
    x = c.a["self"]
    dim = _dim(c.a["dim"], len(x.shape))
    return c.emit("select", [x], {"dim": dim, "index": c.a["index"] % x.shape[dim]}, last=True).name


@rule("aten.unsqueeze.default")
def _unsqueeze(c: Ctx) -> str:
    x = c.a["self"]
    return c.emit("unsqueeze", [x], {"dim": _dim(c.a["dim"], len(x.shape) + 1)}, last=True).name


@rule("aten.squeeze.default", "aten.squeeze.dim", "aten.squeeze.dims")
def _squeeze(c: Ctx) -> str:
    x = c.a["self"]
    nd = len(x.shape)
    want = c.a.get("dim", c.a.get("dims"))
    want = range(nd) if want is None else ([want] if isinstance(want, int) else want)
    dims = sorted({_dim(d, nd) for d in want if x.shape[_dim(d, nd)] == 1})
    if not dims:
        return x.name
    return c.emit("squeeze", [x], {"dims": dims}, last=True).name


@rule("aten.cat.default")
def _cat(c: Ctx) -> str:
    xs = c.a["tensors"]
    nd = len(c.node.shape)
    return c.emit("cat", [x if x.dtype == "f32" else c.public_f32(x) for x in xs], {"dim": _dim(c.a["dim"], nd)},
                  last=True).name


@rule("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int")
def _split(c: Ctx) -> None:
    x = c.a["self"]
    dim = _dim(c.a.get("dim", 0), len(x.shape))
    n = x.shape[dim]
    if "split_size" in c.a:
        sizes = [min(c.a["split_size"], n - s) for s in range(0, n, c.a["split_size"])]
    elif "split_sizes" in c.a:
        sizes = list(c.a["split_sizes"])
    elif "chunks" in c.a:
        each = -(-n // c.a["chunks"])
        sizes = [min(each, n - s) for s in range(0, n, each)]
    else:
        sizes = None  # unbind
    c.splits[c.node.name] = (x, dim, sizes)
    return None


@rule("getitem")
def _getitem(c: Ctx) -> str:
    src = c.node.inputs[0]
    x, dim, sizes = c.splits[src]
    i = c.node.attrs["args"][1]
    if sizes is None:
        return c.emit("select", [x], {"dim": dim, "index": i}, last=True).name
    start = sum(sizes[:i])
    if sizes[i] == x.shape[dim]:
        return x.name
    return c.emit("slice", [x], {"dim": dim, "start": start, "end": start + sizes[i], "step": 1}, last=True).name


# -- reductions -------------------------------------------------------------------------


def _reduce_dims(c: Ctx, x: Node) -> tuple[list[int], bool]:
    dims = c.a.get("dim")
    nd = len(x.shape)
    dims = list(range(nd)) if dims in (None, []) else ([dims] if isinstance(dims, int) else list(dims))
    return sorted(_dim(d, nd) for d in dims), bool(c.a.get("keepdim") or False)


@rule("aten.sum.dim_IntList", "aten.sum.default", "aten.mean.dim", "aten.mean.default")
def _sum_mean(c: Ctx) -> str:
    x = c.a["self"]
    dims, keep = _reduce_dims(c, x)
    op = "mean" if ".mean." in c.node.op else "sum"
    return c.emit(op, [x], {"dims": dims, "keepdim": keep}, last=True).name


@rule("aten.var.correction", "aten.var.dim")
def _var(c: Ctx) -> str:
    x = c.a["self"]
    dims, keep = _reduce_dims(c, x)
    corr = c.a.get("correction")
    if "unbiased" in c.a:
        corr = 1 if c.a["unbiased"] else 0
    corr = 1 if corr is None else corr
    u = c.emit("mean", [x], {"dims": dims, "keepdim": True})
    d = c.emit("sub", [x, u])
    sq = c.emit("mul", [d, d])
    if corr == 0:
        return c.emit("mean", [sq], {"dims": dims, "keepdim": keep}, last=True).name
    n = math.prod(x.shape[d] for d in dims)
    s = c.emit("sum", [sq], {"dims": dims, "keepdim": keep})
    return c.emit("scale", [s], {"factor": 1.0 / (n - corr)}, last=True).name


# -- selection with public conditions ---------------------------------------------------


def _public_cond(node: Node, g: Graph) -> str | None:
    a = bind_args(node, lambda r: g[node.inputs[r.index]])
    cond = a.get("condition", a.get("mask"))
    return "selection by a secret condition (needs comparisons)" if cond.secret else None


@rule("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar", check=_public_cond)
def _where(c: Ctx) -> str:
    a, b = c.a["self"], c.a["other"]
    a = c.const(a) if _scalar(a) is not None and not isinstance(a, Node) else a
    b = c.const(b) if _scalar(b) is not None and not isinstance(b, Node) else b
    return c.emit("where", [c.a["condition"], a, b], last=True).name


@rule("aten.masked_fill.Scalar", "aten.masked_fill.Tensor", check=_public_cond)
def _masked_fill(c: Ctx) -> str:
    v = c.a["value"]
    v = v if isinstance(v, Node) else c.const(v)
    return c.emit("where", [c.a["mask"], v, c.a["self"]], last=True).name


# -- attention --------------------------------------------------------------------------


def _sdpa_check(node: Node, g: Graph) -> str | None:
    a = bind_args(node, lambda r: g[node.inputs[r.index]])
    if a["dropout_p"]:
        return "scaled_dot_product_attention with dropout"
    if a["attn_mask"] is not None and a["attn_mask"].secret:
        return "scaled_dot_product_attention with a secret mask"
    if a["is_causal"] and a["attn_mask"] is not None and a["attn_mask"].dtype != "bool":
        return "causal scaled_dot_product_attention with an additive mask"
    if a["enable_gqa"] and a["query"].shape[-3] != a["key"].shape[-3]:
        return "grouped-query attention"
    return None


@rule("aten.scaled_dot_product_attention.default", check=_sdpa_check)
def _sdpa(c: Ctx) -> str:
    """softmax(q k^T * scale + mask) v, written the way eager attention writes it."""
    q, k, v, mask = c.a["query"], c.a["key"], c.a["value"], c.a["attn_mask"]
    nd = len(q.shape)
    factor = c.a["scale"] if c.a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    kt = c.emit("transpose", [k], {"dim0": nd - 2, "dim1": nd - 1})
    s = c.emit("matmul", [q, kt])
    s = c.emit("scale", [s], {"factor": float(factor)})
    multiplicative = mask is not None and mask.dtype == "bool"
    if c.a["is_causal"]:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        mask = c.const(causal.float()) if mask is None else c.public_f32(mask, "and_to_float", causal)
        multiplicative = True
    elif multiplicative:
        mask = c.public_f32(mask)
    if mask is not None and not multiplicative:
        s = c.emit("add", [s, mask if mask.dtype == "f32" else c.public_f32(mask)])
    p = c.emit("softmax", [s, mask] if multiplicative else [s], {"dim": nd - 1})
    return c.emit("matmul", [p, v], last=True).name


__all__ = ["_scalar"]
