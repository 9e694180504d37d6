"""Secure sine series: shares of sum_k beta_k sin(2 pi k x / P) in one round (SecFormer).

Protocol (DESIGN.md, "The SecFormer protocols, done right"). Let M = P * 2^f, with the
period P a power of two so that M divides 2^64 and "x mod M" is a local operation on
shares. The dealer draws a mask t uniform in Z_M and deals shares (f fractional bits) of
S_k = sin(2 pi k t / M) and C_k = cos(2 pi k t / M) for every frequency k. The parties
open d = (x + t) mod M, which is uniform in Z_M whatever x is (a one-time pad mod M), and
finish locally with

    sin(2 pi k (d - t) / M) = sin(2 pi k d / M) C_k - cos(2 pi k d / M) S_k,

where the public factors sin(.)/cos(.) of d, with beta_k folded in, are encoded with
`scale_frac` fractional bits. The result carries f + scale_frac fractional bits (2f by
default); callers truncate it, or fold that truncation into a later one. Because the
series is P-periodic and d is taken mod M, every ring value x is a valid input: there is
no input range to respect (the approximation's own segment is the caller's business).

`x_sine_series` fuses the series with a product by x, the way GeLU needs x * G(x): a
single uniform ring mask a serves as x's Beaver mask *and* as the sine mask (t = -a mod M
is uniform in Z_M when a is uniform in Z_(2^64)). Opening e = x - a (8 bytes) reveals
d = e mod M for free, and with the dealer's shares of a*S_k and a*C_k,
x * C_k = e * C_k + [a C_k]: so x * (c + sum_k beta_k sin(2 pi k x / P)) costs one round
and one 8-byte opening, instead of sine (1 round), truncation, Beaver (16 bytes) and a
second truncation. The dealer sends 4K values per element instead of 2K + 1 (offline).
`x_cos_series` is the same round for a cosine series plus a linear term (GeLU's even-part
form): it needs no a*S_k, a*C_k, so the dealer sends 2K values per element.
The opened e can be reused for later products b * x of XOR-shared bits b (`bits_times_x`):
their masks are drawn in the same correlation, so such a product opens only b's masked
bit. Reusing e is safe: it was already public, and each bit has a fresh mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..context import Context
from ..correlations import RING, Dom
from ..messages import Protocol, open_add, open_xor
from ..ring import bit_select
from .arith import numel
from .cost import Cost, bits_bytes


def _check_period(period: int | float) -> int:
    p = int(period)
    if p != period or p <= 0 or p & (p - 1):
        raise ValueError(f"the sine period must be a power of two (so that P * 2^f divides "
                         f"2^64 and the opening mod P * 2^f is exact), got {period}")
    return p


def _mod_bits(period: int, f: int) -> int:
    bits = _check_period(period).bit_length() - 1 + f
    if bits > 63:
        raise ValueError(f"period {period} with {f} fractional bits needs a {bits}-bit modulus")
    return bits


def harmonics(theta: torch.Tensor, k_max: int):
    """(sin k theta, cos k theta) for k = 1 .. k_max, float64, by the angle-addition
    recurrence e^(i k theta) = e^(i (k-1) theta) e^(i theta) from one sin and one cos.

    Why: torch's float64 sin/cos of k theta (up to 2 pi k_max) costs 4-8 ms per call on
    128x3072 here, 14 calls per GeLU in each party and in the dealer; the recurrence costs
    four fused multiply-adds per harmonic (sine.py's benchmark note in
    benchmarks/results/profile_base.md). Its error grows by about 2 ulp per step, 1e-14 at
    k = 32, far below the 2^-(f + scale_frac) rounding that follows (a factor can differ
    from the direct rounding only where the exact value sits within 1e-14 of a tie).
    Yields (sin, cos) pairs; the tensors are reused between steps, so copy what you keep.
    """
    s1, c1 = torch.sin(theta), torch.cos(theta)
    s, c = s1.clone(), c1.clone()
    tmp = torch.empty_like(s)
    for k in range(1, k_max + 1):
        yield s, c
        if k < k_max:  # (c + i s)(c1 + i s1)
            torch.mul(s, c1, out=tmp).addcmul_(c, s1)
            c.mul_(c1).addcmul_(s, s1, value=-1)
            s, tmp = tmp, s


def _angle(t: torch.Tensor, mod_bits: int) -> torch.Tensor:
    """2 pi (t mod M) / M in float64 (exact below 2^53)."""
    return (t & ((1 << mod_bits) - 1)).to(torch.float64).mul_(2 * math.pi / (1 << mod_bits))


def trig_of_mask(t: torch.Tensor, k_max: int, mod_bits: int, f: int) -> list[torch.Tensor]:
    """[sin(2 pi k t/M) for k=1..K] + [cos(...)], t read mod M = 2^mod_bits, encoded with f bits.

    Runs in the dealer (on real masks and, for shapes, on meta tensors) and in the simulator.
    """
    scale = float(1 << f)
    sins, coss = [], []
    for s, c in harmonics(_angle(t, mod_bits), k_max):
        sins.append(torch.mul(s, scale).round_().to(torch.int64))
        coss.append(torch.mul(c, scale).round_().to(torch.int64))
    return sins + coss


def _public_factors(d: torch.Tensor, coeffs: Sequence[float], mod_bits: int, frac: int):
    """round(beta_k sin(2 pi k d/M) 2^frac), round(beta_k cos(2 pi k d/M) 2^frac) for public d."""
    scale = float(1 << frac)
    us, vs = [], []
    for beta, (s, c) in zip(coeffs, harmonics(_angle(d, mod_bits), len(coeffs))):
        us.append(torch.mul(s, beta * scale).round_().to(torch.int64))
        vs.append(torch.mul(c, beta * scale).round_().to(torch.int64))
    return us, vs


# --- the plain series ---------------------------------------------------------------------

def sine_series(ctx: Context, x: torch.Tensor, coeffs: Sequence[float], period: int,
                scale_frac: int | None = None) -> Protocol:
    """Share of sum_k coeffs[k-1] sin(2 pi k x / period), at f + scale_frac fractional bits.

    x: share at f fractional bits (any value: the series is periodic). One round, opening
    one (log2(period) + f)-bit value per element. Fresh mask per call.
    """
    f = ctx.f
    frac = f if scale_frac is None else scale_frac
    mb = _mod_bits(period, f)
    k_max = len(coeffs)
    out = ctx.corr.correlated([(x.shape, Dom("add", mb))],
                              lambda t: trig_of_mask(t, k_max, mb, f), [RING] * (2 * k_max))
    t, sins, coss = out[0], out[1:1 + k_max], out[1 + k_max:]
    (d,) = yield from open_add(x + t, bits=mb)  # (x + t) mod M: uniform, t is fresh
    us, vs = _public_factors(d, coeffs, mb, frac)
    acc = ctx.zeros(x.shape)
    for u, v, s, c in zip(us, vs, sins, coss):
        acc = acc + u * c - v * s  # sin(a - b) = sin a cos b - cos a sin b, b = 2 pi k t / M
    return acc


def sine_series_cost(shape, period: int, f: int = 16) -> Cost:
    return Cost(1, bits_bytes(numel(shape), _mod_bits(period, f)))


# --- fused with a product by x -------------------------------------------------------------

@dataclass
class OpenedX:
    """x = e + a with e public (opened by `x_sine_series`), plus masks for later bit products.

    x: this party's share of x.
    r_xor / r_add: this party's XOR and additive shares of fresh uniform bits r_j;
    ra: its shares of r_j * a. `bits_times_x` consumes them in order.
    """

    x: torch.Tensor
    e: torch.Tensor
    r_xor: list[torch.Tensor]
    r_add: list[torch.Tensor]
    ra: list[torch.Tensor]


def _draw_masks(ctx: Context, shape, dealt, n_dealt: int, n_bits: int):
    """The fused series' one correlation: a uniform ring mask a (x's Beaver mask and the
    sine mask t = -a mod M at once), n_bits fresh XOR-shared bits r_j, then shares of the
    dealer's values dealt(a) (n_dealt of them) and of r_j and r_j a (for `bits_times_x`).
    Returns (a, dealt values, r_xor, r_add, ra)."""
    def derive(a, *rs):
        return dealt(a) + list(rs) + [r * a for r in rs]

    sources = [(shape, RING)] + [(shape, Dom("xor", 1))] * n_bits
    n_out = n_dealt + 2 * n_bits
    out = ctx.corr.correlated(sources, derive, [RING] * n_out, out_shapes=[shape] * n_out)
    rest = out[1 + n_bits:]
    return (out[0], rest[:n_dealt], list(out[1:1 + n_bits]), list(rest[n_dealt:n_dealt + n_bits]),
            list(rest[n_dealt + n_bits:]))


def x_sine_series(ctx: Context, x: torch.Tensor, coeffs: Sequence[float], period: int,
                  const: float = 0.0, scale_frac: int | None = None,
                  bit_masks: int = 0) -> Protocol:
    """(share of x * (const + sum_k beta_k sin(2 pi k x / P)), OpenedX), in one round.

    The product carries 2f + scale_frac fractional bits (3f by default). It is exact in the
    ring, so the real value is right whenever it fits (|x * series| < 2^(63 - 3f)). Opens
    only e = x - a (8 bytes per element). `bit_masks` extra bit masks are drawn for
    `bits_times_x` (see the module docstring).
    """
    f = ctx.f
    frac = f if scale_frac is None else scale_frac
    mb = _mod_bits(period, f)
    k_max = len(coeffs)

    def dealt(a):
        trig = trig_of_mask(a, k_max, mb, f)
        return trig + [a * v for v in trig]

    a, vals, r_xor, r_add, ra = _draw_masks(ctx, x.shape, dealt, 4 * k_max, bit_masks)
    sins, coss = vals[:k_max], vals[k_max:2 * k_max]
    a_sins, a_coss = vals[2 * k_max:3 * k_max], vals[3 * k_max:]

    (e,) = yield from open_add(x - a)  # uniform in the ring; e mod M = (x + t) mod M, t = -a
    # x = e + a, so sin(2 pi k x/M) = sin(2 pi k e/M) C_k + cos(2 pi k e/M) S_k with S, C of a,
    # and x C_k = e C_k + [a C_k] (e public). The public factors u_k, v_k (`_public_factors`)
    # are made one frequency at a time into reused buffers, and everything accumulates in
    # place: no fresh 3 MB tensor per pass (fresh pages cost faults:
    # benchmarks/results/profile_base.md).
    acc = x * round(const * 2.0 ** (f + frac))
    tmp, fac = torch.empty_like(acc), torch.empty_like(acc)
    fbuf = torch.empty(acc.shape, dtype=torch.float64, device=acc.device)
    scale = float(1 << frac)
    for beta, (sn, cs), s, c, a_s, a_c in zip(coeffs, harmonics(_angle(e, mb), k_max),
                                            sins, coss, a_sins, a_coss):
        fac.copy_(torch.mul(sn, beta * scale, out=fbuf).round_())  # u_k
        torch.mul(e, c, out=tmp)  # shares of x * C_k
        acc.add_(tmp.add_(a_c).mul_(fac))
        fac.copy_(torch.mul(cs, beta * scale, out=fbuf).round_())  # v_k
        torch.mul(e, s, out=tmp)  # shares of x * S_k
        acc.add_(tmp.add_(a_s).mul_(fac))
    return acc, OpenedX(x, e, r_xor, r_add, ra)


def x_sine_series_cost(shape) -> Cost:
    return Cost(1, 8 * numel(shape))


def x_cos_series(ctx: Context, x: torch.Tensor, coeffs: Sequence[float], period: int,
                 const: float = 0.0, x_coef: float = 0.5, trig_frac: int | None = None,
                 scale_frac: int | None = None, bit_masks: int = 0) -> Protocol:
    """(share of const + x_coef x + sum_k gamma_k cos(2 pi k x / P), OpenedX), in one round.

    The even-part form of SecFormer's GeLU (approx/gelu.py): no product by x, so the dealer
    deals only S_k and C_k of the mask (2K values per element, against 4K for
    `x_sine_series`), and each party does two products per frequency instead of four. It
    opens the same e = x - a (8 bytes per element), so `bits_times_x` can reuse it.

    The dealt sines carry trig_frac fractional bits and the public factors scale_frac (f
    each by default); the result carries trig_frac + scale_frac. x_coef x is exact there
    when x_coef 2^(trig_frac + scale_frac - f) is an integer (x/2 always is, for frac >= 1).
    """
    f = ctx.f
    tf = f if trig_frac is None else trig_frac
    frac = f if scale_frac is None else scale_frac
    out_frac = tf + frac
    x_mult = x_coef * 2.0 ** (out_frac - f)
    if x_mult != round(x_mult):
        raise ValueError(f"x_cos_series: x_coef {x_coef} is not a multiple of 2^-{out_frac - f}")
    mb = _mod_bits(period, f)
    k_max = len(coeffs)

    a, vals, r_xor, r_add, ra = _draw_masks(ctx, x.shape, lambda a: trig_of_mask(a, k_max, mb, tf),
                                            2 * k_max, bit_masks)
    sins, coss = vals[:k_max], vals[k_max:]

    (e,) = yield from open_add(x - a)  # uniform in the ring; e mod M = (x + t) mod M, t = -a
    # x = e + a, so cos(2 pi k x/M) = cos(2 pi k e/M) C_k - sin(2 pi k e/M) S_k, with S, C
    # of a. The public factors are made one frequency at a time into reused buffers, and
    # everything accumulates in place (as in `x_sine_series`).
    acc = ctx.add_public(x * int(x_mult), round(const * 2.0 ** out_frac))
    tmp, fac = torch.empty_like(acc), torch.empty_like(acc)
    fbuf = torch.empty(acc.shape, dtype=torch.float64, device=acc.device)
    scale = float(1 << frac)
    for gamma, (sn, cs), s, c in zip(coeffs, harmonics(_angle(e, mb), k_max), sins, coss):
        fac.copy_(torch.mul(cs, gamma * scale, out=fbuf).round_())
        acc.add_(torch.mul(c, fac, out=tmp))
        fac.copy_(torch.mul(sn, -gamma * scale, out=fbuf).round_())
        acc.add_(torch.mul(s, fac, out=tmp))
    return acc, OpenedX(x, e, r_xor, r_add, ra)


def x_cos_series_cost(shape) -> Cost:
    return Cost(1, 8 * numel(shape))


def bits_times_x(ctx: Context, opened: OpenedX, bits_list: Sequence[torch.Tensor]) -> Protocol:
    """[b_j * x] for XOR-shared bits b_j (shape of x), reusing the opened e = x - a. One round.

    Opens c_j = b_j ^ r_j (1 bit each); b x = c x + (1 - 2c) r x with r x = r e + [r a].
    """
    if len(bits_list) > len(opened.r_xor):
        raise ValueError("bits_times_x: more bits than masks drawn by x_sine_series(bit_masks=...)")
    n = len(bits_list)
    r_xor, r_add, ra = opened.r_xor[:n], opened.r_add[:n], opened.ra[:n]
    del opened.r_xor[:n], opened.r_add[:n], opened.ra[:n]  # each mask is used once
    cs = yield from open_xor(*[b ^ r for b, r in zip(bits_list, r_xor)], bits=1)
    res = []
    for c, rj, raj in zip(cs, r_add, ra):
        rx = rj * opened.e + raj  # shares of r * x: x = e + a
        res.append(bit_select(c, opened.x, rx))  # c x + (1 - 2c) r x
    return res


def bits_times_x_cost(bit_shapes: Sequence) -> Cost:
    return Cost(1, sum(bits_bytes(numel(s), 1) for s in bit_shapes))
