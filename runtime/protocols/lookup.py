"""One-round table lookups of a shared value's high bits, and the table-seeded Newton steps.

Why: Goldschmidt from a public start (goldschmidt.py) needs as many rounds as iterations,
five for BERT-base's 2Quad row sums and four for its LayerNorms, because its first iterate
is only as good as the input range is narrow. A seed good to 1% lets one Newton step reach
1e-4 (the relative error squares), and a lookup table gives that seed in one round, on a
few values per attention or LayerNorm row. GeLU's segment tests are table lookups too
(`lookup_bits`, nonlinear.gelu_secformer_table), in place of multi-round carry trees.

Lookup (a dealer's one-time truth table, as in Ishai et al., "On the Power of Correlated
Randomness in Secure Computation", TCC 2013): x is shared additively mod 2^64. Each party
shifts its own share, idx_i = (x_i >> k) mod 2^b; their sum is floor(x / 2^k) - c mod 2^b
with c in {0, 1} (the carry of the dropped low parts; the 2^64 wrap of the shares is
2^(64-k), which vanishes mod 2^b for k <= 64 - b). The dealer draws r uniform mod 2^b
(shared) and shares of the rotated table T_r[z] = table[(z - r) mod 2^b] for every z.
The parties open z = idx + r mod 2^b, b bits each way, and each outputs its share of
T_r[z] = table[idx]. So a table entry must suit both floor(x / 2^k) and the one below.

Security: z is uniform and independent of x (r is fresh and uniform mod 2^b, used once);
each party's table share is uniform (P0's is drawn from its seed, P1's is the table minus
it, or XOR it for bit tables). Nothing else is sent. Cost: one round, b bits per element
each way (int16 on the wire); the dealer sends P1 2^b ring values per element (2^b / 8
bytes per bit table), so ring tables are for small counts (one per row).

Reciprocal: u = p sum in (0, 2), p the 2Quad pre-scale. The table indexed by
j = floor(u 2^(b-1)) (or one below) holds the seed t_j = 2^(b-1) / (j + 1), the minimax
constant on [j h, (j + 2) h) for h = 2^-(b-1): |1 - u t_j| <= 1 / (j + 1). Each Newton
step y <- y (2 - u y) squares that error and never overshoots 1/u, as Goldschmidt. One
step is one round that opens u and y against fresh masks: u y^2 from the masks' products
(dealer: c^2, a c, a c^2). Inverse square root: w in (0, 1), t_j = 1/sqrt((j + 1) 2^-b),
steps y <- y (3 - w y^2) / 2 (`rsqrt_table_core`).
"""

from __future__ import annotations


import math

import torch

from ..context import Context
from ..correlations import RING, Dom, mod_dom
from ..domain import check_range
from ..messages import ADD, Msg, Protocol
from ..packing import packed_nbytes
from . import fused
from .arith import numel
from .cost import Cost
from .fused import pending_k
from .trunc import Pending, begin, begin_rescale

TABLE_SEED_FRAC = 12  # fractional bits of the seed t (Newton is insensitive to it at first order)
MIN_TABLE_BITS, MAX_TABLE_BITS = 4, 12


def lookup(ctx: Context, x: torch.Tensor, shift: int, bits: int, table: torch.Tensor) -> Protocol:
    """Shares of table[(floor(x / 2^shift) - c) mod 2^bits], c in {0, 1}, for a share x: one round.

    table: 2^bits public int64 ring values (the dealer's); see the module docstring."""
    if not MIN_TABLE_BITS <= bits <= 16 or not 0 <= shift <= 64 - bits:
        raise ValueError(f"lookup: need {MIN_TABLE_BITS} <= bits <= 16 and 0 <= shift <= 64 - bits, "
                         f"got bits={bits}, shift={shift}")
    if tuple(table.shape) != (1 << bits,):
        raise ValueError(f"lookup: a {bits}-bit index needs a table of {1 << bits} entries")
    size, mask = 1 << bits, (1 << bits) - 1
    shape = tuple(x.shape)

    def dealer(r: torch.Tensor) -> list[torch.Tensor]:
        z = torch.arange(size, dtype=torch.int64)
        return [table[(z - r.to(torch.int64).unsqueeze(-1)) & mask]]  # T_r[z] = table[z - r]

    r, rotated = ctx.corr.correlated([(shape, mod_dom(bits))], dealer, [RING],
                                     out_shapes=[shape + (size,)])
    idx = ((x >> shift) + r) & mask  # this party's share of idx + r mod 2^bits
    (z,) = (yield [Msg([idx], ADD, bits)])[0]
    return rotated.gather(-1, (z.to(torch.int64) & mask).unsqueeze(-1)).squeeze(-1)


def lookup_cost(shape, bits: int) -> Cost:
    return Cost(1, packed_nbytes(numel(shape), bits))


# --- reciprocal from a table seed --------------------------------------------------------------

def table_fracs(bits: int) -> tuple[int, int]:
    """(fy, ft): fractional bits of u (the pre-scaled input) and of the iterate y.

    Bound: u y^2 and mult y (mult < 2^4, the pre-scale's mantissa) reach 2^(bits + 4) at
    fy + 2 ft bits (y <= 2 t_0 = 2^bits where u is below the first cell), below 2^61 for
    fy = 57 - bits - 2 ft; u's resolution 2^-fy is the relative error it adds at u."""
    ft = TABLE_SEED_FRAC
    return min(26, 57 - bits - 2 * ft), ft


def reciprocal_seeds(bits: int, frac: int = TABLE_SEED_FRAC) -> torch.Tensor:
    """t_j = 2^(bits-1) / (j + 1) at `frac` bits, j = 0 .. 2^bits - 1 (module docstring)."""
    j = torch.arange(1 << bits, dtype=torch.float64)
    return torch.round(2.0 ** (bits - 1 + frac) / (j + 1)).to(torch.int64)


def _power_round(ctx: Context, u: Pending | torch.Tensor, y: Pending | torch.Tensor, m: int) -> Protocol:
    """(finished u, finished y, u y^m) in one round, for u and y of which at most one is a
    pending truncation.

    With u = e_u + a and y = e_y + c opened against fresh masks (e includes a pending
    truncation's correction, fused.py):
      u y^m = sum_i C(m, i) (e_u + a) e_y^(m-i) c^i;
    the dealer deals c^2 .. c^m and a c .. a c^m. The ring products may wrap; only the
    sum's value must fit (the callers' bounds)."""
    U, Y = fused.as_pending(u), fused.as_pending(y)
    if U.pending and Y.pending:
        raise ValueError("a Newton round may finish u or y, not both")
    C = lambda i: None if i == 0 else (1 if i == 1 else i)  # monomial index of c^i
    AC = lambda i: 0 if i == 0 else m + i  # of a c^i (a is monomial 0)

    def derive(a, c):
        pw = [c]
        for _ in range(m - 1):
            pw.append(pw[-1] * c)
        return pw[1:] + [a * p for p in pw]

    if U.pending:
        cross = [(0, C(i)) for i in range(1, m + 1)]
    else:
        cross = ([(1, C(i)) for i in range(1, m) if Y.pending]
                 + [(1, AC(i)) for i in range(0, m) if Y.pending])
    rnd = yield from fused.fused_round(ctx, [U, Y], [0, 1], derive, [RING] * (2 * m - 1), cross=cross)
    total = None
    for i in range(m + 1):
        coef = math.comb(m, i)
        if U.pending:  # e_y is public
            ey = rnd.opened[1].e
            pub = coef * ey ** (m - i) if m - i else coef
            eu_part = fused.power_times(ctx, rnd, 0, 1, C(i))
            a_part = rnd.mons[AC(i)]
            term = pub * (eu_part + a_part)
        else:  # e_u is public
            eu = rnd.opened[0].e
            yc = fused.power_times(ctx, rnd, 1, m - i, C(i))
            ya = fused.power_times(ctx, rnd, 1, m - i, AC(i))
            term = coef * (eu * yc + ya)
        total = term if total is None else total + term
    u_done, y_done = rnd.values
    return u_done, y_done, total


def _newton_round(ctx: Context, u: Pending | torch.Tensor, y: Pending | torch.Tensor,
                  fu: int, fy: int) -> Protocol:
    """(finished u, y (2 - u y) at fu + 2 fy bits) for u at fu bits and y at fy bits: one
    round (`_power_round` with m = 2; dealer: c^2, a c, a c^2)."""
    u_done, y_done, uy2 = yield from _power_round(ctx, u, y, 2)
    return u_done, (y_done << (fu + fy + 1)) - uy2  # 2 y - u y^2


def reciprocal_table_core(ctx: Context, s: torch.Tensor, s_frac: int, u0: Pending, mult: int,
                          shift: int, bits: int, steps: int, out_frac: int) -> Protocol:
    """(mult 2^-shift) / u at out_frac bits, as a pending truncation (the caller's product
    finishes it); u = s / 2^s_frac in (0, 2), and u0 the same value on its way to
    `table_fracs(bits)[0]` bits (a pending truncation, finished by the first Newton round).

    Rounds: the lookup, then one per Newton step."""
    fu, ft = table_fracs(bits)
    if steps < 1:
        raise ValueError("a table-seeded reciprocal needs at least one Newton step")
    U = fused.as_pending(u0)
    check_range(ctx, "the table-seeded 1/y's pre-scaled input p y", U, fu, 0.0, 2.0)
    t = yield from lookup(ctx, s, s_frac - (bits - 1), bits, reciprocal_seeds(bits, ft))
    u, y = yield from _newton_round(ctx, U, t, fu, ft)
    for _ in range(steps - 1):
        _, y = yield from _newton_round(ctx, u, begin(ctx, y, fu + ft), fu, ft)
    return begin_rescale(ctx, y * mult, fu + 2 * ft + shift, out_frac)


def _seeded_steps_cost(shape, bits: int, steps: int, first_k: int, later_k: int) -> Cost:
    """The lookup, then `steps` rounds that each open the input and the iterate: the first
    finishes the input's pending shift first_k, each later one the iterate's later_k."""
    total = lookup_cost(shape, bits) + fused.fused_round_cost([shape, shape], [shape] if first_k else [])
    for _ in range(steps - 1):
        total = total + fused.fused_round_cost([shape, shape], [shape] if later_k else [])
    return total


def reciprocal_table_core_cost(shape, bits: int, steps: int, mode: str, u0_k: int) -> Cost:
    """Cost of `reciprocal_table_core` up to its pending result; u0_k: u0's pending shift."""
    fu, ft = table_fracs(bits)
    return _seeded_steps_cost(shape, bits, steps, u0_k, pending_k(fu + ft, mode))


def reciprocal_table_out_k(bits: int, shift: int, out_frac: int, mode: str) -> int:
    fu, ft = table_fracs(bits)
    return pending_k(fu + 2 * ft + shift - out_frac, mode)



# --- inverse square root from a table seed ----------------------------------------------------

RSQRT_SEED_FRAC = 10  # seeds are >= 1 (w < 1): 2^-11 relative, 1e-3 of |1 - w t^2|


def rsqrt_table_fracs(bits: int) -> tuple[int, int]:
    """(fw, ft): fractional bits of w (in (0, 1)) and of the iterate y (<= 2^(bits/2)).

    Bound: 3 y - w y^3 (the step's 2 y') reaches 3 2^(bits/2) at fw + 3 ft bits (y <= t_0 =
    2^(bits/2) where w is below the first cell), below 2^60 for fw = 58 - 3 ft - bits/2;
    w's resolution 2^-fw is a relative error of the result of 2^-(fw+1) / w."""
    ft = RSQRT_SEED_FRAC
    return min(26, 58 - 3 * ft - (bits + 1) // 2), ft


def rsqrt_seeds(bits: int, frac: int = RSQRT_SEED_FRAC) -> torch.Tensor:
    """t_j = 1 / sqrt((j + 1) 2^-bits) at `frac` bits: |1 - w t_j^2| <= 1/(j + 1) on both
    cells [j, j + 2) 2^-bits that the lookup may read for w."""
    j = torch.arange(1 << bits, dtype=torch.float64)
    return torch.round(2.0 ** frac / torch.sqrt((j + 1) * 2.0 ** -bits)).to(torch.int64)


def rsqrt_table_core(ctx: Context, w: torch.Tensor, w_frac: int, bits: int, steps: int,
                     half_exp: int, out_frac: int) -> Protocol:
    """2^-half_exp / sqrt(w') at out_frac bits, pending (the caller's product finishes it),
    for w' = w / 2^w_frac in (0, 1): a table seed, then Newton steps y <- y (3 - w' y^2) / 2
    (the error e = 1 - w' y^2 becomes 3 e^2 / 4 + e^3 / 4). Rounds: the lookup, then one per
    step (each opens w' and y: dealer c^2, c^3, a c, a c^2, a c^3)."""
    fw, ft = rsqrt_table_fracs(bits)
    if steps < 1:
        raise ValueError("a table-seeded 1/sqrt needs at least one Newton step")
    if not 0 <= w_frac - bits <= 64 - bits or w_frac <= fw:
        raise ValueError(f"a {bits}-bit rsqrt table cannot read w at {w_frac} fractional bits")
    W = begin(ctx, w, w_frac - fw)
    check_range(ctx, "the table-seeded 1/sqrt's scaled input w", W, fw, 0.0, 1.0)
    y = yield from lookup(ctx, w, w_frac - bits, bits, rsqrt_seeds(bits, ft))
    yf = ft
    for i in range(steps):
        wv, y_done, wy3 = yield from _power_round(ctx, W, y, 3)
        W = wv
        y = ((3 * y_done) << (fw + 2 * ft)) - wy3  # 2 y' at fw + 3 ft bits
        yf = fw + 3 * ft + 1
        if i < steps - 1:
            y = begin(ctx, y, yf - ft)
    return begin_rescale(ctx, y, yf + half_exp, out_frac)


def rsqrt_table_core_cost(shape, bits: int, steps: int, mode: str, w_frac: int) -> Cost:
    """Cost of `rsqrt_table_core` up to its pending result."""
    fw, ft = rsqrt_table_fracs(bits)
    return _seeded_steps_cost(shape, bits, steps, pending_k(w_frac - fw, mode), pending_k(fw + 2 * ft + 1, mode))


def rsqrt_table_out_k(bits: int, half_exp: int, out_frac: int, mode: str) -> int:
    fw, ft = rsqrt_table_fracs(bits)
    return pending_k(fw + 3 * ft + 1 + half_exp - out_frac, mode)


# --- bit tables (GeLU's segment tests) --------------------------------------------------------

def _rotations(table: torch.Tensor) -> torch.Tensor:
    """Row r: table rotated by r (entry z = table[z - r]), packed 8 entries per byte
    (entry z at bit z % 8 of byte z // 8), as uint8."""
    size = table.numel()
    z = torch.arange(size)
    rot = (table.to(torch.int64) & 1)[(z.unsqueeze(0) - z.unsqueeze(1)) % size]
    weights = 1 << torch.arange(8)
    return (rot.view(size, size // 8, 8) * weights).sum(-1).to(torch.uint8)


def lookup_bits(ctx: Context, x: torch.Tensor, shift: int, bits: int,
                tables: list[torch.Tensor]) -> Protocol:
    """XOR shares of tables[i][(floor(x / 2^shift) - c) mod 2^bits], c in {0, 1}: one round.

    As `lookup`, with bit entries: the dealer sends P1 each rotated table packed 8 entries
    to a byte (2^bits / 8 bytes per element and table), one r serves all tables, and a
    party reads its bit straight from the packed row."""
    if not 8 <= bits <= 16 or not 0 <= shift <= 64 - bits:
        raise ValueError(f"lookup_bits: need 8 <= bits <= 16 and 0 <= shift <= 64 - bits, got {bits}, {shift}")
    size, mask = 1 << bits, (1 << bits) - 1
    if any(tuple(t.shape) != (size,) for t in tables):
        raise ValueError(f"lookup_bits: a {bits}-bit index needs tables of {size} entries")
    shape = tuple(x.shape)

    def dealer(r: torch.Tensor) -> list[torch.Tensor]:
        r = r.to(torch.int64)
        return [_rotations(t)[r] for t in tables]

    # the packed rows are bytes end to end (PRG, correction, wire): no widening copies
    out = ctx.corr.correlated([(shape, mod_dom(bits))], dealer, [Dom("xor", 8)] * len(tables),
                              out_shapes=[shape + (size // 8,)] * len(tables),
                              dtype=(torch.int16, torch.uint8))
    r, packed = out[0].to(torch.int64), out[1:]
    idx = ((x >> shift) + r) & mask
    (z,) = (yield [Msg([idx], ADD, bits)])[0]
    z = z.to(torch.int64) & mask
    byte, bit = (z >> 3).unsqueeze(-1), (z & 7)
    return [((p.gather(-1, byte).squeeze(-1).to(torch.int64)) >> bit) & 1 for p in packed]

