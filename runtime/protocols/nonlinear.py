"""SecFormer's non-linear layers: GeLU (segments + Fourier erf), LayerNorm and 2Quad softmax.

* `gelu_secformer`: gelu(x) = x [x > T] + [|x| <= T] x G(x), G = (1 + erf_fourier)/2,
  erf_fourier(x) = sum_k beta_k sin(2 pi k x / P) ~ erf(x / sqrt 2) on [-T, T] (the
  coefficients are for x itself; the sqrt 2 is folded into the fit).
* `layernorm_goldschmidt`: LayerNorm over the last dim with a Goldschmidt 1/sqrt(var + eps).
* `softmax_2quad`: (x + c)^2 / sum (x + c)^2 with a 0/1 attention mask and a Goldschmidt
  reciprocal of the row sum.

Parameters (Fourier coefficients, thresholds, pre-scales, iteration counts) are inputs:
the calibration in `secformer_compiler.approximations` chooses them. Every protocol has a
`*_cost(...)` formula that the tests compare with the transport's count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..context import Context
from ..correlations import RING
from ..domain import check_range
from ..messages import Protocol, parallel
from . import arith, fused
from .arith import FixedOperand
from .compare import (bit_mul, bit_mul_cost, bit_mul_pending, bit_mul_pending_cost, gt_public,
                      lt_public, msb_cost, not_bit)
from .cost import Cost
from .fused import pending_k
from .lookup import (lookup_bits, lookup_cost, reciprocal_table_core, reciprocal_table_core_cost, reciprocal_table_out_k,
                     rsqrt_table_core, rsqrt_table_core_cost, rsqrt_table_out_k, table_fracs)
from .goldschmidt import (SEED_ROBUST, fixed_const, prescale_const, recip_fracs, reciprocal_core,
                          reciprocal_core_cost, reciprocal_core_out_k,
                          rsqrt_core, rsqrt_core_cost, rsqrt_core_out_k, rsqrt_frac)
from .sine import (bits_times_x, bits_times_x_cost, x_cos_series, x_cos_series_cost, x_sine_series,
                   x_sine_series_cost)
from .trunc import Pending, Raw, begin, begin_rescale, finish, trunc, trunc_cost

# --- GeLU -------------------------------------------------------------------------------------


# Extra fractional bits of the even form's dealt sines and public factors (x_cos_series):
# its coefficients sum to 15.3 in absolute value (approx/gelu.py), so their rounding at f
# bits could add ~1e-4; at f + 4 it adds < 1.5e-5. The product then carries 2f + 8 bits,
# |value| < 2^(10 + 40) for |x| <= 1024: far inside the exact truncation's range.
GELU_EVEN_EXTRA_FRAC = 4


def gelu_secformer(ctx: Context, x: torch.Tensor | Pending, coeffs: Sequence[float], period: int,
                   threshold: float, bits: int = 64, drop: int = 0, form: str = "erf",
                   const: float = 0.0) -> Protocol:
    """SecFormer GeLU for x at f fractional bits; the comparisons need
    (|x| + T) 2^f + 2^drop <= 2^(bits-1) (`gelu_cmp_plan` derives bits and drop).

    form "erf" (the paper's): the middle segment is x G(x), G = 1/2 + sum (beta_k/2) sin,
    from `sine.x_sine_series`. form "even": it is x/2 + const + sum gamma_k cos, from
    `sine.x_cos_series` (half the dealt randomness; approx/gelu.py). Same rounds and
    openings either way; "x G(x)" below stands for whichever.

    x may be a pending truncation by k (the linear layer before it deferred it,
    deferral.py): its base equals x mod 2^(64-k), which is all the comparisons read when
    bits <= 64 - k, so they start at once while the series path finishes x first (it has
    the rounds to spare); wider comparisons get x finished in a round of its own.

    drop > 0: the segment tests compare only the high bits (compare.msb), so each
    threshold may move by up to 2^(drop-f) towards zero: [x > T] may read 1 for
    T - 2^(drop-f) < x <= T (output x instead of x G(x)) and [x < -T] may read 1 for
    -T <= x < -T + 2^(drop-f) (output 0). Both differ from GeLU by about |x| Phi(-|x|)
    there (1.5e-4 at T = 4), less than the series' own error.

    Rounds: max(comparison rounds, 2) + 1 (7 at bits=64, 6 at bits=32, 5 when
    bits - drop = 17: `gelu_cmp_plan`'s default at f = 16). Schedule:
      rounds 1..c: s_hi = [x > T] and s_lo = [x < -T] (compare.py; c = 6 at bits=64, 4 with
        `gelu_cmp_plan`'s 17-bit trees), and in parallel
        round 1: x G(x) at 3f bits from one opening of x - a (sine.x_sine_series),
        round 2: truncate it to f bits;
      last round: s_mid = 1 ^ s_hi ^ s_lo (local: the segments are disjoint, at most one
        of s_hi, s_lo is set), then s_mid * xG (compare.bit_mul) and s_hi * x, which reuses
        the opening of x - a from round 1 and so opens only s_hi's masked bit.
    For |x| > T, x G(x) is garbage (the series is periodic, and the 3f-bit product may even
    exceed the exact truncation's 2^62 bound); that is harmless because s_mid = 0 there and
    s_mid * z = 0 in the ring for every z.
    """
    f = ctx.f
    t = round(threshold * (1 << f))
    if form not in ("erf", "even"):
        raise ValueError(f"gelu_secformer: form must be 'erf' or 'even', got {form!r}")
    half = [b / 2 for b in coeffs]  # G = 1/2 + sum (beta_k / 2) sin(.)

    X = fused.as_pending(x)
    check_range(ctx, "GeLU's input |x| (its comparisons' range)", X, f, 0.0,
                ((1 << (bits - 1)) - (1 << drop)) / 2.0 ** f - threshold, magnitude=True)
    if X.pending and bits > 64 - X.k:
        X = Pending((yield from finish(ctx, X)))

    def g_path() -> Protocol:
        x = yield from finish(ctx, X)  # no round unless x is pending
        if form == "even":
            fe = f + GELU_EVEN_EXTRA_FRAC
            xg, opened = yield from x_cos_series(ctx, x, coeffs, period, const=const, x_coef=0.5,
                                                 trig_frac=fe, scale_frac=fe, bit_masks=1)
            xg = yield from trunc(ctx, xg, 2 * fe - f)  # 2f + 8 -> f
            return xg, opened
        xg, opened = yield from x_sine_series(ctx, x, half, period, const=0.5, bit_masks=1)
        xg = yield from trunc(ctx, xg, 2 * f)  # 3f -> f; |x G| <= T (1/2 + sum|beta|/2) here
        return xg, opened

    s_hi, s_lo, (xg, opened) = yield from parallel(
        gt_public(ctx, X.base, t, bits, drop), lt_public(ctx, X.base, -t, bits, drop), g_path())
    s_mid = not_bit(ctx, s_hi ^ s_lo)
    (mid,), (hi,) = yield from parallel(bit_mul(ctx, [s_mid], xg),
                                        bits_times_x(ctx, opened, [s_hi]))
    return mid + hi


# How far GeLU's segment thresholds may move (in value) so that its comparisons can drop
# low bits: 2^-5 makes them 17-bit carry trees at f = 16 and the shipped bound (4 rounds
# and 6.25 bytes per element instead of 5 and 12.25), for an extra error of at most
# |x| Phi(-|x|) ~ 1.5e-4 next to +-T (`gelu_secformer`). The default for programs whose
# approximation names no "window"; gelu.secformer's even form declares 2^-3 with its
# threshold at 4.125 (approx/gelu.py), so that a bound below ~28 gives 8-bit trees.
GELU_CMP_WINDOW = 2.0 ** -5


def gelu_cmp_plan(f: int, threshold: float, input_bound: float,
                  window: float = GELU_CMP_WINDOW) -> tuple[int, int]:
    """(bits, drop) for `gelu_secformer`'s comparisons: right for every |x| <= input_bound
    except within `window` of a threshold (see `gelu_secformer`).

    The tests are msb(T - x) and msb(x + T) with drop low bits dropped (compare.msb): they
    need V + 2^drop <= 2^(bits-1) for V = ceil((input_bound + T) 2^f), and the carry tree
    runs on n = bits - drop - 1 bits padded to a power of two. We take the smallest power n
    that any drop with 2^(drop - f) <= window allows, then the smallest drop that still
    reaches it (the narrowest window for that cost). At f = 16 and a bound of 1024 that
    is bits = 28, drop = 11 (n = 16: 4 rounds, 6.25 bytes per element and party per
    comparison); with window = 0 it is the exact width of before, bits = 33 (n = 32).
    Outside the bound a comparison reads a wrapped sign and the output is garbage, as for
    any input outside a protocol's declared range (nothing may branch on a secret).
    """
    if not input_bound > 0:
        raise ValueError(f"input_bound must be positive, got {input_bound}")
    v = math.ceil((input_bound + threshold) * 2.0 ** f)
    if v >= 1 << 62:
        raise ValueError(f"|x| <= {input_bound} at {f} fractional bits does not fit a 64-bit ring")
    max_drop = max(0, f + math.floor(math.log2(window))) if window > 0 else 0

    def width(drop: int) -> int:  # the carry tree's n for this drop
        n = 1
        while v + (1 << drop) > 1 << (n + drop):
            n *= 2
        return n

    n = width(max_drop)
    drop = next(d for d in range(max_drop + 1) if width(d) == n)
    if n + drop + 1 > 64:  # no narrower tree: the plain 64-bit comparison
        return 64, 0
    return n + drop + 1, drop


def gelu_cmp_from_params(params, f: int) -> tuple[int, int]:
    """(bits, drop) a compiled gelu.secformer node runs with (2PC rule and cost model).

    An explicit "bits" wins (with "drop", default 0); else "input_bound" (the
    approximation's declared comparison range) gives `gelu_cmp_plan` with the
    approximation's "window" (GELU_CMP_WINDOW for programs compiled before it existed);
    programs compiled before input_bound existed keep the full 64 bits they were compiled
    with."""
    if "bits" in params:
        return int(params["bits"]), int(params.get("drop", 0))
    if "input_bound" in params:
        return gelu_cmp_plan(f, float(params["threshold"]), float(params["input_bound"]),
                             float(params.get("window", GELU_CMP_WINDOW)))
    return 64, 0


def gelu_secformer_cost(shape, bits: int = 64, mode: str = "exact", drop: int = 0,
                        x_k: int = 0) -> Cost:
    """x_k: the shift left pending on x (fused.pending_k; 0: x is a finished share)."""
    pre = Cost()
    if x_k and bits > 64 - x_k:
        pre, x_k = fused.fused_round_cost((), [shape]), 0
    cmp = msb_cost(shape, bits, drop)
    g = ((trunc_cost(shape, mode) if x_k else Cost()) + x_sine_series_cost(shape)
         + trunc_cost(shape, mode))
    return pre + (cmp | cmp | g) + (bit_mul_cost([shape], shape) | bits_times_x_cost([shape]))


# --- GeLU with table segment tests --------------------------------------------------------------

# A segment-test table over x's high bits costs the dealer 2^b / 8 bytes per element and
# table (two tables): 128 bytes at b = 9 (BERT-base's FFN1 bound of 17), 512 at b = 11; past
# that the carry trees stay (an FFN1 of 393,216 elements would take 400 MB per layer).
GELU_TABLE_MAX_BITS = 10


def gelu_table_plan(f: int, threshold: float, input_bound: float, window: float) -> tuple[int, int] | None:
    """(w, b) for `gelu_secformer_table`: the index reads x at 2^-w = window resolution,
    b bits wide (signed, |x| + T + window below 2^(b-1-w)); None where the table would pass
    GELU_TABLE_MAX_BITS or the threshold is not a multiple of the window."""
    if not window > 0 or not input_bound > 0:
        return None
    w = -math.log2(window)
    if w != int(w) or not 0 <= w <= f or threshold * 2 ** w != int(threshold * 2 ** w):
        return None
    w = int(w)
    v = math.ceil((input_bound + threshold + window) * 2 ** w) + 1
    b = max(8, v.bit_length() + 1)
    return None if b > GELU_TABLE_MAX_BITS else (w, b)


def gelu_segment_tables(threshold: float, w: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_hi, s_mid) over the b-bit index q = floor(x 2^w) or one below (lookup's carry):
    s_hi = [q >= t - 1], s_mid = [-t <= q <= t - 2] for t = T 2^w (signed q). Then s_hi = 1
    for every x > T and only for x >= T - 2^-w; s_mid = 1 only for |x| < T, and for every x
    in [-T + 2^-w, T - 2^-w) (gelu_secformer's window, both ends)."""
    t = round(threshold * 2 ** w)
    q = torch.arange(1 << b, dtype=torch.int64)
    q = torch.where(q >= 1 << (b - 1), q - (1 << b), q)
    return (q >= t - 1).to(torch.int64), ((q >= -t) & (q <= t - 2)).to(torch.int64)


def gelu_secformer_table(ctx: Context, x: torch.Tensor | Pending, coeffs: Sequence[float], period: int,
                         threshold: float, w: int, b: int, const: float = 0.0) -> Protocol:
    """SecFormer GeLU (the even form) in 2 rounds: its segment tests by one table lookup
    (lookup.lookup_bits) instead of carry trees, and the series' truncation in the selection.

      round 1: the lookup of (s_hi, s_mid) from x's high bits (x's base: a pending x is
               x mod 2^(64-k) there, which is all the index reads), the series' opening of
               x - a (its trig part reads e mod 2^(f + log2 P), which the pending
               correction 2^(64-k) AB does not change), and x's own truncation round;
      round 2: s_mid * xG (compare.bit_mul_pending: xG's truncation rides on it) and
               s_hi * x (compare.bit_mul).
    The thresholds move by at most 2^-w towards zero, as in `gelu_secformer` (its window)."""
    f = ctx.f
    fe = f + GELU_EVEN_EXTRA_FRAC
    X = fused.as_pending(x)
    mb = f + int(math.log2(period))
    if X.pending and (X.k > 64 - max(mb, f - w + b)):
        X = Pending((yield from finish(ctx, X)))
    check_range(ctx, "GeLU's input |x| (its segment table's range)", X, f, 0.0,
                2.0 ** (b - 1 - w) - threshold - 2.0 ** -w, magnitude=True)
    hi_t, mid_t = gelu_segment_tables(threshold, w, b)
    (s_hi, s_mid), (xg, _), x_done = yield from parallel(
        lookup_bits(ctx, X.base, f - w, b, [hi_t, mid_t]),
        x_cos_series(ctx, X.base, coeffs, period, const=const, x_coef=0.5, trig_frac=fe,
                     scale_frac=fe),
        finish(ctx, X))
    # x_cos_series added x/2 from the base: add the pending correction's half too
    xg = xg + (x_done - X.base) * (1 << (2 * fe - f - 1))
    (mid,), (hi,) = yield from parallel(bit_mul_pending(ctx, [s_mid], begin(ctx, xg, 2 * fe - f)),
                                        bit_mul(ctx, [s_hi], x_done))
    return mid + hi


def gelu_table_from_params(params, f: int) -> tuple[int, int] | None:
    """(w, b) where a compiled gelu.secformer node runs `gelu_secformer_table` (2PC rule and
    cost model): the even form, compiled with lookup tables allowed ("lookup"), an input
    bound and a window that give a small enough table; None: the carry trees."""
    if not params.get("lookup") or params.get("form") != "even" or "bits" in params:
        return None
    if "input_bound" not in params or "window" not in params:
        return None
    return gelu_table_plan(f, float(params["threshold"]), float(params["input_bound"]),
                           float(params["window"]))


def gelu_secformer_table_cost(shape, w: int, b: int, period: int, f: int = 16, mode: str = "exact",
                              x_k: int = 0) -> Cost:
    """Cost of `gelu_secformer_table`; x_k: the shift pending on x (0: finished)."""
    pre = Cost()
    if x_k and x_k > 64 - max(f + int(math.log2(period)), f - w + b):
        pre, x_k = fused.fused_round_cost((), [shape]), 0
    first = lookup_cost(shape, b) | x_cos_series_cost(shape) | fused.fused_round_cost((), [shape] if x_k else [])
    k = pending_k(f + 2 * GELU_EVEN_EXTRA_FRAC, mode)  # xG at 2 fe bits to f
    sel = (bit_mul_pending_cost([shape], shape) if k else bit_mul_cost([shape], shape)) | bit_mul_cost([shape], shape)
    return pre + first + sel


# --- LayerNorm --------------------------------------------------------------------------------

_R_EXTRA = 12  # extra fractional bits of 1/sigma before the final product (see below)
# A raw LayerNorm output (`layernorm_goldschmidt(raw=True)`, deferral.py) keeps 1/sigma at
# f + RAW_EXTRA bits and y = Z r untruncated at 2f + RAW_EXTRA: a linear layer by it lands at
# 3f + RAW_EXTRA = 52 bits (f = 16), so its outputs must stay below 2^10 (GeLU's comparisons
# assume that of FFN1 anyway), and 1/sigma >= sqrt(p/3)/2 >= 2^-4 keeps 16 significant bits
# for prescales down to RAW_MIN_PRESCALE (var + eps up to 3/p = 192).
RAW_EXTRA = 4
RAW_MIN_PRESCALE = 2.0 ** -6


def layernorm_raw_frac(prescale: float, f: int) -> int | None:
    """Fractional bits of a raw LayerNorm output (2f + RAW_EXTRA), or None where one may not
    be used: f above 16 (the linear after it would pass 2^52) or a prescale below
    RAW_MIN_PRESCALE (1/sigma would lose precision at f + RAW_EXTRA bits)."""
    if 3 * f + RAW_EXTRA > 52 or prescale < RAW_MIN_PRESCALE:
        return None
    return 2 * f + RAW_EXTRA


def _ln_plan(n: int, prescale: float, f: int, center_first: bool) -> dict:
    """Public constants of one LayerNorm: every shift the protocol and its cost use.

    var_mult / 2^var_shift ~ prescale / n^2 (or / n when centered), rounded *down* so that
    p' var stays in the rsqrt domain; its bit count is capped by the overflow bound
    x0 2^(2f + var_shift) < 2^62 (x0 = p' var < 3, hence 2f + var_shift <= 59).
    """
    scale = n if center_first else n * n
    var_mult, var_shift = fixed_const(prescale / scale, max_shift=59 - 2 * f, round_down=True)
    p_eff = var_mult * scale / 2.0 ** var_shift
    j = 0 if center_first else n.bit_length() - 1  # D' = n d is rescaled by 2^-j (see below)
    y_mult, y_shift = fixed_const(math.sqrt(p_eff) * (1 << j) / (1 if center_first else n))
    return dict(var_mult=var_mult, var_shift=var_shift, p_eff=p_eff, j=j, y_mult=y_mult,
                y_shift=y_shift, r_frac=f + _R_EXTRA, mean_shift=46 - f)


def layernorm_needs_center_first(n: int, prescale: float, f: int = 16, gamma: float = 3.0, *,
                                 seeded: bool | None = None) -> bool:
    """Whether the one-pass LayerNorm cannot represent its constant p/n^2 (var + eps above
    ~3 2^(59 - 2f) / n^2, e.g. 2730 at n = 384: Quad GeLU's FFN outputs reach that), so the
    mean must be subtracted first (one more round; constant p/n, var up to 3 2^27 / n).
    With a seeded first step (gamma != 3) also where p/n^2 would be rounded down by more
    than goldschmidt.SEED_ROBUST: the seed was calibrated for p. seeded: whether the step is
    seeded (default: gamma != 3)."""
    if prescale / (n * n) < 2.0 ** -(59 - 2 * f):
        return True
    seeded = gamma != 3.0 if seeded is None else seeded
    return seeded and _ln_plan(n, prescale, f, False)["p_eff"] < prescale * (1 - SEED_ROBUST)


def layernorm_seeded_prescale(n: int, prescale: float, f: int = 16) -> float:
    """The prescale a LayerNorm with a seeded first step (gamma != 3) applies for `prescale`
    (folded with 1/n^2, or 1/n when it centres first, and rounded down); 0 where it cannot
    represent it at all. The seeded calibration skips prescales this lowers by more than
    goldschmidt.SEED_ROBUST (passes/approximate.py)."""
    try:
        centre = layernorm_needs_center_first(n, prescale, f, seeded=True)
        return layernorm_effective_prescale(n, prescale, f, centre)
    except ValueError:
        return 0.0


def layernorm_effective_prescale(n: int, prescale: float, f: int = 16,
                                 center_first: bool = False) -> float:
    """The prescale the protocol actually applies to var (<= prescale): calibrate with it."""
    return _ln_plan(n, prescale, f, center_first)["p_eff"]


def layernorm_commutes(iters: int) -> bool:
    """Whether a LayerNorm with `iters` rsqrt iterations gains from commuting: Z is finished
    in round 3, so Z W opens in round 4, which must come before the final round (iters + 2)."""
    return iters >= 3


@dataclass
class Commuted:
    """A raw LayerNorm output (`raw`, for the residual add) and, per linear layer after it,
    LN(x) W at f + raw.frac bits (`products`, by the linear's node name: as a linear by the
    raw output would carry) computed as r (Z W) + beta W: the row scaling r = 1/sigma
    commutes with a product on the right, so Z W runs beside the rsqrt iterations
    (`layernorm_goldschmidt(commute=...)`)."""

    raw: Raw
    products: dict[str, torch.Tensor]


def layernorm_goldschmidt(ctx: Context, x: torch.Tensor | Pending,
                          weight: torch.Tensor | FixedOperand | None,
                          bias: torch.Tensor | None, eps: float, prescale: float, iters: int,
                          center_first: bool = False, gamma: float = 3.0,
                          raw: bool = False,
                          commute: dict[str, FixedOperand] | None = None,
                          table_bits: int = 0, table_exp: int = 0) -> Protocol:
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias.

    x: a share, or a pending truncation (`trunc.Pending`: the linear layer before it left
    its truncation to this op's first round). weight: a FixedOperand (arith.fix_operand,
    the usual case: only x's mask is opened), a secret share, or None; bias: a share or
    None. prescale * (var + eps) must lie in the rsqrt domain (0, 3)
    (`layernorm_effective_prescale` gives the factor actually used). gamma: the rsqrt's
    first-step constant (a seeded first step, `rsqrt_core`). raw: return `trunc.Raw` at
    `layernorm_raw_frac` bits instead of the last round's truncation (the linear layers after
    it truncate once for both, deferral.py); 1/sigma is then kept at f + RAW_EXTRA bits.

    One pass (default), 3 + iters rounds (iters >= 1): with S = sum x and D' = n x - S = n d
    (local, exact), the variance comes from V = n sum x^2 - S^2 = n^2 var (at 2f bits)
    without computing the mean first:
      round 1: x^2 and S^2 (one opening of x and S; it finishes a pending x);
      rounds 2 .. iters + 1: r = rsqrt(x0) for x0 = trunc(V p'/n^2 + eps p'), with the
               public start y_0 = sqrt(p') 2^j / n, so that r = (2^j / n) / sqrt(var + eps);
               x0's truncation shares round 2 with the rsqrt's first opening, and each of
               the rsqrt's truncations the next opening (fused.py); beside them,
               D' * weight (round 2) and Z = trunc(D' w) by f + j, j = floor(log2 n)
               (round 3), so Z = (n / 2^j) d w at f bits (iters = 1: Z's truncation rides
               on the next round's product);
      round iters + 2: Z * r (Beaver, r broadcast; r's last truncation rides on it);
      round iters + 3: its truncation; + bias (local).
    commute (raw only; iters >= 3, or a table seed without weight): {name: W} of the linear
    layers that read the output.
    Their products come back with the raw output (`Commuted`) one round sooner: with
    LN(x) = Z r + beta (r per row), LN(x) W = r (Z W) + beta W, so Z W (and beta W
    beside them, a one-row product: each opens only its input minus a mask) runs in round 4,
    beside the rsqrt, and r (Z W) shares the final round with Z r (Beaver, r broadcast; r's
    last truncation rides on it). Z W stays untruncated (2f bits: no truncation to pay for
    and no error), so r (Z W) lands at 3f + RAW_EXTRA bits, where a linear by the raw output
    would: the consumers truncate the same. It opens Z W, the linear's output width, where
    the linear would open LN(x): more bytes, one round fewer. Overflow: |Z W| 2^(2f) < 2^62
    as Z's own product (n d w), and LN(x) W at 3f + RAW_EXTRA = 52 bits needs
    |LN(x) W| < 2^10, the raw path's bound.
    Overflow: the ring is exact mod 2^64, so the terms of V may wrap freely; only the
    truncated values must be below 2^62: V p'/n^2 at 2f + var_shift bits is x0 2^59 at
    most (x0 < 3: fine), n d w 2^(2f) needs |d w| < 2^30 / n, and the final product
    (d w / sigma) 2^(2f + 12) needs |d w / sigma| < 2^18. The catch is p'/n^2: its
    constant must be >= 2^-27, i.e. var < 3 2^27 / n^2 (682 for n = 768), and it has
    only log2(p 2^27 / n^2) bits, so p' is up to 1/mult below p (3% at p = 0.03 for
    n = 768: calibrate iterations at `layernorm_effective_prescale`). For large variances
    use center_first=True (one more round: the mean by a public round(2^k / n) with
    k = 46 - f, then d = x - mean; var < 3 2^27 / n; d^2 and D' * weight in one round; a
    pending x is finished first, in a round of its own).

    table_bits > 0 (one pass only): 1/sqrt from a table seed and `iters` Newton
    steps (lookup.rsqrt_table_core) instead of Goldschmidt: w = (var + eps) (n/2^j)^2 /
    2^table_exp is V + eps n^2 2^(2f) read at 2f + 2j + table_exp bits (no constant to
    round), and r = 2^(-table_exp/2) / sqrt(w) = (2^j / n) / sqrt(var + eps) as above.
    Rounds 1 + (1 + iters) + 1 (+ 1 unless raw): the lookup opens in round 2 beside D' w.
    With a table, commute needs weight None (passes/rounds.py, fold_layernorm_affine moves
    the gain into the linear layers): Z = trunc(D') by j finishes in round 2 beside the
    lookup, Z W opens in round 3 beside the Newton step, and r (Z W) comes with Z r in
    round 2 + iters (with a gain, Z's product and truncation end in round 3: no gain).
    """
    f = ctx.f
    X = fused.as_pending(x)
    n = X.shape[-1]
    plan = _ln_plan(n, prescale, f, center_first)
    if gamma != 3.0 and plan["p_eff"] < prescale * (1 - SEED_ROBUST):
        raise ValueError(f"LayerNorm over {n} features applies its prescale {prescale:g} as "
                         f"{plan['p_eff']:g}, more than 2^-6 below it, but its first Goldschmidt step "
                         f"(gamma {gamma}) was calibrated for {prescale:g}: calibrate it without a seed "
                         "(gamma 3) or for a larger prescale")
    fx = rsqrt_frac(f)
    if table_bits and (center_first or (commute and weight is not None)):
        raise ValueError("a table-seeded LayerNorm runs one pass, and commutes its scaling only "
                         "without a gain (passes/rounds.py: fold_layernorm_affine)")
    if commute and not raw:
        raise ValueError("a LayerNorm commutes its scaling past linear layers only with a raw output")
    if X.pending and (center_first or X.k > 32):  # see _variance_round; the mean needs x
        X = Pending((yield from finish(ctx, X)))
    if center_first:
        x = X.base
        s = x.sum(-1, keepdim=True)
        # mean = S round(2^k / n) / 2^k: error |S| 2^-k / 2, at most |mean| 2^(f + k) < 2^62
        k = plan["mean_shift"]
        mean = yield from trunc(ctx, s * round(2.0 ** k / n), k)
        d = x - mean

        def products() -> Protocol:
            sq = yield from arith.square(ctx, d)
            return sq.sum(-1, keepdim=True)  # n var at 2f bits

        v, (z, z_frac) = yield from parallel(products(), _ln_weighted(ctx, d, weight))
        zpath = finish(ctx, begin_rescale(ctx, z, z_frac + plan["j"], f))
    else:
        rnd, v = yield from _variance_round(ctx, X)  # finishes x when it is pending
        x = rnd.values[0]
        d = n * x - x.sum(-1, keepdim=True)  # n (x - mean), exact

        def zpath_() -> Protocol:  # beside the rsqrt: its product, then its truncation
            z, z_frac = yield from _ln_weighted(ctx, d, weight)
            Z = begin_rescale(ctx, z, z_frac + plan["j"], f)
            return (yield from finish(ctx, Z)) if iters >= 2 or table_bits else Z

        zpath = zpath_()
    if table_bits:
        r_frac = f + (RAW_EXTRA if raw else _R_EXTRA)
        w = ctx.add_public(v, round(eps * n * n * 2.0 ** (2 * f)))  # n^2 (var + eps) at 2f bits
        if commute:  # Z (no gain: a truncation, round 2), Z W in round 3, beside the rsqrt
            zpath = _commuted_products(ctx, zpath, bias, commute)
        z, r = yield from parallel(zpath, rsqrt_table_core(ctx, w, 2 * f + 2 * plan["j"] + table_exp,
                                                           table_bits, iters, table_exp // 2, r_frac))
        if commute:
            return (yield from _commuted_out(ctx, z, r, bias, r_frac, f))
        out = yield from fused.mul(ctx, z, r)  # finishes r's pending rescale in the same round
        if raw:
            return Raw(out if bias is None else out + (bias << r_frac), f + r_frac)
        out = yield from trunc(ctx, out, r_frac)
        return out if bias is None else out + bias
    vs = v * plan["var_mult"]  # p' var at 2f + var_shift bits
    vs = ctx.add_public(vs, round(eps * plan["p_eff"] * 2.0 ** (2 * f + plan["var_shift"])))
    # x0's truncation round is the rsqrt's first opening (fused.py)
    x0 = begin(ctx, vs, 2 * f + plan["var_shift"] - fx)
    r_frac = _ln_r_frac(plan, prescale, f, raw)
    if commute:
        if not layernorm_commutes(iters):
            raise ValueError("a Goldschmidt LayerNorm commutes its scaling past linear layers only "
                             f"with 3 or more rsqrt iterations (iters={iters})")
        zpath = _commuted_products(ctx, zpath, bias, commute)
    z, r = yield from parallel(zpath, rsqrt_core(ctx, x0, plan["y_mult"], plan["y_shift"],
                                                 iters, r_frac, gamma))
    if commute:
        return (yield from _commuted_out(ctx, z, r, bias, r_frac, f))
    out = yield from fused.mul(ctx, z, r)  # finishes r's pending rescale in the same round
    if raw:  # Z (f bits) times r (r_frac bits), for the consumer to truncate
        return Raw(out if bias is None else out + (bias << r_frac), f + r_frac)
    out = yield from trunc(ctx, out, r_frac)
    return out if bias is None else out + bias


def _ln_r_frac(plan: dict, prescale: float, f: int, raw: bool) -> int:
    if not raw:
        return plan["r_frac"]
    if layernorm_raw_frac(prescale, f) is None:
        raise ValueError(f"a raw LayerNorm output needs f <= 16 and a prescale >= {RAW_MIN_PRESCALE:g} "
                         f"(got f = {f}, prescale {prescale:g})")
    return f + RAW_EXTRA


def _commuted_out(ctx: Context, z, r, bias: torch.Tensor | None, r_frac: int, f: int) -> Protocol:
    """The commuted LayerNorm's last round: Z r (its raw output) and r (Z W) for each linear."""
    z, products = z
    names = list(products)
    # r's pending rescale is finished in this round by each product that reads it
    out, *scaled = yield from parallel(fused.mul(ctx, z, r),
                                       *(fused.mul(ctx, products[k][0], r) for k in names))
    # beta W (2f bits) to the products' 2f + r_frac
    res = {k: v if products[k][1] is None else v + (products[k][1] << r_frac)
           for k, v in zip(names, scaled)}
    return Commuted(Raw(out if bias is None else out + (bias << r_frac), f + r_frac), res)


def _commuted_products(ctx: Context, zpath: Protocol, bias: torch.Tensor | None,
                       commute: dict[str, FixedOperand]) -> Protocol:
    """Z (finished by `zpath`), then Z W and beta W for each W in one round:
    {name: (M, beta W)} with M = Z W and beta W at 2f bits (untruncated)."""
    z = yield from zpath
    ws = list(commute.values())
    # beta W as its own one-row product: a row appended to Z would take the int64 kernel off
    # its 128-row tiles (129 x 768 @ 768 x 3072: 29 ms against 26)
    ms = yield from parallel(*(arith.matmul_fixed(ctx, z, w) for w in ws),
                             *(arith.matmul_fixed(ctx, bias.reshape(1, -1), w) for w in ws if bias is not None))
    bw = ms[len(ws):] if bias is not None else [None] * len(ws)
    return z, {name: (m, b) for name, m, b in zip(commute, ms[:len(ws)], bw)}


def _ln_weighted(ctx: Context, d: torch.Tensor, weight) -> Protocol:
    """(D' weight, its fractional bits): one Beaver product, or D' itself without a gain."""
    if weight is None:
        return d, ctx.f
    if isinstance(weight, FixedOperand):
        z = yield from arith.mul_fixed(ctx, d, weight)
    else:
        z = yield from arith.mul(ctx, d, weight)
    return z, 2 * ctx.f


def _variance_round(ctx: Context, X: Pending) -> Protocol:
    """n^2 var = n sum x^2 - S^2 (S = sum x) from one round that opens x and S.

    x may be a pending truncation (a linear layer's output, mpc_interp's deferral): the round
    also finishes it (fused.py). S's opening is then e~_S + C with C = sum_j P_j, and
    S^2 = e~_S^2 + 2 e~_S C + 2 e~_S a_S + 2 C a_S + a_S^2 + C^2, where C a_S comes from the
    dealer's terms for AB_j a_S (a_S broadcast over the row) and C^2 = 2^(2 (64 - k)) (...)
    vanishes mod 2^64 for k <= 32 (the caller finishes x first otherwise).
    Returns (the round, n^2 var at 2f bits; its terms may wrap: only the sum matters).
    """
    n = X.shape[-1]
    s = X.base.sum(-1, keepdim=True)
    rnd = yield from fused.fused_round(ctx, [X, s], [0, 1], lambda a, b: [a * a, b * b],
                                       [RING, RING], cross=[(0, 1), (0, 0)])
    sq_x = fused.square(ctx, rnd, 0, 2)
    e, a = rnd.opened[1].e, rnd.mons[1]
    sq_s = ctx.add_public(2 * e * a + rnd.mons[3], e * e)
    if X.pending:
        sh = 64 - X.k
        c = rnd.opened[0].ab.sum(-1, keepdim=True) << sh
        ca = rnd.cross[(0, 1)].sum(-1, keepdim=True) << sh
        sq_s = sq_s + 2 * e * c + 2 * ca
    return rnd, n * sq_x.sum(-1, keepdim=True) - sq_s


def layernorm_goldschmidt_cost(shape, prescale: float, iters: int, weight: str = "fixed",
                               center_first: bool = False, f: int = 16,
                               mode: str = "exact", x_k: int = 0, raw: bool = False,
                               commute: Sequence[int] = (), bias: bool = True,
                               table_bits: int = 0, table_exp: int = 0) -> Cost:
    """weight: "fixed" (FixedOperand), "secret" (a share of shape (n,)) or "none";
    x_k: the shift left pending on x (fused.pending_k; 0: x is a finished share);
    raw: a `trunc.Raw` output (no final truncation); commute: the output widths of the
    linear layers it computes (`layernorm_goldschmidt(commute=...)`); bias: whether it has one
    (a commuted linear then also multiplies beta)."""
    n = shape[-1]
    rows = tuple(shape[:-1]) + (1,)
    plan = _ln_plan(n, prescale, f, center_first)
    t, t_rows = trunc_cost(shape, mode), trunc_cost(rows, mode)
    pre = Cost()
    if x_k and (center_first or x_k > 32):
        pre, x_k = fused.fused_round_cost((), [shape]), 0
    if weight == "fixed":
        wc, z_frac = arith.beaver_fixed_cost(shape), 2 * f
    elif weight == "secret":
        wc, z_frac = arith.beaver_cost(shape, (n,)), 2 * f
    elif weight == "none":
        wc, z_frac = Cost(), f
    else:
        raise ValueError(f"weight must be 'fixed', 'secret' or 'none', got {weight!r}")
    z_k = pending_k(z_frac + plan["j"] - f, mode)
    x0_k = pending_k(2 * f + plan["var_shift"] - rsqrt_frac(f), mode)
    if table_bits:
        r_frac = f + (RAW_EXTRA if raw else _R_EXTRA)
        r_k = rsqrt_table_out_k(table_bits, table_exp // 2, r_frac, mode)
        rsqrt = rsqrt_table_core_cost(rows, table_bits, iters, mode, 2 * f + 2 * plan["j"] + table_exp)
    else:
        r_frac = _ln_r_frac(plan, prescale, f, raw)
        r_k = rsqrt_core_out_k(plan["y_shift"], iters, r_frac, f, mode)
        rsqrt = rsqrt_core_cost(rows, plan["y_shift"], iters, r_frac, f, mode, x0_k)
    if center_first:
        pre = pre + t_rows + (arith.square_cost(shape) | wc)
        zpath = trunc_cost(shape, mode) if z_k else Cost()
        z_k = 0
    else:
        pre = pre + fused.fused_round_cost([shape, rows], [shape] if x_k else [])
        zpath = wc + (trunc_cost(shape, mode) if z_k and (iters >= 2 or table_bits) else Cost())
        if iters >= 2 or table_bits:
            z_k = 0
    last = fused.mul_cost(shape, z_k, rows, r_k)
    if commute:
        products = Cost()
        for width in commute:  # Z W and beta W, in one round after Z's
            products = products | arith.beaver_fixed_cost(shape)
            if bias:
                products = products | arith.beaver_fixed_cost((1, n))
            last = last | fused.mul_cost(tuple(shape[:-1]) + (width,), 0, rows, r_k)
        zpath = zpath + products
    return pre + (zpath | rsqrt) + last + (Cost() if raw else t)


# --- 2Quad softmax ----------------------------------------------------------------------------

def _softmax_plan(prescale: float, f: int) -> tuple[int, int, int]:
    mult, shift = prescale_const(prescale)
    # the row sum times mult is p' sum < 2 at 2f + shift bits: below 2^62 needs 2f + shift <= 60
    if 2 * f + shift > 60:
        raise ValueError(f"prescale {prescale} is too small for {f} fractional bits")
    return mult, shift, 2 * f + 12  # 1/sum is kept at 2f + 12 bits: q/sum <= 1 at 3f + 12 < 2^62


@dataclass
class QuadRows:
    """2Quad after its first round, rows along the last dim: q2 = (x + c)^2 * mask at 2f
    bits (not yet truncated) and y0 = trunc(p' sum q2), left pending on the reciprocal's
    first opening. `softmax_2quad` normalizes it at once; `softmax_2quad_matmul` multiplies
    by V first and normalizes the smaller product."""

    q2: torch.Tensor
    y0: Pending
    mult: int
    shift: int
    iters: int
    dim: int  # the softmax dim of the caller's layout (q2 has it moved last)
    gamma: float = 2.0  # the reciprocal's first-step constant (reciprocal_core)
    table_bits: int = 0  # > 0: the reciprocal is table-seeded Newton (lookup.py), iters its steps
    s: torch.Tensor | None = None  # p' sum at 2f + shift bits (the table's index reads it)


def _row_reciprocal(ctx: Context, rows: QuadRows, r_frac: int) -> Protocol:
    """1/sum at r_frac bits, pending: Goldschmidt (goldschmidt.reciprocal_core) or, with
    table_bits, a table seed and rows.iters Newton steps (lookup.reciprocal_table_core)."""
    if rows.table_bits:
        return (yield from reciprocal_table_core(ctx, rows.s, 2 * ctx.f + rows.shift, rows.y0, rows.mult,
                                                 rows.shift, rows.table_bits, rows.iters, r_frac))
    return (yield from reciprocal_core(ctx, rows.y0, rows.mult, rows.shift, rows.iters, r_frac, rows.gamma))


def _row_reciprocal_cost(rows, mult: int, shift: int, iters: int, r_frac: int, f: int, mode: str,
                         gamma: float, table_bits: int) -> tuple[Cost, int]:
    """(cost up to the pending result, the result's pending shift) of `_row_reciprocal`."""
    if table_bits:
        u0_k = pending_k(2 * f + shift - table_fracs(table_bits)[0], mode)
        return (reciprocal_table_core_cost(rows, table_bits, iters, mode, u0_k),
                reciprocal_table_out_k(table_bits, shift, r_frac, mode))
    y0_k, r_k = _recip_pending_ks(mult, shift, iters, r_frac, f, mode, gamma)
    return reciprocal_core_cost(rows, mult, shift, iters, r_frac, f, mode, y0_k, gamma), r_k


def softmax_2quad_rows(ctx: Context, x: torch.Tensor | Pending, dim: int = -1, c: float = 5.0,
                       mask: torch.Tensor | None = None, *, prescale: float,
                       iters: int, gamma: float = 2.0, table_bits: int = 0) -> Protocol:
    """Round 1 of 2Quad: (x + c)^2 (Beaver square at 2f bits; it finishes a pending x), masked
    by a local product, and the pre-scaled row sum ready for the reciprocal (`QuadRows`)."""
    f = ctx.f
    mult, shift, _ = _softmax_plan(prescale, f)
    shape = x.shape
    X = fused.as_pending(x).map(lambda t: t.movedim(dim, -1))
    X = Pending(ctx.add_public(X.base, round(c * (1 << f))), X.k, X.own)  # x + c
    rnd = yield from fused.fused_round(ctx, [X], [0], lambda a: [a * a], [RING], cross=[(0, 0)])
    q2 = fused.square(ctx, rnd, 0, 1)
    if mask is not None:  # public 0/1, broadcast against x (local product)
        q2 = q2 * ctx.pub(torch.as_tensor(mask).to(torch.int64).expand(shape).movedim(dim, -1))
    s = q2.sum(-1, keepdim=True) * mult  # p' sum at 2f + shift bits
    # y0's truncation round is the reciprocal's first opening (fused.py)
    if table_bits:
        y0 = begin_rescale(ctx, s, 2 * f + shift, table_fracs(table_bits)[0])
        return QuadRows(q2, y0, mult, shift, iters, dim, gamma, table_bits, s)
    y0 = begin_rescale(ctx, s, 2 * f + shift, recip_fracs(f, mult, iters, gamma)[0])
    return QuadRows(q2, y0, mult, shift, iters, dim, gamma)


def softmax_2quad(ctx: Context, x: torch.Tensor | Pending, dim: int = -1, c: float = 5.0,
                  mask: torch.Tensor | None = None, *, prescale: float, iters: int,
                  gamma: float = 2.0, table_bits: int = 0) -> Protocol:
    """2Quad: q / sum(q) with q = (x + c)^2 * mask; mask is a public 0/1 tensor (broadcast).

    x may be a pending truncation (the scores' product left its truncation to round 1).
    gamma: the reciprocal's first-step constant (a seeded first step, `reciprocal_core`).
    Masked positions contribute 0 (DESIGN.md), not (-large + c)^2. prescale * row sum must
    lie in goldschmidt.RECIPROCAL_DOMAIN (approximations.choose_goldschmidt picks it from a
    declared row-sum range; a power of two is exact and allows p sum down to 2^-16).
    Rounds 3 + iters (iters >= 1):
      round 1: (x + c)^2 (Beaver square, 2f bits; it finishes a pending x), masked by a
               local product (`softmax_2quad_rows`);
      rounds 2 .. iters + 1: r = 1/sum from the Goldschmidt reciprocal, kept at 2f + 12
               bits (1/sum is small: f bits alone would lose its relative precision); the
               pre-scaled row sum trunc(p' sum) shares round 2 with the reciprocal's first
               opening (the prescale rides on a truncation that the sum needs anyway), and
               each of its truncations the next opening (fused.py); q = trunc(.) runs
               beside round 2;
      round iters + 2: q r (Beaver, r broadcast over the row; r's last truncation rides on it);
      round iters + 3: its truncation.
    """
    f = ctx.f
    rows = yield from softmax_2quad_rows(ctx, x, dim, c, mask, prescale=prescale, iters=iters,
                                         gamma=gamma, table_bits=table_bits)
    r_frac = _softmax_plan(prescale, f)[2]
    q, r = yield from parallel(trunc(ctx, rows.q2, f), _row_reciprocal(ctx, rows, r_frac))
    out = yield from fused.mul(ctx, q, r)  # finishes r's pending rescale in the same round
    out = yield from trunc(ctx, out, r_frac)
    return out.movedim(-1, dim)


def attend_r_frac(shift: int, f: int) -> int:
    """Fractional bits of 1/sum when it scales 2Quad(x) @ V (`softmax_2quad_matmul`).

    The row sum is below 2^(shift + 1) (p' sum < 2, p' >= 2^-shift), so f + shift + 3 bits
    keep 1/sum's relative precision at 2^-(f + 2) or better, as 2f + 12 does for the plain
    softmax. Fewer bits than that are what leave room for the output: (q V) r carries
    f + r_frac bits and must stay below 2^62 (`softmax_2quad_matmul`)."""
    return min(f + shift + 3, 2 * f + 12)


def attend_out_bound(shift: int, f: int) -> float:
    """The largest |V| (hence |2Quad(x) @ V|, a convex combination of V's rows) for which
    `softmax_2quad_matmul` cannot overflow: |V| sum < 2^(62 - 2f) for q V at 2f bits, and
    |out| 2^(f + r_frac) < 2^62 for the normalized product."""
    return min(2.0 ** (62 - 2 * f - shift - 1), 2.0 ** (62 - f - attend_r_frac(shift, f)))


def softmax_2quad_matmul(ctx: Context, rows: QuadRows, v: torch.Tensor) -> Protocol:
    """2Quad(x) @ v with the normalization moved after the product: (q v) / sum(q).

    Why: the row scaling commutes with the product (diag(1/sum) q v), so q v (one Beaver
    matmul) runs beside the Goldschmidt reciprocal instead of after it, and the scaling
    multiplies the (.., rows, d_v) product instead of the (.., rows, rows) probabilities.
    Rounds after `softmax_2quad_rows`: max(iters, 2) + 2 instead of iters + 2 + 2 for
    2Quad followed by its matmul (iters >= 2):
      round 1: q = trunc(q2) beside the reciprocal's first opening;
      round 2: q v's opening (its truncation is left pending), beside the reciprocal;
      round max(iters, 2) + 1: (q v) r (Beaver, r broadcast over the row; both pending
               truncations ride on its opening);
      round max(iters, 2) + 2: its truncation by r_frac (`attend_r_frac`).
    Domain: |v| below `attend_out_bound` (2^13 for BERT-base at seq 128); v must be a
    finished share, and 2Quad's dim the last one (rows of q are rows of q v).
    """
    f = ctx.f
    if rows.dim not in (-1, rows.q2.dim() - 1):
        raise ValueError(f"2Quad @ V needs the softmax over the last dim (got dim {rows.dim}): "
                         "its row sums must be the rows of q @ V")
    r_frac = attend_r_frac(rows.shift, f)
    check_range(ctx, "|V| under 2Quad's normalized product", v, f, 0.0, attend_out_bound(rows.shift, f),
                magnitude=True)

    def qv() -> Protocol:
        q = yield from trunc(ctx, rows.q2, f)
        d = yield from arith.matmul(ctx, q.movedim(-1, rows.dim), v)
        return begin(ctx, d, f)

    d, r = yield from parallel(qv(), _row_reciprocal(ctx, rows, r_frac))
    out = yield from fused.mul(ctx, d, r)  # finishes both pending truncations
    return (yield from trunc(ctx, out, r_frac))


def _recip_pending_ks(mult: int, shift: int, iters: int, r_frac: int, f: int, mode: str,
                      gamma: float) -> tuple[int, int]:
    """The shifts 2Quad's reciprocal leaves pending: on y0 (the pre-scaled row sum, finished
    by its first opening) and on its result r (finished by the product that uses it)."""
    y0_k = pending_k(2 * f + shift - recip_fracs(f, mult, iters, gamma)[0], mode)
    return y0_k, reciprocal_core_out_k(mult, shift, iters, r_frac, f, mode, gamma)


def softmax_2quad_rows_cost(shape, x_k: int = 0) -> Cost:
    """Cost of `softmax_2quad_rows` (round 1); x_k: the shift pending on x (0: finished)."""
    return fused.fused_round_cost([tuple(shape)], [tuple(shape)] if x_k else [])


def softmax_2quad_cost(shape, prescale: float, iters: int, dim: int = -1, f: int = 16,
                       mode: str = "exact", x_k: int = 0, gamma: float = 2.0,
                       table_bits: int = 0) -> Cost:
    """x_k: the shift left pending on x (fused.pending_k; 0: x is a finished share)."""
    shape = list(shape)
    n = shape.pop(dim if dim >= 0 else len(shape) + dim)
    full, rows = tuple(shape) + (n,), tuple(shape) + (1,)
    mult, shift, r_frac = _softmax_plan(prescale, f)
    t = trunc_cost(full, mode)
    recip, r_k = _row_reciprocal_cost(rows, mult, shift, iters, r_frac, f, mode, gamma, table_bits)
    return softmax_2quad_rows_cost(full, x_k) + (t | recip) + fused.mul_cost(full, 0, rows, r_k) + t


def softmax_2quad_matmul_cost(q_shape, v_shape, prescale: float, iters: int, f: int = 16,
                              mode: str = "exact", gamma: float = 2.0, table_bits: int = 0) -> Cost:
    """Cost of `softmax_2quad_matmul` after `softmax_2quad_rows` (q_shape: 2Quad's output,
    normalized dim last; v_shape: V's)."""
    q_shape, v_shape = tuple(q_shape), tuple(v_shape)
    rows = q_shape[:-1] + (1,)
    out = tuple(torch.broadcast_shapes(q_shape[:-2], v_shape[:-2])) + (q_shape[-2], v_shape[-1])
    mult, shift, _ = _softmax_plan(prescale, f)
    r_frac = attend_r_frac(shift, f)
    recip, r_k = _row_reciprocal_cost(rows, mult, shift, iters, r_frac, f, mode, gamma, table_bits)
    qv = trunc_cost(q_shape, mode) + arith.beaver_cost(q_shape, v_shape)
    return (qv | recip) + fused.mul_cost(out, pending_k(f, mode), rows, r_k) + trunc_cost(out, mode)
