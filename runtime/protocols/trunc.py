"""Truncation: divide a shared fixed-point value by 2^k after a product.

exact (default): one round, 1 bit each way, error at most 1 ulp, never catastrophic for
|x| < 2^62. Add 2^62 so x' = x + 2^62 lies in [0, 2^63). Reading the shares u0, u1 as
unsigned, u0 + u1 = x' + w*2^64 with the wrap bit w = msb(u0) OR msb(u1) (if both msbs
are 0 the sum is below 2^64; if one is set and the sum did not wrap, x' >= 2^63 - a
contradiction). So floor(x'/2^k) = (u0 >> k) + (u1 >> k) - w*2^(64-k) + c, where c in {0, 1}
is the carry of the two low parts, which we drop (result at most 1 ulp low); and w = a + b - ab
for bits a, b that P0 and P1 hold privately. The product ab comes from a dealer-assisted
product of private bits: P0 sends a XOR u, P1 sends b XOR v (u, v uniform private bits from
the dealer) and the dealer supplies shares of uv mod 2^k. Only bits masked by fresh uniform
bits are ever sent. The result is base + 2^(64-k) ab with a local base, so the round can
be shared with the opening of a product that consumes the result (`Pending`, fused.py).

local (SecureML): no communication; wrong by about 2^(64-k) with probability about
|x|/2^63 per element (measured in benchmarks/truncation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import P0, Context
from ..correlations import Dom, mod_dom
from ..messages import Protocol, swap
from ..ring import signed_by_bit
from .cost import Cost

_OFFSET = 1 << 62


def trunc(ctx: Context, x: torch.Tensor, k: int | None = None, mode: str | None = None) -> Protocol:
    """x / 2^k (default k = f) with the context's truncation mode unless `mode` is given."""
    k = ctx.f if k is None else k
    if k == 0:
        return x
    if (mode or ctx.trunc) == "local":
        return trunc_local(ctx, x, k)
    return (yield from trunc_exact(ctx, x, k))


def trunc_local(ctx: Context, x: torch.Tensor, k: int) -> torch.Tensor:
    """SecureML-style local truncation (probabilistic; see module docstring)."""
    if ctx.party == P0:
        return x >> k
    return -((-x) >> k)


def trunc_exact(ctx: Context, x: torch.Tensor, k: int) -> Protocol:
    """Exact truncation by 2^k (1 round, 1 bit sent per element each way)."""
    return (yield from finish(ctx, begin(ctx, x, k, "exact")))


# --- the truncation split at its round (fused.py shares that round with a product) -----------

@dataclass
class Pending:
    """x / 2^k by exact truncation, before its round: the result is base + 2^(64-k) AB.

    Every part of the result is local except AB = a AND b, the product of P0's and P1's
    private msbs of the offset shares (module docstring): base_i = (u_i >> k) - own_i
    2^(64-k) (- 2^(62-k) at P0), and w = a + b - ab. `own` is this party's msb; None means
    nothing is pending and the value is `base` (k = 0, local mode, or a finished value).
    """

    base: torch.Tensor
    k: int = 0
    own: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def pending(self) -> bool:
        return self.own is not None

    def plus(self, t: torch.Tensor) -> "Pending":
        """The pending value plus a share (or P0's public term): only the base changes."""
        return Pending(self.base + t, self.k, self.own)

    def map(self, fn) -> "Pending":
        """A shape op (movedim, reshape, ...) applied to the base and the bits alike."""
        return Pending(fn(self.base), self.k, None if self.own is None else fn(self.own))


@dataclass
class Raw:
    """A share with `frac` fractional bits, more than f, left for its consumer to truncate.

    Why: a product's truncation costs a round, and where the consumer is itself a product
    whose result is truncated anyway, the two truncations can be one (by the sum of the
    shifts) if the values stay below 2^62 throughout (secformer_compiler/deferral.py: a
    LayerNorm's output into the linear layers after it)."""

    value: torch.Tensor
    frac: int

    @property
    def shape(self) -> torch.Size:
        return self.value.shape


def begin(ctx: Context, x: torch.Tensor, k: int, mode: str | None = None) -> Pending:
    """The local part of trunc(x, k) (context's mode unless `mode` is given)."""
    if k == 0:
        return Pending(x)
    if (mode or ctx.trunc) == "local":
        return Pending(trunc_local(ctx, x, k))
    xs = ctx.add_public(x, _OFFSET)
    # base_i = (u_i >> k logically) - own_i 2^(64-k), which is exactly the arithmetic shift
    # xs >> k (the sign bit own_i extends into the top k bits: -2^(64-k)): one pass, not four
    own = (xs >> 63).neg_()  # this share's msb as 0 / 1 (the fastest of the forms measured)
    return Pending(ctx.add_public(xs >> k, -(_OFFSET >> k)), k, own)


def begin_rescale(ctx: Context, v: torch.Tensor, frm: int, to: int) -> Pending:
    """v from frm to `to` fractional bits: a pending truncation when bits are dropped,
    else a local left shift (nothing pending)."""
    if frm > to:
        return begin(ctx, v, frm - to)
    return Pending(v << (to - frm) if to > frm else v)


def bit_sources(p: Pending) -> list:
    """The dealer's private mask bits for one pending truncation: u (P0's), v (P1's)."""
    return [(p.shape, Dom("xor", 1, owner=0)), (p.shape, Dom("xor", 1, owner=1))]


def masked_bit(ctx: Context, p: Pending, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What this party sends: alpha = a ^ u at P0, beta = b ^ v at P1 (fresh uniform masks)."""
    return p.own ^ (u if ctx.party == P0 else v)


def and_share(ctx: Context, p: Pending, mine: torch.Tensor, theirs: torch.Tensor,
              uv: torch.Tensor) -> torch.Tensor:
    """This party's share of AB (mod 2^k) once alpha and beta are swapped.

    With a = alpha ^ u, (1 - 2 alpha) u = a - alpha (likewise b), so
      ab = alpha b + beta a - alpha beta + (1 - 2 (alpha ^ beta)) uv:
    P0 (knows a, beta) takes beta a + sign uv_0, P1 (knows b, alpha) alpha b - alpha beta
    + sign uv_1: a few bit operations instead of the general product formula.
    """
    share = signed_by_bit(uv, mine ^ theirs).add_(p.own & theirs)  # no product, no where
    return share if ctx.party == P0 else share.sub_(mine & theirs)


def finish(ctx: Context, p: Pending) -> Protocol:
    """The round of a pending truncation on its own (one round, 1 bit each way)."""
    if not p.pending:
        return p.base
    u, v, uv = ctx.corr.correlated(bit_sources(p), lambda u, v: [u * v], [mod_dom(p.k)])
    mine = masked_bit(ctx, p, u, v)
    (theirs,) = yield from swap(mine, bits=1)
    return p.base + (and_share(ctx, p, mine, theirs, uv) << (64 - p.k))


def trunc_cost(shape, mode: str = "exact") -> Cost:
    if mode == "local":
        return Cost(0, 0)
    from ..packing import packed_nbytes

    return Cost(1, packed_nbytes(int(torch.Size(shape).numel()), 1))
