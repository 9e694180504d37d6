"""`check_support`: before converting anything, list every secret op without an MPC lowering.

Public computations (shapes, positions, the padding mask) run in the clear, so any ATen op
is fine there; only ops on secret values need a rule in `decompose.RULES`. The error names
each unsupported op with the module paths it appears at, and the supported set, at once.
"""

from __future__ import annotations

from collections import defaultdict

from ..errors import Problem, UnsupportedOpsError
from ..ir import Graph, is_imported
from .decompose import RULES
from .registry import register_pass


def supported_ops() -> list[str]:
    """ATen overloads that have an MPC lowering when applied to secret values."""
    return sorted(t for t in RULES if t.startswith("aten."))


@register_pass("check_support")
def check_support(graph: Graph) -> Graph:
    """Raise one UnsupportedOpsError listing every secret op without a lowering."""
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for n in graph:
        if not is_imported(n) or not n.secret:
            continue
        r = RULES.get(n.op)
        if r is None:
            found[f"{n.op} has no MPC lowering"].append((n.module_path, n.name))
        elif r.check is not None:
            reason = r.check(n, graph)
            if reason:
                found[f"{n.op}: {reason}"].append((n.module_path, n.name))
    if not found:
        return graph
    items = []
    for what, where in found.items():
        paths = ", ".join(dict.fromkeys(p or "<top level>" for p, _ in where))
        nodes = ", ".join(name for _, name in where)
        items.append(Problem(f"{what} ({len(where)}x)", paths, nodes))
    raise UnsupportedOpsError(
        f"{len(items)} unsupported op(s) on secret values:", items,
        hint="supported ATen ops on secret values: " + ", ".join(supported_ops()))
