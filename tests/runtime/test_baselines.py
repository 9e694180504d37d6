"""CrypTen/PUMA building blocks: against the float references of the same math, and costs."""

import pytest
import torch

from secformer_compiler.approx import iterative as ref
from secformer_compiler.approx.softmax import softmax_crypten, softmax_exact
from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.protocols import arith
from secformer_compiler.runtime.protocols.baselines import (
    exp_limit, exp_limit_cost, reciprocal_newton, reciprocal_newton_cost, rsqrt_newton,
    rsqrt_newton_cost, softmax_exp, softmax_exp_cost)
from secformer_compiler.runtime.protocols.goldschmidt import (
    reciprocal_goldschmidt, reciprocal_goldschmidt_cost)
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint(16)


@pytest.fixture(scope="module")
def cluster():
    return LocalCluster(FX)


def _run(cluster, op, x, *extra):
    shape = x.shape

    def program(ctx, xv, *ex):
        s = yield from arith.share(ctx, xv, 0, shape)
        y = yield from op(ctx, s, *ex)
        return (yield from arith.reveal(ctx, y))

    o0, o1, stats = cluster.run(program, (FX.encode(x), *extra), (None, *extra))
    assert torch.equal(o0, o1)
    clear, counter = run_clear(program, FX.encode(x), *extra, fxp=FX)
    assert counter.rounds == stats.rounds
    return FX.decode(o0), FX.decode(clear), stats


def _check_cost(stats, shape, op_cost):
    declared = arith.share_cost(shape) + op_cost + arith.reveal_cost(shape)
    assert stats.rounds == declared.rounds
    assert stats.bytes_sent[0] == declared.bytes
    assert stats.bytes_sent[1] == declared.bytes - arith.share_cost(shape).bytes


@pytest.mark.parametrize("n,lo", [(8, -16.0), (5, -14.0)])
def test_exp_limit(cluster, seed, n, lo):
    """CrypTen n = 8 on [-16, 0] (its declared domain), PUMA n = 5 on [-14, 0]; up to x = 4."""
    x = torch.cat([torch.linspace(lo, 0, 2001, dtype=torch.float64),
                   torch.linspace(0, 4, 201, dtype=torch.float64)])
    got, clear, stats = _run(cluster, lambda c, s: exp_limit(c, s, n), x)
    want = ref.exp_limit(FX.decode(FX.encode(x)), iterations=n)
    err = ((got - want).abs() / (1 + want)).max().item()
    print(f"exp_limit n={n}: max err vs the float method {err:.2e}, "
          f"vs exp {(got - x.exp()).abs().max().item():.2e}")
    assert err < 2e-4 and ((clear - want).abs() / (1 + want)).max() < 2e-4
    _check_cost(stats, x.shape, exp_limit_cost(x.shape, n))


def test_reciprocal_newton(cluster, seed):
    y = torch.cat([torch.logspace(-3, torch.log10(torch.tensor(250.0)), 1500, dtype=torch.float64),
                   torch.tensor([1e-3, 250.0], dtype=torch.float64)])
    got, clear, stats = _run(cluster, lambda c, s: reciprocal_newton(c, s), y)
    ye = FX.decode(FX.encode(y))
    want = ref.reciprocal_newton(ye, iterations=10, exp_iterations=8)
    err = ((got - want).abs() / (want * 1e-3 + 2 ** -12)).max().item()
    print(f"reciprocal_newton: max abs err {(got - want).abs().max().item():.2e}, "
          f"max rel err vs 1/y {((got * ye - 1).abs()).max().item():.2e}")
    assert err <= 1 and ((clear - want).abs() / (want * 1e-3 + 2 ** -12)).max() <= 1
    _check_cost(stats, y.shape, reciprocal_newton_cost(y.shape))


def test_rsqrt_newton(cluster, seed):
    y = torch.cat([torch.logspace(-1, torch.log10(torch.tensor(150.0)), 1500, dtype=torch.float64),
                   torch.tensor([0.1, 150.0], dtype=torch.float64)])
    got, clear, stats = _run(cluster, lambda c, s: rsqrt_newton(c, s), y)
    ye = FX.decode(FX.encode(y))
    want = ref.rsqrt_newton(ye, iterations=3, exp_iterations=8)
    err = (got - want).abs().max().item()
    print(f"rsqrt_newton: max abs err vs the float method {err:.2e}, max rel err vs "
          f"1/sqrt(y) {((got * ye.sqrt() - 1).abs()).max().item():.2e}")
    assert err < 5e-4 and (clear - want).abs().max() < 5e-4
    _check_cost(stats, y.shape, rsqrt_newton_cost(y.shape))


@pytest.mark.parametrize("flavour", ["crypten", "puma"])
def test_softmax_exp(cluster, seed, flavour):
    shape = (2, 4, 16)
    x = torch.randn(shape, dtype=torch.float64) * 3
    mask = torch.ones(2, 1, 16, dtype=torch.float64)
    mask[1, 0, 10:] = 0
    xe = FX.decode(FX.encode(x))
    rows = (2, 4, 1)
    if flavour == "crypten":
        op = lambda c, s, m: softmax_exp(c, s, -1, m, exp_n=8)  # noqa: E731
        cost = softmax_exp_cost(shape, -1, 8)
        want = softmax_crypten(xe, mask, -1, exp_iterations=8, reciprocal_iterations=10)
    else:  # PUMA's exp and cutoff; a Goldschmidt reciprocal for sums in [1, 16]
        def op(c, s, m):
            recip = lambda c2, v: reciprocal_goldschmidt(c2, v, 2 ** -4, 8)  # noqa: E731
            return softmax_exp(c, s, -1, m, exp_n=5, recip=recip, cutoff=-14.0)
        cost = softmax_exp_cost(shape, -1, 5, reciprocal_goldschmidt_cost(rows, 2 ** -4, 8),
                                cutoff=True)
        z = xe - xe.masked_fill(mask == 0, -1e9).amax(-1, keepdim=True)
        e = ref.exp_limit(z, iterations=5) * (z > -14) * mask
        want = e / e.sum(-1, keepdim=True)
    got, clear, stats = _run(cluster, op, x, mask)
    err = (got - want).abs().max().item()
    print(f"softmax_exp {flavour}: max err vs the float method {err:.2e}, vs softmax "
          f"{(got - softmax_exact(xe, mask)).abs().max().item():.2e}; {cost.rounds} rounds, "
          f"{cost.bytes / x.numel():.1f} bytes/element/party")
    assert err < 2e-3 and (clear - want).abs().max() < 2e-3
    assert (got[1, :, 10:].abs() <= 2 ** -16).all()
    _check_cost(stats, shape, cost)
