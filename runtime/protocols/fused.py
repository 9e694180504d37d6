"""A product's opening and the truncations it waits for, in one round.

Why: SecFormer's Goldschmidt iterations (2Quad's 1/sum, LayerNorm's 1/sqrt) are chains of
products, and each product's result is truncated (one round, trunc.py) before the next
product can open it: two rounds per iteration, half of them truncations. A truncation's
result is base + P with a local base and P = 2^(64-k) AB, where AB is the AND of two
privately held bits (trunc.Pending). So the next product opens e~ = base - mask in the
same round as the bits are swapped; afterwards both parties know e~ and hold shares of AB,
and the true opening is e = e~ + P, a public value plus a secret one. Every place the
Beaver formulas use e becomes e~ plus a correction that is linear in AB:
  * e~ * (a share)  and  P * (public)           local;
  * P * m for a dealer monomial m (the mask a, a^2, another operand's mask c): shares of
    AB m = alpha beta m + alpha (1 - 2 beta) vm + beta (1 - 2 alpha) um + sign uvm, with um,
    vm, uvm shared by the dealer mod 2^k (P's factor 2^(64-k) drops everything above);
  * P^i = 2^(i (64 - k)) AB (AB is a bit), zero once i (64 - k) >= 64;
  * P_x P_y for two different truncations needs (64 - kx) + (64 - ky) >= 64, i.e.
    kx + ky <= 64 (then it vanishes mod 2^64); `product` refuses other pairs, and `settle`
    finishes such a pair first, in a round of its own.
The results are exactly those of truncating first and multiplying after (the same ring
values), one round sooner. Across ops, secformer_compiler/deferral.py decides which
producers hand their truncation to the next op this way.

Security: what is sent is what the two rounds sent apart: base - mask with a fresh uniform
ring mask, and the truncation's bits masked by fresh uniform bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Callable, Sequence

import torch

from ..context import P0, Context
from ..correlations import RING, Dom, derived_shapes, mod_dom
from ..messages import ADD, SWAP, Msg, Protocol, parallel
from ..packing import packed_nbytes
from .arith import numel
from .cost import Cost
from .trunc import Pending, and_share, bit_sources, finish, masked_bit


@dataclass
class Opened:
    """A value opened against a mask in a fused round: value = e~ + P + mask."""

    e: torch.Tensor  # public e~ = base - mask
    mask: torch.Tensor  # this party's share of the mask
    k: int = 0  # the truncation's shift (0: nothing pending, P = 0)
    ab: torch.Tensor | None = None  # this party's share of AB (mod 2^k)


@dataclass
class Round:
    """What a fused round leaves: finished values, openings, monomials and corrections."""

    values: list[torch.Tensor]
    opened: list[Opened]
    mons: list[torch.Tensor]  # shares of the masks (in `opened` order), then of `derive`'s values
    cross: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # AB_v m_j shares
    which: list[int] = field(default_factory=list)  # value index of each opened entry


def as_pending(v: Pending | torch.Tensor) -> Pending:
    return v if isinstance(v, Pending) else Pending(v)


def fused_round(ctx: Context, values: Sequence[Pending | torch.Tensor], opened: Sequence[int],
                derive: Callable[..., Sequence[torch.Tensor]] | None = None,
                out_doms: Sequence[Dom] = (), cross: Sequence[tuple[int, int]] = ()) -> Protocol:
    """Finish `values` (pending truncations or plain shares) and open values[i] - mask_i for
    i in `opened`, in one round.

    derive(*masks) gives further dealer values (a^2, c a, ...) in `out_doms`; the monomials
    are the masks then derive's values. cross: (value index, monomial index) pairs for which
    AB_value * monomial is needed (skipped when that value has nothing pending).
    """
    pend = [as_pending(v) for v in values]
    live = [i for i, p in enumerate(pend) if p.pending]
    cross = [(i, j) for i, j in cross if pend[i].pending]
    n_masks = len(opened)

    def dealer(*src):
        masks, bits = src[:n_masks], src[n_masks:]
        extra = list(derive(*masks)) if derive is not None else []
        mons = list(masks) + extra
        uv = {i: (bits[2 * t], bits[2 * t + 1]) for t, i in enumerate(live)}
        out = extra + [uv[i][0] * uv[i][1] for i in live]
        for i, j in cross:
            u, v = uv[i]
            out += [u * mons[j], v * mons[j], u * v * mons[j]]
        return out

    sources = [(pend[i].shape, RING) for i in opened]
    for i in live:
        sources += bit_sources(pend[i])
    doms = list(out_doms) + [mod_dom(pend[i].k) for i in live]
    for i, _ in cross:
        doms += [mod_dom(pend[i].k)] * 3
    # the derived values' shapes, without running `dealer` on meta tensors in every role
    mask_shapes = [tuple(pend[i].shape) for i in opened]
    extra_shapes = derived_shapes(derive, mask_shapes) if derive is not None else []
    mon_shapes = mask_shapes + extra_shapes
    shapes = extra_shapes + [tuple(pend[i].shape) for i in live]
    for i, j in cross:
        shapes += [tuple(torch.broadcast_shapes(pend[i].shape, mon_shapes[j]))] * 3
    shares = ctx.corr.correlated(sources, dealer, doms, zero_at_zero=True, out_shapes=shapes)
    masks = shares[:n_masks]
    bits = shares[n_masks:n_masks + 2 * len(live)]
    rest = shares[n_masks + 2 * len(live):]
    extra, rest = rest[:len(out_doms)], rest[len(out_doms):]
    uvs, rest = rest[:len(live)], rest[len(live):]

    mine = {i: masked_bit(ctx, pend[i], bits[2 * t], bits[2 * t + 1]) for t, i in enumerate(live)}
    msgs = []
    if opened:
        msgs.append(Msg([pend[i].base - m for i, m in zip(opened, masks)], ADD, 64))
    if live:
        msgs.append(Msg([mine[i] for i in live], SWAP, 1))
    replies = yield msgs
    es = replies[0] if opened else []
    theirs = dict(zip(live, replies[-1])) if live else {}

    ab = {i: and_share(ctx, pend[i], mine[i], theirs[i], uvs[t]) for t, i in enumerate(live)}
    done = [p.base + (ab[i] << (64 - p.k)) if p.pending else p.base for i, p in enumerate(pend)]
    mons = list(masks) + list(extra)
    out = Round(done, [Opened(e, m, pend[i].k, ab.get(i)) for i, e, m in zip(opened, es, masks)],
                mons, which=list(opened))
    for t, (i, j) in enumerate(cross):
        um, vm, uvm = rest[3 * t:3 * t + 3]
        out.cross[(i, j)] = _and_times(ctx, mine[i], theirs[i], mons[j], um, vm, uvm)
    return out


def _and_times(ctx: Context, mine, theirs, m, um, vm, uvm) -> torch.Tensor:
    """Shares of AB m: alpha beta m + alpha (1 - 2 beta) vm + beta (1 - 2 alpha) um + sign uvm."""
    alpha, beta = (mine, theirs) if ctx.party == P0 else (theirs, mine)
    # Expanded in the bits: uvm + alpha (vm - 2 uvm) + beta (um - 2 uvm)
    # + alpha beta (m - 2 vm - 2 um + 4 uvm), each product by a bit taken as an AND with its
    # all-ones mask -bit (int64 products are the slow part; 20% faster than the formula).
    A, B = -alpha, -beta
    d = uvm + uvm
    x, y = vm - d, um - d
    z = (m - x - x).sub_(y).sub_(y).sub_(d).sub_(d)
    return (x & A).add_(y & B).add_(z & (A & B)).add_(uvm)


def fused_round_cost(opened: Sequence, pending: Sequence) -> Cost:
    """One round: 8 bytes per opened element, one bit (packed) per pending element."""
    return Cost(1, sum(8 * numel(s) for s in opened)
                + sum(packed_nbytes(numel(s), 1) for s in pending))


# --- the Beaver formulas with e = e~ + P ---------------------------------------------------------

def correction(rnd: Round, o: int, mon: int | None = None, power: int = 1) -> torch.Tensor | None:
    """Shares of P^power * m (m = monomial `mon`, or 1) for opened entry `o`; None if zero."""
    op = rnd.opened[o]
    shift = power * (64 - op.k)
    if op.ab is None or shift >= 64:
        return None
    t = op.ab if mon is None else rnd.cross[(rnd.which[o], mon)]
    return t << shift


def power_times(ctx: Context, rnd: Round, o: int, j: int, mon: int | None = None) -> torch.Tensor:
    """Shares of e^j * m for opened entry `o` (e = e~ + P) and monomial `mon` (None: 1), j >= 0.

    e^j = sum_i C(j, i) e~^(j - i) P^i; the i = 0 term times m is e~^j m (public times a
    share; public alone when m = 1), the others come from `correction`.
    """
    e = rnd.opened[o].e
    ej = e if j == 1 else e ** j  # j = 0: ones (just m, or the public 1)
    out = ctx.add_public(torch.zeros_like(e), ej) if mon is None else ej * rnd.mons[mon]
    for i in range(1, j + 1):
        c = correction(rnd, o, mon, i)
        if c is not None:
            out = out + (comb(j, i) * e ** (j - i) * c if j > i else c)
    return out


def square(ctx: Context, rnd: Round, o: int, a2: int) -> torch.Tensor:
    """x^2 for x = e + a (opened entry `o`, mask monomial o; a2: index of a^2)."""
    return power_times(ctx, rnd, o, 2) + 2 * power_times(ctx, rnd, o, 1, o) + rnd.mons[a2]


def product(ctx: Context, rnd: Round, ox: int, oy: int, ca: int) -> torch.Tensor:
    """x y for x = g + c, y = e + a (opened entries ox, oy; ca: index of c a).

    x y = g e + g a + c e + c a; with g = g~ + Px, e = e~ + Py:
    g e = g~ e~ + g~ Py + e~ Px + Px Py (zero mod 2^64 when kx + ky <= 64), g a = g~ a + Px a,
    c e = c e~ + Py c.
    """
    X, Y = rnd.opened[ox], rnd.opened[oy]
    if X.ab is not None and Y.ab is not None and X.k + Y.k > 64:
        raise ValueError(f"fused product of two truncations by {X.k} and {Y.k} bits: their "
                         "corrections' product does not vanish (needs kx + ky <= 64)")
    g, e = X.e, Y.e
    out = ctx.add_public(g * rnd.mons[oy] + rnd.mons[ox] * e + rnd.mons[ca], g * e)
    for term in (_times(correction(rnd, oy), g), _times(correction(rnd, ox), e),
                 correction(rnd, ox, oy), correction(rnd, oy, ox)):
        if term is not None:
            out = out + term
    return out


def _times(c: torch.Tensor | None, pub: torch.Tensor) -> torch.Tensor | None:
    return None if c is None else c * pub


def fusable(x: Pending, y: Pending) -> bool:
    """Whether a product of x and y may take both truncations' rounds (see `product`)."""
    return not (x.pending and y.pending and x.k + y.k > 64)


def settle(ctx: Context, x: Pending | torch.Tensor, y: Pending | torch.Tensor) -> Protocol:
    """x and y as they may enter one fused product: both finished in a round of their own
    when their corrections' product would not vanish (`fusable`), else unchanged."""
    x, y = as_pending(x), as_pending(y)
    if fusable(x, y):
        return x, y
    xv, yv = yield from parallel(finish(ctx, x), finish(ctx, y))
    return Pending(xv), Pending(yv)


def settle_cost(x_shape, kx: int, y_shape, ky: int) -> Cost:
    if kx and ky and kx + ky > 64:
        return fused_round_cost((), (x_shape, y_shape))
    return Cost()


def mul(ctx: Context, x: Pending | torch.Tensor, y: Pending | torch.Tensor) -> Protocol:
    """Elementwise x y (broadcasting) of two values that may be pending truncations: one
    round that also finishes them (plus one when `settle` must finish them first)."""
    x, y = yield from settle(ctx, x, y)
    rnd = yield from fused_round(ctx, [x, y], [0, 1], lambda a, b: [a * b], [RING],
                                 cross=[(0, 1), (1, 0)])
    return product(ctx, rnd, 0, 1, 2)


def mul_cost(x_shape, kx: int, y_shape, ky: int) -> Cost:
    """Cost of `mul`; kx, ky: the operands' pending shifts (0: nothing pending)."""
    settled = settle_cost(x_shape, kx, y_shape, ky)
    if settled.rounds:
        kx = ky = 0
    return settled + fused_round_cost((x_shape, y_shape),
                                      [s for s, k in ((x_shape, kx), (y_shape, ky)) if k])


def pending_k(k: int, mode: str) -> int:
    """The shift a truncation by k leaves pending in `mode` (0: none; local mode is local)."""
    return k if k > 0 and mode != "local" else 0
