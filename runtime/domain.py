"""Declared input ranges, checked where the simulator can see the values.

Why: a protocol given an input outside its declared range returns garbage, not an error
(nothing may branch on a secret), and the simulator does not always show it: it runs the
same fixed-point arithmetic with zero masks, and some failures (a Goldschmidt iterate past
its overflow bound, a truncation's wrap bit) only appear under random shares. In the clear
the values are visible, so the protocols state their ranges here and the simulator records
every node whose input left one (`CompiledModel.simulate` warns with the list), before a
2PC run returns garbage. A computing party or the dealer never checks anything: they see
shares, and a check on a secret would leak it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .context import CLEAR, Context

VIOLATIONS = "domain_violations"  # ctx.state: {(node, what): DomainViolation}
NODE = "current_node"  # ctx.state: the IR node whose protocol is running (mpc_interp)


@dataclass
class DomainViolation:
    """Values seen outside a protocol's declared input range, in one node."""

    node: str
    module_path: str
    what: str
    observed: tuple[float, float]
    domain: tuple[float, float]

    def __str__(self) -> str:
        where = f"%{self.node}" + (f" ({self.module_path})" if self.module_path else "")
        return (f"{where}: {self.what} ranged over [{self.observed[0]:.4g}, {self.observed[1]:.4g}], "
                f"outside its domain [{self.domain[0]:.4g}, {self.domain[1]:.4g}]")


def check_range(ctx: Context, what: str, value, frac: int, lo: float, hi: float,
                magnitude: bool = False) -> None:
    """In the simulator, record `value` (a ring tensor at `frac` fractional bits, or a
    trunc.Pending, whose value there is its base) if it leaves [lo, hi] (its absolute
    value, with `magnitude`). Does nothing in a party or the dealer."""
    if ctx.mode != CLEAR:
        return
    t = getattr(value, "base", value)
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
        return
    v = t.double() / 2.0 ** frac
    if magnitude:
        v = v.abs()
    mn, mx = float(v.min()), float(v.max())
    if lo <= mn and mx <= hi:
        return
    node = ctx.state.get(NODE)
    name, path = (node.name, node.module_path) if node is not None else ("?", "")
    seen = ctx.state.setdefault(VIOLATIONS, {})
    old = seen.get((name, what))
    if old is not None:
        mn, mx = min(mn, old.observed[0]), max(mx, old.observed[1])
    seen[(name, what)] = DomainViolation(name, path, what, (mn, mx), (lo, hi))


def violations(ctx: Context) -> list[DomainViolation]:
    """What `check_range` recorded in this context, in the order first seen."""
    return list(ctx.state.get(VIOLATIONS, {}).values())
