"""Products that share a round with the truncations they consume (runtime/protocols/fused.py).

The fused result must equal, exactly in the ring, the product of the finished truncations
(the values `fused_round` hands back), for every shift pair the algebra allows, over the
whole range of the truncation (|x| < 2^62); where it does not allow one, `mul` settles
first. Declared cost must equal counted cost, and the simulator must agree.
"""

import pytest
import torch

from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.correlations import RING
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.protocols import arith, fused
from secformer_compiler.runtime.protocols.trunc import begin
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint(16)


@pytest.fixture(scope="module")
def cluster():
    return LocalCluster(FX)


def _whole_range(n: int, seed: int, top: int = 62) -> torch.Tensor:
    """Signed int64 values with magnitudes spread over [0, 2^top), plus the edges."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.randint(0, top, (n,), generator=g)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 2.0 ** mags.double()).to(torch.int64)
    x = torch.where(torch.rand(n, generator=g) < 0.5, -x, x)
    edges = torch.tensor([0, 1, -1, 2 ** (top - 1), -(2 ** (top - 1)), 2 ** top - 1, -(2 ** top) + 1])
    return torch.cat([x[:n - len(edges)], edges])


def _floor_or_one_less(t: torch.Tensor, x: torch.Tensor, k: int) -> bool:
    floor = torch.div(x, 2 ** k, rounding_mode="floor") if k else x
    return bool(((t == floor) | (t == floor - 1)).all()) if k else bool(torch.equal(t, x))


def _run(cluster, program, x, y):
    out0, out1, stats = cluster.run(program, (x, None), (None, y))
    for a, b in zip(out0, out1):
        assert torch.equal(a, b)
    clear, counter = run_clear(program, x, y)
    assert counter.rounds == stats.rounds
    return out0, clear, stats


@pytest.mark.parametrize("kx,ky,xshape,yshape", [
    (16, 16, (4000,), (4000,)),
    (40, 24, (4000,), (4000,)),  # rsqrt's cubic (40) beside its y rescale (24): sum 64
    (32, 32, (4000,), (4000,)),
    (29, 0, (4000,), (4000,)),  # one operand finished already
    (0, 12, (50, 80), (50, 1)),  # broadcast: a row value (2Quad's 1/sum) against a full one
    (40, 30, (4000,), (4000,)),  # kx + ky > 64: `mul` settles first (one more round)
])
def test_mul_is_the_product_of_the_finished_values(cluster, kx, ky, xshape, yshape):
    n = int(torch.Size(xshape).numel())
    x = _whole_range(n, kx).reshape(xshape)
    y = _whole_range(int(torch.Size(yshape).numel()), 100 + ky).reshape(yshape)

    def program(ctx, xv, yv):
        xs = yield from arith.share(ctx, xv, 0, xshape)
        ys = yield from arith.share(ctx, yv, 1, yshape)
        X, Y = begin(ctx, xs, kx), begin(ctx, ys, ky)
        X, Y = yield from fused.settle(ctx, X, Y)
        rnd = yield from fused.fused_round(ctx, [X, Y], [0, 1], lambda a, b: [a * b], [RING],
                                           cross=[(0, 1), (1, 0)])
        z = fused.product(ctx, rnd, 0, 1, 2)
        tx, ty = rnd.values
        return (yield from arith.reveal(ctx, tx)), (yield from arith.reveal(ctx, ty)), \
            (yield from arith.reveal(ctx, z))

    (tx, ty, z), (cx, cy, cz), stats = _run(cluster, program, x, y)
    assert _floor_or_one_less(tx, x, kx) and _floor_or_one_less(ty, y, ky)
    assert torch.equal(z, tx * ty)  # exact in the ring, however the truncations came out
    assert torch.equal(cz, cx * cy) and _floor_or_one_less(cx, x, kx)
    zshape = torch.broadcast_shapes(xshape, yshape)
    declared = (arith.share_cost(xshape) + arith.share_cost(yshape)
                + fused.mul_cost(xshape, kx, yshape, ky)
                + arith.reveal_cost(xshape) + arith.reveal_cost(yshape) + arith.reveal_cost(zshape))
    assert stats.rounds == declared.rounds
    assert stats.rounds == 6 + (kx + ky > 64)  # 2 sharings, 1 fused round (+1 settling), 3 reveals
    sent_shares = arith.share_cost(xshape).bytes + arith.share_cost(yshape).bytes
    assert stats.bytes_sent[0] + stats.bytes_sent[1] == 2 * declared.bytes - sent_shares


@pytest.mark.parametrize("k", [16, 29, 40, 50, 60])
def test_powers_of_a_pending_value(cluster, k):
    """x^2 and x^3 from one opening of a pending truncation: P^i = 2^(i (64 - k)) AB is not
    zero for k > 32 (square) or k > 42 (cube); every such term must be there."""
    x = _whole_range(4000, k)

    def program(ctx, xv, _):
        xs = yield from arith.share(ctx, xv, 0, x.shape)
        rnd = yield from fused.fused_round(ctx, [begin(ctx, xs, k)], [0],
                                           lambda a: [a * a, a * a * a], [RING, RING],
                                           cross=[(0, 0), (0, 1)])
        x2 = fused.square(ctx, rnd, 0, 1)
        x3 = (fused.power_times(ctx, rnd, 0, 3) + 3 * fused.power_times(ctx, rnd, 0, 2, 0)
              + 3 * fused.power_times(ctx, rnd, 0, 1, 1) + rnd.mons[2])
        outs = []
        for v in (rnd.values[0], x2, x3):
            outs.append((yield from arith.reveal(ctx, v)))
        return tuple(outs)

    (t, t2, t3), (c, c2, c3), stats = _run(cluster, program, x, None)
    assert _floor_or_one_less(t, x, k)
    assert torch.equal(t2, t * t) and torch.equal(t3, t * t * t)
    assert torch.equal(c2, c * c) and torch.equal(c3, c * c * c)
    declared = (arith.share_cost(x.shape) + fused.fused_round_cost([x.shape], [x.shape])
                + arith.reveal_cost(x.shape) + arith.reveal_cost(x.shape) + arith.reveal_cost(x.shape))
    assert stats.rounds == declared.rounds
    assert stats.bytes_sent[1] == declared.bytes - arith.share_cost(x.shape).bytes


def test_local_truncation_leaves_nothing_pending():
    """In local mode `begin` truncates at once: the fused round sends only the opening."""
    cluster = LocalCluster(FX, trunc="local")
    x = _whole_range(1000, 3, top=40)

    def program(ctx, xv, _):
        xs = yield from arith.share(ctx, xv, 0, x.shape)
        X = begin(ctx, xs, 16)
        assert not X.pending
        z = yield from fused.mul(ctx, X, xs)
        return (yield from arith.reveal(ctx, z))

    _, _, stats = cluster.run(program, (x, None), (None, None))
    assert stats.rounds == 3
    assert stats.bytes_sent[1] == fused.mul_cost(x.shape, 0, x.shape, 0).bytes + 8 * x.numel()


def test_opened_values_are_masked_afresh(cluster):
    """The same secret opened twice in fused rounds gives unrelated public values."""
    x = _whole_range(1000, 7, top=40)

    def program(ctx, xv, _):
        xs = yield from arith.share(ctx, xv, 0, x.shape)
        opened = []
        for _ in range(2):
            rnd = yield from fused.fused_round(ctx, [begin(ctx, xs, 16)], [0])
            opened.append(rnd.opened[0].e)
        return tuple(opened)

    (e1, e2), _, _ = cluster.run(program, (x, None), (None, None))
    assert (e1 != e2).float().mean() > 0.99
