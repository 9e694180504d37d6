"""`decompose_aten`: rewrite the secret ATen ops into IR ops, one rule per ATen overload.

After `fold_public` every remaining ATen node computes a secret value. Each has a rule in
`RULES` (filled by `@rule`, which rejects duplicates) that emits IR ops: arithmetic with
public scalars becomes `scale`, views become `reshape`, `addmm` with a weight becomes
`linear` on a weight transposed at compile time, `scaled_dot_product_attention` becomes
matmul / scale / softmax / matmul exactly as eager attention writes it, and a
patch-embedding `conv2d` (kernel = stride, ViT) becomes reshape / permute / `linear`.
Ops that only pattern recognition can absorb (`div` of secrets, `rsqrt`, `erf`, `where`)
become frontend-level ops. A rule may carry a `check(node, graph) -> reason | None` for
argument values it cannot handle; `check_support` reports those with the missing rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import CompileError
from ..ir import Graph, Node, Ref, Rewriter, is_imported
from .registry import register_pass
from .secrecy import public_transform


@dataclass(frozen=True)
class Rule:
    fn: Callable[["Ctx"], str | None]
    check: Callable[[Node, Graph], str | None] | None = None


RULES: dict[str, Rule] = {}


def rule(*targets: str, check: Callable[[Node, Graph], str | None] | None = None) -> Callable:
    """Register a decomposition for ATen overloads `targets` (each at most once)."""

    def decorate(fn: Callable[["Ctx"], str | None]) -> Callable:
        for t in targets:
            if t in RULES:
                raise ValueError(f"decomposition for {t} registered twice")
            RULES[t] = Rule(fn, check)
        return fn

    return decorate


class Ctx:
    """What a rule sees: the old node, its arguments by schema name (inputs as new nodes)."""

    def __init__(self, rw: Rewriter, node: Node, splits: dict):
        self.rw, self.node, self.splits = rw, node, splits
        ins = [rw.new(i) if i in rw.env else None for i in node.inputs]  # a split has no value of its own
        self.a = bind_args(node, lambda r: ins[r.index])

    def emit(self, op: str, inputs: list[Node | str], attrs: dict | None = None, *, last: bool = False, **kw) -> Node:
        names = [i.name if isinstance(i, Node) else i for i in inputs]
        name = self.node.name if last else f"{self.node.name}_{op}"
        return self.rw.dst[self.rw.emit(op, names, attrs, like=self.node, name=name, **kw)]

    def const(self, value: Any) -> Node:
        t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
        t = t.to(torch.float64) if t.dtype == torch.bool else t
        return self.rw.dst[self.rw.constant(t, self.node, name=f"{self.node.name}_c")]

    def public_f32(self, p: Node, helper: str = "to_float", *extra: Any) -> Node:
        """Public node `p` (or a helper's transform of it) as an f32 public value."""
        return self.rw.dst[public_transform(self.rw, p, helper, *extra, like=self.node, name=f"{self.node.name}_mask")]

    def weight_fn(self, w: Node, suffix: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Node | None:
        """A compile-time transform of weight `w` as a new weight (None if `w` is not a weight)."""
        if w.op != "weight":
            return None
        key = w.attrs["name"] + suffix
        existing = [n for n in self.rw.dst if n.op == "weight" and n.attrs["name"] == key]
        if existing:
            return existing[0]
        value = fn(self.rw.dst.weights[w.attrs["name"]]).contiguous()
        self.rw.dst.weights[key] = value
        return self.emit("weight", [], {"name": key}, shape=tuple(value.shape), dtype="f32", secret=True,
                         module_path=w.module_path)


def bind_args(node: Node, ref: Callable[[Ref], Any]) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled, `Ref`s replaced by `ref(r)`."""

    def fill(t: Any) -> Any:
        if isinstance(t, Ref):
            return ref(t)
        if isinstance(t, (list, tuple)):
            return type(t)(fill(x) for x in t)
        return t

    target, args, kwargs = node.attrs["target"], node.attrs["args"], node.attrs["kwargs"]
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {i: fill(a) for i, a in enumerate(args)}
    out = {}
    for i, spec in enumerate(schema.arguments):
        if i < len(args) and not spec.kwarg_only:
            out[spec.name] = fill(args[i])
        elif spec.name in kwargs:
            out[spec.name] = fill(kwargs[spec.name])
        else:
            out[spec.name] = spec.default_value if spec.has_default_value() else None
    return out


def _dim(d: int, nd: int) -> int:
    return d % nd if nd else 0


def _scalar(v: Any) -> float | None:
    """A public scalar: a Python number or a one-element public constant."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, Node) and v.op == "constant" and v.attrs["value"].numel() == 1:
        return float(v.attrs["value"].item())
    return None


# -- identities and casts ---------------------------------------------------------------

def _no_training(node: Node, g: Graph) -> str | None:
    a = bind_args(node, lambda r: None)
    if a.get("train") and (a.get("p") or 0) > 0:
        return "dropout in training mode (call model.eval())"
    return None


def _cast_check(node: Node, g: Graph) -> str | None:
    src = g[node.inputs[0]].dtype
    return None if src == node.dtype or (src != "f32" and node.dtype == "i64") else \
        f"cast of a secret {src} to {node.dtype}"


@rule("aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default", check=_no_training)
def _dropout(c: Ctx) -> str:
    return c.a["input"].name


@rule("aten.contiguous.default", "aten.clone.default", "aten.alias.default", "aten.detach.default",
      "aten.lift_fresh_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.to.device",
      "aten._to_copy.default", "aten.type_as.default", check=_cast_check)
def _identity(c: Ctx) -> str:
    return c.a["self"].name


@rule("aten._assert_tensor_metadata.default")
def _drop(c: Ctx) -> None:
    return None


# -- arithmetic -------------------------------------------------------------------------

def _combine(c: Ctx, kind: str, a: Any, b: Any) -> Node:
    # A public scalar operand may become an attribute only if it does not broadcast the other.
    sa = _scalar(a) if not isinstance(b, Node) or b.shape == c.node.shape else None
    sb = _scalar(b) if not isinstance(a, Node) or a.shape == c.node.shape else None
    last = dict(last=True)
    if kind == "add":
        if sb is not None or sa is not None:
            x, s = (a, sb) if sb is not None else (b, sa)
            if s == 0 and x.shape == c.node.shape:
                return x
            return c.emit("add", [x, c.const(s)], **last)
        return c.emit("add", [_f32(c, a), _f32(c, b)], **last)
    if kind == "sub":
        if sb is not None:
            return _combine(c, "add", a, -sb)
        if sa is not None:
            return c.emit("sub", [c.const(sa), b], **last)
        return c.emit("sub", [_f32(c, a), _f32(c, b)], **last)
    if kind == "mul":
        if sb is not None or sa is not None:
            x, s = (a, sb) if sb is not None else (b, sa)
            if s == 1 and x.shape == c.node.shape:
                return x
            return c.emit("scale", [x], {"factor": s}, **last)
        return c.emit("mul", [_f32(c, a), _f32(c, b)], **last)
    if kind == "div":
        if sb is not None:
            return _combine(c, "mul", a, 1.0 / sb)
        if not b.secret:
            return c.emit("mul", [a, c.public_f32(b, "reciprocal")], **last)
        return c.emit("div", [c.const(sa) if sa is not None else a, b], **last)
    raise AssertionError(kind)


def _f32(c: Ctx, v: Node) -> Node:
    return v if v.secret or v.dtype == "f32" else c.public_f32(v)


def _arith(kind: str, swap: bool = False) -> Callable[[Ctx], str]:
    def fn(c: Ctx) -> str:
        a, b = c.a["self"], c.a["other"]
        if swap:  # rsub(self, other, alpha) = other - alpha * self
            a, b = b, a
        alpha = c.a.get("alpha", 1)
        if alpha not in (None, 1):
            b = b * alpha if _scalar(b) is not None and not isinstance(b, Node) else _combine(c, "mul", b, alpha)
        return _combine(c, kind, a, b).name
    return fn


for _k in ("add", "sub", "mul", "div"):
    rule(f"aten.{_k}.Tensor", f"aten.{_k}.Scalar")(_arith(_k))
rule("aten.rsub.Scalar", "aten.rsub.Tensor")(_arith("sub", swap=True))


@rule("aten.neg.default")
def _neg(c: Ctx) -> str:
    return c.emit("neg", [c.a["self"]], last=True).name


def _pow_check(node: Node, g: Graph) -> str | None:
    e = bind_args(node, lambda r: None)["exponent"]
    ok = e in (0.5, -0.5, -1) or (float(e).is_integer() and 1 <= e <= 8)
    return None if ok else f"x ** {e} (supported: integer 1..8, 0.5, -0.5, -1)"


@rule("aten.pow.Tensor_Scalar", check=_pow_check)
def _pow(c: Ctx) -> str:
    x, e = c.a["self"], float(c.a["exponent"])
    special = {0.5: "sqrt", -0.5: "rsqrt", -1.0: "reciprocal"}
    if e in special:
        return c.emit(special[e], [x], last=True).name
    y = x
    for k in range(int(e) - 1):
        y = c.emit("mul", [y, x], last=k == int(e) - 2)
    return y.name


@rule("aten.square.default")
def _square(c: Ctx) -> str:
    return c.emit("mul", [c.a["self"], c.a["self"]], last=True).name


def _unary(op: str) -> Callable[[Ctx], str]:
    return lambda c: c.emit(op, [c.a["self"]], last=True).name


for _op in ("tanh", "relu", "sqrt", "rsqrt", "reciprocal", "exp", "erf"):
    rule(f"aten.{_op}.default")(_unary(_op))


@rule("aten.gelu.default")
def _gelu(c: Ctx) -> str:
    return c.emit("gelu", [c.a["self"]], {"approximate": c.a["approximate"] or "none"}, last=True).name


@rule("aten.softmax.int", "aten._softmax.default")
def _softmax(c: Ctx) -> str:
    x = c.a["self"]
    return c.emit("softmax", [x], {"dim": _dim(c.a["dim"], len(x.shape))}, last=True).name


@rule("aten.layer_norm.default")
def _layer_norm(c: Ctx) -> str:
    x, w, b = c.a["input"], c.a["weight"], c.a["bias"]
    if w is None and b is not None:
        w = c.const(torch.ones(b.shape))
    ins = [x] + [p for p in (w, b) if p is not None]
    attrs = {"eps": float(c.a["eps"]), "dims": len(c.a["normalized_shape"])}
    return c.emit("layernorm", ins, attrs, last=True).name


from . import decompose_rules  # noqa: E402,F401  (linear algebra, layout, attention rules)


@register_pass("decompose_aten")
def decompose_aten(graph: Graph) -> Graph:
    """Rewrite every secret ATen op into IR ops (frontend level)."""
    rw = Rewriter(graph, level="frontend")
    splits: dict[str, Any] = {}
    for n in graph:
        if not is_imported(n):
            rw.copy(n)
            continue
        r = RULES.get(n.op)
        if r is None:
            raise CompileError(f"no decomposition for {n.op} (run check_support first)")
        new = r.fn(Ctx(rw, n, splits))
        if new is None:
            continue
        got = rw.dst[new].shape
        if n.shape is not None and got != n.shape:
            raise CompileError(f"internal: rule for {n.op} at %{n.name} gave shape {got}, expected {n.shape}")
        rw.bind(n.name, new)
    return rw.finish()


__all__ = ["RULES", "Rule", "rule", "Ctx", "bind_args", "decompose_aten"]
