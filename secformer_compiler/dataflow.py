"""Dataflow execution of a graph of protocol-valued nodes, with round sharing.

Every node whose inputs are ready starts at once, and all running nodes advance in
lockstep: the openings of independent nodes (the Q, K and V projections; the comparisons
and the sine of one GeLU next to another branch) share rounds, one message per peer per
round. A node's completion immediately starts its dependents in the same round. The order
in which nodes start and advance depends only on the graph, never on data, so P0, P1, the
dealer and the simulator draw correlated randomness in the same order.

The number of rounds equals the longest path through the graph weighted by each node's
rounds, which is what the static cost model computes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from .runtime.messages import Protocol, tagged

# rule(node) -> a Protocol generator (or a plain value for local nodes)
Launch = Callable[[Any], Any]


def execute(nodes: Sequence[Any], deps: dict[str, Iterable[str]], launch: Launch,
            values: dict[str, Any], tag: Callable[[Any], str] | None = None,
            keep: Iterable[str] | None = None) -> Protocol:
    """Run `nodes` (each with a `.name`, in topological order); `values` holds ready inputs.

    launch(node) is called once the node's dependencies are in `values`; it returns a
    generator (an interactive protocol) or a value. Results are stored in `values`.
    keep: if given, only these values are kept to the end; any other value is dropped once
    its last user has been launched (a BERT-base forward pass would otherwise hold every
    intermediate share at once).
    """
    pending_users: dict[str, int] = {}
    if keep is not None:
        keep = set(keep)
        for n in nodes:
            for d in set(deps[n.name]):
                pending_users[d] = pending_users.get(d, 0) + 1
    order = {n.name: i for i, n in enumerate(nodes)}
    waiting = {n.name: {d for d in deps[n.name] if d not in values} for n in nodes}
    users: dict[str, list[Any]] = {}
    for n in nodes:
        for d in waiting[n.name]:
            users.setdefault(d, []).append(n)
    ready = [n for n in nodes if not waiting[n.name]]
    active: dict[str, tuple[Any, Any, list]] = {}  # name -> (node, generator, pending msgs)

    def finish(node: Any, value: Any) -> None:
        values[node.name] = value
        for u in users.get(node.name, ()):
            w = waiting[u.name]
            w.discard(node.name)
            if not w:
                ready.append(u)

    def start_ready() -> None:
        while ready:
            ready.sort(key=lambda n: order[n.name])
            node = ready.pop(0)
            out = launch(node)
            if keep is not None:
                for d in set(deps[node.name]):
                    pending_users[d] -= 1
                    if pending_users[d] == 0 and d not in keep:
                        values.pop(d, None)
            if not hasattr(out, "send"):
                finish(node, out)
                continue
            gen = tagged(out, tag(node)) if tag else out
            try:
                msgs = next(gen)
            except StopIteration as stop:
                finish(node, stop.value)
                continue
            active[node.name] = (node, gen, msgs)

    start_ready()
    while active:
        names = sorted(active, key=order.__getitem__)
        merged = []
        for name in names:
            merged.extend(active[name][2])
        replies = yield merged
        pos = 0
        for name in names:
            node, gen, msgs = active[name]
            part, pos = replies[pos:pos + len(msgs)], pos + len(msgs)
            try:
                active[name] = (node, gen, gen.send(part))
            except StopIteration as stop:
                del active[name]
                finish(node, stop.value)
        start_ready()
    missing = [n.name for n in nodes if n.name not in values and (keep is None or n.name in keep)]
    if missing:
        raise RuntimeError(f"dataflow: nodes never became ready (cycle or missing input): {missing[:5]}")
    return values
