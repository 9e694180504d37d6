"""Declared protocol costs: online bytes each party sends, and rounds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """Online cost of one protocol call, per party (both parties send the same in our protocols)."""

    rounds: int = 0
    bytes: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        """Sequential composition: rounds and bytes add."""
        return Cost(self.rounds + other.rounds, self.bytes + other.bytes)

    def __or__(self, other: "Cost") -> "Cost":
        """Parallel composition (lockstep): rounds overlap, bytes add."""
        return Cost(max(self.rounds, other.rounds), self.bytes + other.bytes)


def bits_bytes(numel: int, bits: int) -> int:
    """Wire bytes for `numel` values of `bits` bits (mirrors packing.packed_nbytes)."""
    from ..packing import packed_nbytes

    return packed_nbytes(numel, bits)
