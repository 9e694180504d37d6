"""The 2PC protocol of `softmax.2relu` and its static cost (rounds and bytes per party).

Per softmax node, on shares at f fractional bits (the rules of docs/PROTOCOLS.md):

1. r = relu(x) by `compare.relu` (msb by a carry tree, then one bit x value product): exact,
   no truncation, 8 rounds at 64 bits;
2. r * mask with the public 0/1 padding mask: a local product (no communication);
3. s = sum(r) + eps over the row: local (eps = 2^-4 is added exactly by P0);
4. 1/s by the Goldschmidt reciprocal with the public pre-scale p (`recip_prescale`) and
   `recip_iterations` iterations (1 round each, plus one for the last truncation: each
   truncation shares the next opening's round), kept at R = 2f + 12 fractional bits: 1/s
   is as small as 1/387, which f bits would leave with a relative precision of only ~1e-2;
5. r * (1/s) (one Beaver product, 1/s broadcast over the row) and one truncation by R
   bits. No overflow: the product's value r/s <= 1 sits at f + R = 60 bits (f = 16), below
   the 2^62 that exact truncation needs (R is capped at 60 - f for larger f); 1/s <=
   1/eps = 16 fits at R bits.

Cost (per party), n = elements, m = rows, k = recip_iterations:
    relu_cost(n) + reciprocal_goldschmidt_cost(m, p, k, out_frac=2f+12) + beaver (8n + 8m)
    + one truncation of n values; rounds 8 + (k + 1) + 2 (26 with the defaults).
`softmax_2relu_cost` composes exactly the declared costs of those sub-protocols, in the
order they run, so it equals what a run counts (tests/compiler/test_plugins.py checks it).
"""

from __future__ import annotations

from typing import Any

import torch

from secformer_compiler.ir import Node
from secformer_compiler.plugins import Cost, register_protocol
from secformer_compiler.runtime.context import Context
from secformer_compiler.runtime.messages import Protocol
from secformer_compiler.runtime.protocols import arith, compare
from secformer_compiler.runtime.protocols.goldschmidt import (
    RECIPROCAL_DOMAIN,
    reciprocal_goldschmidt,
    reciprocal_goldschmidt_cost,
)
from secformer_compiler.runtime.protocols.trunc import trunc, trunc_cost

from .approximation import NAME


def _recip_frac(f: int) -> int:
    """Fractional bits of 1/s (module docstring, steps 4 and 5): 2f + 12, capped so that the
    product r/s <= 1 stays at most 60 bits for more than 16 fractional bits."""
    return min(2 * f + 12, 60 - f)


def _check_range(f: int, eps: float, prescale: float) -> None:
    """Refuse divisors the Goldschmidt iterate cannot hold at f fractional bits.

    The smallest divisor is eps, so p * eps is the low end of the reciprocal's input. At f = 16
    that must be >= goldschmidt.RECIPROCAL_DOMAIN[0] = 2^-16; every further fractional bit
    costs the iterate two bits of headroom (its guard bits grow with f), so the low end is
    2^(2f - 48): the defaults (p * eps = 2^-12) work up to f = 18. Nothing may branch on a
    secret, so a divisor below the range would give garbage, not an error: check it here.
    """
    low = RECIPROCAL_DOMAIN[0] * 4.0 ** (f - 16)
    if not prescale * eps >= low:
        raise ValueError(f"softmax.2relu: recip_prescale * eps = {prescale * eps:g} is below "
                         f"{low:g}, the Goldschmidt reciprocal's low end at {f} fractional bits; "
                         f"compile with fewer fractional bits or raise recip_prescale (and iterations)")


def softmax_2relu(ctx: Context, x: torch.Tensor, dim: int = -1, mask: torch.Tensor | None = None,
                  *, eps: float, prescale: float, iters: int) -> Protocol:
    """relu(x) mask / (sum(relu(x) mask) + eps) over `dim`, on shares at ctx.f bits.

    mask: public 0/1 tensor broadcastable to x, or None. prescale * (row sum + eps) must lie
    in goldschmidt.RECIPROCAL_DOMAIN; |x| < 2^(63 - f) for the comparison.
    """
    f = ctx.f
    _check_range(f, eps, prescale)
    r_frac = _recip_frac(f)
    shape = x.shape
    x = x.movedim(dim, -1)
    r = yield from compare.relu(ctx, x)
    if mask is not None:  # public 0/1, broadcast against x (local product)
        r = r * ctx.pub(torch.as_tensor(mask).to(torch.int64).expand(shape).movedim(dim, -1))
    s = ctx.add_public(r.sum(-1, keepdim=True), round(eps * (1 << f)))
    inv = yield from reciprocal_goldschmidt(ctx, s, prescale, iters, out_frac=r_frac)
    out = yield from arith.mul(ctx, r, inv)
    out = yield from trunc(ctx, out, r_frac)
    return out.movedim(-1, dim)


def softmax_2relu_cost(shape: tuple[int, ...], dim: int, prescale: float, iters: int,
                       f: int = 16, mode: str = "exact") -> Cost:
    """Rounds and bytes per party of `softmax_2relu` on a tensor of `shape`."""
    shape = list(shape)
    d = dim if dim >= 0 else len(shape) + dim
    n = shape.pop(d)
    full, rows = tuple(shape) + (n,), tuple(shape) + (1,)
    return (compare.relu_cost(full)
            + reciprocal_goldschmidt_cost(rows, prescale, iters, out_frac=_recip_frac(f), f=f, mode=mode)
            + arith.beaver_cost(full, rows)
            + trunc_cost(full, mode))


def _protocol(ctx: Context, node: Node, ins: list, params: dict[str, Any]) -> Protocol:
    """The compiler's entry: a softmax node (input, optional public mask) with its params."""
    mask = ins[1] if len(ins) > 1 else None
    return softmax_2relu(ctx, ins[0], node.attrs["dim"], mask, eps=float(params["eps"]),
                         prescale=float(params["recip_prescale"]), iters=int(params["recip_iterations"]))


def _cost(node: Node, ins: list[Node], mode: str, f: int) -> Cost:
    p = node.attrs.get("params") or {}
    return softmax_2relu_cost(tuple(node.shape), node.attrs["dim"], float(p["recip_prescale"]),
                              int(p["recip_iterations"]), f, mode)


register_protocol("softmax", NAME, _protocol, _cost)
