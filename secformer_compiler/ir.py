"""The MPC IR: a graph of a small set of protocol-level ops, its verifier and its text form.

A `Graph` is an ordered list of `Node`s (topological: every input is defined earlier), plus
the model's float weights (`graph.weights`, secret: the model owner shares them) and the
names of its inputs and outputs. Every node records its static shape, a dtype tag
(`f32` for real values, which are fixed point once secret; `i64`; `bool`), whether it is
secret, and the module path it came from.

`OPS` declares each op once: its arguments, its attributes and its verifier. The other
tables keyed by op name (float reference in `float_interp.REFERENCE`, the simulator, the
2PC kernels, the cost model) are checked against it by tests, one row per op.

Levels: a graph starts at `aten` (imported ATen ops, see `frontend.import_program`), becomes
`frontend` after `decompose_aten` (OPS ops, including the `frontend`-only ops such as `div`
or `rsqrt` that pattern recognition must absorb) and `mpc` after `lower_to_mpc` (only `mpc`
ops: what the runtime executes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import Problem, VerifyError

LEVELS = ("aten", "frontend", "mpc")
DTYPES = {"f32": torch.float32, "i64": torch.int64, "bool": torch.bool}


def dtype_tag(dtype: torch.dtype) -> str:
    """The IR dtype tag of a torch dtype: f32 (any float), bool, i64 (any integer)."""
    if dtype.is_floating_point:
        return "f32"
    return "bool" if dtype == torch.bool else "i64"


@dataclass
class Node:
    """One IR value: `op(inputs; attrs)` with its static shape and secrecy.

    `inputs` are names of earlier nodes; `meta` holds pass-local annotations that are neither
    printed nor verified (e.g. the value class computed by `analyze_secrecy`).
    """

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] | None = ()
    dtype: str = "f32"
    secret: bool = True
    module_path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def clone(self, **changes: Any) -> "Node":
        base = dict(inputs=list(self.inputs), attrs=dict(self.attrs), meta=dict(self.meta))
        base.update(changes)
        return dataclasses.replace(self, **base)


# ---------------------------------------------------------------------------------------
# The op table.
# ---------------------------------------------------------------------------------------

Check = Callable[["Graph", Node, list[Node]], None]


@dataclass(frozen=True)
class OpDef:
    """An IR op: argument names (`x`, optional `b?`, variadic `*xs`), attributes, verifier.

    `infer(node, inputs)` returns the output shape (None: trust the recorded shape);
    `check(graph, node, inputs)` raises `ValueError` for op-specific rules (secrecy, dtypes).
    `attrs` must be present; `optional_attrs` may be.
    """

    name: str
    args: tuple[str, ...]
    attrs: tuple[str, ...] = ()
    optional_attrs: tuple[str, ...] = ()
    level: str = "mpc"
    doc: str = ""
    infer: Callable[[Node, list[Node]], tuple[int, ...] | None] | None = None
    check: Check | None = None

    def arity(self) -> tuple[int, float]:
        """(min, max) number of inputs."""
        if any(a.startswith("*") for a in self.args):
            return len([a for a in self.args if not a.startswith("*")]), float("inf")
        required = len([a for a in self.args if not a.endswith("?")])
        return required, len(self.args)


OPS: dict[str, OpDef] = {}


def defop(name: str, args: tuple[str, ...] = (), **kw: Any) -> OpDef:
    """Declare an op; declaring a name twice is an error."""
    if name in OPS:
        raise ValueError(f"IR op {name!r} is declared twice")
    OPS[name] = OpDef(name, args, **kw)
    return OPS[name]


def _meta(ins: list[Node]) -> list[torch.Tensor]:
    return [torch.empty(n.shape, dtype=DTYPES[n.dtype], device="meta") for n in ins]


def _via_torch(fn: Callable[..., torch.Tensor]) -> Callable[[Node, list[Node]], tuple[int, ...]]:
    """Shape rule: run the torch function on meta tensors (the same semantics as the reference)."""
    return lambda node, ins: tuple(fn(node.attrs, *_meta(ins)).shape)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _some_secret(g: "Graph", node: Node, ins: list[Node]) -> None:
    _need(any(i.secret for i in ins), f"{node.op} of public values only (should have been folded)")
    _need(node.secret, f"{node.op} of a secret value must be secret")
    _need(all(i.dtype != "bool" for i in ins), f"{node.op} of a bool value")


def _secret_x(g: "Graph", node: Node, ins: list[Node]) -> None:
    _need(ins[0].secret and node.secret, f"{node.op} expects a secret first input")


def _check_input(g: "Graph", node: Node, ins: list[Node]) -> None:
    kind = node.attrs["kind"]
    _need(kind in ("ids", "float", "public"), f"unknown input kind {kind!r}")
    _need(node.secret == (kind != "public"), "input secrecy must match its kind")
    _need(kind != "ids" or node.dtype == "i64", "ids input must be i64")
    _need(kind != "float" or node.dtype == "f32", "float input must be f32")


def _check_weight(g: "Graph", node: Node, ins: list[Node]) -> None:
    w = g.weights.get(node.attrs["name"])
    _need(w is not None, f"weight {node.attrs['name']!r} missing from graph.weights")
    _need(tuple(w.shape) == node.shape, f"weight shape {tuple(w.shape)} != node shape {node.shape}")
    _need(node.secret and node.dtype == "f32", "weights are secret f32")


def _check_constant(g: "Graph", node: Node, ins: list[Node]) -> None:
    v = node.attrs["value"]
    _need(isinstance(v, torch.Tensor), "constant value must be a tensor")
    _need(tuple(v.shape) == node.shape and dtype_tag(v.dtype) == node.dtype, "constant shape/dtype mismatch")
    _need(not node.secret, "constants are public")


def _check_public_fn(g: "Graph", node: Node, ins: list[Node]) -> None:
    _need(callable(node.attrs["fn"]), "public_fn needs a callable fn")
    _need(not node.secret and all(not i.secret for i in ins), "public_fn computes public values from public values")


def _check_embedding(g: "Graph", node: Node, ins: list[Node]) -> None:
    ids, table = ins
    _need(ids.dtype == "i64", "embedding ids must be i64")
    _need(table.secret and table.dtype == "f32" and len(table.shape) == 2, "embedding table: secret f32 [V, H]")
    _need(node.secret, "embedding output is secret")


def _check_linear(g: "Graph", node: Node, ins: list[Node]) -> None:
    _need(ins[0].secret or ins[1].secret, "linear of public values only")
    _need(len(ins[1].shape) == 2, "linear weight must be 2-D [out, in]")
    _need(len(ins) < 3 or ins[2].shape == (ins[1].shape[0],), "linear bias must be [out]")


def _check_index(g: "Graph", node: Node, ins: list[Node]) -> None:
    _secret_x(g, node, ins)
    _need(not ins[1].secret and ins[1].dtype == "i64" and len(ins[1].shape) == 1, "index must be public i64 1-D")


def _check_cat(g: "Graph", node: Node, ins: list[Node]) -> None:
    _some_secret(g, node, ins)


def _check_layernorm(g: "Graph", node: Node, ins: list[Node]) -> None:
    _secret_x(g, node, ins)
    k = node.attrs["dims"]
    _need(isinstance(k, int) and 1 <= k <= len(ins[0].shape), "layernorm dims = number of trailing dims")
    for p in ins[1:]:
        _need(p.shape == ins[0].shape[-k:], f"layernorm affine shape {p.shape} != {ins[0].shape[-k:]}")
    _check_method(g, node, ins)


def _check_softmax(g: "Graph", node: Node, ins: list[Node]) -> None:
    _secret_x(g, node, ins)
    if len(ins) == 2:
        _need(not ins[1].secret and ins[1].dtype == "f32", "softmax mask must be a public f32 0/1 tensor")
        _need(torch.broadcast_shapes(ins[1].shape, ins[0].shape) == ins[0].shape, "mask not broadcastable to x")
    _check_method(g, node, ins)


def _check_method(g: "Graph", node: Node, ins: list[Node]) -> None:
    _secret_x(g, node, ins)
    m = node.attrs.get("method")
    _need(m is None or isinstance(m, str), "method must be a str")
    _need(isinstance(node.attrs.get("params", {}), dict), "params must be a dict")


def _check_where(g: "Graph", node: Node, ins: list[Node]) -> None:
    _need(not ins[0].secret and ins[0].dtype == "bool", "where condition must be public bool")
    _need(node.secret, "where of secret values is secret")


def _dims(a: dict) -> list[int]:
    return list(a["dims"])


_METHOD = ("method", "params")

# Sources of values.
defop("input", (), attrs=("name", "kind"), doc="A runtime input. kind: ids (secret i64 token ids), "
      "float (secret real tensor, e.g. pixels), public (e.g. the padding attention mask).", check=_check_input)
defop("weight", (), attrs=("name",), doc="A secret model parameter: graph.weights[name].", check=_check_weight)
defop("constant", (), attrs=("value",), doc="A public tensor folded at compile time.", check=_check_constant)
defop("public_fn", ("*xs",), attrs=("fn",),
      doc="A public value computed in the clear by every party from public inputs: fn(*xs) "
          "(fn.label names it in the text form).",
      check=_check_public_fn)
# Arithmetic (broadcasting like torch).
_bc = _via_torch(lambda a, x, y: x + y)
defop("add", ("a", "b"), infer=_bc, check=_some_secret, doc="a + b; local.")
defop("sub", ("a", "b"), infer=_bc, check=_some_secret, doc="a - b; local.")
defop("mul", ("a", "b"), infer=_bc, check=_some_secret,
      doc="a * b elementwise: secret x secret (Beaver), secret x public (local + truncation).")
defop("neg", ("x",), infer=_via_torch(lambda a, x: -x), check=_secret_x, doc="-x; local.")
defop("scale", ("x",), attrs=("factor",), infer=_via_torch(lambda a, x: x), check=_secret_x,
      doc="x * factor, factor a public Python float.")
defop("matmul", ("a", "b"), infer=_via_torch(lambda a, x, y: torch.matmul(x, y)), check=_some_secret,
      doc="torch.matmul of tensors of rank >= 2 (batch dims broadcast).")
defop("linear", ("x", "w", "b?"), infer=_via_torch(lambda a, x, w, b=None: torch.nn.functional.linear(x, w, b)),
      check=_check_linear, doc="x @ w.T + b; w [out, in], b [out].")
defop("sum", ("x",), attrs=("dims", "keepdim"), check=_secret_x,
      infer=_via_torch(lambda a, x: x.sum(_dims(a), keepdim=a["keepdim"])), doc="Sum over dims; local.")
defop("mean", ("x",), attrs=("dims", "keepdim"), check=_secret_x,
      infer=_via_torch(lambda a, x: x.mean(_dims(a), keepdim=a["keepdim"])), doc="Mean over dims; local.")
# Layout (local on shares).
defop("reshape", ("x",), attrs=("shape",), check=_secret_x,
      infer=_via_torch(lambda a, x: x.reshape(a["shape"])), doc="Reshape to attrs shape (all dims explicit).")
defop("permute", ("x",), attrs=("dims",), check=_secret_x, infer=_via_torch(lambda a, x: x.permute(a["dims"])))
defop("transpose", ("x",), attrs=("dim0", "dim1"), check=_secret_x,
      infer=_via_torch(lambda a, x: x.transpose(a["dim0"], a["dim1"])))
defop("expand", ("x",), attrs=("shape",), check=_secret_x, infer=_via_torch(lambda a, x: x.expand(a["shape"])))
defop("slice", ("x",), attrs=("dim", "start", "end", "step"), check=_secret_x,
      infer=_via_torch(lambda a, x: x[(slice(None),) * a["dim"] + (slice(a["start"], a["end"], a["step"]),)]),
      doc="x[..., start:end:step, ...] along dim (start/end already clamped, non-negative).")
defop("select", ("x",), attrs=("dim", "index"), check=_secret_x,
      infer=_via_torch(lambda a, x: x.select(a["dim"], a["index"])), doc="x.select(dim, index), public index.")
defop("index_select", ("x", "idx"), attrs=("dim",), check=_check_index,
      infer=_via_torch(lambda a, x, i: x.index_select(a["dim"], i)), doc="Gather with a public index; local.")
defop("cat", ("*xs",), attrs=("dim",), check=_check_cat, infer=_via_torch(lambda a, *xs: torch.cat(xs, a["dim"])))
defop("unsqueeze", ("x",), attrs=("dim",), check=_secret_x, infer=_via_torch(lambda a, x: x.unsqueeze(a["dim"])))
defop("squeeze", ("x",), attrs=("dims",), check=_secret_x, infer=_via_torch(lambda a, x: x.squeeze(_dims(a))))
# Lookups and nonlinearities.
defop("embedding", ("ids", "table"), check=_check_embedding,
      infer=_via_torch(lambda a, i, t: torch.nn.functional.embedding(i, t)),
      doc="table[ids]: secret ids -> one-hot(ids) @ table; public ids -> local gather of share rows.")
defop("gelu", ("x",), attrs=("approximate",), optional_attrs=_METHOD, check=_check_method,
      infer=_via_torch(lambda a, x: x),
      doc="GeLU of the model (approximate='none': erf form, 'tanh': tanh form), evaluated by method.")
defop("tanh", ("x",), optional_attrs=_METHOD, check=_check_method, infer=_via_torch(lambda a, x: x))
defop("relu", ("x",), check=_secret_x, infer=_via_torch(lambda a, x: x), doc="max(x, 0): one comparison.")
defop("layernorm", ("x", "w?", "b?"), attrs=("eps", "dims"), optional_attrs=_METHOD + ("commute",),
      check=_check_layernorm, infer=_via_torch(lambda a, x, *wb: x),
      doc="(x - mean) / sqrt(var + eps) * w + b over the last `dims` dims (biased variance). "
          "commute=1: compute the linear layers after it in 2PC (passes/rounds.py).")
defop("softmax", ("x", "mask?"), attrs=("dim",), optional_attrs=_METHOD, check=_check_softmax,
      infer=_via_torch(lambda a, x, m=None: x),
      doc="softmax over dim; mask: public 0/1 f32 broadcastable to x, 0 = position excluded.")
# Frontend-only ops: produced by decompose_aten, absorbed by pattern recognition or lowered.
defop("div", ("a", "b"), level="frontend", infer=_bc, check=_some_secret)
defop("sqrt", ("x",), level="frontend", infer=_via_torch(lambda a, x: x), check=_secret_x)
defop("rsqrt", ("x",), level="frontend", infer=_via_torch(lambda a, x: x), check=_secret_x)
defop("reciprocal", ("x",), level="frontend", infer=_via_torch(lambda a, x: x), check=_secret_x)
defop("exp", ("x",), level="frontend", infer=_via_torch(lambda a, x: x), check=_secret_x)
defop("erf", ("x",), level="frontend", infer=_via_torch(lambda a, x: x), check=_secret_x)
defop("where", ("cond", "a", "b"), level="frontend", check=_check_where,
      infer=_via_torch(lambda a, c, x, y: torch.where(c, x, y)), doc="cond ? a : b with a public cond.")

MPC_OPS = tuple(n for n, d in OPS.items() if d.level == "mpc")


def describe_ops(level: str | None = None) -> str:
    """The op table as text: `name(args; attrs) [level]  doc`, one line per op."""
    lines = []
    for d in OPS.values():
        if level is None or d.level == level:
            attrs = list(d.attrs) + [f"{a}?" for a in d.optional_attrs]
            sig = ", ".join(d.args) + ("; " + ", ".join(attrs) if attrs else "")
            lines.append(f"{d.name}({sig}) [{d.level}]  {d.doc}".rstrip())
    return "\n".join(lines)
ATEN_LEVEL_OPS = ("input", "weight", "constant", "public_fn")



# ---------------------------------------------------------------------------------------
# The graph.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """In an `aten`-level node's argument template: the node's `index`-th input."""

    index: int


def _canonical(x: Any) -> Any:
    """A hashable, repr-stable form of an attribute value (tensors by content)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous().reshape(-1)
        raw = t.view(torch.uint8).numpy().tobytes()  # any dtype, as its bytes
        return ("tensor", str(x.dtype), tuple(x.shape), hashlib.blake2b(raw, digest_size=16).hexdigest())
    if isinstance(x, dict):
        return ("dict",) + tuple(sorted(((str(k), _canonical(v)) for k, v in x.items()), key=repr))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_canonical(v) for v in x)
    if isinstance(x, float):
        return float.hex(x)
    return x


class Graph:
    """An ordered list of nodes with the model's weights, inputs and outputs."""

    def __init__(self, nodes: Any = (), *, weights: dict[str, torch.Tensor] | None = None,
                 inputs: list[str] | None = None, outputs: list[str] | None = None,
                 meta: dict[str, Any] | None = None):
        self._nodes: dict[str, Node] = {}
        self.weights: dict[str, torch.Tensor] = dict(weights or {})
        self.inputs: list[str] = list(inputs or [])
        self.outputs: list[str] = list(outputs or [])
        self.meta: dict[str, Any] = dict(meta or {})
        for n in nodes:
            self.add(n)

    @property
    def level(self) -> str:
        return self.meta.get("level", "mpc")

    def fingerprint(self) -> str:
        """A digest of what a 2PC program run on this graph depends on besides its inputs'
        values: every node's name, op, inputs, attrs, shape, dtype and secrecy, the graph's
        inputs and outputs, and its weights' names, shapes and dtypes (not their values,
        which the roles hold as shares). Equal for a graph and its unpickled copy: the roles
        of a process cluster receive a fresh copy with every request, and key their recorded
        offline passes on this (runtime.engine.plan_key), so they replay them instead of
        re-running the program on meta tensors each time."""
        h = hashlib.blake2b(digest_size=16)
        for n in self._nodes.values():
            h.update(repr((n.name, n.op, tuple(n.inputs), _canonical(n.attrs),
                           None if n.shape is None else tuple(n.shape), n.dtype, n.secret)).encode())
        h.update(repr((tuple(self.inputs), tuple(self.outputs), self.level)).encode())
        for k in sorted(self.weights):
            w = self.weights[k]
            h.update(repr((k, tuple(w.shape), str(w.dtype))).encode())
        return h.hexdigest()

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def __iter__(self):
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: str) -> bool:
        return name in self._nodes

    def __getitem__(self, name: str) -> Node:
        return self._nodes[name]

    def add(self, node: Node) -> Node:
        if node.name in self._nodes:
            raise ValueError(f"duplicate node name %{node.name}")
        self._nodes[node.name] = node
        return node

    def fresh_name(self, base: str) -> str:
        name, k = base, 0
        while name in self._nodes:
            k += 1
            name = f"{base}_{k}"
        return name

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {n: [] for n in self._nodes}
        for n in self._nodes.values():
            for i in dict.fromkeys(n.inputs):
                out[i].append(n)
        return out

    def copy(self) -> "Graph":
        """A copy whose nodes can be edited; weight tensors are shared (never mutate them)."""
        return Graph([n.clone() for n in self._nodes.values()], weights=self.weights,
                     inputs=self.inputs, outputs=self.outputs, meta=self.meta)

    def eliminate_dead_code(self) -> "Graph":
        """Drop nodes no output depends on (inputs stay: they are the call signature)."""
        live = set(self.outputs) | set(self.inputs)
        for n in reversed(list(self._nodes.values())):
            if n.name in live:
                live.update(n.inputs)
        self._nodes = {k: v for k, v in self._nodes.items() if k in live}
        used = {n.attrs["name"] for n in self._nodes.values() if n.op == "weight"}
        self.weights = {k: v for k, v in self.weights.items() if k in used}
        return self

    # -- verification --------------------------------------------------------------------

    def verify(self, level: str | None = None) -> None:
        """Check structure, every op's arity/attrs/shape/secrecy; raise one `VerifyError`."""
        level = level or self.level
        problems: list[Problem] = []
        seen: set[str] = set()
        for n in self._nodes.values():
            try:
                missing = [i for i in n.inputs if i not in seen]
                _need(not missing, f"uses undefined or later nodes {missing}")
                _verify_node(self, n, [self._nodes[i] for i in n.inputs], level)
            except Exception as e:  # noqa: BLE001 - every failure becomes a Problem with context
                problems.append(Problem(f"{n.op}: {e}", n.module_path, n.name))
            seen.add(n.name)
        for name in self.inputs:
            if name not in self._nodes or self._nodes[name].op != "input":
                problems.append(Problem(f"graph input %{name} is not an input node"))
        for name in self.outputs:
            if name not in self._nodes:
                problems.append(Problem(f"graph output %{name} is not defined"))
        if problems:
            raise VerifyError(f"{len(problems)} problem(s) in the {level}-level IR:", problems)

    # -- text --------------------------------------------------------------------------

    def to_text(self, *, module_paths: bool = True) -> str:
        """One line per node: `%name: f32[2,8] secret = op(%a, %b; attr=v)  # module.path`."""
        lines = [format_node(n, module_paths) for n in self._nodes.values()]
        lines.append("return (" + ", ".join(f"%{o}" for o in self.outputs) + ")")
        return "\n".join(lines) + "\n"

    __str__ = to_text

    def __repr__(self) -> str:
        return f"<Graph level={self.level} nodes={len(self)} weights={len(self.weights)}>"


def _verify_node(g: Graph, n: Node, ins: list[Node], level: str) -> None:
    if is_imported(n):
        _need(level == "aten", f"imported (ATen) op left at the {level} level")
        return
    d = OPS.get(n.op)
    _need(d is not None, f"unknown op; IR ops: {', '.join(OPS)}")
    if level == "mpc":
        _need(d.level == "mpc", "frontend-only op left in the MPC IR")
    lo, hi = d.arity()
    _need(lo <= len(ins) <= hi, f"takes {d.args}, got {len(ins)} inputs")
    absent = [a for a in d.attrs if a not in n.attrs]
    _need(not absent, f"missing attrs {absent}")
    extra = [a for a in n.attrs if a not in d.attrs + d.optional_attrs]
    _need(not extra, f"unknown attrs {extra}")
    _need(n.dtype in DTYPES, f"bad dtype {n.dtype!r}")
    if d.infer is not None:
        shape = d.infer(n, ins)
        _need(shape == tuple(n.shape), f"shape {n.shape} but inputs give {shape}")
    if d.check is not None:
        d.check(g, n, ins)


def is_imported(n: Node) -> bool:
    """An `aten`-level node: an FX call (ATen op, getitem, custom op) not yet decomposed."""
    return n.op not in OPS and "target" in n.attrs


def format_attr(v: Any) -> str:
    """Stable text of an attribute value (golden tests depend on it)."""
    if isinstance(v, torch.Tensor):
        head = f"{dtype_tag(v.dtype)}[{','.join(map(str, v.shape))}]"
        if v.numel() <= 4:
            return f"tensor({head} {format_attr(v.flatten().tolist())})"
        return f"tensor({head})"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={format_attr(x)}" for k, x in v.items()) + "}"
    if isinstance(v, Ref):
        return f"#{v.index}"
    if callable(v) and not isinstance(v, type):
        return getattr(v, "label", None) or getattr(v, "__name__", type(v).__name__)
    return str(v)


def _format_template(a: Any, inputs: list[str]) -> str:
    if isinstance(a, Ref):
        return f"%{inputs[a.index]}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_format_template(x, inputs) for x in a) + "]"
    return format_attr(a)


def format_node(n: Node, module_paths: bool = True) -> str:
    shape = "tuple" if n.shape is None else f"{n.dtype}[{','.join(map(str, n.shape))}]"
    vis = "secret" if n.secret else "public"
    if is_imported(n):
        args = [_format_template(a, n.inputs) for a in n.attrs.get("args", ())]
        kw = [f"{k}={_format_template(v, n.inputs)}" for k, v in n.attrs.get("kwargs", {}).items()]
        body = ", ".join(args) + ("; " + ", ".join(kw) if kw else "")
    else:
        body = ", ".join(f"%{i}" for i in n.inputs)
        attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in n.attrs.items())
        body += ("; " if attrs and body else "") + attrs
    line = f"%{n.name}: {shape} {vis} = {n.op}({body})"
    if module_paths and n.module_path:
        line += f"  # {n.module_path}"
    return line


class Rewriter:
    """Build a new graph from `src`: copy nodes, or emit replacements and `bind` old names.

    `env` maps each old node name to the name of the node that now holds its value.
    """

    def __init__(self, src: Graph, level: str | None = None):
        self.src = src
        self.dst = Graph(weights=src.weights, meta=src.meta)
        if level:
            self.dst.meta["level"] = level
        self.env: dict[str, str] = {}

    def new(self, old: str) -> Node:
        """The new node holding the value of old node `old`."""
        return self.dst[self.env[old]]

    def copy(self, node: Node) -> str:
        new = node.clone(name=self.dst.fresh_name(node.name), inputs=[self.env[i] for i in node.inputs])
        self.dst.add(new)
        self.env[node.name] = new.name
        return new.name

    def emit(self, op: str, inputs: list[str], attrs: dict[str, Any] | None = None, *, like: Node,
             name: str | None = None, shape: tuple[int, ...] | None = None, dtype: str | None = None,
             secret: bool | None = None, module_path: str | None = None) -> str:
        """Add `op(inputs; attrs)` (inputs are new names); shape inferred from the op table."""
        ins = [self.dst[i] for i in inputs]
        node = Node(self.dst.fresh_name(name or f"{like.name}_{op}"), op, list(inputs), dict(attrs or {}),
                    (), dtype or ("f32" if op not in ("input", "constant") else like.dtype),
                    any(i.secret for i in ins) if secret is None else secret,
                    like.module_path if module_path is None else module_path)
        if shape is None:
            infer = OPS[op].infer if op in OPS else None
            shape = infer(node, ins) if infer else like.shape
        node.shape = tuple(shape)
        self.dst.add(node)
        return node.name

    def constant(self, value: Any, like: Node, name: str | None = None) -> str:
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)
        return self.emit("constant", [], {"value": t}, like=like, name=name or f"{like.name}_c",
                         shape=tuple(t.shape), dtype=dtype_tag(t.dtype), secret=False)

    def weight(self, name: str, value: torch.Tensor, like: Node, node: str | None = None) -> str:
        """A new model weight `name` (a compile-time tensor, stored in the new graph's weights)
        and the secret `weight` node reading it, named `node` or p_<name>. The new graph must
        own its weights dict (copy the source's first: Rewriter shares it)."""
        self.dst.weights[name] = value
        return self.emit("weight", [], {"name": name}, like=like,
                         name=node or "p_" + re.sub(r"\W+", "_", name).strip("_"),
                         shape=tuple(value.shape), secret=True)

    def bind(self, old: str, new: str) -> None:
        self.env[old] = new

    def finish(self) -> Graph:
        self.dst.inputs = [self.env[i] for i in self.src.inputs if i in self.env]
        self.dst.outputs = [self.env[o] for o in self.src.outputs]
        return self.dst.eliminate_dead_code()
