"""Goldschmidt reciprocal and inverse square root with a public pre-scale (SecFormer).

Both iterations converge only on a range (DESIGN.md): the reciprocal iteration
(m = 2 - y; x <- x m; y <- y m, from x = 1) needs y in (0, 2), and the inverse square
root iteration (m = (3 - x)/2; x <- x m^2; y <- y m, from y = 1) needs x in (0, 3). So
the input is first multiplied by a public pre-scale p chosen from the input's range
(a calibration pass measures it; `secformer_compiler.approximations.choose_goldschmidt`
picks p and the iteration count for a declared range), and the result is corrected by
p (1/y = p/(p y)) or sqrt(p) (1/sqrt(y) = sqrt(p)/sqrt(p y)). Inputs outside the
declared range give garbage, not an error: nothing may branch on a secret.

Rounds. Each iteration is one product round, and each product's result is truncated; the
truncation's round is shared with the next iteration's opening (fused.py: the opened value
is base - mask, and the truncation's secret correction enters the Beaver formulas), so a
core of n >= 2 iterations takes n rounds and leaves its result as a pending truncation
(`trunc.Pending`) whose round the caller shares with its own next product. The products of
one iteration share their round:

* reciprocal: with e = 1 - y the iterates are y_(i+1) = y_i (2 - y_i), a square, and
  x_(i+1) = x_i (2 - y_i) = 2 x_i - x_i y_i; both come from one opening of y - a and
  x - c (dealer: a^2 and c*a).
* rsqrt: m is a function of x, so x m^2 = x (3 - x)^2 / 4 = (9x - 6x^2 + x^3)/4 is a cubic
  in x: one opening of x - a with the dealer's a^2, a^3 gives it (the "x m^2 in one round"
  product needs no second mask), and y m = (3y - y x)/2 reuses the same mask a with c*a.
  The /4 and /2 are folded into the truncation shifts (exact truncation by any k).
* The first iteration starts from a public value (x_0 = 1, resp. y_0 = 1), so its
  x_1 = 2 - y_0 (resp. y_1 = (3 - x_0)/2) is local; the output correction p (resp.
  sqrt(p)) is folded in there by starting from x_0 = p (resp. y_0 = sqrt(p)), held with
  extra fractional bits that the next truncation removes.
* The pre-scale of the input folds into the truncation that produced it when the caller
  has one (LayerNorm and 2Quad do this); otherwise p y is formed by reading y's f bits
  as f + s bits (p = mult 2^-s), which is free while f + s is at most the iterate's
  fractional bits (reciprocal: p >= 2^-11; rsqrt: p >= 2^-3) and a truncation below
  that, whose round is the first opening's.

Seeded first step: the cores take gamma, the first factor's constant (gamma - y_0, resp.
(gamma - x_0)/2), a multiple of 1/64 chosen with the prescale by approx.goldschmidt
(`choose_seeded_goldschmidt`). Same rounds and bytes per iteration, fewer iterations; the
reciprocal's x' may then reach gamma 2^i, one bit more (`recip_fracs`), and the rsqrt's
cubic x (gamma - x)^2 <= 4 gamma^3 / 27 stays below 2^62 at 3 fx bits for gamma <= 3.5.

Costs per element and party of `reciprocal_goldschmidt` / `rsqrt_goldschmidt` (which finish
the result themselves), n iterations, T = 1/8 byte per truncation:
    n >= 2: n + 1 rounds, 8 + 16 (n - 1) bytes + (2n - 1) T (less one T where the final
            rescale to out_frac keeps every bit: then also one round less), plus T for a
            small input prescale;
    n == 1: local, plus at most one truncation round (the rescale, and the prescale's T).

Fixed point: the converging iterate (y of the reciprocal, x of rsqrt) carries guard
bits (`recip_fracs`, `rsqrt_frac`): its absolute error becomes a relative error of the
result divided by its value, which is small at the low end of a wide range. The
output-carrying iterate is held at f + s bits where the output constant is mult / 2^s,
so small constants keep their relative precision. Overflow bounds are at each core.
"""

from __future__ import annotations

import math

import torch

from ..context import Context
from ..correlations import RING
from ..domain import check_range
from ..messages import Protocol
from . import fused
from .cost import Cost
from .trunc import Pending, begin, begin_rescale, finish, trunc_cost

# Domains of p * y at f = 16 (low ends: overflow bounds, see the cores). Near the low end
# the input's own resolution limits accuracy: relative 2^-(fy_0 + 1) / (p y) for the
# reciprocal (fy_0 = 27 or 28), 2^-21 / (p y) for rsqrt (x is held at 19 bits).
RECIPROCAL_DOMAIN = (2.0 ** -16, 2.0)
RSQRT_DOMAIN = (2.0 ** -16, 3.0)
CONST_BITS = 16  # precision of a public constant that is not a power of two
# A seeded first step (gamma other than 2 resp. 3) is calibrated for its prescale; the
# runtime may apply a prescale rounded down by at most this much (approx.goldschmidt checks
# its choice there too; LayerNorm centres first or refuses where it would round more).
SEED_ROBUST = 2.0 ** -6
PRESCALE_BITS = 4  # an input prescale only has to land in the domain (rounded down)
X_GUARD = 6  # extra fractional bits of the reciprocal's output-carrying iterate x


def fixed_const(c: float, max_shift: int | None = None, precision: int = CONST_BITS,
                round_down: bool = False) -> tuple[int, int]:
    """(mult, shift) with c ~= mult / 2^shift, shift >= 0, mult >= 1.

    Exact when c is a power of two (mult = 1 or a power of two, minimal shift). Otherwise
    mult has `precision` bits, or fewer if `max_shift` caps the shift (then rounding may
    be down, never below 1: the caller's overflow bound is what max_shift encodes).
    """
    if not c > 0:
        raise ValueError(f"constant must be positive, got {c}")
    mant, exp = math.frexp(c)  # c = mant 2^exp, mant in [0.5, 1)
    if mant == 0.5:
        e = exp - 1
        if e >= 0:
            return 1 << e, 0
        if max_shift is not None and -e > max_shift:
            raise ValueError(f"constant {c} needs a shift of {-e} > {max_shift}")
        return 1, -e
    shift = max(0, precision - exp)
    if max_shift is not None:
        shift = min(shift, max_shift)
    v = c * 2.0 ** shift
    mult = math.floor(v) if round_down else round(v)
    if mult < 1:
        raise ValueError(f"constant {c} is below 2^-{shift}, the smallest step the shift allows")
    return mult, shift


def prescale_const(p: float) -> tuple[int, int]:
    """(mult, shift) with p' = mult 2^-shift <= p the prescale a Goldschmidt protocol applies.

    p rounded *down* to PRESCALE_BITS bits (p' y never leaves the domain when p y does
    not), exact for a power of two (mult = 1). shift is negative for p >= 2^PRESCALE_BITS.
    Calibrate iterations at `effective_prescale(p)`.
    """
    if not p > 0:
        raise ValueError(f"prescale must be positive, got {p}")
    mant, exp = math.frexp(p)  # p = mant 2^exp, mant in [0.5, 1)
    if mant == 0.5:
        return 1, 1 - exp
    return math.floor(mant * (1 << PRESCALE_BITS)), PRESCALE_BITS - exp


def effective_prescale(p: float) -> float:
    mult, shift = prescale_const(p)
    return mult * 2.0 ** -shift


# --- reciprocal -----------------------------------------------------------------------------

def _gamma_int(gamma: float) -> int:
    """gamma * 64 (the first step's constant, a multiple of 1/64: exact at >= 6 fractional
    bits); ValueError otherwise."""
    g = gamma * 64
    if g != int(g) or not 0 < g < 1 << 10:
        raise ValueError(f"a Goldschmidt first-step constant must be a multiple of 1/64 below 16, got {gamma}")
    return int(g)


def recip_fracs(f: int, mult: int, iters: int, gamma: float = 2.0) -> list[int]:
    """Fractional bits of y_0 .. y_(n-1), the reciprocal's converging iterate.

    Why so many: an absolute error d in y_i is a relative error d / y_i of the result, and
    y_i starts at p y, small at the low end of a wide range (2Quad sums in [1, 8192]:
    p y down to 2^-13). Why they may shrink: y_i roughly doubles per iteration while it is
    small, and the bound that limits them, x_(i+1) = x_i (2 - y_i) < 2^62 at
    (f + X_GUARD) + fy_i bits with x'_(i+1) <= 2^(i+1), loosens by one bit per iteration:
    fy_i = min(f + 12, 61 - bitlen(mult) - (f + X_GUARD) - (i + 1)), at least f + 2.
    That keeps y_i's relative precision near 2^-21 throughout; where the floor f + 2
    binds, the bound needs x'_(i+1) <= 1/(p y) <= 2^17: the domain's 2^-16 low end.
    A seeded first step (gamma > 2, at most 4) makes x' up to gamma 2^i: one bit less.
    """
    lm = mult.bit_length() + (gamma > 2)
    fys = [max(f + 2, min(f + 12, 61 - lm - (f + X_GUARD) - (i + 1))) for i in range(iters)]
    if iters > 1:  # x_1 = p (gamma - y_0) is held at fy_0 bits: fy_0 + fy_1 + 2 + lm <= 61
        fys[0] = min(f + 12, 59 - lm - fys[1])
    return fys


def reciprocal_core(ctx: Context, y0: Pending | torch.Tensor, mult: int, shift: int,
                     iters: int, out_frac: int, gamma: float = 2.0) -> Protocol:
    """(mult 2^-shift) / y0 at out_frac bits, for y0 (recip_fracs(...)[0] bits) in the domain.

    y0 may be a pending truncation (its round is the first product's); the result is one
    (`trunc.Pending`: the caller finishes it, or fuses it into its next product).
    x_i = p x' with x' = prod m carries f + X_GUARD + shift fractional bits (x_1:
    fy_0 + shift), i.e. it is stored as mult x' 2^(f + X_GUARD). Its relative precision
    matters (the result inherits it) and x'_1 = 2 - p y is small when p y is near 2, hence
    the guard bits. Overflow: see `recip_fracs` (the Beaver terms may wrap; only the
    truncated x (2 - y) and y (2 - y) <= 1 must stay below 2^62).
    gamma: the first factor is gamma - y_0 (a seeded first step, approx.goldschmidt
    `choose_seeded_goldschmidt`; 2 < gamma <= 2.75 keeps y_1 = y_0 (gamma - y_0) < 2).
    """
    f = ctx.f
    fys = recip_fracs(f, mult, iters, gamma)
    fy = fys[0]
    g = _gamma_int(gamma) << (fy - 6)  # gamma at fy_0 bits
    Y = fused.as_pending(y0)
    check_range(ctx, "Goldschmidt 1/y's pre-scaled input p y", Y, fy, *RECIPROCAL_DOMAIN)
    if iters == 1:  # x_1 = p (gamma - y_0) from x_0 = p (public) is local
        y0 = yield from finish(ctx, Y)
        return begin_rescale(ctx, mult * ctx.add_public(-y0, g), fy + shift, out_frac)
    # y_1 = y_0 (gamma - y_0): the square's opening finishes y_0 (monomials: a, a^2)
    rnd = yield from fused.fused_round(ctx, [Y], [0], lambda a: [a * a], [RING], cross=[(0, 0)])
    y0 = rnd.values[0]
    X = Pending(mult * ctx.add_public(-y0, g))  # x_1 at fy_0 + shift bits
    xf = fy + shift
    Y = begin(ctx, y0 * g - fused.square(ctx, rnd, 0, 1), 2 * fy - fys[1])
    fy = fys[1]
    for i in range(2, iters + 1):
        last = i == iters
        Y, X = yield from fused.settle(ctx, Y, X)
        # entries 0 = y (mask a), 1 = x (mask c); monomials a, c, [a^2], c a
        if last:
            rnd = yield from fused.fused_round(ctx, [Y, X], [0, 1], lambda a, c: [c * a],
                                               [RING], cross=[(0, 1), (1, 0)])
            ca = 2
        else:
            rnd = yield from fused.fused_round(ctx, [Y, X], [0, 1],
                                               lambda a, c: [a * a, c * a], [RING, RING],
                                               cross=[(0, 0), (0, 1), (1, 0)])
            ca = 3
        y, x = rnd.values
        x_new = (x << (fy + 1)) - fused.product(ctx, rnd, 1, 0, ca)  # x (2 - y) at xf + fy bits
        if last:
            return begin_rescale(ctx, x_new, xf + fy, out_frac)
        y_new = (y << (fy + 1)) - fused.square(ctx, rnd, 0, 2)  # y (2 - y) at 2 fy bits
        Y = begin(ctx, y_new, 2 * fy - fys[i])
        X = begin_rescale(ctx, x_new, xf + fy, f + X_GUARD + shift)
        fy, xf = fys[i], f + X_GUARD + shift


def reciprocal_core_cost(shape, mult: int, shift: int, iters: int, out_frac: int, f: int,
                          mode: str, y0_k: int = 0, gamma: float = 2.0) -> Cost:
    """Cost of `reciprocal_core` up to its pending result (whose round the caller counts).

    y0_k: the shift left pending on y0 (fused.pending_k; 0: y0 is finished)."""
    fys = recip_fracs(f, mult, iters, gamma)
    if iters == 1:
        return fused.fused_round_cost((), [shape]) if y0_k else Cost()
    total = fused.fused_round_cost([shape], [shape] if y0_k else [])
    ky, kx = fused.pending_k(2 * fys[0] - fys[1], mode), 0
    xf, fy = fys[0] + shift, fys[1]
    for i in range(2, iters + 1):
        total = total + fused.mul_cost(shape, ky, shape, kx)  # one product's round, settled
        if i == iters:
            return total
        ky = fused.pending_k(2 * fy - fys[i], mode)
        kx = fused.pending_k(xf + fy - (f + X_GUARD + shift), mode)
        fy, xf = fys[i], f + X_GUARD + shift


def reciprocal_core_out_k(mult: int, shift: int, iters: int, out_frac: int, f: int,
                          mode: str, gamma: float = 2.0) -> int:
    """The shift left pending on `reciprocal_core`'s result (0: none)."""
    fys = recip_fracs(f, mult, iters, gamma)
    if iters == 1:
        return fused.pending_k(fys[0] + shift - out_frac, mode)
    xf = fys[0] + shift if iters == 2 else f + X_GUARD + shift
    return fused.pending_k(xf + fys[iters - 1] - out_frac, mode)


def reciprocal_goldschmidt(ctx: Context, y: torch.Tensor, prescale: float, iters: int, *,
                           scaled_input: bool = False, out_frac: int | None = None,
                           gamma: float = 2.0) -> Protocol:
    """1/y for prescale * y in RECIPROCAL_DOMAIN, by `iters` Goldschmidt iterations.

    y: share at f fractional bits (already multiplied by prescale if scaled_input).
    Relative error |1 - p y|^(2^iters) plus a few ulps. Result at out_frac (default f) bits.
    The prescale is used as `prescale_const(prescale)` (rounded down to 4 bits, exact for
    a power of two); the same constant corrects the output, so rounding costs no accuracy.
    gamma: the first step's constant (`reciprocal_core`).
    """
    f = ctx.f
    if iters < 1:
        raise ValueError("Goldschmidt needs at least one iteration")
    mult, shift = prescale_const(prescale)
    y0 = begin_rescale(ctx, y if scaled_input else y * mult, f if scaled_input else f + shift,
                       recip_fracs(f, mult, iters, gamma)[0])
    r = yield from reciprocal_core(ctx, y0, mult, shift, iters, f if out_frac is None else out_frac,
                                   gamma)
    return (yield from finish(ctx, r))


def reciprocal_goldschmidt_cost(shape, prescale: float, iters: int, *, scaled_input: bool = False,
                                out_frac: int | None = None, f: int = 16,
                                mode: str = "exact", gamma: float = 2.0) -> Cost:
    mult, shift = prescale_const(prescale)
    out_frac = f if out_frac is None else out_frac
    y0_k = fused.pending_k(f + (0 if scaled_input else shift)
                           - recip_fracs(f, mult, iters, gamma)[0], mode)
    out_k = reciprocal_core_out_k(mult, shift, iters, out_frac, f, mode, gamma)
    return (reciprocal_core_cost(shape, mult, shift, iters, out_frac, f, mode, y0_k, gamma)
            + (trunc_cost(shape, mode) if out_k else Cost()))


# --- inverse square root --------------------------------------------------------------------

def rsqrt_frac(f: int) -> int:
    """Fractional bits of the converging iterate x (and of the scaled input): 19.

    Small x loses relative precision as in the reciprocal, so x gets as many bits as the
    one-round cubic allows: x (3 - x)^2 <= 4 at 3 * 19 bits is < 2^59 (the cubic's terms
    wrap individually; the ring makes their sum exact). Needs f <= 19.
    """
    if f > 19:
        raise ValueError("rsqrt_goldschmidt's one-round cubic needs f <= 19 fractional bits")
    return 19


def rsqrt_core(ctx: Context, x0: Pending | torch.Tensor, mult: int, shift: int, iters: int,
                out_frac: int, gamma: float = 3.0) -> Protocol:
    """(mult/2^shift) / sqrt(x0) at out_frac fractional bits, for x0 (rsqrt_frac bits) in (0, 3).

    x0 may be a pending truncation (its round is the first opening's); the result is one
    (`trunc.Pending`, as in `reciprocal_core`).
    y_i = c prod m is held at f + shift bits as mult y' 2^f, y' <= 1/sqrt(x0), mult < 2^16:
    the truncated y (3 - x) is 2 y'_(i+1) mult 2^(f + fx) < 2^(1 + 16 + 16 + 19) y', below
    2^62 for y' < 2^8, i.e. x0 > 2^-16 (f = 16).
    gamma: the first factor is (gamma - x_0)/2 (a seeded first step, approx.goldschmidt
    `choose_seeded_goldschmidt`; gamma <= 3.5 keeps the cubic x (gamma - x)^2 <= 4 gamma^3/27
    below 2^62 at 3 fx bits).
    """
    f, fx = ctx.f, rsqrt_frac(ctx.f)
    X = fused.as_pending(x0)
    check_range(ctx, "Goldschmidt 1/sqrt(y)'s pre-scaled input p y", X, fx, *RSQRT_DOMAIN)
    yf = fx + shift + 1
    g = _gamma_int(gamma)
    if iters == 1:  # y_1 = c (gamma - x_0)/2 from y_0 = c (public) is local, at fx + shift + 1 bits
        x0 = yield from finish(ctx, X)
        return begin_rescale(ctx, mult * ctx.add_public(-x0, g << (fx - 6)), yf, out_frac)
    # iteration 1: y_0 is public, so only x_0 is opened, for x_1 = x_0 (gamma - x_0)^2 / 4
    # (entry 0 = x, mask a; monomials a, a^2, a^3)
    rnd = yield from fused.fused_round(ctx, [X], [0], lambda a: [a * a, a * a * a],
                                       [RING, RING], cross=[(0, 0), (0, 1)])
    x = rnd.values[0]
    Y = Pending(mult * ctx.add_public(-x, g << (fx - 6)))
    X = begin(ctx, _cubic(ctx, rnd, x, fx, 1, 2, g), 2 * fx + 2)
    for i in range(2, iters + 1):
        last = i == iters
        X, Y = yield from fused.settle(ctx, X, Y)
        # entries 0 = x (mask a), 1 = y (mask c); monomials a, c, [a^2, a^3], c a
        if last:  # only y_n = y (3 - x)/2 is needed
            rnd = yield from fused.fused_round(ctx, [X, Y], [0, 1], lambda a, c: [c * a],
                                               [RING], cross=[(0, 1), (1, 0)])
            ca = 2
        else:
            rnd = yield from fused.fused_round(
                ctx, [X, Y], [0, 1], lambda a, c: [a * a, a * a * a, c * a], [RING] * 3,
                cross=[(0, 0), (0, 2), (0, 1), (1, 0)])
            ca = 4
        x, y = rnd.values
        y_new = ((3 * y) << fx) - fused.product(ctx, rnd, 1, 0, ca)  # 2 y m at yf + fx bits
        y_frac = yf + fx + 1  # read with one more fractional bit it is y m
        if last:
            return begin_rescale(ctx, y_new, y_frac, out_frac)
        X = begin(ctx, _cubic(ctx, rnd, x, fx, 2, 3), 2 * fx + 2)
        Y = begin_rescale(ctx, y_new, y_frac, f + shift)
        yf = f + shift


def _cubic(ctx: Context, rnd: fused.Round, x: torch.Tensor, fx: int, a2: int,
           a3: int, g: int = 3 * 64) -> torch.Tensor:
    """x (gamma - x)^2 = 4 x m^2 at 3 fx bits for x = e + a (opened entry 0): one opening.
    g = 64 gamma (3 * 64: the plain step)."""
    x2 = fused.square(ctx, rnd, 0, a2)
    x3 = (fused.power_times(ctx, rnd, 0, 3) + 3 * fused.power_times(ctx, rnd, 0, 2, 0)
          + 3 * fused.power_times(ctx, rnd, 0, 1, a2) + rnd.mons[a3])
    return ((g * g * x) << (2 * fx - 12)) - ((2 * g * x2) << (fx - 6)) + x3


def rsqrt_core_cost(shape, shift: int, iters: int, out_frac: int, f: int, mode: str,
                    x0_k: int = 0) -> Cost:
    """Cost of `rsqrt_core` up to its pending result (whose round the caller counts).

    x0_k: the shift left pending on x0 (fused.pending_k; 0: x0 is finished)."""
    fx = rsqrt_frac(f)
    if iters == 1:
        return fused.fused_round_cost((), [shape]) if x0_k else Cost()
    total = fused.fused_round_cost([shape], [shape] if x0_k else [])
    kx, ky = fused.pending_k(2 * fx + 2, mode), 0
    yf = fx + shift + 1
    for i in range(2, iters + 1):
        total = total + fused.mul_cost(shape, kx, shape, ky)  # one product's round, settled
        if i == iters:
            return total
        kx = fused.pending_k(2 * fx + 2, mode)
        ky = fused.pending_k(yf + fx + 1 - (f + shift), mode)
        yf = f + shift


def rsqrt_core_out_k(shift: int, iters: int, out_frac: int, f: int, mode: str) -> int:
    """The shift left pending on `rsqrt_core`'s result (0: none)."""
    fx = rsqrt_frac(f)
    if iters == 1:
        return fused.pending_k(fx + shift + 1 - out_frac, mode)
    yf = fx + shift + 1 if iters == 2 else f + shift
    return fused.pending_k(yf + fx + 1 - out_frac, mode)


def rsqrt_goldschmidt(ctx: Context, y: torch.Tensor, prescale: float, iters: int, *,
                      scaled_input: bool = False, out_frac: int | None = None,
                      gamma: float = 3.0) -> Protocol:
    """1/sqrt(y) for prescale * y in RSQRT_DOMAIN, by `iters` Goldschmidt iterations.

    y: share at f fractional bits (already multiplied by prescale if scaled_input).
    Result at out_frac (default f) bits. The input prescale is applied as
    p' = `prescale_const(prescale)`; the output is corrected by sqrt(p') to 16 bits
    (exact for powers of 4).
    """
    f = ctx.f
    if iters < 1:
        raise ValueError("Goldschmidt needs at least one iteration")
    p_eff, mult, shift = _rsqrt_prescale(prescale, scaled_input)
    x0 = begin_rescale(ctx, y if scaled_input else y * mult, f if scaled_input else f + shift,
                       rsqrt_frac(f))
    cm, cs = fixed_const(math.sqrt(p_eff))
    r = yield from rsqrt_core(ctx, x0, cm, cs, iters, f if out_frac is None else out_frac, gamma)
    return (yield from finish(ctx, r))


def _rsqrt_prescale(prescale: float, scaled_input: bool) -> tuple[float, int, int]:
    if scaled_input:
        return prescale, 1, 0
    mult, shift = prescale_const(prescale)
    return mult / 2.0 ** shift, mult, shift


def rsqrt_goldschmidt_cost(shape, prescale: float, iters: int, *, scaled_input: bool = False,
                           out_frac: int | None = None, f: int = 16, mode: str = "exact") -> Cost:
    p_eff, _, shift = _rsqrt_prescale(prescale, scaled_input)
    out_frac = f if out_frac is None else out_frac
    x0_k = fused.pending_k(f + shift - rsqrt_frac(f), mode)
    _, cs = fixed_const(math.sqrt(p_eff))
    out_k = rsqrt_core_out_k(cs, iters, out_frac, f, mode)
    return (rsqrt_core_cost(shape, cs, iters, out_frac, f, mode, x0_k)
            + (trunc_cost(shape, mode) if out_k else Cost()))
