"""`report_softmax_count`: a small analysis pass, and how a plugin registers one.

A pass is a function `graph -> graph` registered by name with `register_pass`; it needs a
docstring (the registry refuses an undocumented pass). Run it by naming it in a pipeline,
after `approximate` so that the methods are known:

    from secformer_compiler.frontend import build_ir
    from secformer_compiler.passes import DEFAULT_PIPELINE
    graph = build_ir(model, x, softmax="softmax.2relu",
                     pipeline=[*DEFAULT_PIPELINE, "report_softmax_count"])
    graph.meta["softmax_count"]  # {"softmax.2relu": 2}
    graph.meta["softmax_rows"]   # {"softmax.2relu": (rows, longest row)}

The pass manager verifies the graph after it, as after every pass.
"""

from __future__ import annotations

import math

from secformer_compiler.ir import Graph
from secformer_compiler.plugins import register_pass


@register_pass("report_softmax_count")
def report_softmax_count(graph: Graph) -> Graph:
    """Count softmax nodes and their rows per method into graph.meta (the graph is unchanged).

    graph.meta["softmax_count"]: {method: number of softmax nodes};
    graph.meta["softmax_rows"]: {method: (total rows, longest row)}, rows being what a
    protocol normalizes one at a time (the product of the other dims) - what a
    per-row cost such as a reciprocal's scales with. Method "exact" for unapproximated nodes.
    """
    counts: dict[str, int] = {}
    rows: dict[str, tuple[int, int]] = {}
    for n in graph:
        if n.op != "softmax":
            continue
        method = n.attrs.get("method") or "exact"
        shape = list(n.shape)
        length = shape.pop(n.attrs["dim"])
        counts[method] = counts.get(method, 0) + 1
        total, longest = rows.get(method, (0, 0))
        rows[method] = (total + math.prod(shape), max(longest, length))
    graph.meta = {**graph.meta, "softmax_count": counts, "softmax_rows": rows}
    return graph
