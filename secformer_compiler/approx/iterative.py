"""exp, reciprocal and inverse square root as the baselines compute them (CrypTen, PUMA/SPU).

Float references of what those systems evaluate under MPC (constants and iteration
counts from /work/shared/BASELINES.md, checked against the CrypTen and SPU sources), plus
the exact functions every spec's error is measured against. SecFormer's Goldschmidt
variants live in `goldschmidt.py`.

Domains are where the method is accurate, measured; outside them some of these fail
badly, which is why the domains are part of the data:
* CrypTen's reciprocal seeds Newton with 3 exp(1 - 2x) + 0.003, and exp(y) = (1 + y/256)^256
  turns into a huge even power once y < -256, so 1/x diverges for x > ~256.
* CrypTen's inverse sqrt seed 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024 is poor below ~0.1
  (3 Newton steps leave 0.5% error at 0.1, 40% at 0.01) and, turning negative near
  x = 205, makes the iteration diverge from ~155 up.
* SPU normalises by the highest set bit, so its accuracy does not depend on the range
  (in fixed point only the resolution limits it).
"""

from __future__ import annotations

import torch

from .spec import approximation

CRYPTEN = "CrypTen (Knott et al., NeurIPS 2021), crypten/common/functions/approximations.py"
PUMA = "PUMA (Dong et al., 2023) / SecretFlow SPU, libspu/kernel/hal/fxp_approx.cc"

# SPU rsqrt_init_guess: rsqrt(u) on u in [0.25, 0.5), lowest degree first (Lu et al. PPMLP'20).
SPU_RSQRT_COEFFS = (4.14285016, -15.47994394, 38.4714796, -49.86605845, 26.02942339)
# SPU reciprocal initial guess w = 2.9142 - 2c for c in [0.5, 1).
SPU_RECIPROCAL_INIT = (2.9142, -2.0)


def exp_limit(x: torch.Tensor, *, iterations: int) -> torch.Tensor:
    """exp(x) ~= (1 + x / 2^n)^(2^n), n squarings."""
    y = 1 + x / 2**iterations
    for _ in range(iterations):
        y = y * y
    return y


def reciprocal_newton(
    x: torch.Tensor, *, iterations: int, exp_iterations: int, initial: float | None = None
) -> torch.Tensor:
    """CrypTen 1/x for x > 0: Newton y <- 2y - x y^2 from 3 exp(1 - 2x) + 0.003 (or `initial`)."""
    if initial is None:
        y = 3 * exp_limit(1 - 2 * x, iterations=exp_iterations) + 0.003
    else:
        y = torch.full_like(x, initial)
    for _ in range(iterations):
        y = 2 * y - y * y * x
    return y


def rsqrt_newton(x: torch.Tensor, *, iterations: int, exp_iterations: int) -> torch.Tensor:
    """CrypTen 1/sqrt(x): Newton y <- y (3 - x y^2)/2 from 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024."""
    y = 2.2 * exp_limit(-(x / 2 + 0.2), iterations=exp_iterations) + 0.2 - x / 1024
    for _ in range(iterations):
        y = y * (3 - x * y * y) / 2
    return y


def _pow2_exponent(a: torch.Tensor, offset: int) -> torch.Tensor:
    # The highest set bit is found by a protocol in SPU; it is a step function, so it
    # carries no gradient and is computed on detached values.
    tiny = torch.finfo(a.dtype).tiny
    return torch.floor(torch.log2(a.detach().clamp_min(tiny))) + offset


def reciprocal_spu(
    x: torch.Tensor, *, iterations: int, initial: tuple[float, float]
) -> torch.Tensor:
    """SPU 1/x: |x| = c 2^e, c in [0.5, 1); w = 2.9142 - 2c; Goldschmidt r <- r(1+e), e <- e^2."""
    a = x.abs()
    scale = torch.exp2(-_pow2_exponent(a, 1))
    c = a * scale
    r = initial[0] + initial[1] * c
    err = 1 - c * r
    for _ in range(iterations):
        r, err = r * (1 + err), err * err
    r = r * scale
    return torch.where(x < 0, -r, r)


def rsqrt_spu(x: torch.Tensor, *, coeffs: tuple[float, ...]) -> torch.Tensor:
    """SPU 1/sqrt(x): x = u 2^e with u in [0.25, 0.5); poly(u) * 2^(-e/2); no Newton step."""
    e = _pow2_exponent(x, 2)
    u = x * torch.exp2(-e)
    r = torch.zeros_like(u) + coeffs[-1]
    for c in reversed(coeffs[:-1]):
        r = r * u + c
    return r * torch.exp2(-e / 2)


@approximation(
    "exp.exact",
    op="exp",
    method="exact",
    domain=(-16.0, 16.0),
    declared_max_abs_err=0.0,
    source="torch.exp (plaintext simulator only)",
)
def exp_exact(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x)


@approximation(
    "reciprocal.exact",
    op="reciprocal",
    method="exact",
    domain=(1e-6, 1e6),
    declared_max_rel_err=0.0,
    source="1 / x (plaintext simulator only)",
)
def reciprocal_exact(x: torch.Tensor) -> torch.Tensor:
    return 1 / x


@approximation(
    "rsqrt.exact",
    op="rsqrt",
    method="exact",
    domain=(1e-6, 1e6),
    declared_max_rel_err=0.0,
    source="torch.rsqrt (plaintext simulator only)",
)
def rsqrt_exact(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(x)


@approximation(
    "exp.limit",
    op="exp",
    method="limit",
    domain=(-16.0, 0.0),
    params={"iterations": 8},
    declared_max_abs_err=1.1e-3,
    source=CRYPTEN + " (exp_iterations = 8)",
    notes="x <= 0 as after max subtraction; for x < -2^n the base is negative and the result wrong",
)
@approximation(
    "exp.puma",
    op="exp",
    method="limit",
    domain=(-14.0, 0.0),
    params={"iterations": 5},
    declared_max_abs_err=8.6e-3,
    source=PUMA + " (n = 5 in PUMA's BERT benchmarks; SPU's default is 8)",
    notes="PUMA zeroes exp below -14, so the domain stops there",
)
def _exp_limit(x: torch.Tensor, *, iterations: int) -> torch.Tensor:
    return exp_limit(x, iterations=iterations)


@approximation(
    "reciprocal.newton",
    op="reciprocal",
    method="newton",
    domain=(1e-3, 250.0),
    params={"iterations": 10, "exp_iterations": 8},
    declared_max_rel_err=3.2e-4,
    source=CRYPTEN + " (reciprocal_nr_iters = 10, all_pos)",
    notes="diverges for x > ~256 (see module docstring): CrypTen softmax rows longer than ~256",
)
def _reciprocal_newton(x: torch.Tensor, **params) -> torch.Tensor:
    return reciprocal_newton(x, **params)


@approximation(
    "reciprocal.puma",
    op="reciprocal",
    method="normalized_goldschmidt",
    domain=(1e-4, 1e5),
    params={"iterations": 2, "initial": SPU_RECIPROCAL_INIT},
    declared_max_rel_err=5.5e-5,
    source=PUMA + " (reciprocal_goldschmidt_normalized_approx, div_iter = 2)",
)
def _reciprocal_spu(x: torch.Tensor, **params) -> torch.Tensor:
    return reciprocal_spu(x, **params)


@approximation(
    "rsqrt.newton",
    op="rsqrt",
    method="newton",
    domain=(0.1, 150.0),
    params={"iterations": 3, "exp_iterations": 8},
    declared_max_rel_err=5e-3,
    source=CRYPTEN + " (sqrt_nr_iters = 3, default initial guess)",
    notes="0.5% error at 0.1, 40% at 0.01, and divergence above ~155 (the initial guess turns "
    "negative near 205): all-MiniLM-L6-v2's embedding LayerNorm (var ~0.002) is outside",
)
def _rsqrt_newton(x: torch.Tensor, **params) -> torch.Tensor:
    return rsqrt_newton(x, **params)


@approximation(
    "rsqrt.puma",
    op="rsqrt",
    method="normalized_poly",
    domain=(1e-4, 1e5),
    params={"coeffs": SPU_RSQRT_COEFFS},
    declared_max_rel_err=8.5e-5,
    source=PUMA + " (f_rsqrt: rsqrt_init_guess * rsqrt_comp)",
)
def _rsqrt_spu(x: torch.Tensor, **params) -> torch.Tensor:
    return rsqrt_spu(x, **params)
