"""Table-seeded Newton reciprocal (2Quad's row sums) and inverse square root (LayerNorm's
var + eps): float references and calibration.

The 2PC protocol (runtime/protocols/lookup.py) reads the pre-scaled row sum u = p sum in
(0, 2) through a 2^b-entry table indexed by j = floor(u 2^(b-1)), or one below (the
lookup drops a carry), whose entry t_j = 2^(b-1) / (j + 1) is the minimax seed on both
cells: |1 - u t_j| <= 1/(j + 1). Each Newton step y <- y (2 - u y) squares the relative
error and stays below 1/u. So n steps leave (h / u)^(2^n) with h = 2^-(b-1): the error
falls with u, and the calibrated range's low end decides b and n.

Why it is chosen where it is: Goldschmidt from a public start takes a round per iteration
(five for BERT-base's row sums at 1e-4); the lookup takes one round, and one Newton step
one more. The price is the dealer's table, 2^b ring values per row (b = 10: 8 KiB per
attention row), so `choose_table_reciprocal` takes the fewest rounds, then the smallest b.

Above the range the seed only improves, up to u < 2 (p is chosen for headroom x hi, as
Goldschmidt's); below it the error grows smoothly ((h/u)^(2^n)) and the result never
overshoots. u >= 2 wraps the index (garbage, like Goldschmidt past its interval).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..runtime.protocols.goldschmidt import effective_prescale
from ..runtime.protocols.lookup import (MIN_TABLE_BITS, RSQRT_SEED_FRAC, TABLE_SEED_FRAC,
                                        reciprocal_seeds, rsqrt_seeds)

MAX_CHOSEN_TABLE_BITS = 11  # 16 KiB of dealer traffic per row; 12 would double it
MAX_STEPS = 3


def reciprocal_table(x: torch.Tensor, *, prescale: float, table_bits: int, iterations: int,
                     carry: int = 0) -> torch.Tensor:
    """1/x from the table seed and `iterations` Newton steps (float64 inside).

    carry: 1 reads the cell below (what the 2PC lookup may do); the float simulator reads 0.
    The seed is taken at the protocol's TABLE_SEED_FRAC bits; the rest is exact."""
    p = effective_prescale(prescale)
    u = x.to(torch.float64) * p
    size = 1 << table_bits
    j = (torch.floor(u * 2.0 ** (table_bits - 1)).to(torch.int64) - carry) % size
    y = reciprocal_seeds(table_bits)[j].to(torch.float64) / 2.0 ** TABLE_SEED_FRAC
    for _ in range(iterations):
        y = y * (2 - u * y)
    return (y * p).to(x.dtype)


class TableChoice(NamedTuple):
    prescale: float
    table_bits: int
    iterations: int
    achieved_err: float


def table_reciprocal_error(lo: float, hi: float, prescale: float, table_bits: int,
                           iterations: int, points: int = 4000) -> float:
    """Worst relative error on [lo, hi] (log grid, both carries)."""
    x = torch.from_numpy(np.geomspace(lo, hi, points))
    worst = 0.0
    for carry in (0, 1):
        y = reciprocal_table(x, prescale=prescale, table_bits=table_bits, iterations=iterations,
                             carry=carry)
        worst = max(worst, float(((y * x) - 1).abs().max()))
    return worst


def choose_table_reciprocal(lo: float, hi: float, target_rel_err: float, *, headroom: float = 1.5,
                            max_rounds: int | None = None) -> TableChoice | None:
    """Prescale, table bits and Newton steps for row sums in [lo, hi]: the fewest rounds
    (1 + steps) that meet the target on [lo, hi], then the smallest table. The prescale is
    the largest 4-bit one with p x < 2 up to headroom x hi. None if nothing within
    MAX_CHOSEN_TABLE_BITS and MAX_STEPS (or max_rounds) meets the target."""
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < lo <= hi, got [{lo}, {hi}]")
    p = effective_prescale(2.0 / (hi * headroom) * (1 - 2.0 ** -20))
    for steps in range(1, MAX_STEPS + 1):
        if max_rounds is not None and 1 + steps > max_rounds:
            return None
        for bits in range(MIN_TABLE_BITS, MAX_CHOSEN_TABLE_BITS + 1):
            # quick bound first: (h / (p lo) + seed rounding)^(2^steps)
            e0 = 2.0 ** -(bits - 1) / (p * lo) + 2.0 ** -(TABLE_SEED_FRAC - 1)
            if e0 >= 1 or e0 ** (2 ** steps) > 4 * target_rel_err:
                continue
            err = table_reciprocal_error(lo, hi, p, bits, steps)
            if err <= target_rel_err:
                return TableChoice(p, bits, steps, err)
    return None


# --- 1/sqrt(var + eps) for LayerNorm -----------------------------------------------------------
#
# The 2PC LayerNorm holds V = n^2 var at 2f bits; with j = floor(log2 n) its w = (var + eps)
# (n / 2^j)^2 / 2^E is V read at 2f + 2j + E bits (no constant to round), and
# 1/sqrt(var + eps) = (n / 2^j) 2^(-E/2) / sqrt(w): E even, 2^E above headroom x hi.

MAX_LN_TABLE_BITS = 12  # 32 KiB per row; a LayerNorm has one row per token
MAX_LN_TABLE_EXP = 10  # 1/sigma >= 2^-5 keeps 15 significant bits in a raw output (f + 4 bits)


def ln_scale(n: int) -> float:
    """(n / 2^j)^2, j = floor(log2 n): w's factor on var + eps."""
    return (n / 2.0 ** (n.bit_length() - 1)) ** 2


def rsqrt_table(v: torch.Tensor, *, n: int, table_bits: int, table_exp: int, iterations: int,
                carry: int = 0) -> torch.Tensor:
    """1/sqrt(v) for v = var + eps of an n-wide LayerNorm, as the protocol computes it: the
    seed from a 2^table_bits table over w = v (n/2^j)^2 / 2^table_exp in (0, 1), then
    `iterations` Newton steps (float64 inside; the seed at its protocol precision)."""
    c = ln_scale(n)
    w = v.to(torch.float64) * c / 2.0 ** table_exp
    size = 1 << table_bits
    j = (torch.floor(w * size).to(torch.int64) - carry) % size
    y = rsqrt_seeds(table_bits)[j].to(torch.float64) / 2.0 ** RSQRT_SEED_FRAC
    for _ in range(iterations):
        y = y * (3 - w * y * y) / 2
    return (y * 2.0 ** (-table_exp / 2) * math.sqrt(c)).to(v.dtype)


class RsqrtTableChoice(NamedTuple):
    table_exp: int
    table_bits: int
    iterations: int
    achieved_err: float


def table_rsqrt_error(lo: float, hi: float, n: int, table_exp: int, table_bits: int,
                      iterations: int, points: int = 4000) -> float:
    """Worst relative error on [lo, hi] (log grid, both carries)."""
    v = torch.from_numpy(np.geomspace(lo, hi, points))
    worst = 0.0
    for carry in (0, 1):
        y = rsqrt_table(v, n=n, table_bits=table_bits, table_exp=table_exp, iterations=iterations,
                        carry=carry)
        worst = max(worst, float((y * v.sqrt() - 1).abs().max()))
    return worst


def choose_table_rsqrt(lo: float, hi: float, n: int, target_rel_err: float, *, f: int = 16,
                       headroom: float = 1.5, max_rounds: int | None = None) -> RsqrtTableChoice | None:
    """Exponent, table bits and Newton steps for var + eps in [lo, hi] of an n-wide
    LayerNorm: the fewest rounds (1 + steps) that meet the target, then the smallest table.
    None where no choice within MAX_LN_TABLE_BITS, MAX_STEPS (or max_rounds) meets it, or
    headroom x hi needs an exponent past MAX_LN_TABLE_EXP or past what w's 2f + 2j + E
    bits allow below 2^61."""
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < lo <= hi, got [{lo}, {hi}]")
    c = ln_scale(n)
    e = math.ceil(math.log2(hi * headroom * c))
    e += e % 2
    while 2.0 ** e <= hi * headroom * c:  # log2 rounding at exact powers
        e += 2
    j = n.bit_length() - 1
    if e > MAX_LN_TABLE_EXP or 2 * f + 2 * j + e > 61:
        return None
    w_lo = lo * c / 2.0 ** e
    for steps in range(1, MAX_STEPS + 1):
        if max_rounds is not None and 1 + steps > max_rounds:
            return None
        for bits in range(MIN_TABLE_BITS, MAX_LN_TABLE_BITS + 1):
            e0 = 2.0 ** -bits / w_lo + 2.0 ** -(RSQRT_SEED_FRAC - 1)
            if e0 >= 1 or (0.75 * e0) ** (2 ** steps - 1) * e0 > 8 * target_rel_err:
                continue
            err = table_rsqrt_error(lo, hi, n, e, bits, steps)
            if err <= target_rel_err:
                return RsqrtTableChoice(e, bits, steps, err)
    return None
