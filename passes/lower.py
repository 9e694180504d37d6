"""`lower_to_mpc`: the last step to the MPC IR, and `verify_mpc`.

Pattern recognition has absorbed the frontend-only ops it could (`erf`, `rsqrt`, `div`,
masks before softmax). What is left:

- `where(cond, a, b)` with a public condition is local arithmetic on shares:
  a * cond + b * (1 - cond). A public fill value (masked_fill outside a softmax) must fit
  the fixed-point range: |v| <= 2^20 (a -inf or -1e38 fill is only meaningful before a
  softmax, where `recognize_softmax_mask` removes it);
- every other frontend op (`exp`, `erf`, `rsqrt`, `sqrt`, `reciprocal`, `div` of secrets)
  outside a recognized pattern has no standalone protocol: all are reported at once.
"""

from __future__ import annotations

from ..errors import Problem, UnsupportedOpsError
from ..ir import OPS, Graph, Node, Rewriter
from .registry import register_pass
from .secrecy import public_transform

FILL_LIMIT = 2.0 ** 20


def _lower_where(rw: Rewriter, n: Node) -> str:
    cond = rw.new(n.inputs[0])
    terms, public_terms = [], []
    for val, helper in ((n.inputs[1], "to_float"), (n.inputs[2], "not_to_float")):
        v = rw.new(val)
        if v.secret:
            m = rw.dst[public_transform(rw, cond, helper, like=n, name=f"{n.name}_sel")]
            terms.append(rw.emit("mul", [v.name, m.name], like=n))
            continue
        if v.op != "constant" or v.attrs["value"].numel() != 1:
            raise ValueError("selecting a public tensor into a secret one")
        s = float(v.attrs["value"].item())
        if abs(s) > FILL_LIMIT:
            raise ValueError(f"fill value {s} outside the fixed-point range (|v| <= 2^20) and not before a softmax")
        if s != 0:
            m = rw.dst[public_transform(rw, cond, helper, like=n, name=f"{n.name}_sel")]
            public_terms.append(public_transform(rw, m, "scale", s, like=n, name=f"{n.name}_fill"))
    out = terms[0]
    for t in terms[1:] + public_terms:
        out = rw.emit("add", [out, t], like=n)
    return out


@register_pass("lower_to_mpc")
def lower_to_mpc(graph: Graph) -> Graph:
    """Lower public selections to arithmetic; report frontend ops no pattern absorbed."""
    rw = Rewriter(graph, level="mpc")
    problems = []
    for n in graph:
        if n.op == "where":
            try:
                rw.bind(n.name, _lower_where(rw, n))
                continue
            except ValueError as e:
                problems.append(Problem(f"where/masked_fill: {e}", n.module_path, n.name))
        elif OPS[n.op].level != "mpc":
            problems.append(Problem(f"{n.op} outside a recognized GeLU / LayerNorm / softmax pattern "
                                    f"has no MPC protocol", n.module_path, n.name))
        rw.copy(n)
    if problems:
        raise UnsupportedOpsError(f"{len(problems)} op(s) have no MPC lowering:", problems,
                                  hint="MPC nonlinearities: gelu, layernorm, softmax, tanh, relu")
    return rw.finish()


@register_pass("verify_mpc")
def verify_mpc(graph: Graph) -> Graph:
    """Verify the graph as final MPC IR (only `mpc`-level ops)."""
    graph.verify("mpc")
    return graph
