"""Approximation specs: declared error bounds, the GeLU refit, masks, calibration, registry.

The sweeps are deterministic (measure.py seeds its random rows with 0); reproduce one with
    .venv/bin/python -m pytest tests/compiler/test_approximations.py -k "<spec name>"
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from secformer_compiler.approx.goldschmidt import reciprocal_goldschmidt, rsqrt_goldschmidt
from secformer_compiler.approx.softmax import quad2_exact
from secformer_compiler.approximations import (
    APPROXIMATIONS,
    ERF_SINE_COEFFS,
    GELU_EVEN_COEFFS,
    GELU_EVEN_CONST,
    GOLDSCHMIDT_DEFAULTS,
    ApproxSpec,
    DuplicateApproximationError,
    UnknownApproximationError,
    approximation,
    approximations_for,
    calibrate_goldschmidt,
    choose_goldschmidt,
    fit_erf_sine_series,
    fit_gelu_even_cos_series,
    get_approx,
    measure_error,
    register,
)

SPEC_NAMES = sorted(APPROXIMATIONS)


def test_catalog_has_the_presets_specs():
    expected = {
        "gelu.secformer", "gelu.secformer_erf", "gelu.quad", "gelu.puma", "gelu.crypten", "gelu.exact",
        "softmax.2quad", "softmax.exact", "softmax.puma", "softmax.crypten",
        "layernorm.secformer", "layernorm.crypten", "layernorm.puma", "layernorm.exact",
        "reciprocal.goldschmidt", "reciprocal.newton", "rsqrt.goldschmidt", "rsqrt.newton",
        "exp.limit",
    }  # fmt: skip
    assert expected <= set(APPROXIMATIONS)
    for op in ("gelu", "softmax", "layernorm", "rsqrt", "reciprocal", "exp"):
        assert f"{op}.exact" in APPROXIMATIONS, "every op needs an exact target"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_declared_bound_holds_over_domain(name):
    """The one generic check: sweep the declared domain; the declared bound holds, tightly."""
    spec = get_approx(name)
    report = measure_error(spec)
    for kind, declared, measured, where in (
        ("abs", spec.declared_max_abs_err, report.max_abs, report.worst_abs_input),
        ("rel", spec.declared_max_rel_err, report.max_rel, report.worst_rel_input),
    ):
        if declared is None:
            continue
        assert measured <= declared, (
            f"{name}: max {kind} error {measured:.4g} > declared {declared:.4g} at {where}"
        )
        # Honest *and* informative: a bound far above the measurement is stale.
        assert declared <= max(2 * measured, measured + 1e-9), (
            f"{name}: declared {kind} bound {declared:.4g} is loose "
            f"(measured {measured:.4g}); tighten it"
        )


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_reference_is_differentiable_and_keeps_dtype(name):
    spec = get_approx(name)
    lo, hi = spec.domain
    if spec.op == "softmax":
        x = torch.linspace(lo, hi, 24, dtype=torch.float64).reshape(3, 8)
        args = (torch.tensor([1.0, 1, 1, 0, 1, 0, 1, 1]),)
    elif spec.op == "layernorm":
        x = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(2, 8) * math.sqrt(lo * 4) + 1
        args = ()
    else:
        x = torch.linspace(lo, hi, 37, dtype=torch.float64)
        args = ()
    x.requires_grad_(True)
    spec.reference(x, *args).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all(), f"{name}: non-finite gradient"
    assert spec.reference(x.detach().float(), *args).dtype == torch.float32


def test_gelu_refit_reproduces_coefficients():
    spec = get_approx("gelu.secformer_erf")
    refit = fit_erf_sine_series(spec.period, spec.threshold, len(spec.coeffs))
    assert refit == pytest.approx(ERF_SINE_COEFFS, abs=1e-9)
    assert spec.coeffs == ERF_SINE_COEFFS and spec.form == "erf"
    even = get_approx("gelu.secformer")
    const, coeffs = fit_gelu_even_cos_series(even.period, even.threshold, len(even.coeffs))
    assert const == pytest.approx(GELU_EVEN_CONST, abs=1e-9)
    assert coeffs == pytest.approx(GELU_EVEN_COEFFS, abs=1e-9)
    assert even.coeffs == GELU_EVEN_COEFFS and even.const == GELU_EVEN_CONST and even.form == "even"


@pytest.mark.parametrize("name", ["gelu.secformer", "gelu.secformer_erf"])
def test_gelu_secformer_fits_the_ring_and_the_runtime_budget(name):
    spec = get_approx(name)
    assert math.log2(spec.period).is_integer(), "P * 2^f must divide 2^64 for the secure sine"
    assert (spec.threshold * 2**16).is_integer(), "segment bounds must be exact in fixed point"
    assert len(spec.coeffs) in (7, 8)
    lo, hi = spec.domain
    assert lo <= -20 and hi >= 20 and spec.declared_max_abs_err <= 0.01


def test_gelu_forms_share_segments_and_old_params_read_as_erf():
    """Both forms give x above T and 0 below -T; params without "form" (programs compiled
    before the even form) are the erf series."""
    even, erf = get_approx("gelu.secformer"), get_approx("gelu.secformer_erf")
    x = torch.tensor([-30.0, -4.5, 4.5, 30.0], dtype=torch.float64)
    for spec in (even, erf):
        assert torch.equal(spec.reference(x), torch.tensor([0.0, 0.0, 4.5, 30.0], dtype=torch.float64))
    old = {k: v for k, v in erf.params.items() if k != "form"}
    y = torch.linspace(-4, 4, 101, dtype=torch.float64)
    assert torch.equal(erf.fn(y, **old), erf.reference(y))
    with pytest.raises(ValueError, match="form"):
        erf.fn(y, **{**old, "form": "odd"})


def test_gelu_puma_branches():
    f = get_approx("gelu.puma").reference
    x = torch.tensor([-5.0, -4.0, -1.96, -1.95, 3.0, 3.5, 10.0], dtype=torch.float64)
    y = f(x)
    mid = get_approx("gelu.puma").mid
    assert y[0] == 0 and y[5] == 3.5 and y[6] == 10.0  # x < -4 -> 0; x > 3 -> x
    assert y[3] == pytest.approx(sum(c * (-1.95) ** i for i, c in enumerate(mid)))  # -1.95 is mid
    assert y[4] == pytest.approx(sum(c * 3.0**i for i, c in enumerate(mid)))  # 3 is mid
    assert abs(y[2] - torch.nn.functional.gelu(x[2])) < 0.01  # [-4, -1.95) is the cubic


@pytest.mark.parametrize("name", [s.name for s in approximations_for("softmax")])
def test_softmax_mask_drops_positions(name):
    spec = get_approx(name)
    lo, hi = spec.domain
    gen = torch.Generator().manual_seed(1)
    x = lo + (hi - lo) * torch.rand(4, 10, generator=gen, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    out = spec.reference(x, keep.to(torch.float64))
    assert (out[:, ~keep] == 0).all()
    compact = spec.reference(x[:, keep])
    assert out[:, keep] == pytest.approx(compact, abs=1e-12, rel=0)
    empty = spec.reference(x, torch.zeros(10, dtype=torch.float64))
    assert (empty == 0).all(), "a fully masked row must give zeros, not NaN"


def test_2quad_mask_is_multiplicative_not_additive():
    spec = get_approx("softmax.2quad")
    x = torch.tensor([[0.5, -1.0, 2.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    num = (x + spec.c) ** 2 * mask
    assert spec.reference(x, mask) == pytest.approx(num / num.sum(), abs=1e-6)
    additive = quad2_exact(x + (1 - mask) * -1e4, c=spec.c)  # the HF convention, wrong for 2Quad
    assert additive[0, 2] > 0.99


# --- calibration ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(GOLDSCHMIDT_DEFAULTS))
def test_goldschmidt_defaults_are_reproduced(key):
    d = GOLDSCHMIDT_DEFAULTS[key]
    got = choose_goldschmidt(d.lo, d.hi, d.target_rel_err, d.kind)
    assert (got.prescale, got.iterations) == (d.choice.prescale, d.choice.iterations)
    assert got.achieved_err == pytest.approx(d.choice.achieved_err, rel=1e-3)


def _max_rel_err(kind, lo, hi, prescale, iterations):
    v = torch.logspace(math.log10(lo), math.log10(hi), 4097, dtype=torch.float64)
    if kind == "reciprocal":
        return float(
            (reciprocal_goldschmidt(v, prescale=prescale, iterations=iterations) * v - 1)
            .abs()
            .max()
        )
    return float(
        (rsqrt_goldschmidt(v, prescale=prescale, iterations=iterations) * v.sqrt() - 1).abs().max()
    )


@pytest.mark.parametrize(
    "lo, hi, target, kind",
    [
        (1e-3, 1e3, 1e-4, "rsqrt"),
        (0.002, 0.03, 1e-4, "rsqrt"),
        (1.0, 5000.0, 1e-3, "reciprocal"),
        (0.5, 0.6, 1e-6, "reciprocal"),
    ],
)
def test_choose_goldschmidt_is_minimal_and_safe(lo, hi, target, kind):
    s, n, err = choose_goldschmidt(lo, hi, target, kind)
    assert math.log2(s).is_integer(), "pre-scale must be a power of two"
    bound = {"reciprocal": 2.0, "rsqrt": 3.0}[kind]
    assert s * hi * 1.5 < bound, (
        "default headroom 1.5 x hi must stay inside the convergence interval"
    )
    assert err <= target and _max_rel_err(kind, lo, hi, s, n) == pytest.approx(err, rel=1e-9)
    assert _max_rel_err(kind, lo, hi, s, n - 1) > target, "one iteration fewer must miss the target"


def test_choose_goldschmidt_small_range_scales_up():
    # all-MiniLM-L6-v2's embedding LayerNorm: var + eps in [0.002, 0.03]
    s, n, _ = choose_goldschmidt(0.002, 0.03, 1e-4, "rsqrt")
    assert (s, n) == (64.0, 6)


def test_choose_goldschmidt_rejects_bad_requests():
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        choose_goldschmidt(0.0, 1.0, 1e-3, "rsqrt")
    with pytest.raises(ValueError, match="kind"):
        choose_goldschmidt(1.0, 2.0, 1e-3, "sqrt")
    with pytest.raises(ValueError, match="cannot reach"):
        choose_goldschmidt(1e-3, 1e3, 1e-3, "reciprocal", max_iterations=5)


def test_choose_goldschmidt_fixed_point_emulation():
    with pytest.raises(ValueError, match="fixed-point resolution 2\\^-16"):
        choose_goldschmidt(1e-3, 1e3, 1e-3, "rsqrt", frac_bits=16)
    s, n, err = choose_goldschmidt(0.002, 0.03, 1e-3, "rsqrt", frac_bits=16)
    assert err <= 1e-3 and s == 64.0


def test_calibrate_goldschmidt_derives_checked_variants():
    ln = get_approx("layernorm.secformer")
    tuned = calibrate_goldschmidt(ln, 0.13, 131.0)
    assert tuned.iterations < ln.iterations and tuned.domain == (0.13, 131.0)
    assert measure_error(tuned).max_rel <= tuned.declared_max_rel_err
    assert APPROXIMATIONS["layernorm.secformer"] is ln, "variants are not registered"

    quad = get_approx("softmax.2quad")
    tuned = calibrate_goldschmidt(quad, 64.0, 4096.0)
    assert tuned.domain == quad.domain and "[64, 4096]" in tuned.notes
    with pytest.raises(ValueError, match="no Goldschmidt"):
        calibrate_goldschmidt(get_approx("gelu.puma"), 1.0, 2.0)


def test_seeded_goldschmidt_choice():
    """Fewer iterations than the plain choice where a seed helps, never more; the target
    holds on the range at the prescale and at prescale (1 - SEED_ROBUST); inputs up to 1.5 hi
    stay inside the convergence interval after the first step; gamma on the 1/64 grid and
    the prescale with the runtime's significant bits."""
    from secformer_compiler.approx import goldschmidt as gs

    for kind, lo, hi in [("reciprocal", 2457.0, 8363.0), ("rsqrt", 1.0, 4.0), ("rsqrt", 0.7985, 2.698),
                         ("rsqrt", 0.002, 0.03), ("reciprocal", 0.5, 0.6)]:
        c = gs.choose_seeded_goldschmidt(lo, hi, 1e-4, kind)
        plain = choose_goldschmidt(lo, hi, 1e-4, kind)
        assert c.iterations <= plain.iterations
        if c.iterations == plain.iterations:  # no gain: exactly the plain program
            assert (c.prescale, c.gamma) == (plain.prescale, gs.SEED_GAMMA[kind][0])
            continue
        assert (c.gamma / gs.SEED_GAMMA_UNIT).is_integer()
        assert gs.SEED_GAMMA[kind][0] <= c.gamma <= gs.SEED_GAMMA[kind][1]
        m, _ = math.frexp(c.prescale)
        assert (m * 2 ** gs.SEED_PRESCALE_BITS[kind]).is_integer()
        v = torch.logspace(math.log10(lo), math.log10(hi), 20001, dtype=torch.float64)
        fn = gs.reciprocal_goldschmidt if kind == "reciprocal" else gs.rsqrt_goldschmidt
        exact = 1 / v if kind == "reciprocal" else torch.rsqrt(v)
        for s in (c.prescale, c.prescale * (1 - gs.SEED_ROBUST)):
            est = fn(v, prescale=s, iterations=c.iterations, gamma=c.gamma)
            assert float(((est - exact) / exact).abs().max()) <= 1.0001e-4
            above = torch.linspace(hi, 1.5 * hi, 2001, dtype=torch.float64)
            est = fn(above, prescale=s, iterations=c.iterations, gamma=c.gamma)
            ex = 1 / above if kind == "reciprocal" else torch.rsqrt(above)
            assert float(((est - ex) / ex).abs().max()) <= gs.SEED_HEADROOM_ERR * 1.0001e-4
        u = torch.linspace(lo, 1.5 * hi, 5001, dtype=torch.float64) * c.prescale
        assert bool(gs._first_ok(kind, u, torch.tensor(c.gamma, dtype=torch.float64)))
    assert gs.choose_seeded_goldschmidt(2457.0, 8363.0, 1e-4, "reciprocal").iterations == 4  # was 5
    # BERT-base's LayerNorm variances: 3 iterations would meet 1e-4 on the range but be ~13%
    # off at 1.5 hi (4 plain ones: 8e-4), so the plain choice stays
    assert gs.choose_seeded_goldschmidt(0.7985, 2.698, 1e-4, "rsqrt").gamma == 3.0


def test_calibrate_goldschmidt_seeds_specs_that_take_gamma():
    quad = get_approx("softmax.2quad")
    tuned = calibrate_goldschmidt(quad, 2457.0, 8363.0, table_seed=False)
    assert tuned.params["gamma"] != 2.0 and tuned.iterations == 4 and tuned.params["table_bits"] == 0
    ln = calibrate_goldschmidt(get_approx("layernorm.secformer"), 1.0, 4.0)
    assert ln.params["gamma"] != 3.0 and ln.iterations == 4  # plain: 5
    assert measure_error(ln).max_rel <= ln.declared_max_rel_err
    plain = get_approx("reciprocal.goldschmidt")  # declares no gamma: the plain step
    assert "gamma" not in calibrate_goldschmidt(plain, 2457.0, 8363.0).params


def test_calibrate_goldschmidt_seeds_2quad_from_a_table_where_it_saves_rounds():
    """2Quad's division becomes a table seed and one Newton step (2 rounds) where that meets
    the target; the derived spec declares the error it achieves and meets it; a range too
    wide for a cheaper table keeps Goldschmidt; specs without table_bits never change."""
    quad = get_approx("softmax.2quad")
    tuned = calibrate_goldschmidt(quad, 2457.0, 8363.0)
    assert tuned.params["table_bits"] > 0 and tuned.iterations == 1
    assert tuned.declared_max_abs_err <= 1e-4 * 1.01
    x = torch.rand(64, 4, 128, dtype=torch.float64) * 7 - 4  # row sums of (x + 5)^2 in [1, 8192]
    x = x.clamp(-0.62, 3)  # ... here, sums above 128 * 4.38^2 = 2457: inside the range
    got = tuned.fn(x, **tuned.params)
    want = ((x + 5) ** 2) / ((x + 5) ** 2).sum(-1, keepdim=True)
    assert (got - want).abs().max().item() <= tuned.declared_max_abs_err
    wide = calibrate_goldschmidt(quad, 1.0, 8192.0)  # no table within 11 bits and 3 steps pays
    assert wide.params["table_bits"] == 0
    ln = calibrate_goldschmidt(get_approx("layernorm.secformer"), 1.0, 4.0)
    assert ln.params["table_bits"] == 0  # a LayerNorm's table needs its width
    ln = calibrate_goldschmidt(get_approx("layernorm.secformer"), 0.69, 2.87, features=768)
    assert ln.params["table_bits"] > 0 and ln.iterations == 1 and ln.params["table_exp"] % 2 == 0
    assert measure_error(ln).max_rel <= ln.declared_max_rel_err


# --- registry and spec data ----------------------------------------------------------------


def _dummy_spec(name="gelu.secformer"):
    return ApproxSpec(
        name=name, op="gelu", method="x", domain=(0, 1), fn=lambda x: x, declared_max_abs_err=1.0
    )


def test_duplicate_names_are_rejected():
    before = dict(APPROXIMATIONS)
    with pytest.raises(DuplicateApproximationError, match="'gelu.secformer' is already registered"):
        register(_dummy_spec())
    with pytest.raises(DuplicateApproximationError):
        approximation(
            "gelu.secformer", op="gelu", method="x", domain=(0, 1), declared_max_abs_err=1.0
        )(lambda x: x)
    assert APPROXIMATIONS == before


def test_unknown_name_lists_available():
    with pytest.raises(
        UnknownApproximationError,
        match="no approximation named 'gelu.nope'; available: .*gelu.puma",
    ):
        get_approx("gelu.nope")


def test_spec_validation_and_param_access():
    with pytest.raises(ValueError, match="declare declared_max_abs_err"):
        ApproxSpec(name="gelu.t", op="gelu", method="x", domain=(0, 1), fn=lambda x: x)
    with pytest.raises(ValueError, match="op 'sigmoid'"):
        ApproxSpec(
            name="sigmoid.t",
            op="sigmoid",
            method="x",
            domain=(0, 1),
            fn=lambda x: x,
            declared_max_abs_err=0,
        )
    spec = get_approx("gelu.secformer")
    assert spec.period == 16 and spec.threshold == 4.125  # the even form: window 2^-3 stops at 4
    with pytest.raises(AttributeError, match="no field or param 'nope'"):
        _ = spec.nope
    with pytest.raises(TypeError):
        spec.params["period"] = 20  # read-only
    clone = pickle.loads(pickle.dumps(spec))
    assert clone == spec and clone.coeffs == spec.coeffs
    with pytest.raises(TypeError, match="unknown params"):
        spec.derive(declared_max_abs_err=1.0, periodd=8)
