"""Goldschmidt reciprocal and inverse square root (SecFormer), and their calibration.

SecFormer replaces CrypTen's exp-seeded Newton iterations by Goldschmidt iterations,
which need no initial guess but converge only inside a range:

* reciprocal 1/v: y <- s*v, x <- 1; repeat m = 2 - y, x <- x*m, y <- y*m. With
  e = 1 - y0, after n iterations y = 1 - e^(2^n) and x = (1 - e^(2^n)) / y0, so the
  relative error is e^(2^n): it converges for y0 in (0, 2) and underestimates 1/v for
  every y0 in (0, 2), never overshooting.
* inverse square root 1/sqrt(v): x <- s*v, y <- 1; repeat m = (3 - x)/2, x <- x*m^2,
  y <- y*m. Invariant y^2 * x = x0, and x -> 1 quadratically once near 1 (x = 1 - e
  maps to 1 - 3e^2/4 - e^3/4); from a small x0 it grows by ~2.25x per iteration. It
  converges for x0 in (0, 3). Result 1/sqrt(v) = y * sqrt(s).

The public pre-scale s (the paper's released code has none) maps the calibrated input
range into that interval. `choose_goldschmidt` picks s as a power of two, so the runtime
applies s and the post-scale exactly (for rsqrt, even exponents make sqrt(s) a power of
two too and are preferred on ties), and the fewest iterations that meet a relative-error
target over the whole range, evaluated in float64 on a dense log-spaced grid (optionally
emulating f-bit fixed point). Values above the range keep converging up to
`headroom` x hi; values below it only under-converge (the error grows, nothing blows up).

Defaults used without calibration (`GOLDSCHMIDT_DEFAULTS`, reproduced by a test):

| use | kind | range | prescale | iterations | rel. error |
| LayerNorm var + eps | rsqrt | [1e-3, 1e3] | 2^-10 | 20 | 7.7e-5 |
| 2Quad row sums | reciprocal | [1, 8192] | 2^-13 | 17 | 1.1e-7 |

Seeded first step (`choose_seeded_goldschmidt`, what `calibrate_goldschmidt` uses for specs
that declare a `gamma` param: softmax.2quad and layernorm.secformer): the first factor
gamma - y (resp. (gamma - x)/2) with a prescale of a few significant bits, chosen together,
costs the same round as the plain step and puts the first iterate on both sides of 1; it
saves an iteration where the range ratio is a few (BERT-base's 2Quad row sums: 5 -> 4) and
falls back to the plain choice where it saves none, or only by giving up accuracy just above
the calibrated range (BERT-base's LayerNorms: 3 iterations would meet 1e-4 on the range but be
13% off at 1.5 hi, where 4 plain ones are 8e-4 off).

Wide ranges are expensive (each iteration is two dependent multiplications); calibrate
per LayerNorm / attention instance: e.g. all-MiniLM-L6-v2's embedding LayerNorm sees
var + eps in [0.002, 0.03] only (prescale 2^6, 6 iterations at 1e-4).

Fixed point limits this more than iteration counts do: the scaled input's resolution
2^-f / (s lo) is a relative error the iterations cannot remove. Emulated with floor
truncation (`frac_bits`), a 1e-3 target needs f >= 20 for var + eps in [0.13, 131],
f >= 24 for 2Quad sums in [1, 8192], f >= 32 for [1e-3, 1e3]; at f = 16 only narrow
ranges such as [0.002, 0.03] (5 iterations) reach it. So the runtime should calibrate
per instance and run this step with extra fractional bits (the squares feeding var and
the 2Quad sums carry 2f bits before truncation).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from ..runtime.protocols.goldschmidt import SEED_ROBUST as RUNTIME_SEED_ROBUST
from .spec import ApproxSpec, approximation

_BOUND = {"reciprocal": 2.0, "rsqrt": 3.0}
DEFAULT_TARGET_REL_ERR = 1e-4
# What `compile` asks of a calibrated step unless told otherwise (`compile(goldschmidt_target=
# ...)`, `secformer compile --goldschmidt-target`). 1e-3 saves one iteration (one round) in
# most of BERT-base's LayerNorms (seq 128: 370 -> 338 rounds) and moved all-MiniLM-L6-v2's
# SST-2 sentence embeddings by at most 4.5e-5; but one iteration less is far less margin
# outside the calibrated range: below lo a plain choice under-converges (a LayerNorm at 0.57
# lo: 2% off at 1e-3, 0.08% at 1e-4), and a seeded one is held to 10x the target only above
# hi. So the default stays 1e-4 (e2e_notes.md, seventeenth series).
CALIBRATION_TARGET_REL_ERR = DEFAULT_TARGET_REL_ERR
SOURCE = (
    "SecFormer (Luo et al., Findings of ACL 2024), Goldschmidt division / inverse sqrt; "
    "pre-scale and calibration: this project (DESIGN.md)"
)

Quantize = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def reciprocal_steps(y: torch.Tensor, quantize: Quantize = _identity,
                     gamma: float = 2.0) -> Iterator[torch.Tensor]:
    """Goldschmidt reciprocal of an already scaled y in (0, 2): yields x after each iteration.

    gamma: the first factor is gamma - y instead of 2 - y (a seeded first step, see
    `choose_seeded_goldschmidt`); every later one is 2 - y."""
    x = torch.ones_like(y)
    c = gamma
    while True:
        m = c - y
        x, y = quantize(x * m), quantize(y * m)
        c = 2
        yield x


def rsqrt_steps(x: torch.Tensor, quantize: Quantize = _identity,
                gamma: float = 3.0) -> Iterator[torch.Tensor]:
    """Goldschmidt 1/sqrt of an already scaled x in (0, 3): yields y after each iteration.

    gamma: the first factor is (gamma - x)/2 instead of (3 - x)/2 (seeded first step)."""
    y = torch.ones_like(x)
    c = gamma
    while True:
        m = quantize((c - x) / 2)
        x, y = quantize(quantize(x * m) * m), quantize(y * m)
        c = 3
        yield y


def _run(steps: Iterator[torch.Tensor], start: torch.Tensor, iterations: int) -> torch.Tensor:
    out = start
    for step in itertools.islice(steps, iterations):
        out = step
    return out


def reciprocal_goldschmidt(x: torch.Tensor, *, prescale: float, iterations: int,
                           gamma: float = 2.0) -> torch.Tensor:
    """1/x ~= s * Goldschmidt(s * x): `iterations` steps after the public pre-scale s."""
    y = x * prescale
    return _run(reciprocal_steps(y, gamma=gamma), torch.ones_like(y), iterations) * prescale


def rsqrt_goldschmidt(x: torch.Tensor, *, prescale: float, iterations: int,
                      gamma: float = 3.0) -> torch.Tensor:
    """1/sqrt(x) ~= sqrt(s) * Goldschmidt(s * x): `iterations` steps after the pre-scale s."""
    v = x * prescale
    return _run(rsqrt_steps(v, gamma=gamma), torch.ones_like(v), iterations) * math.sqrt(prescale)


class GoldschmidtChoice(NamedTuple):
    """Result of `choose_goldschmidt`: unpacks as (prescale, iterations, achieved_err)."""

    prescale: float
    iterations: int
    achieved_err: float


class GoldschmidtDefault(NamedTuple):
    """A conservative range used without calibration, and the parameters it implies."""

    kind: str
    lo: float
    hi: float
    target_rel_err: float
    choice: GoldschmidtChoice
    why: str


def _candidate_exponents(hi: float, bound: float, headroom: float) -> list[int]:
    # Largest j with 2^j * hi * headroom < bound, then a few smaller (for rsqrt a start
    # near 2 costs an extra iteration, so the largest admissible s is not always best).
    j = math.floor(math.log2(bound / (hi * headroom)))
    while 2.0**j * hi * headroom >= bound:
        j -= 1
    while 2.0 ** (j + 1) * hi * headroom < bound:
        j += 1
    return [j, j - 1, j - 2, j - 3]


def choose_goldschmidt(
    lo: float,
    hi: float,
    target_rel_err: float = DEFAULT_TARGET_REL_ERR,
    kind: str = "rsqrt",
    *,
    headroom: float = 1.5,
    frac_bits: int | None = None,
    grid: int = 4097,
    max_iterations: int = 64,
) -> GoldschmidtChoice:
    """Choose a power-of-two pre-scale and the fewest iterations for inputs in [lo, hi].

    kind: "rsqrt" (1/sqrt, convergence interval (0, 3)) or "reciprocal" (1/x, (0, 2)).
    headroom: inputs up to headroom * hi must still map inside the convergence interval,
        since calibration samples may miss the largest runtime values.
    frac_bits: if given, emulate f-bit fixed point (the scaled input and every product
        floored to a multiple of 2^-f) instead of exact float64.
    Returns (prescale, iterations, achieved_err): the max relative error over a
    `grid`-point log-spaced sweep of [lo, hi] with those parameters.
    Raises ValueError if no admissible pre-scale meets the target within max_iterations.
    """
    if kind not in _BOUND:
        raise ValueError(f"kind must be one of {sorted(_BOUND)}, got {kind!r}")
    if not 0 < lo <= hi or not math.isfinite(hi):
        raise ValueError(f"need 0 < lo <= hi < inf, got lo={lo}, hi={hi}")
    if not target_rel_err > 0 or headroom < 1:
        raise ValueError(
            f"need target_rel_err > 0 and headroom >= 1, got {target_rel_err}, {headroom}"
        )
    bound = _BOUND[kind]
    v = torch.logspace(math.log10(lo), math.log10(hi), grid, dtype=torch.float64)
    v[0], v[-1] = lo, hi  # exact endpoints: the error is largest at the range's ends
    if frac_bits is None:
        quantize = _identity
    else:
        unit = 2.0**-frac_bits
        quantize = lambda t: torch.floor(t / unit) * unit  # noqa: E731 (floor: worst case of trunc)

    results = []  # (iterations or inf, tie-break, -exponent, error): min() is the choice
    exponents = _candidate_exponents(hi, bound, headroom)
    exact = 1 / v if kind == "reciprocal" else torch.rsqrt(v)
    for j in exponents:
        s = 2.0**j
        if kind == "reciprocal":
            steps, post = reciprocal_steps(quantize(v * s), quantize), s
        else:
            steps, post = rsqrt_steps(quantize(v * s), quantize), math.sqrt(s)
        odd = j % 2 if kind == "rsqrt" else 0  # even exponent: sqrt(s) is a power of two
        outcome = (math.inf, odd, -j, math.inf)
        with torch.no_grad():
            for n, est in enumerate(itertools.islice(steps, max_iterations), start=1):
                err = float(((est * post - exact) / exact).abs().max())
                if err <= target_rel_err:
                    outcome = (n, odd, -j, err)
                    break
                outcome = (math.inf, odd, -j, min(err, outcome[3]))
        results.append(outcome)
    n, _, neg_j, err = min(results)
    if n == math.inf:
        detail = ", ".join(f"prescale 2^{-r[2]}: {r[3]:.2e}" for r in results)
        hint = ""
        scaled_lo = lo * 2.0 ** exponents[0]
        if frac_bits is not None and scaled_lo < 2.0 ** (4 - frac_bits):
            hint = (
                f"; lo * prescale = {scaled_lo:.2e} is within 16 units of the fixed-point "
                f"resolution 2^-{frac_bits}: narrow the range or add fractional bits"
            )
        raise ValueError(
            f"Goldschmidt {kind} cannot reach relative error {target_rel_err:g} on "
            f"[{lo:g}, {hi:g}] within {max_iterations} iterations (best error with "
            f"{detail}){hint}"
        )
    return GoldschmidtChoice(prescale=2.0**-neg_j, iterations=int(n), achieved_err=err)


# --- seeded first step ----------------------------------------------------------------------
#
# Goldschmidt's first factor is a linear function of the scaled input u = s v: 2 - u
# (reciprocal), (3 - u)/2 (rsqrt). Any linear first factor k (g - u) costs the same round
# (the first product opens u alone: u (g - u) resp. u (g - u)^2 / 4 are polynomials in u),
# and (k, g) is (s, g) again after rescaling u, so a seeded first step is a pre-scale with a
# few significant bits and a constant gamma in place of 2 (3). Chosen jointly they put the
# first iterate's error on both sides of 1 (a minimax seed) instead of one side: for the
# 2Quad row sums of BERT-base (range ratio 3.4 after the calibration margins) 4 iterations
# instead of 5 reach 1e-4, for its LayerNorm variances (ratio 3.2 to 3.4) 3 instead of 4.
SEED_GAMMA = {"reciprocal": (2.0, 2.75), "rsqrt": (3.0, 3.5)}  # runtime overflow bounds
SEED_GAMMA_UNIT = 2.0**-6  # gamma = g / 64: exact at the runtime's >= 18 fractional bits
# prescale = m 2^-k with m < 2^bits: the 2Quad runtime (prescale_const) keeps 4 bits exactly;
# LayerNorm folds 1/n^2 into its constant (nonlinear._ln_plan) and rounds that down, by at
# most 1/76 for n <= 1024 at f = 16: the target must also hold at prescale (1 - SEED_ROBUST)
SEED_PRESCALE_BITS = {"reciprocal": 4, "rsqrt": 6}
SEED_ROBUST = RUNTIME_SEED_ROBUST
# Between hi and headroom * hi the seeded choice must stay within this multiple of the target
# (the plain one is usually far below it there: a minimax seed that just meets the target
# on [lo, hi] can be 10% off at 1.5 hi, e.g. LayerNorm at 3 iterations on [0.8, 2.7]).
SEED_HEADROOM_ERR = 10.0


class SeededChoice(NamedTuple):
    """Result of `choose_seeded_goldschmidt`."""

    prescale: float
    gamma: float
    iterations: int
    achieved_err: float


def _first_ok(kind: str, u: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Whether the first iterate of every u (last dim) stays inside the convergence interval."""
    if kind == "reciprocal":
        y1 = u * (gamma - u)
        return ((y1 > 0) & (y1 < 2)).all(-1)
    x1 = u * (gamma - u) ** 2 / 4
    return ((u < gamma) & (x1 > 0) & (x1 < 3)).all(-1)


def choose_seeded_goldschmidt(
    lo: float,
    hi: float,
    target_rel_err: float = DEFAULT_TARGET_REL_ERR,
    kind: str = "rsqrt",
    *,
    headroom: float = 1.5,
    grid: int = 1025,
    max_iterations: int = 64,
    applied: Callable[[float], float] | None = None,
) -> SeededChoice:
    """Pre-scale, first-step constant gamma and the fewest iterations for inputs in [lo, hi].

    Searches prescales m 2^-k (m < 2^SEED_PRESCALE_BITS[kind]) and gamma on a 1/64 grid inside
    `SEED_GAMMA[kind]`, with inputs up to headroom * hi inside the convergence interval
    after the first step, the target met at prescale and at prescale (1 - SEED_ROBUST), and
    at most SEED_HEADROOM_ERR times the target between hi and headroom * hi.
    applied(p): the prescale the runtime will actually apply for p (LayerNorm folds 1/n^2 or
    1/n into it and rounds down); candidates it lowers by more than SEED_ROBUST are skipped.
    Falls back to `choose_goldschmidt`'s power of two and standard gamma when the seed saves
    no iteration (the same program as before)."""
    plain = choose_goldschmidt(lo, hi, target_rel_err, kind, headroom=headroom, grid=grid,
                               max_iterations=max_iterations)
    std_gamma = SEED_GAMMA[kind][0]
    fallback = SeededChoice(plain.prescale, std_gamma, plain.iterations, plain.achieved_err)
    if plain.iterations <= 1:
        return fallback
    g_lo, g_hi = SEED_GAMMA[kind]
    gammas = torch.arange(round(g_lo / SEED_GAMMA_UNIT), round(g_hi / SEED_GAMMA_UNIT) + 1,
                          dtype=torch.float64) * SEED_GAMMA_UNIT
    j0 = math.floor(math.log2(_BOUND[kind] / hi))
    bits = SEED_PRESCALE_BITS[kind]
    cands = sorted({m * 2.0 ** (j - bits) for j in range(j0 - 2, j0 + 3)
                    for m in range(1 << (bits - 1), 1 << bits)})
    if applied is not None:
        cands = [p for p in cands if applied(p) >= p * (1 - SEED_ROBUST)]
    if not cands:
        return fallback
    prescales = torch.tensor(cands, dtype=torch.float64)

    def errors(points: int, s: torch.Tensor, g: torch.Tensor, n: int, top: float = hi,
               bottom: float = lo) -> torch.Tensor:
        """Max relative error after n iterations of each (s, g) pair on [bottom, top], at s and
        s (1 - robust)."""
        v = torch.logspace(math.log10(bottom), math.log10(top), points, dtype=torch.float64)
        v[0], v[-1] = bottom, top
        exact = 1 / v if kind == "reciprocal" else torch.rsqrt(v)
        worst = torch.zeros(len(s), dtype=torch.float64)
        for sc in (s, s * (1 - SEED_ROBUST)):
            u = v[None, :] * sc[:, None]
            if kind == "reciprocal":
                est, post = _run(reciprocal_steps(u, gamma=g[:, None]), u, n), sc[:, None]
            else:
                est, post = _run(rsqrt_steps(u, gamma=g[:, None]), u, n), sc[:, None].sqrt()
            worst = torch.maximum(worst, ((est * post - exact) / exact).abs().amax(-1))
        return worst

    with torch.no_grad():
        # (prescale, gamma) pairs whose first step keeps inputs up to headroom * hi inside the
        # convergence interval
        vh = torch.logspace(math.log10(lo), math.log10(hi * headroom), 257, dtype=torch.float64)
        S, G = torch.meshgrid(prescales, gammas, indexing="ij")
        S, G = S.reshape(-1), G.reshape(-1)
        ok = _first_ok(kind, vh[None, :] * S[:, None], G[:, None])
        S, G = S[ok], G[ok]
        def meets(n: int) -> SeededChoice | None:
            # above hi (calibration samples miss the largest runtime values) the plain choice
            # degrades gracefully; a seed may not do much worse there
            coarse = torch.maximum(errors(257, S, G, n),
                                   errors(129, S, G, n, hi * headroom, hi) / SEED_HEADROOM_ERR)
            for k in torch.argsort(coarse)[:8].tolist():  # confirm on the full grid
                if float(coarse[k]) > target_rel_err:
                    break
                err = float(errors(grid, S[k:k + 1], G[k:k + 1], n)[0])
                above = float(errors(grid, S[k:k + 1], G[k:k + 1], n, hi * headroom, hi)[0])
                if err <= target_rel_err and above <= SEED_HEADROOM_ERR * target_rel_err:
                    return SeededChoice(float(S[k]), float(G[k]), n, err)
            return None

        best = None  # fewer iterations than plain, then as few as still meet the target
        for n in range(plain.iterations - 1, 0, -1):
            found = meets(n)
            if found is None:
                break
            best = found
    return fallback if best is None else best


GOLDSCHMIDT_DEFAULTS: dict[str, GoldschmidtDefault] = {
    "layernorm_var": GoldschmidtDefault(
        kind="rsqrt",
        lo=1e-3,
        hi=1e3,
        target_rel_err=DEFAULT_TARGET_REL_ERR,
        choice=GoldschmidtChoice(prescale=2.0**-10, iterations=20, achieved_err=7.6715e-05),
        why="var + eps of every LayerNorm of all-MiniLM-L6-v2 on 64 SST-2 dev sentences "
        "spans [0.0021, 130]; [1e-3, 1e3] covers it with margin",
    ),
    "softmax_2quad_sum": GoldschmidtDefault(
        kind="reciprocal",
        lo=1.0,
        hi=8192.0,
        target_rel_err=DEFAULT_TARGET_REL_ERR,
        choice=GoldschmidtChoice(prescale=2.0**-13, iterations=17, achieved_err=1.1243e-07),
        why="sum of (x + 5)^2 over <= 128 unmasked scores in [-4, 3]: each term in [1, 64]",
    ),
}

_LN = GOLDSCHMIDT_DEFAULTS["layernorm_var"]
_SM = GOLDSCHMIDT_DEFAULTS["softmax_2quad_sum"]


@approximation(
    "reciprocal.goldschmidt",
    op="reciprocal",
    method="goldschmidt",
    domain=(_SM.lo, _SM.hi),
    params={"prescale": _SM.choice.prescale, "iterations": _SM.choice.iterations},
    declared_max_rel_err=1.2e-7,
    source=SOURCE,
    notes="defaults sized for 2Quad row sums; calibrate with calibrate_goldschmidt()",
)
def _reciprocal_goldschmidt(x: torch.Tensor, **params) -> torch.Tensor:
    return reciprocal_goldschmidt(x, **params)


@approximation(
    "rsqrt.goldschmidt",
    op="rsqrt",
    method="goldschmidt",
    domain=(_LN.lo, _LN.hi),
    params={"prescale": _LN.choice.prescale, "iterations": _LN.choice.iterations},
    declared_max_rel_err=8e-5,
    source=SOURCE,
    notes="defaults sized for LayerNorm var + eps; calibrate with calibrate_goldschmidt()",
)
def _rsqrt_goldschmidt(x: torch.Tensor, **params) -> torch.Tensor:
    return rsqrt_goldschmidt(x, **params)


_CALIBRATABLE = {
    "reciprocal": "reciprocal",
    "rsqrt": "rsqrt",
    "layernorm": "rsqrt",
    "softmax": "reciprocal",
}


def calibrate_goldschmidt(
    spec: ApproxSpec, lo: float, hi: float, target_rel_err: float = DEFAULT_TARGET_REL_ERR,
    applied: Callable[[float], float] | None = None, table_seed: bool = True,
    features: int | None = None, **kwargs
) -> ApproxSpec:
    """A variant of a Goldschmidt-based spec with pre-scale and iterations chosen for [lo, hi].

    [lo, hi] is the observed range of the Goldschmidt input: x for reciprocal/rsqrt,
    var + eps for layernorm, the row sums of the 2Quad numerator for softmax. kwargs go to
    `choose_goldschmidt`; applied: see `choose_seeded_goldschmidt` (specs with a `gamma`
    param only). The variant declares the achieved error: relative for
    reciprocal/rsqrt/layernorm (layernorm's normalized outputs carry rsqrt's relative
    error), absolute for 2Quad (its outputs are <= 1, so absolute <= relative).
    """
    if "prescale" not in spec.params or "iterations" not in spec.params:
        raise ValueError(f"{spec.name} has no Goldschmidt pre-scale/iterations to calibrate")
    kind = _CALIBRATABLE[spec.op]
    extra = {}
    if "gamma" in spec.params:  # the spec's function takes a seeded first step
        seeded = choose_seeded_goldschmidt(lo, hi, target_rel_err, kind, applied=applied, **kwargs)
        choice = GoldschmidtChoice(seeded.prescale, seeded.iterations, seeded.achieved_err)
        extra["gamma"] = seeded.gamma
    else:
        choice = choose_goldschmidt(lo, hi, target_rel_err, kind, **kwargs)
    if table_seed and "table_bits" in spec.params and (spec.op == "softmax" or features):
        from .table_seed import choose_table_reciprocal, choose_table_rsqrt

        # a table seed where it takes fewer rounds than Goldschmidt's `iterations`
        opts = dict(headroom=kwargs.get("headroom", 1.5), max_rounds=choice.iterations - 1)
        if spec.op == "softmax":
            table = choose_table_reciprocal(lo, hi, target_rel_err, **opts)
            if table is not None:
                choice = GoldschmidtChoice(table.prescale, table.iterations, table.achieved_err)
                extra = {"gamma": 2.0, "table_bits": table.table_bits}
        else:  # a LayerNorm over `features`
            table = choose_table_rsqrt(lo, hi, features, target_rel_err, **opts)
            if table is not None:
                choice = GoldschmidtChoice(choice.prescale, table.iterations, table.achieved_err)
                extra = {"gamma": 3.0, "table_bits": table.table_bits, "table_exp": table.table_exp,
                         "table_width": features}
    margin = choice.achieved_err * 1.01 + 1e-15
    if spec.op == "softmax":
        return spec.derive(
            declared_max_abs_err=margin,
            notes=f"{spec.notes}; division calibrated for row sums in [{lo:g}, {hi:g}]",
            prescale=choice.prescale,
            iterations=choice.iterations,
            **extra,
        )
    return spec.derive(
        domain=(lo, hi),
        declared_max_rel_err=margin,
        prescale=choice.prescale,
        iterations=choice.iterations,
        **extra,
    )
