"""Static cost model: bytes each party sends and rounds, per node, per op type, per layer.

One rule per IR op, built from the protocols' declared `*_cost` formulas (each checked by
the runtime tests against what the transport counted). Rounds of the whole program are the
longest path through the graph weighted by each node's rounds: the dataflow executor
(dataflow.py) starts a node in the round its last input finishes and runs independent
nodes in lockstep, so that is exactly what a run counts (tests/compiler/test_cost.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .ir import Graph, Node
from .runtime.protocols import arith, baselines, compare
from .runtime.protocols import nonlinear as nl
from .runtime.protocols.cost import Cost
from .runtime.protocols.fused import pending_k
from .runtime.protocols.trunc import trunc_cost

NETWORKS = {"LAN": (1e9, 0.5e-3), "WAN": (100e6, 40e-3)}  # bandwidth bit/s, round-trip time s

CostRule = Callable[[Node, list[Node], str, int], Cost]
COST: dict[str, CostRule] = {}
NONLINEAR_COST: dict[tuple[str, str], CostRule] = {}


def cost_rule(*ops: str):
    def deco(fn):
        for op in ops:
            if op in COST:
                raise ValueError(f"cost rule for {op!r} registered twice")
            COST[op] = fn
        return fn
    return deco


def nonlinear_cost(op: str, *methods: str):
    def deco(fn):
        for m in methods:
            NONLINEAR_COST[(op, m)] = fn
        return fn
    return deco


def _free(node, ins, mode, f):
    return Cost()


for _op in ("input", "weight", "constant", "public_fn", "add", "sub", "neg", "sum", "reshape", "permute",
            "transpose", "expand", "slice", "select", "index_select", "cat", "unsqueeze", "squeeze"):
    cost_rule(_op)(_free)


def scale_cost(shape, factor: float, mode: str) -> Cost:
    """Mirrors mpc_interp.scale_public: powers of two >= 1 are free, the rest one truncation."""
    if factor == 0:
        return Cost()
    m, e = math.frexp(abs(factor))
    if m == 0.5 and e - 1 >= 0:
        return Cost()
    if m != 0.5 and max(0, 20 - e) == 0:
        return Cost()
    return trunc_cost(shape, mode)


@cost_rule("scale")
def _scale(node, ins, mode, f):
    if node.meta.get("folded"):  # into the product's deferred truncation (deferral.py)
        return Cost()
    return scale_cost(node.shape, float(node.attrs["factor"]), mode)


@cost_rule("mean")
def _mean(node, ins, mode, f):
    n = 1
    for d in node.attrs["dims"]:
        n *= ins[0].shape[d]
    return scale_cost(node.shape, 1.0 / n, mode)


def _product(node, ins, mode):
    a, b = ins
    if a.secret and b.secret:
        fixed = node.meta.get("fixed", {}).get(1)
        c = arith.beaver_fixed_cost(a.shape) if fixed else arith.beaver_cost(a.shape, b.shape)
        return c if "defer" in node.meta else c + trunc_cost(node.shape, mode)  # deferral.py
    from .mpc_interp import _int_valued
    pub = b if a.secret else a
    return Cost() if _int_valued(pub) else trunc_cost(node.shape, mode)


@cost_rule("mul", "matmul")
def _mul(node, ins, mode, f):
    if node.meta.get("normalizes"):  # 2Quad(x) @ V after 2Quad's first round (deferral.py)
        p = _p(ins[0])
        return nl.softmax_2quad_matmul_cost(ins[0].shape, ins[1].shape, float(p["prescale"]),
                                            int(p["iterations"]), f, mode, float(p.get("gamma", 2.0)),
                                            int(p.get("table_bits", 0)))
    return _product(node, ins, mode)


@cost_rule("linear")
def _linear(node, ins, mode, f):
    # a LayerNorm that commuted its scaling past this linear computed the product (deferral.py)
    c = Cost() if node.meta.get("commuted") else arith.beaver_fixed_cost(ins[0].shape)
    deferred = "defer" in node.meta or node.meta.get("defer_raw")  # deferral.py
    return c if deferred else c + trunc_cost(node.shape, mode)


def _pending_k(node, mode: str, f: int) -> int:
    """The shift a nonlinear node's input has pending (deferral.py; 0: a finished share)."""
    if node.meta.get("pending_in") is None:
        return 0
    return pending_k(f + node.meta["pending_shift"], mode)


@cost_rule("embedding")
def _embedding(node, ins, mode, f):
    ids, table = ins
    return arith.beaver_fixed_cost(tuple(ids.shape) + (table.shape[0],)) if ids.secret else Cost()


@cost_rule("relu")
def _relu(node, ins, mode, f):
    return compare.relu_cost(node.shape)


@cost_rule("gelu", "tanh", "layernorm", "softmax")
def _nonlinear(node, ins, mode, f):
    method = node.attrs.get("method") or "exact"
    fn = NONLINEAR_COST.get((node.op, method))
    if fn is None:
        if method.endswith("exact"):
            return Cost()  # simulator only
        raise KeyError(f"no cost rule for {node.op} method {method!r}")
    return fn(node, ins, mode, f)


def _p(node) -> dict:
    return node.attrs.get("params") or {}


@nonlinear_cost("gelu", "gelu.secformer", "gelu.secformer_erf")
def _gelu_secformer_cost(n, ins, mode, f):
    table = nl.gelu_table_from_params(_p(n), f)  # as the 2PC rule (mpc_nonlinear) runs it
    if table is not None:
        return nl.gelu_secformer_table_cost(n.shape, *table, int(_p(n)["period"]), f, mode,
                                            x_k=_pending_k(n, mode, f))
    bits, drop = nl.gelu_cmp_from_params(_p(n), f)
    return nl.gelu_secformer_cost(n.shape, bits, mode, drop=drop, x_k=_pending_k(n, mode, f))


from .runtime.protocols import activations as act  # noqa: E402

nonlinear_cost("gelu", "gelu.quad")(lambda n, ins, mode, f: act.gelu_quad_cost(n.shape, mode))
nonlinear_cost("gelu", "gelu.puma")(lambda n, ins, mode, f: act.gelu_puma_cost(n.shape))
nonlinear_cost("gelu", "gelu.crypten")(
    lambda n, ins, mode, f: act.gelu_crypten_cost(n.shape, exp_iterations=int(_p(n)["exp_iterations"])))
nonlinear_cost("tanh", "tanh.secformer")(
    lambda n, ins, mode, f: act.tanh_secformer_cost(n.shape, int(_p(n)["period"]), f=f, mode=mode))
nonlinear_cost("tanh", "tanh.crypten")(
    lambda n, ins, mode, f: act.tanh_crypten_cost(n.shape, exp_iterations=int(_p(n)["exp_iterations"])))


def _ln_shape(node, ins):
    k = node.attrs["dims"]
    s = tuple(ins[0].shape)
    return s if k == 1 else s[:-k] + (math.prod(s[-k:]),)


@nonlinear_cost("layernorm", "layernorm.secformer")
def _ln_secformer(node, ins, mode, f):
    weight = "fixed" if len(ins) > 1 else "none"
    shape, prescale = _ln_shape(node, ins), float(_p(node)["prescale"])
    table_bits = int(_p(node).get("table_bits", 0))
    return nl.layernorm_goldschmidt_cost(shape, prescale, int(_p(node)["iterations"]), weight=weight, f=f, mode=mode,
                                         raw="raw" in node.meta,
                                         commute=[w for _, w in node.meta.get("commute_into", {}).values()],
                                         bias=len(ins) > 2,
                                         center_first=not table_bits and nl.layernorm_needs_center_first(
                                             shape[-1], prescale, f, float(_p(node).get("gamma", 3.0))),
                                         x_k=_pending_k(node, mode, f), table_bits=table_bits,
                                         table_exp=int(_p(node).get("table_exp", 0)))


@nonlinear_cost("layernorm", "layernorm.crypten")
def _ln_crypten(node, ins, mode, f):
    s = _ln_shape(node, ins)
    rows = s[:-1] + (1,)
    p = _p(node)
    c = scale_cost(rows, 1.0 / s[-1], mode) + arith.square_cost(s) + trunc_cost(rows, mode)
    c = c + scale_cost(rows, 1.0 / s[-1], mode)
    c = c + baselines.rsqrt_newton_cost(rows, int(p["iterations"]), int(p["exp_iterations"]), mode)
    c = c + arith.beaver_cost(s, rows) + trunc_cost(s, mode)
    if len(ins) > 1:
        c = c + arith.beaver_fixed_cost(s) + trunc_cost(s, mode)
    return c


@nonlinear_cost("softmax", "softmax.2quad")
def _sm_2quad(node, ins, mode, f):
    p = _p(node)
    if node.meta.get("unnormalized"):  # its first round only; the matmul after it normalizes
        return nl.softmax_2quad_rows_cost(node.shape, _pending_k(node, mode, f))
    return nl.softmax_2quad_cost(node.shape, float(p["prescale"]), int(p["iterations"]), node.attrs["dim"], f, mode,
                                 x_k=_pending_k(node, mode, f), gamma=float(p.get("gamma", 2.0)),
                                 table_bits=int(p.get("table_bits", 0)))


@nonlinear_cost("softmax", "softmax.crypten")
def _sm_crypten(node, ins, mode, f):
    p = _p(node)
    dim = node.attrs["dim"]
    shape = list(node.shape)
    shape[dim] = 1
    recip = baselines.reciprocal_newton_cost(tuple(shape), int(p["reciprocal_iterations"]),
                                             int(p["exp_iterations"]), mode)
    return baselines.softmax_exp_cost(node.shape, dim, int(p["exp_iterations"]), recip, mode=mode)


@nonlinear_cost("softmax", "softmax.puma")
def _sm_puma(node, ins, mode, f):
    from .mpc_nonlinear import puma_recip_plan
    from .runtime.protocols.goldschmidt import reciprocal_goldschmidt_cost
    p = _p(node)
    dim = node.attrs["dim"]
    shape = list(node.shape)
    prescale, iters = puma_recip_plan(shape[dim])
    shape[dim] = 1
    recip = reciprocal_goldschmidt_cost(tuple(shape), prescale, iters, f=f, mode=mode)
    return baselines.softmax_exp_cost(node.shape, dim, int(p["exp_iterations"]), recip, cutoff=True, mode=mode)


@dataclass
class ProgramCost:
    """Static cost of one inference. bytes are sent per party (both parties send the same)."""

    rounds: int
    bytes_per_party: int
    by_node: dict[str, Cost]
    by_op: dict[str, dict[str, int]] = field(default_factory=dict)
    by_layer: dict[str, dict[str, int]] = field(default_factory=dict)

    def estimate(self, network: str) -> float:
        """Seconds of communication: rounds x RTT + bytes x 8 / bandwidth."""
        bw, rtt = NETWORKS[network]
        return self.rounds * rtt + self.bytes_per_party * 8 / bw

    def as_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "bytes_sent_per_party": self.bytes_per_party,
                "by_op": self.by_op, "by_layer": self.by_layer,
                "estimates_s": {k: self.estimate(k) for k in NETWORKS}}


def layer_of(module_path: str) -> str:
    """`encoder.layer.3.attention.self` -> `encoder.layer.3`; other paths keep two parts."""
    parts = module_path.split(".") if module_path else ["<top>"]
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2])


def program_cost(graph: Graph, mode: str = "exact", frac_bits: int = 16) -> ProgramCost:
    """The static cost of one inference of `graph` (see module docstring)."""
    from .mpc_interp import plan_fixed

    if graph.nodes:  # always: the deferral marks depend on the methods (deferral.py)
        plan_fixed(graph, frac_bits)
    finish: dict[str, int] = {}
    by_node: dict[str, Cost] = {}
    by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"bytes_sent": 0, "rounds": 0, "count": 0})
    by_layer: dict[str, dict[str, int]] = defaultdict(lambda: {"bytes_sent": 0, "rounds": 0})
    total = 0
    for n in graph:
        ins = n.meta["in_nodes"]
        c = COST[n.op](n, ins, mode, frac_bits)
        by_node[n.name] = c
        finish[n.name] = max((finish[i] for i in n.inputs), default=0) + c.rounds
        total += c.bytes
        key = n.op if n.op not in ("gelu", "tanh", "layernorm", "softmax") else f"{n.op}:{n.attrs.get('method')}"
        row = by_op[key]
        row["bytes_sent"] += c.bytes
        row["rounds"] += c.rounds
        row["count"] += 1
        lrow = by_layer[layer_of(n.module_path)]
        lrow["bytes_sent"] += c.bytes
        lrow["rounds"] += c.rounds
    rounds = max(finish.values(), default=0)
    return ProgramCost(rounds, total, by_node, dict(by_op), dict(by_layer))


def missing_cost_rules(ops=None) -> list[str]:
    from .ir import OPS
    return [op for op in (ops or OPS) if OPS[op].level == "mpc" and op not in COST]
