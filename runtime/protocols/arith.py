"""Arithmetic protocols: sharing, opening, linear ops and Beaver products (mul, square, matmul).

Beaver (one round): with a dealer triple (a, b, c = a*b), both parties open e = x - a and
f = y - b; then x*y = c + e*b + a*f + e*f, where e*f is added by P0 only. For a fixed
weight W (issue 2), the masked weight F = W - B is opened once when the weights are
loaded and reused by every inference, which draws a fresh activation mask A and gets
C = A @ B from the dealer: only E = X - A is opened per inference. Since
X @ W = E @ W + A @ F + C and A does not depend on the input, each party computes its
share of A @ F offline (correlations.PartyCorrelations.prepare_products); online it
does one product, E @ W_i, where W_i = B_i (+ F at P0) is its share of W.

Products of fixed-point values carry 2f fractional bits; callers truncate (trunc.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..context import CLEAR, P0, Context
from ..correlations import RING
from ..messages import SWAP, Msg, Protocol, open_add
from ..ring import SplitOperand, ring_matmul
from .cost import Cost

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def numel(shape) -> int:
    return int(torch.Size(shape).numel())


# --- sharing and opening -------------------------------------------------------------

def share(ctx: Context, x: torch.Tensor | None, owner: int, shape) -> Protocol:
    """Secret-share a ring tensor held by `owner`; the other party passes None. One round."""
    other = 1 - owner
    if ctx.mode == CLEAR:
        yield [Msg([ctx.zeros(shape)], SWAP, to=other)]
        return x
    if ctx.is_dealer:
        yield [Msg([ctx.zeros(shape)], SWAP, to=other)]
        return ctx.zeros(shape)
    if ctx.party == owner:
        if x is None or tuple(x.shape) != tuple(shape):
            raise ValueError(f"share: the owner must pass a tensor of shape {tuple(shape)}")
        r = ctx.private.ring(shape)  # uniform in the ring: the peer's share reveals nothing
        yield [Msg([r], SWAP, to=other)]
        return x - r
    res = yield [Msg([ctx.zeros(shape)], SWAP, to=other)]
    return res[0][0]


def share_cost(shape) -> Cost:
    return Cost(1, 8 * numel(shape))  # the owner sends; the receiver sends nothing


def reveal(ctx: Context, x: torch.Tensor, to: int | None = None) -> Protocol:
    """Open x to both parties (to=None) or to one of them (the other gets None). One round."""
    res = yield from open_add(x, to=to)
    return None if res is None else res[0]


def reveal_cost(shape) -> Cost:
    return Cost(1, 8 * numel(shape))


# --- local ops -------------------------------------------------------------------------

def add_public(ctx: Context, x: torch.Tensor, c) -> torch.Tensor:
    """x + c for a public ring value c (local)."""
    return ctx.add_public(x, c)


def mul_public(ctx: Context, x: torch.Tensor, c: torch.Tensor | int) -> torch.Tensor:
    """x * c for a public ring integer (no truncation; the caller rescales). Local."""
    return x * ctx.pub(c)


def matmul_public(ctx: Context, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w for a public ring matrix w (local, exact mod 2^64)."""
    return ring_matmul(x, ctx.pub(w))


# --- Beaver products ---------------------------------------------------------------------

def _beaver(ctx: Context, x: torch.Tensor, y: torch.Tensor, op: Op) -> Protocol:
    a, b, c = ctx.corr.correlated([(x.shape, RING), (y.shape, RING)],
                                  lambda a, b: [op(a, b)], [RING], zero_at_zero=True)
    e, f = yield from open_add(x - a, y - b)
    # x*y = x*f + e*b + c, with x = e + a (each party uses its own share of x): the local
    # terms are the party's shares of x*f, e*b and c, so no public product is added twice.
    return op(x, f) + op(e, b) + c


def mul(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> Protocol:
    """Elementwise x*y (broadcasting), one round, result at the sum of the input scales."""
    return (yield from _beaver(ctx, x, y, torch.mul))


def matmul(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> Protocol:
    """x @ y for two secrets (batched like torch.matmul), one round."""
    return (yield from _beaver(ctx, x, y, ring_matmul))


def beaver_cost(x_shape, y_shape) -> Cost:
    return Cost(1, 8 * (numel(x_shape) + numel(y_shape)))


def square(ctx: Context, x: torch.Tensor) -> Protocol:
    """x*x with one opening: (e + a)^2 = e^2 + 2ea + a^2."""
    a, c = ctx.corr.correlated([(x.shape, RING)], lambda a: [a * a], [RING], zero_at_zero=True)
    (e,) = yield from open_add(x - a)
    z = 2 * e * a + c
    return ctx.add_public(z, e * e)


def square_cost(shape) -> Cost:
    return Cost(1, 8 * numel(shape))


# --- fixed (weight) operands ----------------------------------------------------------------

FIXED_OPERANDS = "fixed_operands"  # ctx.state key: {key: FixedOperand} of the loaded weights


@dataclass
class FixedOperand:
    """A secret operand whose mask B is fixed: F = W - B is public, B_i is this party's share."""

    key: str
    masked: torch.Tensor | SplitOperand  # F = W - B (public; as ring.public_operand keeps it)
    # this party's share of W re-based on the mask: B_i, plus F at P0. None once `split`
    # holds it (a matmul operand keeps only its prepared form: `share_value` rebuilds it)
    share: torch.Tensor | None
    split: SplitOperand | None = None  # the share prepared for ring_matmul, once it is a matmul operand

    def split_share(self, compact: bool = False) -> SplitOperand | torch.Tensor:
        """The share as a matmul right operand: prepared (ring.SplitOperand, `compact` as
        ring.compact_limbs decides for all of a party's weights) on first use, then reused by
        every later inference (meta shares are not split). The int64 share is dropped then:
        for a BERT-base party that is 0.68 GB of 4."""
        if self.split is None:
            if self.share.device.type == "meta":
                return self.share
            self.split = SplitOperand(self.share, compact)
            self.share = None
        return self.split

    def share_value(self) -> torch.Tensor:
        """The int64 share (rebuilt from the prepared operand if only that is kept)."""
        return self.share if self.share is not None else self.split.value


def fix_operand(ctx: Context, w: torch.Tensor, key: str) -> Protocol:
    """Open W - B once for a secret weight W (loading phase). One round."""
    (b,) = ctx.corr.correlated([(w.shape, RING)], keep=key)
    (f,) = yield from open_add(w - b)
    share = ctx.add_public(b, f)
    f = ctx.corr.publish(key, f)  # kept in the matmul kernel's layout (one copy of F in all)
    operand = FixedOperand(key, f, share)
    # by key, so that a party's prepare phase can split its share ahead (engine.Role.prepare)
    ctx.state.setdefault(FIXED_OPERANDS, {})[key] = operand
    return operand


def fix_operand_cost(shape) -> Cost:
    return Cost(1, 8 * numel(shape))


def _beaver_fixed(ctx: Context, x: torch.Tensor, w: FixedOperand, op: Op, rhs=None) -> Protocol:
    a, pre, c = ctx.corr.fixed_product(x.shape, w.key, op)  # pre = A_i op F, made offline
    (e,) = yield from open_add(x - a)  # fresh activation mask every call
    # x op W = E op W + A op F + A op B: one product online, E op W_i.
    return op(e, w.share_value() if rhs is None else rhs) + pre + c


def mul_fixed(ctx: Context, x: torch.Tensor, w: FixedOperand) -> Protocol:
    """Elementwise x * W for a fixed secret W (broadcasting). One round, opens only x - a."""
    return (yield from _beaver_fixed(ctx, x, w, torch.mul))


def matmul_fixed(ctx: Context, x: torch.Tensor, w: FixedOperand) -> Protocol:
    """x @ W for a fixed secret W. One round, opens only x - a.

    W_i is kept prepared from the first call on (`FixedOperand.split_share`): with the
    float64-limb kernel that saves about a quarter of the online product's time, for 3x
    the share's memory; with the int64 kernel it is a column-major copy (no extra memory)."""
    return (yield from _beaver_fixed(ctx, x, w, ring_matmul, w.split_share()))


def beaver_fixed_cost(x_shape) -> Cost:
    return Cost(1, 8 * numel(x_shape))
