"""GeLU approximations: SecFormer's segmented Fourier erf, and the baselines.

GeLU(x) = x/2 (1 + erf(x / sqrt 2)). SecFormer evaluates erf as -1 / a sine series / +1
on three segments; the sine terms come from a one-round secure-sine protocol in which
the parties open d = x + t mod P 2^f. That needs the period P to be a power of two (so
P 2^f divides 2^64); the published series uses period 20 in u = x/sqrt 2, so we refit.

Our series is in x itself (the runtime needs no 1/sqrt 2 scaling before the sine):

    erf(x / sqrt 2) ~= sum_{k=1..K} beta_k sin(2 pi k x / P)   for |x| <= T,
                       sign(x)                                   for |x| > T,

with P = 16, T = 4, K = 7 and beta fitted by `fit_erf_sine_series` (np.linalg.lstsq on
8001 equispaced points of [-T, T]). Why these: the error outside [-T, T] is
|x| Phi(-|x|), 1.3e-4 at T = 4 (8e-4 at the paper's T = 2.5 sqrt 2 ~ 3.54); inside,
the K = 7 series is within 7e-5 of erf, so the GeLU error is 1.4e-4 over all x. P = 8
cannot fit [-4, 4]; P = 32 needs coefficients of size ~1e4 (ill-conditioned, fixed-point
noise is multiplied by them); with P = 16, sum |beta_k| = 2.3, so f = 16 share noise on
the sines adds < 1e-4. K = 8 gains nothing at T = 4 and costs one more sine.

That is the paper's form, kept as `gelu.secformer_erf`. The default `gelu.secformer`
evaluates the same segments with a Fourier series of GeLU's *even part* instead:

    GeLU(x) = x/2 + h(x),  h(x) = (x/2) erf(x / sqrt 2) (even)
            ~= x/2 + gamma_0 + sum_{k=1..K} gamma_k cos(2 pi k x / P)   for |x| <= T,

x for x > T and 0 for x < -T (the same segment tests). Why: x G(x) in the erf form needs
a product by x, which the fused one-round protocol (`sine.x_sine_series`) pays for with
dealt shares of a S_k and a C_k: 4K ring values per element from the dealer. The even form
needs no product by x (`sine.x_cos_series`): 2K values, half the dealer's correlated
randomness and its CPU, and half the parties' series arithmetic, in the same one round
and with the same 8-byte opening. Its segment is T = 4.125 (`GELU_EVEN_THRESHOLD`): the 2PC
comparisons may move a threshold towards zero by their window, 2^-3 here, so x is taken for
GeLU(x) down to 4 at worst, within |x| Phi(-|x|) = 1.27e-4 as at T = 4 with no window; a
window that wide lets the comparisons run 8-bit carry trees (3 rounds, not 4) wherever the
input bound is below about 28 (`passes/bounds.py` derives it from the LayerNorm and linear
layer before the GeLU). gamma (`fit_gelu_even_cos_series(16, 4.125, 7)`, least squares on
8001 points of [-4.125, 4.125]) is within 1.08e-4 of h on the segment (8.2e-5 on [-4, 4]);
the GeLU error over all x is 1.27e-4, set by the window's end. sum |gamma_k| = 9.2
(alternating signs), so the protocol encodes the dealt sines and the public factors with
f + 4 fractional bits each (rounding adds < 1e-5). Until 2026-11-27 17:45 UTC it was fitted
on [-4, 4] with a 2^-5 window (the erf form keeps those: its series fits [-4.125, 4.125]
only to 1.9e-4).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .iterative import CRYPTEN, PUMA, exp_limit, reciprocal_newton
from .spec import approximation

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)

ERF_SINE_PERIOD = 16  # int: the runtime checks it is a power of two
# |x| up to which the 2PC segment comparisons must be right. 32x the swept domain: a
# trained BERT's GeLU inputs stay within a few tens, and LayerNorm's own product bound
# (nonlinear.layernorm_goldschmidt) is tighter. At f = 16 `nonlinear.gelu_cmp_plan` makes
# them 28-bit comparisons of the shares' top 17 bits (right up to |x| < 2044, except that
# a threshold may move by 2^-5 towards zero, which changes the output by at most ~1.5e-4).
GELU_CMP_INPUT_BOUND = 1024.0
ERF_SINE_THRESHOLD = 4.0
# How far (towards zero) the 2PC segment comparisons may move a threshold so that they can
# drop low bits (`nonlinear.gelu_cmp_plan`): there x is taken for GeLU(x) (or 0 for x < -T),
# an error of |x| Phi(-|x|). The erf form keeps 2^-5 (1.5e-4 at T - 2^-5); the even form's
# segment reaches T = 4 + 2^-3 so that a window of 2^-3 stops at 4 (1.27e-4): that lets an
# input bound below ~28 (`passes/bounds.py`) run 8-bit carry trees, 3 rounds instead of 4.
ERF_CMP_WINDOW = 2.0 ** -5
GELU_EVEN_THRESHOLD = 4.125
GELU_EVEN_WINDOW = 2.0 ** -3
# fit_erf_sine_series(16, 4.0, 7, 8001); tests/compiler/test_approximations.py refits.
ERF_SINE_COEFFS = (
    1.3258256851832724,
    -0.2289757850407971,
    0.4355951668163921,
    -0.15878627671318069,
    0.12019555172042225,
    -0.030313100514413945,
    0.010418461005737479,
)

# fit_gelu_even_cos_series(16, 4.125, 7, 8001): gamma_0, then gamma_1..gamma_7 (the module
# docstring; tests/compiler/test_approximations.py refits).
GELU_EVEN_CONST = 3.446777978889845
GELU_EVEN_COEFFS = (
    -4.398254275410558,
    2.0779100616033905,
    -1.5697356976396186,
    0.7229350877178822,
    -0.34890897449160485,
    0.09197356761870205,
    -0.02266420901701746,
)

# PUMA GeLU pieces, lowest degree first (BASELINES.md; SPU/PUMA source).
PUMA_GELU_LEFT = (
    -0.5054031199708174,
    -0.42226581151983866,
    -0.11807612951181953,
    -0.011034134030615728,
)
PUMA_GELU_MID = (
    0.008526321541038084,
    0.5,
    0.3603292692789629,
    0.0,
    -0.037688200365904236,
    0.0,
    0.0018067462606141187,
)
PUMA_GELU_BREAKS = (-4.0, -1.95, 3.0)


def fit_erf_sine_series(
    period: float, threshold: float, terms: int, points: int = 8001
) -> tuple[float, ...]:
    """Least-squares beta_1..beta_K: erf(x/sqrt 2) ~= sum beta_k sin(2 pi k x / P) on [-T, T]."""
    x = np.linspace(-threshold, threshold, points)
    basis = np.sin(2 * np.pi / period * np.outer(x, np.arange(1, terms + 1)))
    target = np.array([math.erf(v / math.sqrt(2)) for v in x])
    beta, *_ = np.linalg.lstsq(basis, target, rcond=None)
    return tuple(float(b) for b in beta)


def fit_gelu_even_cos_series(
    period: float, threshold: float, terms: int, points: int = 8001
) -> tuple[float, tuple[float, ...]]:
    """Least squares (gamma_0, (gamma_1..gamma_K)): (x/2) erf(x/sqrt 2) ~= gamma_0 +
    sum gamma_k cos(2 pi k x / P) on [-T, T] (GeLU's even part; the odd part is x/2)."""
    x = np.linspace(-threshold, threshold, points)
    basis = np.cos(2 * np.pi / period * np.outer(x, np.arange(0, terms + 1)))
    target = np.array([0.5 * v * math.erf(v / math.sqrt(2)) for v in x])
    gamma, *_ = np.linalg.lstsq(basis, target, rcond=None)
    return float(gamma[0]), tuple(float(g) for g in gamma[1:])


def _poly(x: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    out = torch.zeros_like(x) + coeffs[-1]
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


@approximation(
    "gelu.exact",
    op="gelu",
    method="exact",
    domain=(-32.0, 32.0),
    declared_max_abs_err=0.0,
    source="torch.nn.functional.gelu, erf form (plaintext simulator only)",
)
def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


@approximation(
    "gelu.secformer",
    op="gelu",
    method="fourier_even",
    domain=(-32.0, 32.0),
    params={"period": ERF_SINE_PERIOD, "threshold": GELU_EVEN_THRESHOLD, "coeffs": GELU_EVEN_COEFFS,
            "const": GELU_EVEN_CONST, "form": "even", "input_bound": GELU_CMP_INPUT_BOUND,
            "window": GELU_EVEN_WINDOW},
    declared_max_abs_err=1.5e-4,
    source="SecFormer (Luo et al., Findings of ACL 2024), segmented Fourier-series GeLU with "
    "the secure sine; the series is of GeLU's even part (x/2) erf(x/sqrt 2), in cosines of a "
    "power-of-two period, so no product by x is needed (this module's docstring)",
    notes="same segments and comparisons as gelu.secformer_erf (the paper's erf form), half "
    "its dealt randomness; the error is the same for every |x| > T, so it holds beyond the "
    "swept domain up to input_bound (the 2PC comparisons' range, tightened per GeLU from the "
    "LayerNorm and linear layer before it by passes/bounds.py); each threshold (4.125) may move "
    "by up to the window 2^-3 towards zero there, where GeLU(x) = x is off by at most 1.27e-4",
)
@approximation(
    "gelu.secformer_erf",
    op="gelu",
    method="fourier_erf",
    domain=(-32.0, 32.0),
    params={"period": ERF_SINE_PERIOD, "threshold": ERF_SINE_THRESHOLD, "coeffs": ERF_SINE_COEFFS,
            "form": "erf", "input_bound": GELU_CMP_INPUT_BOUND, "window": ERF_CMP_WINDOW},
    declared_max_abs_err=1.5e-4,
    source="SecFormer (Luo et al., Findings of ACL 2024), erf by a segmented Fourier series; "
    "refit for a power-of-two period (this module's docstring)",
    notes="the error is the same for every |x| > T, so it holds beyond the swept domain, up "
    "to input_bound: the 2PC segment comparisons are right for |x| <= input_bound (their "
    "width is derived from it, runtime.protocols.nonlinear.gelu_cmp_plan), except that "
    "each threshold may move by up to 2^-5 towards zero there (about 1.5e-4 more error)",
)
def gelu_fourier(
    x: torch.Tensor, *, period: float, threshold: float, coeffs: tuple[float, ...],
    input_bound: float = GELU_CMP_INPUT_BOUND, form: str = "erf", const: float = 0.0,
    window: float = ERF_CMP_WINDOW, lookup: int = 0,
) -> torch.Tensor:
    """SecFormer's segmented Fourier GeLU: 0 for x < -T, x for x > T, and in between
    form "erf": x/2 (1 + sum beta_k sin(2 pi k x / P)) (the paper's erf series), or
    form "even": x/2 + const + sum gamma_k cos(2 pi k x / P) (the even part's series).

    input_bound, window and lookup are runtime parameters (the comparisons' width, how far
    they may move a threshold, and whether a lookup table may do them: the same segments
    and window, runtime/protocols/nonlinear.py); the float reference has no range limit and
    ignores them. Programs compiled before `form` existed hold erf
    coefficients and no form: the default reads them as such."""
    series = torch.zeros_like(x)
    if form == "erf":
        for k, beta in enumerate(coeffs, start=1):
            series = series + beta * torch.sin(x * (2 * math.pi * k / period))
        mid = 0.5 * x * (1 + series)
    elif form == "even":
        for k, gamma in enumerate(coeffs, start=1):
            series = series + gamma * torch.cos(x * (2 * math.pi * k / period))
        mid = 0.5 * x + const + series
    else:
        raise ValueError(f"gelu.secformer form must be 'erf' or 'even', got {form!r}")
    return torch.where(x > threshold, x, torch.where(x < -threshold, torch.zeros_like(x), mid))


@approximation(
    "gelu.quad",
    op="gelu",
    method="quad",
    domain=(-4.0, 4.0),
    params={"coeffs": (0.5, 0.25, 0.125)},
    declared_max_abs_err=1.5002,
    replacement=True,
    source="MPCFormer (Li et al., ICLR 2023), Quad = 0.125x^2 + 0.25x + 0.5 (its training code)",
    notes="a replacement, not an approximation: far from GeLU (1.5 at x = -4, 136 at |x| = 32), "
    "so the model must be distilled with it; the bound is reported against exact GeLU",
)
def gelu_quad(x: torch.Tensor, *, coeffs: tuple[float, ...]) -> torch.Tensor:
    return _poly(x, coeffs)


@approximation(
    "gelu.puma",
    op="gelu",
    method="piecewise_poly",
    domain=(-32.0, 32.0),
    params={"breaks": PUMA_GELU_BREAKS, "left": PUMA_GELU_LEFT, "mid": PUMA_GELU_MID},
    declared_max_abs_err=0.02,
    source=PUMA + " (GeLU: 0 | cubic | degree-6 | x split at -4, -1.95, 3)",
    notes="the worst error, 0.0199, is the jump at x = 3 (the degree-6 piece gives 3.0199)",
)
def gelu_puma(
    x: torch.Tensor,
    *,
    breaks: tuple[float, float, float],
    left: tuple[float, ...],
    mid: tuple[float, ...],
) -> torch.Tensor:
    """0 for x < -4; left cubic on [-4, -1.95); mid polynomial on [-1.95, 3]; x for x > 3."""
    b0, b1, b2 = breaks
    out = torch.where(x > b2, x, _poly(x, mid))
    out = torch.where(x < b1, _poly(x, left), out)
    return torch.where(x < b0, torch.zeros_like(x), out)


def sigmoid_crypten(
    x: torch.Tensor, *, exp_iterations: int, reciprocal_iterations: int, reciprocal_initial: float
) -> torch.Tensor:
    """CrypTen sigmoid ("reciprocal" method): 1 / (1 + exp(-|x|)), mirrored for x < 0."""
    negative = x < 0
    pos = torch.where(negative, -x, x)
    denom = 1 + exp_limit(-pos, iterations=exp_iterations)
    y = reciprocal_newton(
        denom, iterations=reciprocal_iterations, exp_iterations=0, initial=reciprocal_initial
    )
    return torch.where(negative, 1 - y, y)


@approximation(
    "gelu.crypten",
    op="gelu",
    method="tanh_sigmoid",
    domain=(-20.0, 20.0),
    params={
        "cubic": 0.044715,
        "exp_iterations": 9,
        "reciprocal_iterations": 3,
        "reciprocal_initial": 0.75,
    },
    declared_max_abs_err=8.5e-4,
    source=CRYPTEN + " (tanh = 2 sigmoid(2x) - 1; sigmoid overrides exp_iterations = 9, "
    "reciprocal_nr_iters = 3, reciprocal_initial = 0.75)",
    notes="breaks down for |x| > ~23.5, where 2 sqrt(2/pi)(x + 0.044715 x^3) exceeds 2^10 "
    "and exp(-|y|) = (1 - |y|/512)^512 becomes a huge even power (all-MiniLM-L6-v2 sees 24.7)",
)
def gelu_crypten(
    x: torch.Tensor,
    *,
    cubic: float,
    exp_iterations: int,
    reciprocal_iterations: int,
    reciprocal_initial: float,
) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))), tanh(z) = 2 sigmoid(2z) - 1 as in CrypTen."""
    z = SQRT_2_OVER_PI * (x + cubic * x * x * x)
    s = sigmoid_crypten(
        2 * z,
        exp_iterations=exp_iterations,
        reciprocal_iterations=reciprocal_iterations,
        reciprocal_initial=reciprocal_initial,
    )
    return 0.5 * x * (1 + (2 * s - 1))
