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
bits are ever sent.

local (SecureML): no communication; wrong by about 2^(64-k) with probability about
|x|/2^63 per element (measured in benchmarks/truncation.py).
"""

from __future__ import annotations

import torch

from ..context import P0, Context
from ..correlations import Dom, mod_dom
from ..messages import Protocol, swap
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
    xs = ctx.add_public(x, _OFFSET)
    msb = (xs >> 63) & 1
    low = (xs >> k) & ((1 << (64 - k)) - 1)  # logical shift of the share read as unsigned
    u, v, uv = ctx.corr.correlated(
        [(x.shape, Dom("xor", 1, owner=0)), (x.shape, Dom("xor", 1, owner=1))],
        lambda u, v: [u * v], [mod_dom(k)])
    mine = msb ^ (u if ctx.party == P0 else v)  # alpha = a ^ u at P0, beta = b ^ v at P1
    (theirs,) = yield from swap(mine, bits=1)
    # The wrap bit is w = a OR b = a + b - ab for P0's msb a and P1's msb b. With a = alpha ^ u,
    # (1 - 2 alpha) u = a - alpha (and likewise for b), so
    #   ab = alpha b + beta a - alpha beta + (1 - 2 (alpha ^ beta)) uv,
    # and the shares of w (mod 2^k is enough) are a (1 - beta) - sign uv_0 at P0 and
    # b (1 - alpha) + alpha beta - sign uv_1 at P1, sign = 1 - 2 (alpha ^ beta): a few
    # bit operations instead of the general product formula's nine multiplies and adds.
    signed_uv = torch.where((mine ^ theirs).bool(), -uv, uv)
    wrap_share = (msb & (theirs ^ 1)) - signed_uv
    if ctx.party != P0:
        wrap_share = wrap_share + (mine & theirs)
    return ctx.add_public(low - (wrap_share << (64 - k)), -(_OFFSET >> k))


def trunc_cost(shape, mode: str = "exact") -> Cost:
    if mode == "local":
        return Cost(0, 0)
    from ..packing import packed_nbytes

    return Cost(1, packed_nbytes(int(torch.Size(shape).numel()), 1))
