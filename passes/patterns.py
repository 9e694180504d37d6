"""Pattern recognition: GeLU (erf and tanh forms), LayerNorm, and masked softmax.

Models write these functions many ways; MPC wants each as one op so that one protocol
(SecFormer's, or a baseline's) evaluates it. Matchers work on the frontend-level IR, where
`decompose_aten` has made multiplication by a public scalar a `scale`, so the written-out
forms are small trees:

- GeLU, tanh form (GPT-2, ALBERT `gelu_new`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));
- GeLU, erf form: 0.5 x (1 + erf(x / sqrt 2)); `aten.gelu` arrives already whole;
- LayerNorm: (x - mean(x)) * rsqrt(mean((x - mean(x))^2) + eps) (or / sqrt(...)), then an
  optional elementwise affine by weights; `aten.layer_norm` arrives whole;
- softmax(x + m) with a public additive mask m, softmax(where(cond, x, -big)) and
  softmax(masked_fill(x, cond, -big)): the public mask becomes a multiplicative 0/1 mask
  input of `softmax`, so that 2Quad can zero masked positions (DESIGN.md), instead of
  squaring (-big + c).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..ir import DTYPES, Graph, Node, Rewriter
from .registry import register_pass
from .secrecy import PublicFn, example_value, public_node, then

Replace = Callable[[Rewriter], str]
MASK_THRESHOLD = -1e4  # additive entries at or below this are "excluded" (exp(-1e4) == 0)


def rewrite(graph: Graph, replacements: dict[str, Replace]) -> Graph:
    """Copy `graph`, emitting `replacements[name](rw)` in place of each replaced node."""
    if not replacements:
        return graph
    rw = Rewriter(graph)
    for n in graph:
        if n.name in replacements:
            rw.bind(n.name, replacements[n.name](rw))
        else:
            rw.copy(n)
    return rw.finish()


def _scalar(g: Graph, name: str) -> float | None:
    n = g[name]
    if n.op == "constant" and n.attrs["value"].numel() == 1:
        return float(n.attrs["value"].item())
    return None


def _close(a: float | None, b: float, rel: float = 1e-4) -> bool:
    return a is not None and abs(a - b) <= rel * abs(b)


def _peel_scale(g: Graph, n: Node) -> tuple[float, Node]:
    k = 1.0
    while n.op == "scale":
        k *= n.attrs["factor"]
        n = g[n.inputs[0]]
    return k, n


def _only_user(users: dict[str, list[Node]], n: Node) -> Node | None:
    u = users[n.name]
    return u[0] if len(u) == 1 else None


def _is_cube_of(g: Graph, n: Node, x: str) -> bool:
    if n.op != "mul":
        return False
    a, b = n.inputs
    sq = lambda m: m.op == "mul" and m.inputs == [x, x]  # noqa: E731
    return (a == x and sq(g[b])) or (b == x and sq(g[a]))


def _other(n: Node, name: str) -> str | None:
    a, b = n.inputs
    return b if a == name else a if b == name else None


def _emit(op: str, old_inputs: list[str], attrs: dict, like: Node, name: str | None = None) -> Replace:
    """Emit `op` for the matched subgraph ending at `like`; named after the op by default."""
    return lambda rw: rw.emit(op, [rw.env[i] for i in old_inputs], attrs, like=like, name=name or op)


# ---------------------------------------------------------------------------------------


def _gelu_core(g: Graph, t: Node) -> tuple[str, str] | None:
    """(x, approximate) if `t` is tanh(sqrt(2/pi)(x + 0.044715 x^3)) or erf(x / sqrt 2)."""
    k, inner = _peel_scale(g, g[t.inputs[0]])
    if t.op == "erf":
        return (inner.name, "none") if _close(k, 1 / math.sqrt(2)) else None
    if not _close(k, math.sqrt(2 / math.pi)) or inner.op != "add":
        return None
    for x, other in (inner.inputs, inner.inputs[::-1]):
        c, cube = _peel_scale(g, g[other])
        if _close(c, 0.044715) and _is_cube_of(g, cube, x):
            return x, "tanh"
    return None


@register_pass("recognize_gelu")
def recognize_gelu(graph: Graph) -> Graph:
    """Replace written-out GeLU (tanh form and erf form) by one `gelu` op."""
    users = graph.users()
    found: dict[str, Replace] = {}
    for t in graph:
        if t.op not in ("tanh", "erf"):
            continue
        core = _gelu_core(graph, t)
        a = _only_user(users, t)
        if core is None or a is None or a.op != "add" or not _close(_scalar(graph, _other(a, t.name) or t.name), 1.0):
            continue
        x, approx = core
        cur, coef, have_x = a, 1.0, False
        while (u := _only_user(users, cur)) is not None:
            if u.op == "scale":
                coef *= u.attrs["factor"]
            elif u.op == "mul" and (o := _other(u, cur.name)) is not None:
                k, base = _peel_scale(graph, graph[o])
                if base.name != x or have_x:
                    break
                have_x, coef = True, coef * k
            else:
                break
            cur = u
            if have_x and _close(coef, 0.5, 1e-6):
                found[cur.name] = _emit("gelu", [x], {"approximate": approx}, cur)
                break
    return rewrite(graph, found)


# ---------------------------------------------------------------------------------------


def _centered(g: Graph, n: Node) -> tuple[str, list[int]] | None:
    """(x, dims) if n is x - mean(x, dims, keepdim=True)."""
    if n.op != "sub":
        return None
    x, u = n.inputs
    m = g[u]
    if m.op == "mean" and m.inputs == [x] and m.attrs["keepdim"]:
        return x, list(m.attrs["dims"])
    return None


def _layernorm_core(g: Graph, r: Node) -> tuple[str, list[int], float] | None:
    """(x, dims, eps) if r is rsqrt / sqrt of mean((x - mean x)^2) + eps."""
    ve = g[r.inputs[0]]
    eps = 0.0
    if ve.op == "add":
        for v_name, e_name in (ve.inputs, ve.inputs[::-1]):
            if _scalar(g, e_name) is not None:
                ve, eps = g[v_name], _scalar(g, e_name)
                break
    if ve.op != "mean" or not ve.attrs["keepdim"]:
        return None
    sq = g[ve.inputs[0]]
    if sq.op != "mul" or sq.inputs[0] != sq.inputs[1]:
        return None
    cen = _centered(g, g[sq.inputs[0]])
    if cen is None or cen[1] != list(ve.attrs["dims"]):
        return None
    return cen[0], cen[1], eps


@register_pass("recognize_layernorm")
def recognize_layernorm(graph: Graph) -> Graph:
    """Replace hand-written LayerNorm (mean / variance / rsqrt, optional affine) by `layernorm`."""
    users = graph.users()
    found: dict[str, Replace] = {}
    for r in graph:
        if r.op not in ("rsqrt", "sqrt") or (core := _layernorm_core(graph, r)) is None:
            continue
        x, dims, eps = core
        nd = len(graph[x].shape)
        if dims != list(range(nd - len(dims), nd)):
            continue
        n = _only_user(users, r)
        want = "mul" if r.op == "rsqrt" else "div"
        if n is None or n.op != want or (d := _other(n, r.name)) is None or _centered(graph, graph[d]) != (x, dims):
            continue
        if want == "div" and n.inputs[1] != r.name:
            continue
        end, params = n, []
        for op in ("mul", "add"):  # elementwise affine: * w then + b
            u = _only_user(users, end)
            p = _other(u, end.name) if u is not None and u.op == op else None
            if p is None or graph[p].shape != graph[x].shape[nd - len(dims):] or graph[p].op == "input":
                break
            end, params = u, params + [p]
        found[end.name] = _emit("layernorm", [x] + params, {"eps": eps, "dims": len(dims)}, end)
    return rewrite(graph, found)


# ---------------------------------------------------------------------------------------


class MaskProduct:
    """Product of two public masks, each computed by its own function of its own inputs."""

    def __init__(self, fa: Callable, na: int, fb: Callable, nb: int):
        self.fa, self.na, self.fb, self.nb = fa, na, fb, nb
        self.label = f"{_label(fa)}*{_label(fb)}"

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fa(*xs[: self.na]) * self.fb(*xs[self.na:])


def _label(fn: Callable) -> str:
    return getattr(fn, "label", getattr(fn, "__name__", "fn"))


def _as_fn(g: Graph, m: Node) -> tuple[Callable, list[str]]:
    """The public node `m` as (fn, old input names)."""
    if m.op == "public_fn":
        return m.attrs["fn"], list(m.inputs)
    if m.op == "input":
        return PublicFn(m.name, [m.name], [], {}, m.name), [m.name]
    value = m.attrs["value"]
    return PublicFn(m.name, [], [], {m.name: value}, m.name), []


def _mask_of(g: Graph, x: Node) -> tuple[str, Callable, list[str], float] | None:
    """For a softmax input x = k * (y (+) public mask), k > 0: (y, mask fn, mask inputs, k)."""
    k = 1.0
    while x.op == "scale" and x.attrs["factor"] > 0:  # the mask is read before scaling: -big stays big
        k *= x.attrs["factor"]
        x = g[x.inputs[0]]
    m = _unscaled_mask_of(g, x)
    return None if m is None else (*m, k)


def _unscaled_mask_of(g: Graph, x: Node) -> tuple[str, Callable, list[str]] | None:
    if x.op == "add":
        for y, m in (x.inputs, x.inputs[::-1]):
            mn = g[m]
            if g[y].secret and not mn.secret and mn.dtype == "f32":
                fn, ins = _as_fn(g, mn)
                ex = example_value(g, m)
                if ex is not None and bool(torch.any(torch.where(ex > MASK_THRESHOLD, ex, 0) != 0)):
                    return None  # a real additive bias (e.g. ALiBi): leave the add in place
                return y, then(fn, "additive_to_mask"), ins
    if x.op == "where":
        cond, a, b = x.inputs
        for big, y, helper in ((a, b, "not_to_float"), (b, a, "to_float")):
            v = _scalar(g, big)
            if v is not None and v <= MASK_THRESHOLD and g[y].secret:
                fn, ins = _as_fn(g, g[cond])
                return y, then(fn, helper), ins
    return None


@register_pass("recognize_softmax_mask")
def recognize_softmax_mask(graph: Graph) -> Graph:
    """Turn additive / masked_fill / where masks before a softmax into its 0/1 `mask` input."""
    found: dict[str, Replace] = {}
    for s in graph:
        if s.op != "softmax":
            continue
        y, fn, ins, steps, factor = s.inputs[0], None, [], 0, 1.0
        while (m := _mask_of(graph, graph[y])) is not None:
            y, f2, ins2, k = m
            factor *= k
            if fn is None:
                fn, ins = f2, ins2
            else:
                fn, ins = MaskProduct(fn, len(ins), f2, len(ins2)), ins + ins2
            steps += 1
        if len(s.inputs) == 2:  # already masked (sdpa with a bool mask): multiply the masks
            if steps == 0:
                mask = graph[s.inputs[1]]
                if mask.op == "constant" and bool(torch.all(mask.attrs["value"] == 1)):
                    found[s.name] = _emit("softmax", [y], dict(s.attrs), s, name=s.name)
                continue
            f0, ins0 = _as_fn(graph, graph[s.inputs[1]])
            fn, ins = MaskProduct(fn, len(ins), f0, len(ins0)), ins + ins0
        if steps == 0:
            continue
        found[s.name] = _softmax_with_mask(s, y, fn, ins, factor)
    return rewrite(graph, found)


def _softmax_with_mask(s: Node, y: str, fn: Callable, ins: list[str], factor: float) -> Replace:
    def emit(rw: Rewriter) -> str:
        new_ins = [rw.env[i] for i in ins]
        x = rw.env[y]
        if factor != 1.0:
            x = rw.emit("scale", [x], {"factor": factor}, like=s, name=f"{s.name}_scale")
        if not new_ins:
            value = fn()
            if bool(torch.all(value == 1)):
                return rw.emit("softmax", [x], {"dim": s.attrs["dim"]}, like=s, name=s.name)
            mask = rw.constant(value.float(), s, name=f"{s.name}_mask")
        else:
            shape = tuple(fn(*[_sample(rw.dst, i) for i in new_ins]).shape)
            mask = public_node(rw, fn, new_ins, s, shape, "f32", f"{s.name}_mask")
        return rw.emit("softmax", [x, mask], {"dim": s.attrs["dim"]}, like=s, name=s.name)
    return emit


def _sample(g: Graph, name: str) -> torch.Tensor:
    """A valid value of public node `name`: its example value, else ones (e.g. "no padding")."""
    ex = example_value(g, name)
    return ex if ex is not None else torch.ones(g[name].shape, dtype=DTYPES[g[name].dtype])
