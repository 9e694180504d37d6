"""Softmax approximations: 2Quad (MPCFormer/SecFormer) and the PUMA and CrypTen pipelines.

Every reference takes `(x, mask=None, dim=-1)`. `mask` is a public 0/1 tensor
broadcastable to x (1 = attend). Masked positions output exactly 0 and do not influence
the others. For 2Quad this is the point DESIGN.md insists on: the numerator is
multiplied by the mask, instead of adding a large negative score, which 2Quad would
turn into a large positive (-10^4 + c)^2. For the max-based pipelines the max is taken
over unmasked positions only (the mask is public, so the runtime can substitute a
public minimum locally).
"""

from __future__ import annotations

import torch

from .goldschmidt import GOLDSCHMIDT_DEFAULTS, reciprocal_goldschmidt
from .table_seed import reciprocal_table
from .goldschmidt import SOURCE as GOLDSCHMIDT_SOURCE
from .iterative import (
    CRYPTEN,
    PUMA,
    SPU_RECIPROCAL_INIT,
    exp_limit,
    reciprocal_newton,
    reciprocal_spu,
)
from .spec import approximation

_SUM = GOLDSCHMIDT_DEFAULTS["softmax_2quad_sum"]


def _apply_mask(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t * mask.to(t.dtype)


def _masked_max(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Row max over unmasked positions; 0 for rows with none (their outputs are 0 anyway)."""
    if mask is None:
        return x.amax(dim, keepdim=True)
    keep = mask.to(torch.bool).expand_as(x)
    low = torch.finfo(x.dtype).min
    mx = torch.where(keep, x, low).amax(dim, keepdim=True)
    return torch.where(keep.any(dim, keepdim=True), mx, torch.zeros_like(mx))


def _normalize(num: torch.Tensor, dim: int) -> torch.Tensor:
    den = num.sum(dim, keepdim=True)
    return num / torch.where(den == 0, torch.ones_like(den), den)


@approximation(
    "softmax.exact",
    op="softmax",
    method="exact",
    domain=(-16.0, 16.0),
    declared_max_abs_err=0.0,
    source="softmax over unmasked positions (plaintext simulator only)",
)
def softmax_exact(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum over unmasked positions; masked positions and empty rows give 0."""
    e = _apply_mask(torch.exp(x - _masked_max(x, mask, dim)), mask)
    return _normalize(e, dim)


def quad2_exact(
    x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1, *, c: float = 5.0
) -> torch.Tensor:
    """2Quad with exact division, (x + c)^2 mask / sum((x + c)^2 mask): softmax.2quad's target."""
    return _normalize(_apply_mask((x + c) ** 2, mask), dim)


def _quad2_target(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    return quad2_exact(x, mask, dim, c=5.0)


@approximation(
    "softmax.2quad",
    op="softmax",
    method="2quad",
    domain=(-4.0, 3.0),
    params={"c": 5.0, "prescale": _SUM.choice.prescale, "iterations": _SUM.choice.iterations,
            "gamma": 2.0, "table_bits": 0},
    declared_max_abs_err=1.2e-7,
    target=_quad2_target,
    replacement=True,
    source="MPCFormer (Li et al., ICLR 2023) 2Quad with c = 5; division by Goldschmidt as in "
    + GOLDSCHMIDT_SOURCE,
    notes="a replacement for softmax (distill the model with it); the bound is the Goldschmidt "
    "division's error against 2Quad with exact division, for row sums in [1, 8192] (entries in "
    "[-4, 3], rows of <= 128 unmasked positions); calibrate_goldschmidt() on observed row sums",
)
def softmax_2quad(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    dim: int = -1,
    *,
    c: float,
    prescale: float,
    iterations: int,
    gamma: float = 2.0,
    table_bits: int = 0,
) -> torch.Tensor:
    """(x + c)^2 mask * Goldschmidt(1 / sum((x + c)^2 mask)): no exp, no max.

    gamma: the Goldschmidt first step's constant (goldschmidt.choose_seeded_goldschmidt).
    table_bits > 0: the division is a table seed and `iterations` Newton steps instead
    (table_seed.py; calibrate_goldschmidt picks it where it takes fewer rounds)."""
    num = _apply_mask((x + c) ** 2, mask)
    den = num.sum(dim, keepdim=True)
    if table_bits:
        return num * reciprocal_table(den, prescale=prescale, table_bits=table_bits, iterations=iterations)
    # An all-masked row has den = 0: Goldschmidt then returns 2^n * s, finite, times num = 0.
    return num * reciprocal_goldschmidt(den, prescale=prescale, iterations=iterations, gamma=gamma)


@approximation(
    "softmax.puma",
    op="softmax",
    method="max_exp_reciprocal",
    domain=(-16.0, 16.0),
    params={
        "exp_iterations": 5,
        "cutoff": -14.0,
        "reciprocal_iterations": 2,
        "reciprocal_initial": SPU_RECIPROCAL_INIT,
    },
    declared_max_abs_err=0.1,
    source=PUMA + " (softmax: x - max, exp (1 + z/32)^32 zeroed below -14, SPU reciprocal)",
    notes="the error is from exp with n = 5: 0.098 for one score 6 above 127 equal ones; "
    "BASELINES.md measures 0.065 on N(0, 3^2) scores of (12, 128, 128)",
)
def softmax_puma(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    dim: int = -1,
    *,
    exp_iterations: int,
    cutoff: float,
    reciprocal_iterations: int,
    reciprocal_initial: tuple[float, float],
) -> torch.Tensor:
    """z = x - max; e = exp_n(z) [z > cutoff]; e / sum(e) with SPU's reciprocal."""
    z = x - _masked_max(x, mask, dim)
    e = exp_limit(z, iterations=exp_iterations) * (z > cutoff).to(x.dtype)
    e = _apply_mask(e, mask)
    den = e.sum(dim, keepdim=True)
    den = torch.where(den == 0, torch.ones_like(den), den)  # empty rows only
    return e * reciprocal_spu(den, iterations=reciprocal_iterations, initial=reciprocal_initial)


@approximation(
    "softmax.crypten",
    op="softmax",
    method="max_exp_reciprocal",
    domain=(-16.0, 16.0),
    params={"exp_iterations": 8, "reciprocal_iterations": 10},
    declared_max_abs_err=0.013,
    source=CRYPTEN + " (softmax: x - max by a comparison tree, exp_iterations = 8, "
    "reciprocal_nr_iters = 10)",
    notes="exp with n = 8 gives 0.0128 for one score 6 above 127 equal ones; the row sum "
    "lies in [1, n] and the reciprocal diverges for sums > ~256 (rows of > ~256 near-equal scores)",
)
def softmax_crypten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    dim: int = -1,
    *,
    exp_iterations: int,
    reciprocal_iterations: int,
) -> torch.Tensor:
    """z = x - max; e = (1 + z/256)^256; e * Newton(1 / sum(e))."""
    z = x - _masked_max(x, mask, dim)
    e = _apply_mask(exp_limit(z, iterations=exp_iterations), mask)
    den = e.sum(dim, keepdim=True)
    den = torch.where(den == 0, torch.ones_like(den), den)  # empty rows only
    return e * reciprocal_newton(
        den, iterations=reciprocal_iterations, exp_iterations=exp_iterations
    )
