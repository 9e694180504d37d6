"""tanh approximations (BERT's pooler): a SecFormer-style segmented sine series, CrypTen's.

SecFormer-style: the same segmentation as its erf (gelu.py), applied to tanh itself:

    tanh(x) ~= sum_{k=1..K} beta_k sin(2 pi k x / P)   for |x| <= T,
               sign(x)                                   for |x| > T,

with P = 16 (a power of two, so the secure-sine opening mod P 2^f is exact: see
runtime/protocols/sine.py), T = 5.75 and K = 14, beta fitted by `fit_tanh_sine_series`
(np.linalg.lstsq on 8001 equispaced points of [-T, T]). Why these: outside [-T, T] the
error is 1 - tanh(T) ~= 2 e^(-2T), 2.0e-5 at T = 5.75; inside, tanh is steeper than
erf(x / sqrt 2) near the ends of a period (its odd P-periodic extension jumps from +1 to -1
at P/2 = 8), so it needs more terms than the erf series: K = 14 gives 9.8e-5 over all x.
Smaller T needs large, cancelling coefficients (T = 5: sum |beta_k| = 50 at K = 14, which
multiplies the fixed-point noise of the sine shares); here sum |beta_k| = 1.9. P = 32 is
ill-conditioned (sum |beta_k| ~ 1e7). K = 12 at T = 5.5 would give 3.1e-4.

CrypTen: tanh(x) = 2 sigmoid(2x) - 1 with its sigmoid (exp of -|2x| by 9 squarings, a
3-step Newton reciprocal from 0.75); the error, 0.0039 at x = 0, is the unconverged
Newton reciprocal of 2 (CrypTen's own numbers, not fixed-point noise).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .gelu import sigmoid_crypten
from .iterative import CRYPTEN
from .spec import approximation

TANH_SINE_PERIOD = 16  # int: the runtime checks it is a power of two
TANH_SINE_THRESHOLD = 5.75  # exact in fixed point (the comparisons are against it)
# fit_tanh_sine_series(16, 5.75, 14, 8001); tests/runtime/test_activations.py refits.
TANH_SINE_COEFFS = (
    1.1622051011830463,
    0.06686097127504705,
    0.1575777130571798,
    0.11418195049787991,
    -0.04726321881744175,
    0.11118923400745077,
    -0.072468228103682,
    0.0710029601170839,
    -0.04266601159033258,
    0.030037970286650756,
    -0.014584658626706293,
    0.007679631506553871,
    -0.0024496087387103757,
    0.0008591454584282931,
)


def fit_tanh_sine_series(
    period: float, threshold: float, terms: int, points: int = 8001
) -> tuple[float, ...]:
    """Least-squares beta_1..beta_K: tanh(x) ~= sum beta_k sin(2 pi k x / P) on [-T, T]."""
    x = np.linspace(-threshold, threshold, points)
    basis = np.sin(2 * np.pi / period * np.outer(x, np.arange(1, terms + 1)))
    beta, *_ = np.linalg.lstsq(basis, np.tanh(x), rcond=None)
    return tuple(float(b) for b in beta)


@approximation(
    "tanh.exact",
    op="tanh",
    method="exact",
    domain=(-30.0, 30.0),
    declared_max_abs_err=0.0,
    source="torch.tanh (plaintext simulator only)",
)
def tanh_exact(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


@approximation(
    "tanh.secformer",
    op="tanh",
    method="fourier",
    domain=(-30.0, 30.0),
    params={
        "period": TANH_SINE_PERIOD,
        "threshold": TANH_SINE_THRESHOLD,
        "coeffs": TANH_SINE_COEFFS,
    },
    declared_max_abs_err=1e-4,
    source="SecFormer (Luo et al., Findings of ACL 2024) segmented Fourier series, as for its "
    "erf, fitted to tanh for a power-of-two period (this module's docstring)",
    notes="the error beyond |x| = T is 1 - tanh(|x|) < 2.1e-5, so the bound holds for all x",
)
def tanh_fourier(
    x: torch.Tensor, *, period: float, threshold: float, coeffs: tuple[float, ...]
) -> torch.Tensor:
    """-1 | sum beta_k sin(2 pi k x / P) | +1 split at -T, T."""
    series = torch.zeros_like(x)
    for k, beta in enumerate(coeffs, start=1):
        series = series + beta * torch.sin(x * (2 * math.pi * k / period))
    return torch.where(x > threshold, 1.0, torch.where(x < -threshold, -1.0, series))


@approximation(
    "tanh.crypten",
    op="tanh",
    method="sigmoid",
    domain=(-30.0, 30.0),
    params={"exp_iterations": 9, "reciprocal_iterations": 3, "reciprocal_initial": 0.75},
    declared_max_abs_err=3.91e-3,
    source=CRYPTEN + " (tanh = 2 sigmoid(2x) - 1, sigmoid_tanh_method = 'reciprocal'; sigmoid "
    "overrides exp_iterations = 9, reciprocal_nr_iters = 3, reciprocal_initial = 0.75)",
    notes="worst at x = 0 (Newton's 1/2 from 0.75 after 3 steps: 0.498); wrong for |x| > 512, "
    "where exp(-2|x|) = (1 - |x|/256)^512 becomes a huge even power",
)
def tanh_crypten(
    x: torch.Tensor, *, exp_iterations: int, reciprocal_iterations: int, reciprocal_initial: float
) -> torch.Tensor:
    s = sigmoid_crypten(
        2 * x,
        exp_iterations=exp_iterations,
        reciprocal_iterations=reciprocal_iterations,
        reciprocal_initial=reciprocal_initial,
    )
    return 2 * s - 1
