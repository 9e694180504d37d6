"""GeLU variants and tanh (runtime/protocols/activations.py) against their specs' float64 references.

Each protocol runs in the LocalCluster (P0, P1, dealer) and in the simulator over its
spec's whole declared domain (dense sweep, the ends, every breakpoint +- a few ulps, and
some values far outside where the protocol still claims to be right). The reference is
evaluated at the fixed-point input the protocol actually sees (x_int / 2^f), so a jump
of the reference (PUMA at 3, the sine series at +-T) is compared on the same side. The
bounds asserted are the measured 2PC errors with a margin (printed); the declared cost
must equal what the transport counted.
"""

import math

import numpy as np
import pytest
import torch

from secformer_compiler.approximations import get_approx, measure_error
from secformer_compiler.approx.tanh import TANH_SINE_COEFFS, fit_tanh_sine_series
from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.protocols import activations as act
from secformer_compiler.runtime.protocols import arith
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint(16)
ULP = 2.0 ** -16


@pytest.fixture(scope="module")
def cluster():
    torch.empty(1, device="meta") * 2  # torch's first meta op imports for seconds: not a test's time
    return LocalCluster(FX)


def P(name):
    """A spec's params: the protocols take them as keywords (what the lowering passes)."""
    return dict(get_approx(name).params)


def sweep(lo, hi, n, points=(), far=()):
    """Equispaced [lo, hi], the given points +- 0..2 ulps, values outside, some random."""
    near = [p + k * ULP for p in points for k in (-2, -1, 0, 1, 2)]
    rand = lo + (hi - lo) * torch.rand(2000, dtype=torch.float64)
    x = torch.cat([torch.linspace(lo, hi, n, dtype=torch.float64),
                   torch.tensor([lo, hi, 0.0, ULP, -ULP, *near, *far], dtype=torch.float64), rand])
    return FX.decode(FX.encode(x))  # exactly the inputs the protocol sees


def run_both(cluster, proto, x, **kw):
    """(2PC output, simulator output, RunStats, simulator Counter), decoded."""
    shape = x.shape

    def program(ctx, xv):
        s = yield from arith.share(ctx, xv, 0, shape)
        y = yield from proto(ctx, s, **kw)
        return (yield from arith.reveal(ctx, y))

    o0, o1, stats = cluster.run(program, (FX.encode(x),), (None,))
    assert torch.equal(o0, o1)
    clear, counter = run_clear(program, FX.encode(x), fxp=FX)
    return FX.decode(o0), FX.decode(clear), stats, counter


def check_cost(stats, counter, declared, shape):
    """Declared cost == counted (both parties, and the simulator's rounds)."""
    io = arith.share_cost(shape) + arith.reveal_cost(shape)
    assert stats.rounds == counter.rounds == declared.rounds + io.rounds
    assert stats.bytes_sent[1] == declared.bytes + arith.reveal_cost(shape).bytes
    assert stats.bytes_sent[0] == declared.bytes + io.bytes


def check_accuracy(name, x, got, clear, bound, spec_name, inside=None):
    """2PC and simulator within `bound` of the spec's reference; report vs the exact function."""
    spec = get_approx(spec_name)
    ref = spec.reference(x)
    for label, out in (("2pc", got), ("clear", clear)):
        err = (out - ref).abs()
        i = int(err.argmax())
        print(f"{name} {label}: max |out - ref| {float(err[i]):.3e} at x = {float(x[i]):.6f}")
        assert float(err[i]) <= bound, f"{name} {label}: {float(err[i]):.3e} at x = {float(x[i])}"
    exact = get_approx(f"{spec.op}.exact").reference(x)
    m = torch.ones_like(x, dtype=torch.bool) if inside is None else inside
    total = float((got - exact)[m].abs().max())
    print(f"{name}: max |out - exact| {total:.3e} (spec declares {spec.declared_max_abs_err})")
    assert total <= spec.declared_max_abs_err + bound


def test_gelu_quad(cluster, seed):
    x = sweep(-4, 4, 8001)
    got, clear, stats, counter = run_both(cluster, act.gelu_quad, x, **P("gelu.quad"))
    # exact square, constants folded into one truncation: error below 2 ulps (floor + carry)
    check_accuracy("gelu_quad", x, got, clear, 2 * ULP, "gelu.quad")
    check_cost(stats, counter, act.gelu_quad_cost(x.shape), x.shape)
    assert act.gelu_quad_cost((8,)) == act.gelu_quad_cost((8,), "exact")
    assert act.gelu_quad_cost((800,)).bytes == 800 * 8 + 100


def test_gelu_puma(cluster, seed):
    x = sweep(-32, 32, 20001, points=(-4.0, -1.95, 3.0), far=(-1000.0, 1000.0, -3e4, 3e4))
    got, clear, stats, counter = run_both(cluster, act.gelu_puma, x, **P("gelu.puma"))
    # measured 3.5e-5: the truncations of x^3 and of the polynomials, and x3's error in x^6
    check_accuracy("gelu_puma", x, got, clear, 6e-5, "gelu.puma", x.abs() <= 32)
    far = x.abs() > 100
    assert torch.equal(got[far], torch.where(x[far] > 0, x[far], 0.0)), "0 | x branches exact"
    declared = act.gelu_puma_cost(x.shape)
    check_cost(stats, counter, declared, x.shape)
    assert declared.rounds == 7 and act.gelu_puma_cost((8000,)).bytes == 8000 * 105.5
    assert act.gelu_puma_cost((8,), bits=32).rounds == 6


def test_gelu_puma_narrow_comparisons(cluster, seed):
    x = sweep(-32, 32, 2001, points=(-4.0, -1.95, 3.0))
    got, _, stats, counter = run_both(cluster, act.gelu_puma, x, bits=24)
    assert (got - get_approx("gelu.puma").reference(x)).abs().max() <= 6e-5
    check_cost(stats, counter, act.gelu_puma_cost(x.shape, bits=24), x.shape)


def test_tanh_secformer(cluster, seed):
    t = get_approx("tanh.secformer").threshold
    x = sweep(-30, 30, 10001, points=(-t, t), far=(-1e3, 1e3, -3e4, 3e4, 8.0, -8.0, 16.0))
    got, clear, stats, counter = run_both(cluster, act.tanh_secformer, x, **P("tanh.secformer"))
    # measured 8.5e-5: dealer's sin/cos shares and public factors at 2^-17 each, sum |beta|
    # = 1.9, times 2 per term, plus the truncation
    check_accuracy("tanh_secformer", x, got, clear, 1.5e-4, "tanh.secformer")
    far = x.abs() > 100
    assert torch.equal(got[far], torch.sign(x[far])), "+-1 segments are exact"
    declared = act.tanh_secformer_cost(x.shape)
    check_cost(stats, counter, declared, x.shape)
    assert declared.rounds == 7 and act.tanh_secformer_cost((8000,)).bytes == 8000 * 60.875


def test_gelu_crypten(cluster, seed):
    x = sweep(-20, 20, 20001, points=(0.0,), far=(-23.0, 23.0))
    got, clear, stats, counter = run_both(cluster, act.gelu_crypten, x, **P("gelu.crypten"))
    # measured 6.5e-5 at |x| ~ 20: y2 (13 bits) enters y3 through 2 (1 - y2 d) <= 0.008, and
    # E (21 bits) through x y2^2 E; both are multiplied by |x|
    check_accuracy("gelu_crypten", x, got, clear, 1.2e-4, "gelu.crypten", x.abs() <= 20)
    declared = act.gelu_crypten_cost(x.shape)
    check_cost(stats, counter, declared, x.shape)
    assert declared.rounds == 25 and act.gelu_crypten_cost((8000,)).bytes == 8000 * 154.5


def test_tanh_crypten(cluster, seed):
    x = sweep(-30, 30, 20001, points=(0.0,), far=(-500.0, 500.0, -100.0, 100.0))
    got, clear, stats, counter = run_both(cluster, act.tanh_crypten, x, **P("tanh.crypten"))
    # measured 3.3e-5: the final truncation and y2 (15 bits), E (30 bits) at 2^-30
    check_accuracy("tanh_crypten", x, got, clear, 6e-5, "tanh.crypten", x.abs() <= 30)
    declared = act.tanh_crypten_cost(x.shape)
    check_cost(stats, counter, declared, x.shape)
    assert declared.rounds == 22 and act.tanh_crypten_cost((8000,)).bytes == 8000 * 154.25


@pytest.mark.parametrize("bits, lim", [(32, 8.0), (17, 0.99)])
def test_crypten_costs_other_widths(cluster, bits, lim, seed):
    """How many squarings run on both exp chains follows the comparison's rounds (6 at 32
    bits, 5 at 17 bits, which needs |x| < 1); the cost model follows it too."""
    x = sweep(-lim, lim, 401, points=(0.0,))
    for proto, spec in ((act.gelu_crypten, "gelu.crypten"), (act.tanh_crypten, "tanh.crypten")):
        got, _, stats, counter = run_both(cluster, proto, x, bits=bits)
        cost = act.gelu_crypten_cost if spec == "gelu.crypten" else act.tanh_crypten_cost
        check_cost(stats, counter, cost(x.shape, bits=bits), x.shape)
        assert (got - get_approx(spec).reference(x)).abs().max() <= 1.2e-4


def test_crypten_rejects_other_newton_settings():
    def program(ctx, xv):
        yield from act.gelu_crypten(ctx, xv, reciprocal_iterations=4)

    with pytest.raises(ValueError, match="3 Newton"):
        run_clear(program, FX.encode(torch.zeros(2)), fxp=FX)


def test_newton_cubic_is_crypten_two_steps():
    e = np.linspace(0, 1, 101)
    y = np.full_like(e, 0.75)
    for _ in range(2):
        y = 2 * y - y * y * (1 + e)
    assert np.abs(np.polyval(act.Y2_NUM[::-1], e) / 256 - y).max() < 1e-15


def test_tanh_sine_refit_and_ring_constraints():
    spec = get_approx("tanh.secformer")
    refit = fit_tanh_sine_series(spec.period, spec.threshold, len(spec.coeffs))
    assert refit == pytest.approx(TANH_SINE_COEFFS, abs=1e-9)
    assert math.log2(spec.period).is_integer(), "P * 2^f must divide 2^64 for the secure sine"
    assert (spec.threshold * 2**16).is_integer(), "segment bounds must be exact in fixed point"
    assert measure_error(spec).max_abs <= 1e-3, "the brief's target on [-30, 30]"
    assert sum(abs(b) for b in spec.coeffs) < 2, "fixed-point noise is scaled by sum |beta|"
