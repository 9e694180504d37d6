"""Baseline building blocks (CrypTen, PUMA) so users can compare inside one tool.

They compute what those systems compute (BASELINES.md; the float references are in
`secformer_compiler.approx.iterative` / `.softmax`), with our protocols underneath:

* `exp_limit`: exp(x) = (1 + x/2^n)^(2^n) by n squarings (CrypTen n = 8, PUMA n = 5).
  1 + x/2^n is formed exactly by reading x's f fractional bits as f + n (no truncation),
  and the powers keep 8 guard bits. Valid for x in [-2^(n+1), 4]: below, the base
  1 + x/2^n < -1 and the power explodes (CrypTen's behaviour too; PUMA zeroes exp below
  -14, `softmax_exp(cutoff=-14)`); above, the guard bits overflow.
* `reciprocal_newton`: CrypTen's 1/y, Newton r <- 2r - y r^2 from 3 exp(1 - 2y) + 0.003.
  Accurate for y in about [1e-3, 250] (the exp seed explodes past ~256).
* `rsqrt_newton`: CrypTen's 1/sqrt(y), Newton r <- r (3 - y r^2)/2 from
  2.2 exp(-(y/2 + 0.2)) + 0.2 - y/1024. Accurate for y in about [0.1, 150].
* `softmax_exp`: x - max (compare.max_tree), exp, sum, reciprocal, product.

Our implementation is leaner than CrypTen's own, with the same math: y r^2 is one round
(dealer triple with b, b^2, a b, a b^2), y's masked value y - a is opened once and reused
by every Newton iteration (y does not change; each r_i gets a fresh mask), the exp's last
truncation absorbs the seed's affine map. Reported costs are ours, not CrypTen's.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..context import Context
from ..correlations import RING
from ..messages import Protocol, open_add, parallel
from . import arith
from .arith import numel
from .compare import bit_mul, bit_mul_cost, gt_public, max_tree, max_tree_cost, msb_cost
from .cost import Cost
from .goldschmidt import fixed_const
from .trunc import trunc, trunc_cost

# --- exp ------------------------------------------------------------------------------------

EXP_GUARD = 8


def _exp_squarings(ctx: Context, x: torch.Tensor, n: int, x_frac: int) -> Protocol:
    """(1 + x/2^n)^(2^n) with the last square untruncated: returns (value, fractional bits).

    The powers are held at f + EXP_GUARD bits: each squaring doubles the relative error,
    so an ulp lost at step i costs 2^(n - i) ulps at the end (2^-9 relative at f = 16,
    n = 8 without guard bits). Bound: squares at 2(f + 8) bits must stay below 2^62, so
    the powers must stay below 2^7: x <= 4.
    """
    if n < 1:
        raise ValueError("exp_limit needs at least one squaring")
    g = ctx.f + EXP_GUARD
    y = ctx.add_public(x, 1 << (x_frac + n))  # x at x_frac bits is x/2^n at x_frac + n bits
    frac = x_frac + n
    for i in range(n):
        sq = yield from arith.square(ctx, y)
        if i == n - 1:
            return sq, 2 * frac
        y = yield from trunc(ctx, sq, 2 * frac - g)
        frac = g


def exp_limit(ctx: Context, x: torch.Tensor, n: int = 8, x_frac: int | None = None) -> Protocol:
    """exp(x) for x at x_frac (default f) bits by n squarings; result at f bits. 2n rounds."""
    f = ctx.f
    v, frac = yield from _exp_squarings(ctx, x, n, f if x_frac is None else x_frac)
    return (yield from trunc(ctx, v, frac - f))


def exp_limit_cost(shape, n: int = 8, mode: str = "exact") -> Cost:
    return _repeat(arith.square_cost(shape) + trunc_cost(shape, mode), n)


def _repeat(c: Cost, k: int) -> Cost:
    total = Cost()
    for _ in range(k):
        total = total + c
    return total


# --- Newton iterations ----------------------------------------------------------------------

def _newton_masks(ctx: Context, shape, iters: int, with_c: bool):
    """One correlation for all iterations: y's mask a, and per iteration r's mask b_i with
    b_i^2, a b_i, a b_i^2 (and, for rsqrt, the mask c_i of 3 - y r^2 with b_i c_i)."""
    per = 2 if with_c else 1

    def derive(a, *ms):
        out = []
        for i in range(iters):
            b = ms[per * i]
            out += [b * b, a * b, a * b * b]
            if with_c:
                out.append(b * ms[per * i + 1])
        return out

    k = 4 if with_c else 3
    vals = ctx.corr.correlated([(shape, RING)] * (1 + per * iters), derive, [RING] * (k * iters))
    a, srcs, der = vals[0], vals[1:1 + per * iters], vals[1 + per * iters:]
    steps = []
    for i in range(iters):
        step = dict(b=srcs[per * i], b2=der[k * i], ab=der[k * i + 1], ab2=der[k * i + 2])
        if with_c:
            step.update(c=srcs[per * i + 1], bc=der[k * i + 3])
        steps.append(step)
    return a, steps


def _y_r2(ctx: Context, e: torch.Tensor, a: torch.Tensor, g: torch.Tensor, m: dict) -> torch.Tensor:
    """Shares of y r^2 for y = e + a, r = g + b (e, g public): one round for the openings."""
    b, b2, ab, ab2 = m["b"], m["b2"], m["ab"], m["ab2"]
    local = 2 * e * g * b + e * b2 + g * g * a + 2 * g * ab + ab2
    return ctx.add_public(local, e * g * g)


def reciprocal_newton(ctx: Context, y: torch.Tensor, iters: int = 10, exp_n: int = 8) -> Protocol:
    """CrypTen's 1/y for y > 0 (about [1e-3, 250]), at f bits. 2 exp_n + 2 iters rounds."""
    f = ctx.f
    e2, frac = yield from _exp_squarings(ctx, ctx.add_public(-2 * y, 1 << f), exp_n, f)
    r = yield from trunc(ctx, ctx.add_public(3 * e2, round(0.003 * 2.0 ** frac)), frac - f)
    a, steps = _newton_masks(ctx, y.shape, iters, with_c=False)
    e = None
    for m in steps:
        if e is None:
            e, g = yield from open_add(y - a, r - m["b"])
        else:
            (g,) = yield from open_add(r - m["b"])
        # r <- 2r - y r^2: y r^2 at 3f bits, |y r^2| ~ |r| < 2^13 keeps it below 2^62
        r = yield from trunc(ctx, (r << (2 * f + 1)) - _y_r2(ctx, e, a, g, m), 2 * f)
    return r


def reciprocal_newton_cost(shape, iters: int = 10, exp_n: int = 8, mode: str = "exact") -> Cost:
    n, t = numel(shape), trunc_cost(shape, mode)
    return (exp_limit_cost(shape, exp_n, mode) + Cost(1, 16 * n) + t
            + _repeat(Cost(1, 8 * n) + t, iters - 1))


def rsqrt_newton(ctx: Context, y: torch.Tensor, iters: int = 3, exp_n: int = 8) -> Protocol:
    """CrypTen's 1/sqrt(y) (about [0.1, 150]), at f bits. 2 exp_n + 4 iters rounds."""
    f = ctx.f
    # -(y/2 + 0.2): y at f bits read at f + 1 bits is y/2
    arg = ctx.add_public(-y, -round(0.2 * 2.0 ** (f + 1)))
    e2, frac = yield from _exp_squarings(ctx, arg, exp_n, f + 1)
    c22, k = fixed_const(2.2, max_shift=60 - frac)  # E <= e^-0.2: E 2.2 2^(frac + k) < 2^62
    seed = e2 * c22 - (y << (frac + k - f - 10))  # 2.2 E - y/1024 at frac + k bits
    seed = ctx.add_public(seed, round(0.2 * 2.0 ** (frac + k)))
    r = yield from trunc(ctx, seed, frac + k - f)
    a, steps = _newton_masks(ctx, y.shape, iters, with_c=True)
    e = None
    for m in steps:
        if e is None:
            e, g = yield from open_add(y - a, r - m["b"])
        else:
            (g,) = yield from open_add(r - m["b"])
        z = yield from trunc(ctx, _y_r2(ctx, e, a, g, m), 2 * f)  # y r^2 at f bits
        w = ctx.add_public(-z, 3 << f)
        (h,) = yield from open_add(w - m["c"])
        rw = r * h + g * m["c"] + m["bc"]  # Beaver with r's opened mask: r = g + b, w = h + c
        r = yield from trunc(ctx, rw, f + 1)  # r (3 - y r^2) / 2
    return r


def rsqrt_newton_cost(shape, iters: int = 3, exp_n: int = 8, mode: str = "exact") -> Cost:
    n, t = numel(shape), trunc_cost(shape, mode)
    it = Cost(1, 8 * n) + t + Cost(1, 8 * n) + t
    return exp_limit_cost(shape, exp_n, mode) + Cost(0, 8 * n) + _repeat(it, iters)


# --- softmax with exp and max ----------------------------------------------------------------

Reciprocal = Callable[[Context, torch.Tensor], Protocol]


def _mask_offset(bits: int, f: int) -> int:
    """A public score offset for masked positions: far below any real score, and still
    inside the comparisons' range (|difference| < 2^(bits - 1)); real |x| < offset / 2."""
    return 1 << min(20 + f, bits - 3)


def softmax_exp(ctx: Context, x: torch.Tensor, dim: int = -1, mask: torch.Tensor | None = None,
                exp_n: int = 8, recip: Reciprocal | None = None, cutoff: float | None = None,
                bits: int = 64) -> Protocol:
    """Softmax as CrypTen (exp_n=8, Newton reciprocal) or PUMA (exp_n=5, cutoff=-14) do it.

    z = x - max(x) (compare.max_tree over unmasked positions: masked ones get a large
    public negative offset, locally), e = exp_limit(z) [* (z > cutoff)], masked positions
    zeroed, out = e * recip(sum e). recip(ctx, s) returns 1/s at f bits; default CrypTen's
    `reciprocal_newton` (s is in [1, n]: fine for rows up to ~250). PUMA's own reciprocal
    normalises by the highest set bit and is not implemented here: pass e.g. a Goldschmidt
    reciprocal with prescale for [1, n]. Depends on compare.py (max_tree, comparisons).
    """
    f = ctx.f
    recip = recip or (lambda c, s: reciprocal_newton(c, s, 10, exp_n))
    x = x.movedim(dim, -1)
    m = None
    if mask is not None:
        m = ctx.pub(torch.as_tensor(mask).to(torch.int64).expand(x.movedim(-1, dim).shape)
                    .movedim(dim, -1))
        x = ctx.add_public(x, (m - 1) * _mask_offset(bits, f))
    mx = yield from max_tree(ctx, x, -1, bits)
    z = x - mx
    if cutoff is None:
        e = yield from exp_limit(ctx, z, exp_n)
    else:
        e, keep = yield from parallel(exp_limit(ctx, z, exp_n),
                                      gt_public(ctx, z, round(cutoff * (1 << f)), bits))
        (e,) = yield from bit_mul(ctx, [keep], e)
    if m is not None:
        e = e * m
    r = yield from recip(ctx, e.sum(-1, keepdim=True))
    out = yield from arith.mul(ctx, e, r)
    out = yield from trunc(ctx, out, f)
    return out.movedim(-1, dim)


def softmax_exp_cost(shape, dim: int = -1, exp_n: int = 8, recip_cost: Cost | None = None,
                     cutoff: bool = False, bits: int = 64, mode: str = "exact") -> Cost:
    """recip_cost: the cost of `recip` on the row sums (default CrypTen's Newton)."""
    shape = list(shape)
    n = shape.pop(dim if dim >= 0 else len(shape) + dim)
    full, rows = tuple(shape) + (n,), tuple(shape) + (1,)
    if recip_cost is None:
        recip_cost = reciprocal_newton_cost(rows, 10, exp_n, mode)
    ex = exp_limit_cost(full, exp_n, mode)
    if cutoff:
        ex = (ex | msb_cost(full, bits)) + bit_mul_cost([full], full)
    return (max_tree_cost(full, -1, bits) + ex + recip_cost + arith.beaver_cost(full, rows)
            + trunc_cost(full, mode))
