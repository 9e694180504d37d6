"""Secrecy analysis and compile-time folding of everything that is not a secret runtime value.

Every value gets one of four classes:

- `const`: public and known at compile time (shapes, positions, `arange`, constants);
- `public`: public but known only at run time: derived from a public input (the padding
  attention mask: public per the threat model in DESIGN.md);
- `weight`: secret but known to the model owner at compile time (parameters and anything
  computed from parameters and constants alone, e.g. a transposed weight or a position
  embedding looked up at constant positions);
- `secret`: depends on a secret input.

`fold_public` then evaluates `const` values to `constant` nodes, `weight` values to new
(secret) weights, and turns each `public` value a secret op consumes into one `public_fn`
node: a small ATen program that every party runs in the clear on the public inputs.

RoBERTa derives position ids from `input_ids != pad_token_id`. Those ids are secret, but
which positions are padding is public, so the comparison is replaced by
`attention_mask != 0`; the assumption (the mask marks exactly the non-pad tokens) is
recorded in `graph.meta["assumptions"]`.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch

from ..ir import DTYPES, Graph, Node, Ref, Rewriter, dtype_tag
from .registry import register_pass

CONST, PUBLIC, WEIGHT, SECRET = "const", "public", "weight", "secret"

# Ops whose result depends only on their input's shape and dtype, never on its value.
SHAPE_ONLY = {
    "aten.new_ones.default", "aten.new_zeros.default", "aten.new_full.default", "aten.new_empty.default",
    "aten.zeros_like.default", "aten.ones_like.default", "aten.full_like.default", "aten.empty_like.default",
    "aten.sym_size.int", "aten.sym_numel.default", "aten._assert_tensor_metadata.default",
}
PAD_INDICATOR = "aten.ne.Scalar"


def _join(classes: list[str]) -> str:
    s = set(classes)
    if SECRET in s or (WEIGHT in s and PUBLIC in s):
        return SECRET
    for c in (WEIGHT, PUBLIC):
        if c in s:
            return c
    return CONST


def value_class(node: Node) -> str:
    return node.meta.get("vclass", SECRET if node.secret else CONST)


@register_pass("analyze_secrecy")
def analyze_secrecy(graph: Graph) -> Graph:
    """Classify every value as const / public / weight / secret and set `node.secret`."""
    for n in graph:
        if n.op == "input":
            c = PUBLIC if n.attrs["kind"] == "public" else SECRET
        elif n.op == "weight":
            c = WEIGHT
        elif n.op == "constant":
            c = CONST
        elif n.op in SHAPE_ONLY:
            c = CONST
        elif n.op == PAD_INDICATOR and graph[n.inputs[0]].op == "input" and graph[n.inputs[0]].attrs["kind"] == "ids":
            c = PUBLIC
            n.meta["pad_indicator"] = True
        else:
            c = _join([value_class(graph[i]) for i in n.inputs])
        n.meta["vclass"] = c
        n.secret = c in (WEIGHT, SECRET)
    return graph


# ---------------------------------------------------------------------------------------
# Public programs run in the clear.
# ---------------------------------------------------------------------------------------

def _resolve(target: str) -> Callable[..., Any]:
    if target == "getitem":
        return operator.getitem
    if target.startswith("helper:"):
        return PUBLIC_HELPERS[target[len("helper:"):]]
    ns, op, overload = target.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def _fill(t: Any, env: dict[str, Any]) -> Any:
    if isinstance(t, _Var):
        return env[t.name]
    if isinstance(t, (list, tuple)):
        return type(t)(_fill(x, env) for x in t)
    return t


class _Var:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return (_Var, (self.name,))


class PublicFn:
    """A public computation: ATen calls (and named helpers) replayed in the clear.

    Called as `fn(*public_inputs)`; `steps` are (name, target, args, kwargs) with `_Var`
    placeholders; targets are strings (picklable), resolved on use.
    """

    def __init__(self, label: str, params: list[str], steps: list[tuple], consts: dict[str, torch.Tensor], out: str):
        self.label, self.params, self.steps, self.consts, self.out = label, params, steps, consts, out

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = dict(self.consts)
        env.update(zip(self.params, xs))
        for name, target, args, kwargs in self.steps:
            env[name] = _resolve(target)(*_fill(args, env), **_fill(kwargs, env))
        return env[self.out]

    def then(self, helper: str, *extra: Any, label: str | None = None) -> "PublicFn":
        """This computation followed by `PUBLIC_HELPERS[helper](result, *extra)`."""
        name = f"{self.out}>{helper}"
        step = (name, f"helper:{helper}", (_Var(self.out),) + tuple(extra), {})
        return PublicFn(label or f"{self.label}>{helper}", self.params, self.steps + [step], self.consts, name)

    def __repr__(self) -> str:
        return f"PublicFn({self.label}: {len(self.steps)} steps)"


def additive_to_mask(m: torch.Tensor, threshold: float = -1e4) -> torch.Tensor:
    """0/1 float mask from an additive attention mask (0 kept, <= threshold excluded).

    Raises if a kept entry is a non-zero bias: the compiled program assumed it was zero.
    """
    keep = m > threshold
    if torch.any(torch.where(keep, m, torch.zeros_like(m)) != 0):
        raise ValueError("additive attention mask has non-zero finite entries; the program assumed 0/-inf")
    return keep.to(torch.float32)


PUBLIC_HELPERS: dict[str, Callable[..., torch.Tensor]] = {
    "additive_to_mask": additive_to_mask,
    "to_float": lambda m: m.to(torch.float32),
    "not_to_float": lambda m: (~m.bool()).to(torch.float32),
    "times": lambda m, other: m * other,
    "and_to_float": lambda m, other: (m.bool() & other).to(torch.float32),
    "one_minus": lambda m: 1.0 - m,
    "scale": lambda m, c: m * c,
    "reciprocal": lambda m: 1.0 / m,
}


class Then:
    """`PUBLIC_HELPERS[helper](fn(*xs), *extra)`, for any public function `fn`."""

    def __init__(self, fn: Callable, helper: str, *extra: Any):
        self.fn, self.helper, self.extra = fn, helper, extra
        self.label = f"{getattr(fn, 'label', getattr(fn, '__name__', 'fn'))}>{helper}"

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        return PUBLIC_HELPERS[self.helper](self.fn(*xs), *self.extra)


def then(fn: Callable, helper: str, *extra: Any, label: str | None = None) -> Callable:
    """`fn` followed by a named helper (flattened into the same program when `fn` is a PublicFn)."""
    if isinstance(fn, PublicFn):
        return fn.then(helper, *extra, label=label)
    return Then(fn, helper, *extra)


def public_node(rw: Rewriter, fn: Any, inputs: list[str], like: Node, shape: tuple, dtype: str, label: str) -> str:
    """Emit a public value: a constant if `fn` has no inputs, else a `public_fn` node."""
    if not inputs:
        value = fn()
        return rw.constant(value, like, name=label)
    return rw.emit("public_fn", inputs, {"fn": fn}, like=like, name=label,
                   shape=shape, dtype=dtype, secret=False)


def public_transform(rw: Rewriter, p: Node, helper: str, *extra: Any, like: Node, name: str) -> str:
    """Emit `PUBLIC_HELPERS[helper](p, *extra)` for a public node `p` of `rw.dst`."""
    if p.op == "constant":
        return rw.constant(PUBLIC_HELPERS[helper](p.attrs["value"], *extra), like, name=name)
    base = p.attrs["fn"] if p.op == "public_fn" else PublicFn(p.name, [p.name], [], {}, p.name)
    inputs = list(p.inputs) if p.op == "public_fn" else [p.name]
    fn = then(base, helper, *extra)
    out = fn(*[torch.ones(rw.dst[i].shape, dtype=DTYPES[rw.dst[i].dtype]) for i in inputs])
    return public_node(rw, fn, inputs, like, tuple(out.shape), dtype_tag(out.dtype), name)


def example_value(graph: Graph, name: str) -> torch.Tensor | None:
    """The value of a public node on the example public inputs (None if unknown)."""
    n = graph[name]
    if n.op == "constant":
        return n.attrs["value"]
    if n.op == "input":
        return graph.meta.get("public_examples", {}).get(n.attrs["name"])
    if n.op == "public_fn":
        xs = [example_value(graph, i) for i in n.inputs]
        return None if any(x is None for x in xs) else n.attrs["fn"](*xs)
    return None


# ---------------------------------------------------------------------------------------
# Folding.
# ---------------------------------------------------------------------------------------


def _evaluate(node: Node, values: dict[str, Any]) -> Any:
    env = [values[i] for i in node.inputs]

    def fill(t: Any) -> Any:
        if isinstance(t, Ref):
            return env[t.index]
        if isinstance(t, (list, tuple)):
            return type(t)(fill(x) for x in t)
        return t

    return node.attrs["target"](*fill(node.attrs["args"]), **{k: fill(v) for k, v in node.attrs["kwargs"].items()})


@register_pass("fold_public")
def fold_public(graph: Graph) -> Graph:
    """Evaluate const and weight values at compile time; make public values `public_fn` nodes."""
    rw = Rewriter(graph)
    values: dict[str, Any] = {}  # old name -> value, for const and weight classes
    made: dict[str, str] = {}  # old name -> new name, materialized lazily

    def materialize(old: str) -> str:
        if old in made:
            return made[old]
        n = graph[old]
        c = value_class(n)
        if n.op in ("input", "weight", "constant"):
            new = rw.copy(n)
        elif c == CONST:
            new = rw.constant(values[old], n, name=n.name)
        elif c == WEIGHT:
            new = rw.weight(f"folded.{n.name}", values[old].detach().float(), like=n, node=n.name)
        elif c == PUBLIC:
            new = _materialize_public(graph, rw, n, values, materialize)
        else:
            raise AssertionError(f"secret node %{old} materialized before it was rewritten")
        made[old] = new
        return new

    for n in graph:
        c = value_class(n)
        if n.op in ("input", "weight", "constant"):
            values[n.name] = graph.weights[n.attrs["name"]] if n.op == "weight" else n.attrs.get("value")
            if n.op == "input":
                materialize(n.name)
            continue
        if c in (CONST, WEIGHT):
            values[n.name] = None if n.meta.get("no_value") else _evaluate(n, values)
        elif c == SECRET:
            new = n.clone(name=rw.dst.fresh_name(n.name), inputs=[materialize(i) for i in n.inputs])
            rw.dst.add(new)
            made[n.name] = new.name
            rw.bind(n.name, new.name)
    for o in graph.outputs:
        rw.bind(o, materialize(o))
    return rw.finish()


def _materialize_public(graph: Graph, rw: Rewriter, n: Node, values: dict, materialize: Callable) -> str:
    """One `public_fn` computing public node `n` from the public inputs it depends on."""
    steps, consts, params, seen = [], {}, [], set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        m = graph[name]
        c = value_class(m)
        if m.op == "input":
            params.append(name)
            return
        if c == CONST:
            consts[name] = values[name]
            return
        if m.meta.get("pad_indicator"):
            steps.append(_pad_indicator_step(graph, m, params, seen))
            return
        for i in m.inputs:
            visit(i)
        to_var = {i: _Var(i) for i in m.inputs}

        def tmpl(t: Any) -> Any:
            if isinstance(t, Ref):
                return to_var[m.inputs[t.index]]
            if isinstance(t, (list, tuple)):
                return type(t)(tmpl(x) for x in t)
            return t

        steps.append((name, _target_name(m), tmpl(m.attrs["args"]), {k: tmpl(v) for k, v in m.attrs["kwargs"].items()}))

    visit(n.name)
    fn = PublicFn(n.name, params, steps, consts, n.name)
    return public_node(rw, fn, [materialize(p) for p in params], n, n.shape, n.dtype, n.name)


def _target_name(m: Node) -> str:
    t = m.attrs["target"]
    return "getitem" if t is operator.getitem else str(t)


def _pad_indicator_step(graph: Graph, m: Node, params: list[str], seen: set) -> tuple:
    ids = graph[m.inputs[0]]
    masks = [n for n in graph if n.op == "input" and n.attrs["kind"] == "public" and n.shape == ids.shape]
    masks.sort(key=lambda n: n.attrs["name"] != "attention_mask")
    notes = graph.meta.setdefault("assumptions", [])
    if masks:
        mask = masks[0].name
        if mask not in params:
            params.append(mask)
            seen.add(mask)
        note = (f"{mask} marks exactly the tokens of {ids.name} that are not padding "
                f"({ids.name} != {m.attrs['args'][1]}), as {m.module_path or 'the model'} assumes")
        if note not in notes:
            notes.append(note)
        return (m.name, "aten.ne.Scalar", (_Var(mask), 0), {})
    note = (f"no attention mask given: {ids.name} is assumed to contain no padding token "
            f"({m.attrs['args'][1]}) at {m.module_path or 'the model'}")
    if note not in notes:
        notes.append(note)
    return (m.name, "aten.ones.default", (list(ids.shape),), {"dtype": torch.bool})


__all__ = ["analyze_secrecy", "fold_public", "PublicFn", "PUBLIC_HELPERS", "public_node", "example_value",
           "value_class", "then", "Then", "public_transform"]
