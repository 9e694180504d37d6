"""LayerNorm approximations: the only nonlinear step is 1/sqrt(var + eps).

Every reference takes `(x, weight=None, bias=None, eps=1e-5)` and normalizes over the
last dimension, like `torch.nn.functional.layer_norm(x, x.shape[-1:], ...)`. Mean and
variance are sums and products (exact under MPC up to fixed point); the methods differ
only in the inverse square root, so a LayerNorm's normalized outputs carry exactly that
inverse square root's relative error. Each spec's domain is the range of var + eps and
its bound is a relative error of the normalized outputs (before the affine part).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .goldschmidt import GOLDSCHMIDT_DEFAULTS, rsqrt_goldschmidt
from .goldschmidt import SOURCE as GOLDSCHMIDT_SOURCE
from .iterative import CRYPTEN, PUMA, SPU_RSQRT_COEFFS, rsqrt_newton, rsqrt_spu
from .spec import approximation
from .table_seed import rsqrt_table

_VAR = GOLDSCHMIDT_DEFAULTS["layernorm_var"]


def _layernorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rsqrt: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    centered = x - x.mean(-1, keepdim=True)
    var = (centered * centered).mean(-1, keepdim=True)  # biased, as torch's LayerNorm
    out = centered * rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


@approximation(
    "layernorm.exact",
    op="layernorm",
    method="exact",
    domain=(1e-6, 1e6),
    declared_max_rel_err=1e-12,
    source="torch.nn.functional.layer_norm (plaintext simulator only)",
)
def layernorm_exact(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


@approximation(
    "layernorm.secformer",
    op="layernorm",
    method="goldschmidt",
    domain=(_VAR.lo, _VAR.hi),
    params={"prescale": _VAR.choice.prescale, "iterations": _VAR.choice.iterations, "gamma": 3.0,
            "table_bits": 0, "table_exp": 0, "table_width": 0},
    declared_max_rel_err=8e-5,
    source=GOLDSCHMIDT_SOURCE,
    notes="default pre-scale/iterations cover var + eps in [1e-3, 1e3]; calibrate per "
    "LayerNorm with calibrate_goldschmidt() for fewer iterations",
)
def layernorm_secformer(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    prescale: float,
    iterations: int,
    gamma: float = 3.0,
    table_bits: int = 0,
    table_exp: int = 0,
    table_width: int = 0,
) -> torch.Tensor:
    """LayerNorm with Goldschmidt 1/sqrt(var + eps) after the public pre-scale (gamma: the
    first step's constant, goldschmidt.choose_seeded_goldschmidt); table_bits > 0: a table
    seed and `iterations` Newton steps instead (table_seed.rsqrt_table), for the LayerNorm
    width `table_width` the 2PC protocol reads var + eps at (a function of var + eps alone)."""
    if table_bits:
        return _layernorm(x, weight, bias, eps,
                          lambda v: rsqrt_table(v, n=table_width, table_bits=table_bits,
                                                table_exp=table_exp, iterations=iterations))
    return _layernorm(
        x,
        weight,
        bias,
        eps,
        lambda v: rsqrt_goldschmidt(v, prescale=prescale, iterations=iterations, gamma=gamma),
    )


@approximation(
    "layernorm.crypten",
    op="layernorm",
    method="newton",
    domain=(0.1, 150.0),
    params={"iterations": 3, "exp_iterations": 8},
    declared_max_rel_err=5e-3,
    source=CRYPTEN + " (inv_sqrt: 3 Newton iterations, exp-based initial guess)",
    notes="var + eps below ~0.1 or above ~155 is badly approximated; see rsqrt.newton",
)
def layernorm_crypten(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    iterations: int,
    exp_iterations: int,
) -> torch.Tensor:
    """LayerNorm with CrypTen's Newton 1/sqrt."""
    return _layernorm(
        x,
        weight,
        bias,
        eps,
        lambda v: rsqrt_newton(v, iterations=iterations, exp_iterations=exp_iterations),
    )


@approximation(
    "layernorm.puma",
    op="layernorm",
    method="normalized_poly",
    domain=(1e-4, 1e5),
    params={"coeffs": SPU_RSQRT_COEFFS},
    declared_max_rel_err=8.5e-5,
    source=PUMA + " (LayerNorm with f_rsqrt)",
)
def layernorm_puma(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    coeffs: tuple[float, ...],
) -> torch.Tensor:
    """LayerNorm with SPU's normalized-polynomial 1/sqrt."""
    return _layernorm(x, weight, bias, eps, lambda v: rsqrt_spu(v, coeffs=coeffs))
