"""The per-role state a protocol runs with: who we are, fixed point, randomness, options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .correlations import ClearCorrelations, Correlations
from .prg import PRG
from .ring import FixedPoint

P0, P1, DEALER = 0, 1, 2
ROLE_NAMES = {P0: "P0", P1: "P1", DEALER: "dealer"}

PARTY, DEALER_MODE, CLEAR = "party", "dealer", "clear"


@dataclass
class Context:
    """Everything a protocol needs besides its inputs.

    mode: ``party`` (a real computing party), ``dealer`` (shapes only, on meta tensors,
    generating correlated randomness), ``clear`` (the simulator: P0 holds every value,
    P1's shares are zero).
    trunc: ``exact`` (default; one round, at most 1 ulp of error) or ``local``
    (SecureML-style, no communication, fails with probability about |x|/2^63 per element).
    """

    party: int
    mode: str
    corr: Correlations
    fxp: FixedPoint = field(default_factory=FixedPoint)
    trunc: str = "exact"
    private: PRG | None = None  # a party's own randomness (input sharing), not the dealer's
    state: dict = field(default_factory=dict)  # per-session state (e.g. loaded fixed weights)
    # True in a computing party's offline pass (engine.Role.prepare), which runs the
    # program exactly as the dealer does (party = DEALER, meta tensors) to list its requests.
    recording: bool = False

    @property
    def is_dealer(self) -> bool:
        return self.mode == DEALER_MODE

    @property
    def f(self) -> int:
        return self.fxp.frac_bits

    def pub(self, t: Any) -> Any:
        """A public tensor in this role's device (meta on the dealer); scalars pass through."""
        if isinstance(t, torch.Tensor) and self.is_dealer:
            return t.to("meta")
        return t

    def add_public(self, x: torch.Tensor, c: Any) -> torch.Tensor:
        """x + c for public c: only P0 adds it (the dealer only tracks the shape)."""
        if self.party == P0:
            return x + self.pub(c)
        if self.is_dealer and isinstance(c, torch.Tensor):
            return x + c.to("meta")  # broadcasting may change the shape
        if isinstance(c, torch.Tensor) and c.shape != x.shape:
            return x + torch.zeros_like(c)
        return x

    def zeros(self, shape) -> torch.Tensor:
        dev = "meta" if self.is_dealer else "cpu"
        return torch.zeros(tuple(shape), dtype=torch.int64, device=dev)


def clear_context(fxp: FixedPoint | None = None, trunc: str = "exact") -> Context:
    """A context for running protocols in the clear (the simulator)."""
    return Context(party=P0, mode=CLEAR, corr=ClearCorrelations(), fxp=fxp or FixedPoint(), trunc=trunc)
