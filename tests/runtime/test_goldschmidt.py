"""Goldschmidt reciprocal and inverse square root: whole declared range, both runtimes, cost."""

import numpy as np
import pytest
import torch

from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.protocols import arith
from secformer_compiler.approx import goldschmidt as approx_gs
from secformer_compiler.approximations import choose_goldschmidt
from secformer_compiler.runtime.protocols.goldschmidt import (
    effective_prescale, fixed_const, reciprocal_goldschmidt, reciprocal_goldschmidt_cost,
    rsqrt_goldschmidt, rsqrt_goldschmidt_cost)
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint(16)


def reciprocal_goldschmidt_ref(y, prescale, iters):
    return approx_gs.reciprocal_goldschmidt(torch.as_tensor(y), prescale=prescale, iterations=iters)


def rsqrt_goldschmidt_ref(y, prescale, iters):
    return approx_gs.rsqrt_goldschmidt(torch.as_tensor(y), prescale=prescale, iterations=iters)


def choose_reciprocal(lo, hi, rel_tol):
    p, n, _ = choose_goldschmidt(lo, hi, rel_tol, "reciprocal", headroom=1.0)
    return p, n


def choose_rsqrt(lo, hi, rel_tol):
    p, n, _ = choose_goldschmidt(lo, hi, rel_tol, "rsqrt", headroom=1.0)
    return p, n


@pytest.fixture(scope="module")
def cluster():
    return LocalCluster(FX)


def _sweep(lo, hi, n=1500):
    """Log-spaced over [lo, hi] with both edges, plus random points."""
    g = torch.from_numpy(np.geomspace(lo, hi, n))
    r = lo * (hi / lo) ** torch.rand(500, dtype=torch.float64)
    return torch.cat([g, r, torch.tensor([lo, hi], dtype=torch.float64)])


def _run(cluster, op, x, **kw):
    shape = x.shape

    def program(ctx, xv):
        s = yield from arith.share(ctx, xv, 0, shape)
        y = yield from op(ctx, s, **kw)
        return (yield from arith.reveal(ctx, y))

    o0, o1, stats = cluster.run(program, (FX.encode(x),), (None,))
    assert torch.equal(o0, o1)
    clear, counter = run_clear(program, FX.encode(x), fxp=FX)
    assert counter.rounds == stats.rounds
    return FX.decode(o0), FX.decode(clear), stats


def _check_cost(stats, shape, op_cost):
    declared = arith.share_cost(shape) + op_cost + arith.reveal_cost(shape)
    assert stats.rounds == declared.rounds
    assert stats.bytes_sent[1] == declared.bytes - arith.share_cost(shape).bytes
    assert stats.bytes_sent[0] == declared.bytes


def _fewest_iters(ref_fn, exact, lo, hi, p, tol=1e-4):
    g = _sweep(lo, hi)
    return next(n for n in range(1, 40)
                if ((ref_fn(g, p, n) - exact(g)).abs() / exact(g)).max() <= tol)


@pytest.mark.parametrize("lo,hi,optimal", [
    (0.5, 50.0, False),
    (0.5, 50.0, True),  # p = 2/(lo + hi), applied as a 4-bit constant (not a power of two)
    (1.0, 8000.0, False),  # a 2Quad row-sum range: p y down to 2^-13
    (0.05, 1.5, False),  # p = 1: no prescale truncation
    (0.002, 1.9, False),  # near the domain's low end
])
def test_reciprocal_whole_range(cluster, seed, lo, hi, optimal):
    p, iters = choose_reciprocal(lo, hi, rel_tol=1e-4)
    if optimal:
        p = effective_prescale(2 / (lo + hi))
        iters = _fewest_iters(reciprocal_goldschmidt_ref, lambda g: 1 / g, lo, hi, p)
    print(f"reciprocal on [{lo}, {hi}]: prescale {p:.6g}, {iters} iterations")
    y = _sweep(lo, hi)
    got, clear, stats = _run(cluster, reciprocal_goldschmidt, y, prescale=p, iters=iters)
    want = 1 / y
    ref = torch.as_tensor(reciprocal_goldschmidt_ref(y, p, iters))
    # fixed point: a few ulps of the result plus the input's own encoding error (relative 2^-17/y)
    bound = 1e-4 * want + 8 * 2 ** -16 + want * 2 ** -17 / y
    err = ((got - want).abs() / bound).max().item()
    print(f"max err / bound {err:.3f}; max rel err {((got - want) / want).abs().max():.2e}; "
          f"max abs err vs float iteration {(got - ref).abs().max().item():.2e}")
    assert err <= 1
    assert ((clear - want).abs() / bound).max() <= 1
    _check_cost(stats, y.shape, reciprocal_goldschmidt_cost(y.shape, p, iters))


@pytest.mark.parametrize("lo,hi", [(0.01, 10.0), (0.05, 3.0), (20.0, 30.0)])
def test_rsqrt_whole_range(cluster, seed, lo, hi):
    p, iters = choose_rsqrt(lo, hi, rel_tol=1e-4)
    print(f"rsqrt on [{lo}, {hi}]: prescale {p:.6g}, {iters} iterations")
    y = _sweep(lo, hi)
    got, clear, stats = _run(cluster, rsqrt_goldschmidt, y, prescale=p, iters=iters)
    want = 1 / y.sqrt()
    # d(y^-1/2)/y^-1/2 = -dy/(2y); dy is the encoding's half ulp of y plus the exact
    # truncation of the public prescale (floor, < 1 ulp of p*y, i.e. 2^-16/p in y units).
    # Without the prescale term a fresh mask set fails ~1 run in 10 near y = 0.01 (p = 1/4).
    input_err = (2 ** -17 + 2 ** -16 / effective_prescale(p)) / (2 * y)
    bound = 1e-4 * want + 8 * 2 ** -16 + want * input_err
    err = ((got - want).abs() / bound).max().item()
    print(f"max err / bound {err:.3f}; max rel err {((got - want) / want).abs().max():.2e}")
    assert err <= 1
    assert ((clear - want).abs() / bound).max() <= 1
    _check_cost(stats, y.shape, rsqrt_goldschmidt_cost(y.shape, p, iters))


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("prescale", [1.0, 0.25, 0.3, 4.0])
def test_small_iteration_counts_and_scaled_input(cluster, iters, prescale):
    """Corner cases of the cost formulas: n = 1 (local), n = 2, power-of-two/other prescales."""
    y = torch.linspace(0.5, 1.5, 101, dtype=torch.float64) / prescale
    for op, ref_fn, cost_fn in ((reciprocal_goldschmidt, reciprocal_goldschmidt_ref,
                                 reciprocal_goldschmidt_cost),
                                (rsqrt_goldschmidt, rsqrt_goldschmidt_ref, rsqrt_goldschmidt_cost)):
        got, clear, stats = _run(cluster, op, y, prescale=prescale, iters=iters)
        ref = torch.as_tensor(ref_fn(y, effective_prescale(prescale), iters))  # 0.3 -> 0.28125
        assert (got - ref).abs().max() < 1e-3 * ref.abs().max() + 2e-4
        _check_cost(stats, y.shape, cost_fn(y.shape, prescale, iters))
    # scaled_input: the caller already multiplied by the prescale
    ys = y * prescale
    got, _, stats = _run(cluster, rsqrt_goldschmidt, ys, prescale=prescale, iters=iters,
                         scaled_input=True)
    ref = torch.as_tensor(rsqrt_goldschmidt_ref(y, prescale, iters))
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max() + 2e-4
    _check_cost(stats, y.shape, rsqrt_goldschmidt_cost(y.shape, prescale, iters, scaled_input=True))


def test_round_and_byte_formula():
    """n + 1 rounds (each truncation shares the next opening's round, the last has its own)
    and 8 + 16(n - 1) bytes + (2n - 2) truncations per element."""
    shape = (8, 100)
    for n in range(2, 8):
        c = rsqrt_goldschmidt_cost(shape, 1.0, n, scaled_input=True)
        assert c.rounds == n + 1
        assert c.bytes == 800 * (8 + 16 * (n - 1)) + 100 * (2 * n - 2)
        c = reciprocal_goldschmidt_cost(shape, 1.0, n, scaled_input=True)
        assert c.rounds == n + 1
        assert c.bytes == 800 * (8 + 16 * (n - 1)) + 100 * (2 * n - 2)


def test_fixed_const():
    assert fixed_const(1.0) == (1, 0) and fixed_const(0.25) == (1, 2) and fixed_const(8) == (8, 0)
    m, s = fixed_const(0.3)
    assert abs(m / 2 ** s - 0.3) < 0.3 * 2 ** -15
    m, s = fixed_const(1 / 3000, max_shift=20, round_down=True)
    assert s == 20 and m / 2 ** s <= 1 / 3000
    with pytest.raises(ValueError):
        fixed_const(2 ** -30, max_shift=20)


# --- seeded first step (approx.goldschmidt.choose_seeded_goldschmidt) ------------------------

@pytest.mark.parametrize("kind,lo,hi", [
    ("reciprocal", 2457.0, 8363.0),  # BERT-base's 2Quad row sums (with calibration margins)
    ("reciprocal", 0.5, 50.0),
    ("rsqrt", 1.0, 4.0),
    ("rsqrt", 0.01, 10.0),
])
def test_seeded_first_step_whole_range(cluster, seed, kind, lo, hi):
    """The seeded step (prescale with a few significant bits, first factor gamma - y) over the
    whole range in 2PC and the simulator: the relative-error target plus a few ulps, with
    fewer iterations than the plain power-of-two prescale, and no garbage up to the 1.5x
    headroom above hi (within SEED_HEADROOM_ERR times the target); cost formula = counted."""
    c = approx_gs.choose_seeded_goldschmidt(lo, hi, 1e-4, kind)
    plain = choose_goldschmidt(lo, hi, 1e-4, kind)
    assert c.iterations < plain.iterations and c.gamma != {"reciprocal": 2.0, "rsqrt": 3.0}[kind]
    print(f"{kind} on [{lo}, {hi}]: seeded prescale {c.prescale:g}, gamma {c.gamma}, "
          f"{c.iterations} iterations (plain: {plain.iterations})")
    y = _sweep(lo, hi)
    above = torch.linspace(hi, 1.5 * hi, 200, dtype=torch.float64)
    if kind == "reciprocal":
        op, want_fn = reciprocal_goldschmidt, (lambda t: 1 / t)
        kw = dict(prescale=c.prescale, iters=c.iterations, gamma=c.gamma)
        enc = lambda t: t  # noqa: E731 - the runtime applies the 4-bit prescale exactly
        input_err = lambda t: 2 ** -17 / t  # noqa: E731
    else:  # the caller applies the prescale (LayerNorm folds it into its variance constant)
        op, want_fn = rsqrt_goldschmidt, (lambda t: 1 / t.sqrt())
        kw = dict(prescale=c.prescale, iters=c.iterations, gamma=c.gamma, scaled_input=True)
        enc = lambda t: t * c.prescale  # noqa: E731
        input_err = lambda t: 2 ** -16 / (c.prescale * t)  # noqa: E731
    for pts, tol in ((y, 1e-4), (above, approx_gs.SEED_HEADROOM_ERR * 1e-4)):
        got, clear, stats = _run(cluster, op, enc(pts), **kw)
        want = want_fn(pts)
        bound = tol * want + 8 * 2 ** -16 + want * input_err(pts)
        assert ((got - want).abs() / bound).max() <= 1
        assert ((clear - want).abs() / bound).max() <= 1
    if kind == "reciprocal":
        _check_cost(stats, above.shape, reciprocal_goldschmidt_cost(above.shape, c.prescale, c.iterations,
                                                                    gamma=c.gamma))
    else:
        _check_cost(stats, above.shape, rsqrt_goldschmidt_cost(above.shape, c.prescale, c.iterations,
                                                               scaled_input=True))


def test_gamma_must_be_a_multiple_of_a_64th(cluster):
    def program(ctx, xv):
        s = yield from arith.share(ctx, xv, 0, (4,))
        return (yield from reciprocal_goldschmidt(ctx, s, 0.25, 3, gamma=2.3))

    with pytest.raises(ValueError, match="multiple of 1/64"):
        run_clear(program, FX.encode(torch.ones(4)), fxp=FX)
