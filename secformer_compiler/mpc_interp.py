"""The MPC IR executed as a protocol: one rule per IR op, shared by 2PC and the simulator.

`program(ctx, graph, inputs)` is a protocol generator (runtime/messages.py): run it under
`LocalCluster`/`ProcessCluster` for real 2PC (P0, P1 and the dealer), or with
`engine.run_clear` for the simulator, which therefore executes exactly the parties'
fixed-point arithmetic (bit for bit, up to truncation's 1-ulp randomness).

Value representation while executing: a secret value is this party's int64 share at
scale f (ctx.f fractional bits); a public value is a plain torch tensor (meta on the dealer
when it comes from a public input). The one exception is a secret `ids` input, which the
client sends as shares of its one-hot encoding at scale 0 (integers), consumed only by
`embedding` (one-hot @ table: DESIGN.md "Secret token ids become a one-hot x shared-table
matmul").

Weights are loaded once per session by `load_program`: every weight used as the second
operand of a product (linear, matmul, elementwise mul, layernorm gain, embedding table) is
opened masked (W - B) once; inferences then open only their activations.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .dataflow import execute
from .deferral import plan_deferred
from .ir import Graph, Node
from .runtime.context import P0, Context
from .runtime.domain import NODE
from .runtime.messages import Protocol, parallel
from .runtime.protocols import arith, compare, trunc as T
from .runtime.protocols import nonlinear as nl
from .runtime.ring import ring_matmul

Rule = Callable[[Context, Node, list], Any]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    """Register the 2PC/simulator rule of IR ops; registering an op twice is an error."""
    def deco(fn: Rule) -> Rule:
        for op in ops:
            if op in RULES:
                raise ValueError(f"mpc_interp: rule for {op!r} registered twice")
            RULES[op] = fn
        return fn
    return deco


# --- helpers ------------------------------------------------------------------------------

def _is_share(v: Any, node: Node) -> bool:
    return node.secret


def encode_public(ctx: Context, v: torch.Tensor | float, frac: int | None = None) -> torch.Tensor:
    """A public real value as a ring tensor at `frac` bits (meta stays meta on the dealer)."""
    f = ctx.f if frac is None else frac
    if isinstance(v, torch.Tensor) and v.device.type == "meta":
        return torch.empty(v.shape, dtype=torch.int64, device="meta")
    if isinstance(v, torch.Tensor) and not v.dtype.is_floating_point:
        return ctx.pub(v.to(torch.int64) << f)
    return ctx.pub(ctx.fxp.encode(v, f))


def as_share(ctx: Context, v: Any, node: Node) -> torch.Tensor:
    """A value as this party's share: public values are held by P0 (P1 holds zeros)."""
    if node.secret:
        return v
    enc = encode_public(ctx, v)
    return ctx.add_public(ctx.zeros(enc.shape), enc)


def scale_public(ctx: Context, x: torch.Tensor, factor: float) -> Protocol:
    """x * factor for a public real factor: exact shifts for powers of two, else a
    20-significant-bit constant and one truncation."""
    if factor == 0:
        return x * 0
    m, e = math.frexp(abs(factor))  # |factor| = m * 2^e, m in [0.5, 1)
    sign = -1 if factor < 0 else 1
    if m == 0.5:  # a power of two: 2^(e-1)
        s = e - 1
        if s >= 0:
            return sign * (x << s)
        return sign * (yield from T.trunc(ctx, x, -s))
    k = max(0, 20 - e)  # factor * 2^k has about 20 significant bits
    mult = round(factor * 2 ** k)
    if k == 0:
        return x * mult
    return (yield from T.trunc(ctx, x * mult, k))


def _int_valued(node: Node) -> bool:
    """Public multiplicands that are integers need no truncation (decided statically)."""
    if node.dtype in ("i64", "bool"):
        return True
    if node.op == "constant":
        v = node.attrs["value"]
        return bool(torch.equal(v, torch.round(v))) and v.abs().max().item() < 2 ** 20
    return False


# --- sources --------------------------------------------------------------------------------

@rule("input")
def _input(ctx, node, ins):
    return ctx.state["inputs"][node.name]


@rule("weight")
def _weight(ctx, node, ins):
    return ctx.state["weights"][node.attrs["name"]]


@rule("constant")
def _constant(ctx, node, ins):
    return node.attrs["value"]


@rule("public_fn")
def _public_fn(ctx, node, ins):
    if any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in ins):
        return torch.empty(node.shape, dtype=_DT[node.dtype], device="meta")
    return node.attrs["fn"](*ins)


_DT = {"f32": torch.float32, "i64": torch.int64, "bool": torch.bool}


# --- arithmetic -------------------------------------------------------------------------------

@rule("add", "sub")
def _add(ctx, node, ins):
    if node.meta.get("raw_add"):  # a raw linear product + a raw LayerNorm output (deferral.py)
        ins = [v.raw if isinstance(v, nl.Commuted) else v for v in ins]
        frac = max(v.frac for v in ins)
        a, b = (v.value << (frac - v.frac) for v in ins)
        return T.begin(ctx, a + b if node.op == "add" else a - b, frac - ctx.f)
    pos = node.meta.get("pending_in")
    if pos is not None:  # a deferred truncation passes through (deferral.py): add to its base
        p = ins[pos]
        ins = list(ins)
        ins[pos] = p.base
        return T.Pending(_add_values(ctx, node, ins), p.k, p.own)
    return _add_values(ctx, node, ins)


def _add_values(ctx, node, ins):
    a, b = ins
    na, nb = node.meta["in_nodes"]
    sign = 1 if node.op == "add" else -1
    if na.secret and nb.secret:
        return a + sign * b
    if na.secret:
        return ctx.add_public(a, sign * encode_public(ctx, b))
    return ctx.add_public(sign * b, encode_public(ctx, a))


@rule("neg")
def _neg(ctx, node, ins):
    return -ins[0]


@rule("scale")
def _scale(ctx, node, ins):
    if node.meta.get("folded"):  # the product before it truncates by f + s (deferral.py)
        return ins[0]
    return scale_public(ctx, ins[0], float(node.attrs["factor"]))


def _product(ctx, node, ins, op, fixed_op, public_op):
    """Secret x secret (Beaver), secret x weight (fixed operand), secret x public (local)."""
    a, b = ins
    na, nb = node.meta["in_nodes"]
    in_frac = ctx.f
    if node.meta.get("raw_in"):  # a raw LayerNorm output times its gain (deferral.py)
        raw = a.raw if isinstance(a, nl.Commuted) else a
        a, in_frac = raw.value, raw.frac
    if na.secret and nb.secret:
        key = _fixed_key(node, 1)
        if key is not None:
            z = yield from fixed_op(ctx, a, ctx.state[arith.FIXED_OPERANDS][key])
        else:
            z = yield from op(ctx, a, b)
        if "defer" in node.meta:  # the consumer's first round finishes it (deferral.py)
            return T.begin(ctx, z, in_frac + node.meta["defer"])
        return (yield from T.trunc(ctx, z, in_frac))
    sec, pub, pub_node, pub_first = (a, b, nb, False) if na.secret else (b, a, na, True)
    if _int_valued(pub_node):
        p = pub.to(torch.int64) if pub.device.type != "meta" else torch.empty(pub.shape, dtype=torch.int64, device="meta")
        return public_op(sec, ctx.pub(p), pub_first)
    z = public_op(sec, encode_public(ctx, pub), pub_first)
    return (yield from T.trunc(ctx, z))


@rule("mul")
def _mul(ctx, node, ins):
    return _product(ctx, node, ins, arith.mul, arith.mul_fixed, lambda s, p, first: s * p)


@rule("matmul")
def _matmul(ctx, node, ins):
    if node.meta.get("normalizes"):  # 2Quad(x) @ V, normalized after the product (deferral.py)
        return nl.softmax_2quad_matmul(ctx, ins[0], ins[1])
    return _product(ctx, node, ins, arith.matmul, arith.matmul_fixed,
                    lambda s, p, first: ring_matmul(p, s) if first else ring_matmul(s, p))


@rule("linear")
def _linear(ctx, node, ins):
    if isinstance(ins[0], nl.Commuted):  # the LayerNorm before it computed x W (deferral.py)
        z, in_frac = ins[0].products[node.name], ins[0].raw.frac
    else:
        x, in_frac = (ins[0].value, ins[0].frac) if isinstance(ins[0], T.Raw) else (ins[0], ctx.f)
        z = yield from arith.matmul_fixed(ctx, x, ctx.state[arith.FIXED_OPERANDS][_fixed_key(node, 1)])
    # z carries f + in_frac bits: a raw LayerNorm output's extra bits are truncated here too
    if node.meta.get("defer_raw"):  # the residual add truncates the sum (deferral.py)
        return T.Raw(z + (ins[2] << in_frac) if len(ins) == 3 else z, ctx.f + in_frac)
    if "defer" in node.meta:  # the consumer's first round finishes it (deferral.py)
        p = T.begin(ctx, z, in_frac + node.meta["defer"])
        return p.plus(ins[2]) if len(ins) == 3 else p
    z = yield from T.trunc(ctx, z, in_frac)
    if len(ins) == 3:
        z = z + ins[2]
    return z


@rule("sum")
def _sum(ctx, node, ins):
    return ins[0].sum(dim=list(node.attrs["dims"]), keepdim=node.attrs["keepdim"])


@rule("mean")
def _mean(ctx, node, ins):
    x = ins[0]
    dims = list(node.attrs["dims"])
    n = 1
    for d in dims:
        n *= node.meta["in_nodes"][0].shape[d]
    s = x.sum(dim=dims, keepdim=node.attrs["keepdim"])
    return scale_public(ctx, s, 1.0 / n)


# --- layout (local on shares) --------------------------------------------------------------------

@rule("reshape")
def _reshape(ctx, node, ins):
    return ins[0].reshape(node.attrs["shape"])


@rule("permute")
def _permute(ctx, node, ins):
    return ins[0].permute(node.attrs["dims"])


@rule("transpose")
def _transpose(ctx, node, ins):
    return ins[0].transpose(node.attrs["dim0"], node.attrs["dim1"])


@rule("expand")
def _expand(ctx, node, ins):
    return ins[0].expand(node.attrs["shape"])


@rule("slice")
def _slice(ctx, node, ins):
    a = node.attrs
    idx = [slice(None)] * len(node.meta["in_nodes"][0].shape)
    idx[a["dim"]] = slice(a["start"], a["end"], a["step"])
    return ins[0][tuple(idx)]


@rule("select")
def _select(ctx, node, ins):
    return ins[0].select(node.attrs["dim"], node.attrs["index"])


@rule("index_select")
def _index_select(ctx, node, ins):
    idx = ins[1]
    if idx.device.type == "meta" and not ctx.is_dealer:
        raise RuntimeError("index_select: public index unavailable")
    return ins[0].index_select(node.attrs["dim"], ctx.pub(idx.to(torch.int64)))


@rule("cat")
def _cat(ctx, node, ins):
    parts = [as_share(ctx, v, n) for v, n in zip(ins, node.meta["in_nodes"])]
    return torch.cat(parts, node.attrs["dim"])


@rule("unsqueeze")
def _unsqueeze(ctx, node, ins):
    return ins[0].unsqueeze(node.attrs["dim"])


@rule("squeeze")
def _squeeze(ctx, node, ins):
    return ins[0].squeeze(list(node.attrs["dims"]))


@rule("embedding")
def _embedding(ctx, node, ins):
    ids, table = ins
    ids_node = node.meta["in_nodes"][0]
    if ids_node.secret:
        # one-hot (scale 0) @ table (scale f): the product is already at scale f
        return (yield from arith.matmul_fixed(ctx, ids, ctx.state[arith.FIXED_OPERANDS][_fixed_key(node, 1)]))
    flat = ctx.pub(ids.reshape(-1).to(torch.int64))
    return table.index_select(0, flat).reshape(tuple(node.shape))


# --- nonlinear ops: dispatched on the approximation method ---------------------------------------

NONLINEAR: dict[tuple[str, str], Callable[..., Protocol]] = {}


def nonlinear(op: str, *methods: str):
    """Register the protocol implementing (op, method)."""
    def deco(fn):
        for m in methods:
            if (op, m) in NONLINEAR:
                raise ValueError(f"nonlinear rule {(op, m)} registered twice")
            NONLINEAR[(op, m)] = fn
        return fn
    return deco


@rule("gelu", "tanh", "layernorm", "softmax")
def _nonlinear(ctx, node, ins):
    method = node.attrs.get("method") or "exact"
    fn = NONLINEAR.get((node.op, method))
    if fn is None:
        have = sorted(m for (o, m) in NONLINEAR if o == node.op)
        raise NotImplementedError(f"no 2PC protocol for {node.op} method {method!r} (have: {have})")
    return fn(ctx, node, ins, node.attrs.get("params") or {})


@rule("relu")
def _relu(ctx, node, ins):
    return compare.relu(ctx, ins[0])


# --- fixed operands (weights opened once) ------------------------------------------------------

def _fixed_key(node: Node, pos: int) -> str | None:
    """Key of the fixed operand feeding input `pos` of `node` (set by `plan_fixed`)."""
    return node.meta.get("fixed", {}).get(pos)


def plan_fixed(graph: Graph, frac_bits: int = 16) -> dict[str, tuple[str, str]]:
    """Annotate products whose second operand is a weight; returns key -> (weight, layout).

    layout: "t" (linear: x @ W.T, so W.T is the fixed operand) or "n" (as is). Then the
    deferred truncations for f = frac_bits (deferral.py; recorded as the first node's
    meta["plan_f"]).
    """
    plan: dict[str, tuple[str, str]] = {}
    nodes = {n.name: n for n in graph}
    for n in graph:
        n.meta["in_nodes"] = [nodes[i] for i in n.inputs]
        wpos = {"linear": 1, "matmul": 1, "mul": 1, "embedding": 1, "layernorm": 1}.get(n.op)
        if wpos is None or len(n.inputs) <= wpos:
            continue
        src = nodes[n.inputs[wpos]]
        if src.op != "weight":
            continue
        if n.op in ("mul", "matmul") and not nodes[n.inputs[0]].secret:
            continue
        layout = "t" if n.op == "linear" else "n"
        key = f"{src.attrs['name']}:{layout}"
        plan[key] = (src.attrs["name"], layout)
        n.meta.setdefault("fixed", {})[wpos] = key
    plan_deferred(graph, frac_bits)
    if graph.nodes:
        graph.nodes[0].meta["plan_f"] = frac_bits
    return plan


def load_program(ctx: Context, graph: Graph, weight_shares: dict[str, torch.Tensor],
                 keys: list[str] | None = None) -> Protocol:
    """Loading phase: open W - B for every fixed operand, ~4M values per round.

    keys: load only these fixed operands (one round: a group of `load_groups`) and add
    `weight_shares`, which need hold only their weights and any others to keep, to the
    weights already loaded. A session loads group by group this way so that neither the
    model owner nor a party ever holds more than one group's shares in transit
    (compiled.Session). None: every fixed operand, replacing what was loaded."""
    plan = plan_fixed(graph, ctx.f)
    if keys is None:
        ctx.state["weights"] = {}
        groups = load_groups(graph, ctx.f)
    else:
        unknown = [k for k in keys if k not in plan]
        if unknown:
            raise ValueError(f"load_program: no fixed operand {unknown[0]!r} in this program")
        groups = [keys]
    for group in groups:  # openings go out in rounds of ~4M values: bounded memory for big models
        batch = []
        for key in group:
            name, layout = plan[key]
            w = weight_shares[name]
            batch.append(arith.fix_operand(ctx, w.t().contiguous() if layout == "t" else w, key))
        if batch:
            yield from parallel(*batch)
    # each FixedOperand is in ctx.state[arith.FIXED_OPERANDS] under its key (fix_operand)
    ctx.state.setdefault("weights", {}).update(_without_fixed_only(graph, weight_shares))
    return sum(len(g) for g in groups)


def load_groups(graph: Graph, frac_bits: int = 16, round_values: int | None = None) -> list[list[str]]:
    """The fixed operands' keys (`plan_fixed`) in the groups `load_program` opens together,
    one round each: in key order, a group closes once it holds `round_values` (default
    LOAD_ROUND_VALUES) values. Both keys of one weight (layouts "n" and "t") fall in the
    same group, so that a group's weights are exactly those its keys name."""
    plan = plan_fixed(graph, frac_bits)
    limit = LOAD_ROUND_VALUES if round_values is None else round_values
    shapes = {n.attrs["name"]: n.shape for n in graph if n.op == "weight"}
    groups: list[list[str]] = []
    group: list[str] = []
    size = 0
    keys = sorted(plan)
    for i, key in enumerate(keys):
        name = plan[key][0]
        group.append(key)
        size += math.prod(shapes[name])
        same_weight_next = i + 1 < len(keys) and plan[keys[i + 1]][0] == name
        if size >= limit and not same_weight_next:
            groups.append(group)
            group, size = [], 0
    if group:
        groups.append(group)
    return groups


def _without_fixed_only(graph: Graph, weight_shares: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weight shares a session must keep: a weight read only through its fixed operand
    (every user is a linear, matmul or mul taking it at its planned fixed position, where
    their rules never read the value) is replaced by a meta tensor of its shape. Its
    FixedOperand holds this party's share (re-based on the mask), so the original copy is
    dead: for BERT-base that is 0.68 GB per party. Embedding tables and LayerNorm gains
    stay: a public-ids lookup and some LayerNorm methods read the share itself.
    Needs `plan_fixed` to have run (load_program does it first)."""
    fixed_only = set()
    read = set()  # weight names some node reads by value
    for n in graph:
        for pos, src in enumerate(n.meta["in_nodes"]):
            if src.op != "weight":
                continue
            name = src.attrs["name"]
            if n.op in ("linear", "matmul", "mul") and pos in n.meta.get("fixed", {}):
                fixed_only.add(name)
            else:
                read.add(name)
    read |= {graph[o].attrs["name"] for o in graph.outputs if graph[o].op == "weight"}
    shapes = {n.attrs["name"]: tuple(n.shape) for n in graph if n.op == "weight"}
    dropped = fixed_only - read
    # a dropped weight is not read here (`weight_shares` may encode on each read: RingWeights)
    return {name: torch.empty(shapes[name], dtype=torch.int64, device="meta") if name in dropped
            else weight_shares[name] for name in weight_shares}


LOAD_ROUND_VALUES = 4 << 20  # 32 MiB of ring values per group: what loading adds to a party's peak


def _where(node: Node) -> str:
    return f"while executing %{node.name} = {node.op}(...)  # {node.module_path or '?'}"


def _contextual(gen: Protocol, node: Node, ctx: Context) -> Protocol:
    """Adds "while executing <node>" to any error raised inside a node's protocol, and names
    the node whose protocol runs (runtime.domain: the simulator's range checks say where)."""
    state = ctx.state
    try:
        state[NODE] = node
        msgs = next(gen)
        while True:
            reply = yield msgs
            state[NODE] = node
            msgs = gen.send(reply)
    except StopIteration as stop:
        return stop.value
    except Exception as e:
        e.add_note(_where(node))
        raise


def infer_program(ctx: Context, graph: Graph, inputs: dict[str, Any],
                  on_node: Callable[[Node], None] | None = None) -> Protocol:
    """One inference: returns this party's shares of the graph outputs (scale f).

    on_node(node), if given, is called as each compute node completes (progress bars); it
    changes neither the messages nor the randomness."""
    if "in_nodes" not in graph.nodes[0].meta or graph.nodes[0].meta.get("plan_f") != ctx.f:
        plan_fixed(graph, ctx.f)
    ctx.state["inputs"] = inputs
    nodes = graph.nodes
    notify = on_node or (lambda node: None)

    def finished(gen, node: Node):
        out = yield from gen
        notify(node)
        return out

    def launch(node: Node):
        ins = [values[i] for i in node.inputs]
        fn = RULES.get(node.op)
        if fn is None:
            raise NotImplementedError(f"no 2PC rule for IR op {node.op!r} (node %{node.name})")
        try:
            ctx.state[NODE] = node
            out = fn(ctx, node, ins)
        except Exception as e:
            e.add_note(_where(node))
            raise
        if hasattr(out, "send"):
            return finished(_contextual(out, node, ctx), node)
        if node.op not in ("input", "weight", "constant"):
            notify(node)
        return out

    values: dict[str, Any] = {}
    deps = {n.name: n.inputs for n in nodes}
    yield from execute(nodes, deps, launch, values, tag=lambda n: n.name, keep=graph.outputs)
    return [values[o] for o in graph.outputs]


from . import mpc_nonlinear  # noqa: E402,F401  (registers the nonlinear protocols)
