"""Goldschmidt reciprocal and inverse square root with a public pre-scale (SecFormer).

Both iterations converge only on a range (DESIGN.md): the reciprocal iteration
(m = 2 - y; x <- x m; y <- y m, from x = 1) needs y in (0, 2), and the inverse square
root iteration (m = (3 - x)/2; x <- x m^2; y <- y m, from y = 1) needs x in (0, 3). So
the input is first multiplied by a public pre-scale p chosen from the input's range
(a calibration pass measures it; `secformer_compiler.approximations.choose_goldschmidt`
picks p and the iteration count for a declared range), and the result is corrected by
p (1/y = p/(p y)) or sqrt(p) (1/sqrt(y) = sqrt(p)/sqrt(p y)). Inputs outside the
declared range give garbage, not an error: nothing may branch on a secret.

Rounds. Each iteration is one product round plus one truncation round, and the
products of one iteration share their round:

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
  fractional bits (reciprocal: p >= 2^-11; rsqrt: p >= 2^-3) and costs one truncation
  round below that.

Costs per element and party, n iterations, T = 1/8 byte per truncation:
    n >= 2: 2n rounds, 8 + 16 (n - 1) bytes + (2n - 2) T (the last T is the final
            rescale to out_frac; it disappears when out_frac keeps every bit)
    n == 1: local, plus at most one truncation (the rescale);
    plus, unless scaled_input, one truncation round for a small input prescale (below).

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
from ..messages import Protocol, open_add, parallel
from .arith import numel, square
from .cost import Cost
from .trunc import trunc, trunc_cost

# Domains of p * y at f = 16 (low ends: overflow bounds, see the cores). Near the low end
# the input's own resolution limits accuracy: relative 2^-(fy_0 + 1) / (p y) for the
# reciprocal (fy_0 = 27 or 28), 2^-21 / (p y) for rsqrt (x is held at 19 bits).
RECIPROCAL_DOMAIN = (2.0 ** -16, 2.0)
RSQRT_DOMAIN = (2.0 ** -16, 3.0)
CONST_BITS = 16  # precision of a public constant that is not a power of two
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


def rescale(ctx: Context, v: torch.Tensor, frm: int, to: int) -> Protocol:
    """Change the number of fractional bits: truncate (one round) or shift left (local)."""
    if frm > to:
        return (yield from trunc(ctx, v, frm - to))
    return v << (to - frm) if to > frm else v


def rescale_cost(shape, frm: int, to: int, mode: str) -> Cost:
    return trunc_cost(shape, mode) if frm > to else Cost()


def _powers(ctx: Context, e: torch.Tensor, a: torch.Tensor, a2: torch.Tensor,
            a3: torch.Tensor | None = None):
    """Shares of x^2 (and x^3) for x = e + a with e public: binomial expansion (P0 adds e^k)."""
    x2 = ctx.add_public(2 * e * a + a2, e * e)
    if a3 is None:
        return x2
    x3 = ctx.add_public(3 * e * e * a + 3 * e * a2 + a3, e * e * e)
    return x2, x3


# --- reciprocal -----------------------------------------------------------------------------

def recip_fracs(f: int, mult: int, iters: int) -> list[int]:
    """Fractional bits of y_0 .. y_(n-1), the reciprocal's converging iterate.

    Why so many: an absolute error d in y_i is a relative error d / y_i of the result, and
    y_i starts at p y, small at the low end of a wide range (2Quad sums in [1, 8192]:
    p y down to 2^-13). Why they may shrink: y_i roughly doubles per iteration while it is
    small, and the bound that limits them, x_(i+1) = x_i (2 - y_i) < 2^62 at
    (f + X_GUARD) + fy_i bits with x'_(i+1) <= 2^(i+1), loosens by one bit per iteration:
    fy_i = min(f + 12, 61 - bitlen(mult) - (f + X_GUARD) - (i + 1)), at least f + 2.
    That keeps y_i's relative precision near 2^-21 throughout; where the floor f + 2
    binds, the bound needs x'_(i+1) <= 1/(p y) <= 2^17: the domain's 2^-16 low end.
    """
    lm = mult.bit_length()
    fys = [max(f + 2, min(f + 12, 61 - lm - (f + X_GUARD) - (i + 1))) for i in range(iters)]
    if iters > 1:  # x_1 = p (2 - y_0) is held at fy_0 bits: fy_0 + fy_1 + 2 + lm <= 61
        fys[0] = min(f + 12, 59 - lm - fys[1])
    return fys


def reciprocal_core(ctx: Context, y0: torch.Tensor, mult: int, shift: int, iters: int,
                     out_frac: int) -> Protocol:
    """(mult 2^-shift) / y0 at out_frac bits, for y0 (recip_fracs(...)[0] bits) in the domain.

    x_i = p x' with x' = prod m carries f + X_GUARD + shift fractional bits (x_1:
    fy_0 + shift), i.e. it is stored as mult x' 2^(f + X_GUARD). Its relative precision
    matters (the result inherits it) and x'_1 = 2 - p y is small when p y is near 2, hence
    the guard bits. Overflow: see `recip_fracs` (the Beaver terms may wrap; only the
    truncated x (2 - y) and y (2 - y) <= 1 must stay below 2^62).
    """
    f = ctx.f
    fys = recip_fracs(f, mult, iters)
    fy = fys[0]
    # iteration 1 from x_0 = p (public): x_1 = p (2 - y_0) is local, at fy_0 + shift bits
    x = mult * ctx.add_public(-y0, 2 << fy)
    xf = fy + shift
    if iters == 1:
        return (yield from rescale(ctx, x, xf, out_frac))
    sq = yield from square(ctx, y0)
    y = yield from trunc(ctx, (y0 << (fy + 1)) - sq, 2 * fy - fys[1])  # y_1 = y_0 (2 - y_0)
    fy = fys[1]
    for i in range(2, iters + 1):
        last = i == iters
        if last:
            a, c, ca = ctx.corr.correlated([(y.shape, RING), (x.shape, RING)],
                                           lambda a, c: [c * a], [RING])
        else:
            a, c, a2, ca = ctx.corr.correlated([(y.shape, RING), (x.shape, RING)],
                                               lambda a, c: [a * a, c * a], [RING, RING])
        e, g = yield from open_add(y - a, x - c)
        xy = x * e + g * a + ca  # Beaver: x = g + c, y = e + a
        x_new = (x << (fy + 1)) - xy  # x (2 - y) at xf + fy bits
        if last:
            return (yield from rescale(ctx, x_new, xf + fy, out_frac))
        y_new = (y << (fy + 1)) - _powers(ctx, e, a, a2)  # y (2 - y) at 2 fy bits
        y, x = yield from parallel(trunc(ctx, y_new, 2 * fy - fys[i]),
                                   rescale(ctx, x_new, xf + fy, f + X_GUARD + shift))
        fy, xf = fys[i], f + X_GUARD + shift


def reciprocal_core_cost(shape, mult: int, shift: int, iters: int, out_frac: int, f: int,
                          mode: str) -> Cost:
    n, t = numel(shape), trunc_cost(shape, mode)
    fys = recip_fracs(f, mult, iters)
    if iters == 1:
        return rescale_cost(shape, fys[0] + shift, out_frac, mode)
    total = Cost(1, 8 * n) + t
    xf = fys[0] + shift
    for i in range(2, iters):
        total = total + Cost(1, 16 * n) + (t | t)
        xf = f + X_GUARD + shift
    return total + Cost(1, 16 * n) + rescale_cost(shape, xf + fys[iters - 1], out_frac, mode)


def reciprocal_goldschmidt(ctx: Context, y: torch.Tensor, prescale: float, iters: int, *,
                           scaled_input: bool = False, out_frac: int | None = None) -> Protocol:
    """1/y for prescale * y in RECIPROCAL_DOMAIN, by `iters` Goldschmidt iterations.

    y: share at f fractional bits (already multiplied by prescale if scaled_input).
    Relative error |1 - p y|^(2^iters) plus a few ulps. Result at out_frac (default f) bits.
    The prescale is used as `prescale_const(prescale)` (rounded down to 4 bits, exact for
    a power of two); the same constant corrects the output, so rounding costs no accuracy.
    """
    f = ctx.f
    if iters < 1:
        raise ValueError("Goldschmidt needs at least one iteration")
    mult, shift = prescale_const(prescale)
    y = yield from rescale(ctx, y if scaled_input else y * mult,
                            f if scaled_input else f + shift, recip_fracs(f, mult, iters)[0])
    return (yield from reciprocal_core(ctx, y, mult, shift, iters,
                                        f if out_frac is None else out_frac))


def reciprocal_goldschmidt_cost(shape, prescale: float, iters: int, *, scaled_input: bool = False,
                                out_frac: int | None = None, f: int = 16,
                                mode: str = "exact") -> Cost:
    mult, shift = prescale_const(prescale)
    pre = rescale_cost(shape, f if scaled_input else f + shift, recip_fracs(f, mult, iters)[0],
                        mode)
    return pre + reciprocal_core_cost(shape, mult, shift, iters,
                                       f if out_frac is None else out_frac, f, mode)


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


def rsqrt_core(ctx: Context, x0: torch.Tensor, mult: int, shift: int, iters: int,
                out_frac: int) -> Protocol:
    """(mult/2^shift) / sqrt(x0) at out_frac fractional bits, for x0 (rsqrt_frac bits) in (0, 3).

    y_i = c prod m is held at f + shift bits as mult y' 2^f, y' <= 1/sqrt(x0), mult < 2^16:
    the truncated y (3 - x) is 2 y'_(i+1) mult 2^(f + fx) < 2^(1 + 16 + 16 + 19) y', below
    2^62 for y' < 2^8, i.e. x0 > 2^-16 (f = 16).
    """
    f, fx = ctx.f, rsqrt_frac(ctx.f)
    # iteration 1 from y_0 = c (public): y_1 = c (3 - x_0)/2 is local, at fx + shift + 1 bits
    y = mult * ctx.add_public(-x0, 3 << fx)
    yf = fx + shift + 1
    if iters == 1:
        return (yield from rescale(ctx, y, yf, out_frac))
    x = x0
    for i in range(1, iters + 1):
        first, last = i == 1, i == iters
        if first:  # y_0 is public: only x is opened, for x_1 = x_0 (3 - x_0)^2 / 4
            a, a2, a3 = ctx.corr.correlated([(x.shape, RING)], lambda a: [a * a, a * a * a],
                                            [RING, RING])
            (e,) = yield from open_add(x - a)
        elif last:  # only y_n = y (3 - x)/2 is needed
            a, c, ca = ctx.corr.correlated([(x.shape, RING), (y.shape, RING)],
                                           lambda a, c: [c * a], [RING])
            e, g = yield from open_add(x - a, y - c)
        else:
            a, c, a2, a3, ca = ctx.corr.correlated(
                [(x.shape, RING), (y.shape, RING)], lambda a, c: [a * a, a * a * a, c * a],
                [RING] * 3)
            e, g = yield from open_add(x - a, y - c)
        if not first:
            yx = y * e + g * a + ca  # Beaver: y = g + c, x = e + a
            y_new = ((3 * y) << fx) - yx  # y (3 - x) = 2 y m at yf + fx bits
            y_frac = yf + fx + 1  # read with one more fractional bit it is y m
            if last:
                return (yield from rescale(ctx, y_new, y_frac, out_frac))
        x2, x3 = _powers(ctx, e, a, a2, a3)
        cubic = ((9 * x) << (2 * fx)) - ((6 * x2) << fx) + x3  # x (3 - x)^2 = 4 x m^2 at 3 fx
        if first:
            x = yield from trunc(ctx, cubic, 2 * fx + 2)
        else:
            x, y = yield from parallel(trunc(ctx, cubic, 2 * fx + 2),
                                       rescale(ctx, y_new, y_frac, f + shift))
            yf = f + shift


def rsqrt_core_cost(shape, shift: int, iters: int, out_frac: int, f: int, mode: str) -> Cost:
    n, t, fx = numel(shape), trunc_cost(shape, mode), rsqrt_frac(f)
    if iters == 1:
        return rescale_cost(shape, fx + shift + 1, out_frac, mode)
    total = Cost(1, 8 * n) + t
    yf = fx + shift + 1
    for _ in range(2, iters):
        total = total + Cost(1, 16 * n) + (t | rescale_cost(shape, yf + fx + 1, f + shift, mode))
        yf = f + shift
    return total + Cost(1, 16 * n) + rescale_cost(shape, yf + fx + 1, out_frac, mode)


def rsqrt_goldschmidt(ctx: Context, y: torch.Tensor, prescale: float, iters: int, *,
                      scaled_input: bool = False, out_frac: int | None = None) -> Protocol:
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
    y = yield from rescale(ctx, y if scaled_input else y * mult,
                            f if scaled_input else f + shift, rsqrt_frac(f))
    cm, cs = fixed_const(math.sqrt(p_eff))
    return (yield from rsqrt_core(ctx, y, cm, cs, iters, f if out_frac is None else out_frac))


def _rsqrt_prescale(prescale: float, scaled_input: bool) -> tuple[float, int, int]:
    if scaled_input:
        return prescale, 1, 0
    mult, shift = prescale_const(prescale)
    return mult / 2.0 ** shift, mult, shift


def rsqrt_goldschmidt_cost(shape, prescale: float, iters: int, *, scaled_input: bool = False,
                           out_frac: int | None = None, f: int = 16, mode: str = "exact") -> Cost:
    p_eff, _, shift = _rsqrt_prescale(prescale, scaled_input)
    pre = rescale_cost(shape, f if scaled_input else f + shift, rsqrt_frac(f), mode)
    _, cs = fixed_const(math.sqrt(p_eff))
    return pre + rsqrt_core_cost(shape, cs, iters, f if out_frac is None else out_frac, f, mode)
