"""Comparison protocols (msb, lt, b2a, bit_mul, select, relu, max_tree) through every mode.

Each protocol is checked against plaintext over its whole declared range (random values
plus the edges 0, +-1, +-(2^(bits-1) - 1) and values next to the threshold), in 2PC
(LocalCluster) and in the simulator, and its declared cost against the counted traffic.

Measured with `msb_cost` (per element, per party): bits=64: 6 rounds, 24.25 bytes;
bits=32: 5 rounds, 12.25 bytes; bits=20: 5 rounds, 12.25 bytes (levels 0 and 1 of the
carry tree share a round: 7, 6, 6 rounds and 32.25, 16.25, 16.25 bytes before). Timing (2-core machine
shared with other jobs, LocalCluster, torch single-threaded): lt_public on 128x3072
(393,216 elements) at bits=64: online phase about 0.30 s per party, dealer's offline
phase about 0.22 s, whole run 0.52-0.57 s (after a one-time ~2 s first use of meta
tensors in the process). bits=32 takes the same time (same word ops, half the bytes).
"""

import pytest
import torch

from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.messages import open_xor
from secformer_compiler.runtime.protocols import arith
from secformer_compiler.runtime.protocols import compare as cmp
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint(16)
BITS = [64, 32, 20]


@pytest.fixture
def cluster():
    """A fresh cluster per test: a failed role marks its hub failed for every later run."""
    return LocalCluster(FX)


def _ring_uniform(shape, g=None):
    return torch.randint(-2 ** 63, 2 ** 63 - 1, shape, generator=g)


def _split(x):
    """Random additive shares of x (plaintext test data; protocol randomness is the PRG's)."""
    r = _ring_uniform(x.shape)
    return x - r, r


def _in_range(bits, n):
    """n values with |x| < 2^(bits-1): uniform, log-uniform magnitudes and the edges."""
    lim = 1 << (bits - 1)
    uni = torch.randint(-(lim - 1), lim, (n // 2,)) if bits < 64 else _ring_uniform((n // 2,))
    uni[uni == -(1 << 63)] = 0
    mags = torch.randint(0, bits - 1, (n - n // 2,))
    logu = (torch.rand(n - n // 2, dtype=torch.float64) * 2.0 ** mags.double()).to(torch.int64)
    logu = torch.where(torch.rand(n - n // 2) < 0.5, -logu, logu)
    edges = torch.tensor([0, 1, -1, 2, -2, lim - 1, -(lim - 1), lim // 2, -(lim // 2),
                          lim // 2 - 1, -(lim // 2) + 1, (1 << 20) - 1, -(1 << 20)], dtype=torch.int64)
    edges = edges[edges.abs() < lim] if bits < 64 else edges
    return torch.cat([uni, logu, edges])


def _check_2pc_and_clear(cluster, program, x, y=None):
    """Run with x owned by P0 (and y by P1); both parties and the simulator must agree."""
    if y is None:
        o0, o1, stats = cluster.run(program, (x,), (None,))
        clear, counter = run_clear(program, x)
    else:
        o0, o1, stats = cluster.run(program, (x, None), (None, y))
        clear, counter = run_clear(program, x, y)
    assert torch.equal(o0, o1)
    assert torch.equal(o0, clear)
    assert counter.rounds == stats.rounds
    return o0


# --- msb and comparisons over the whole declared range ----------------------------------

def _msb_program(shape, bits):
    """P0 shares x, msb(x) on `bits` bits, opened to both."""
    def program(ctx, x):
        s = yield from arith.share(ctx, x, 0, shape)
        b = yield from cmp.msb(ctx, s, bits)
        return (yield from open_xor(b, bits=1))[0]
    return program


@pytest.mark.parametrize("bits", BITS + [2, 3, 5, 17, 33])
def test_msb_whole_range(cluster, seed, bits):
    x = _in_range(bits, 4000)
    got = _check_2pc_and_clear(cluster, _msb_program(x.shape, bits), x)
    assert torch.equal(got, (x < 0).long())


@pytest.mark.parametrize("bits, drop", [(28, 11), (64, 20), (33, 16), (20, 3), (5, 2)])
def test_msb_with_dropped_low_bits_whole_range(cluster, seed, bits, drop):
    """msb(x, bits, drop) = [x < 0] on [-2^(bits-1) + 2^drop, 2^(bits-1)) except in the
    one-sided window 0 <= x < 2^drop, where it may be 1 (the dropped parts' carry), and it
    costs the (bits - drop)-bit comparison. In the window the answer depends on how x was
    split, so some elements there must come out 1 and some 0."""
    lim, w = 1 << (bits - 1), 1 << drop
    x = _in_range(bits, 4000)
    x = x[(x >= -lim + w)]
    window = torch.randint(0, w, (2000,))
    edges = torch.tensor([-lim + w, -1, 0, w - 1, w, lim - 1, -w, -w - 1], dtype=torch.int64)
    x = torch.cat([x, window, edges])
    shape = x.shape

    def program(ctx, x):
        s = yield from arith.share(ctx, x, 0, shape)
        b = yield from cmp.msb(ctx, s, bits, drop)
        return (yield from open_xor(b, bits=1))[0]

    o0, o1, stats = cluster.run(program, (x,), (None,))
    assert torch.equal(o0, o1)
    inside = (x >= 0) & (x < w)
    assert torch.equal(o0[~inside], (x[~inside] < 0).long())
    assert 0 < int(o0[inside].sum()) < int(inside.sum())  # the carry really is dropped
    clear, counter = run_clear(program, x)  # the simulator's P1 share is 0: no carry, exact
    assert torch.equal(clear, (x < 0).long())
    reveal = arith.Cost(1, cmp.packed_nbytes(x.numel(), 1))  # open_xor of the result bit
    declared = arith.share_cost(shape) + cmp.msb_cost(shape, bits, drop) + reveal
    assert stats.rounds == counter.rounds == declared.rounds
    assert stats.bytes_sent[1] == declared.bytes - arith.share_cost(shape).bytes
    assert cmp.msb_cost(shape, bits, drop) == cmp.msb_cost(shape, bits - drop)
    with pytest.raises(ValueError, match="drop must be"):
        run_clear(lambda ctx, v: cmp.msb(ctx, v, bits, bits - 1), x)


@pytest.mark.parametrize("bits", BITS)
def test_compare_with_public_and_secret(cluster, seed, bits):
    """x < c, x > c (c a Python int and a tensor) and x < y, including values next to c."""
    lim = 1 << (bits - 1)
    c_int = FX.encode(1.25).item() if bits > 20 else 12345
    c_int = min(c_int, lim // 4)
    base = _in_range(bits - 1, 3000)  # |x - c| < 2^(bits-1) needs |x| < 2^(bits-2) here
    near = c_int + torch.arange(-3, 4)
    x = torch.cat([base, near])
    c_t = torch.randint(-(lim // 2) + 1, lim // 2, x.shape)
    c_t[-7:] = x[-7:] + torch.tensor([-1, 0, 1, 0, -1, 1, 0])
    y = torch.cat([_in_range(bits - 1, 3000), x[-7:] + torch.tensor([1, 0, -1, 2, -2, 0, 1])])
    shape = x.shape

    def program(ctx, x, y):
        s = yield from arith.share(ctx, x, 0, shape)
        t = yield from arith.share(ctx, y, 1, shape)
        outs = [(yield from cmp.lt_public(ctx, s, c_int, bits)),
                (yield from cmp.gt_public(ctx, s, c_int, bits)),
                (yield from cmp.lt_public(ctx, s, c_t, bits)),
                (yield from cmp.gt_public(ctx, s, c_t, bits)),
                (yield from cmp.lt(ctx, s, t, bits))]
        return torch.stack((yield from open_xor(*outs, bits=1)))

    got = _check_2pc_and_clear(cluster, program, x, y)
    want = torch.stack([x < c_int, x > c_int, x < c_t, x > c_t, x < y]).long()
    assert torch.equal(got, want)


def test_rejects_unsupported_width():
    with pytest.raises(ValueError, match="comparison width"):
        cmp.msb_cost((3,), 1)
    with pytest.raises(ValueError, match="comparison width"):
        run_clear(lambda ctx, x: cmp.msb(ctx, x, 65), torch.zeros(3, dtype=torch.int64))


# --- bits times values ---------------------------------------------------------------------

def test_b2a_bit_mul_select(cluster, seed):
    n = 3000
    bits = torch.randint(0, 2, (3, n))
    z = torch.cat([_ring_uniform((n - 4,)), torch.tensor([0, 1, -1, -(1 << 63)])])
    w = _ring_uniform((n,))
    b0 = _ring_uniform((3, n)) & 1  # XOR shares of the bits
    b1 = bits ^ b0

    def program(ctx, bx, z, w):
        zs = yield from arith.share(ctx, z, 0, (n,))
        ws = yield from arith.share(ctx, w, 1, (n,))
        a = yield from cmp.b2a(ctx, bx[0])
        prods = yield from cmp.bit_mul(ctx, [bx[0], bx[1], bx[2]], zs)
        sel = yield from cmp.select(ctx, bx[1], zs, ws)
        out = []
        for t in [a, *prods, sel]:
            out.append((yield from arith.reveal(ctx, t)))
        return torch.stack(out)

    o0, o1, _ = cluster.run(program, (b0, z, None), (b1, None, w))
    assert torch.equal(o0, o1)
    want = torch.stack([bits[0], bits[0] * z, bits[1] * z, bits[2] * z,
                        torch.where(bits[1] == 1, z, w)])
    assert torch.equal(o0, want)
    clear, _ = run_clear(program, bits, z, w)  # the simulator: P0 holds the bits outright
    assert torch.equal(clear, want)


def test_bit_mul_broadcasts_bits_against_values(cluster, seed):
    bits = torch.randint(0, 2, (4, 1))
    z = _ring_uniform((4, 5))
    b0 = _ring_uniform((4, 1)) & 1

    def program(ctx, bx, z):
        zs = yield from arith.share(ctx, z, 0, (4, 5))
        (p,) = yield from cmp.bit_mul(ctx, [bx], zs)
        return (yield from arith.reveal(ctx, p))

    o0, _, _ = cluster.run(program, (b0, z), (bits ^ b0, None))
    assert torch.equal(o0, bits * z)


@pytest.mark.parametrize("bits", BITS)
def test_relu_whole_range(cluster, seed, bits):
    x = _in_range(bits, 3000)
    shape = x.shape

    def program(ctx, x):
        s = yield from arith.share(ctx, x, 0, shape)
        return (yield from arith.reveal(ctx, (yield from cmp.relu(ctx, s, bits))))

    got = _check_2pc_and_clear(cluster, program, x)
    assert torch.equal(got, torch.clamp(x, min=0))


@pytest.mark.parametrize("shape,dim", [((4, 7), -1), ((5, 3), 0), ((2, 1, 6), 1), ((3, 1), 1),
                                       ((2, 8), 1), ((2, 33), -1)])
def test_max_tree(cluster, seed, shape, dim):
    xf = torch.randn(shape, dtype=torch.float64) * 8
    x = FX.encode(xf)
    x.view(-1)[0] = x.view(-1)[-1]  # a tie
    bits = 32  # |x_i - x_j| < 2^31 (values within +-2^14 at f = 16)

    def program(ctx, x):
        s = yield from arith.share(ctx, x, 0, shape)
        return (yield from arith.reveal(ctx, (yield from cmp.max_tree(ctx, s, dim, bits))))

    got = _check_2pc_and_clear(cluster, program, x)
    assert torch.equal(got, torch.amax(x, dim=dim, keepdim=True))


# --- declared cost == counted cost ---------------------------------------------------------

def _cost_case(name):
    """(program on pre-split shares, inputs, declared cost, how to check the result)."""
    shape = (6, 11)
    # |x|, |y| < 2^30 so that differences fit the 32-bit comparisons; keep the edges
    # (appended last by _in_range)
    x = _in_range(31, 80)[-66:].reshape(shape)
    y = _in_range(31, 80)[-66:].reshape(shape)
    bits = torch.randint(0, 2, shape)
    if name.startswith("msb"):
        b = int(name[3:])
        x = _in_range(b, 80)[-66:].reshape(shape)
        return (lambda ctx, s: cmp.msb(ctx, s, b)), [x], cmp.msb_cost(shape, b), "xor", (x < 0).long()
    if name == "lt":
        return (lambda ctx, s, t: cmp.lt(ctx, s, t, 32)), [x, y], cmp.compare_cost(shape, 32), "xor", \
            (x < y).long()
    if name == "b2a":
        return cmp.b2a, [bits], cmp.b2a_cost(shape), "xor-in", bits
    if name == "bit_mul":
        def prog(ctx, b, z):
            return (yield from cmp.bit_mul(ctx, [b, b ^ 1 if ctx.party == 0 else b], z))[1]
        return prog, [bits, x], cmp.bit_mul_cost([shape, shape], shape), "mixed", (1 - bits) * x
    if name == "select":
        def prog(ctx, b, s, t):
            return (yield from cmp.select(ctx, b, s, t))
        return prog, [bits, x, y], cmp.select_cost(shape), "mixed", torch.where(bits == 1, x, y)
    if name == "relu":
        return (lambda ctx, s: cmp.relu(ctx, s, 32)), [x], cmp.relu_cost(shape, 32), "add", x.clamp(min=0)
    if name.startswith("max"):
        dim = int(name[3:])
        return (lambda ctx, s: cmp.max_tree(ctx, s, dim, 32)), [x], cmp.max_tree_cost(shape, dim, 32), \
            "add", x.amax(dim, keepdim=True)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["msb64", "msb32", "msb20", "msb2", "msb3", "msb9", "lt", "b2a",
                                  "bit_mul", "select", "relu", "max0", "max1"])
def test_declared_cost_equals_counted(cluster, seed, name):
    """Inputs arrive already shared, so the counted traffic is the protocol's alone."""
    prog, inputs, declared, kind, want = _cost_case(name)
    args0, args1 = [], []
    for i, t in enumerate(inputs):
        if kind in ("xor-in", "mixed") and i == 0:  # an XOR-shared bit
            r = _ring_uniform(t.shape) & 1
            args0.append(r), args1.append(t ^ r)
        else:
            s0, s1 = _split(t)
            args0.append(s0), args1.append(s1)
    o0, o1, stats = cluster.run(prog, args0, args1)
    assert stats.rounds == declared.rounds
    assert stats.bytes_sent[0] == declared.bytes and stats.bytes_sent[1] == declared.bytes
    got = o0 ^ o1 if kind == "xor" else o0 + o1
    assert torch.equal(got, want)


def test_msb_cost_formula_values():
    """The per-element numbers quoted in compare.py's docstring."""
    n = 8000
    assert cmp.msb_cost((n,), 64) == cmp.Cost(6, int(24.25 * n))
    assert cmp.msb_cost((n,), 32) == cmp.Cost(5, int(12.25 * n))
    assert cmp.msb_cost((n,), 20) == cmp.Cost(5, int(12.25 * n))
    assert cmp.msb_cost((n,), 17) == cmp.Cost(4, int(6.25 * n))  # GeLU's trees (gelu_cmp_plan)
    assert cmp.msb_cost((n,), 3) == cmp.Cost(1, int(0.375 * n))  # n = 2: one merged level
    assert cmp.msb_cost((n,), 2) == cmp.Cost(1, n // 8)  # n = 1: a single AND
    assert cmp.b2a_cost((n,)) == cmp.Cost(1, n // 8)


# --- what goes on the wire is masked --------------------------------------------------------

def _recording(gen, log):
    """Forward a protocol's rounds and keep what this party received: (bits, tensors)."""
    try:
        msgs = next(gen)
        while True:
            replies = yield msgs
            log.extend((m.bits, r) for m, r in zip(msgs, replies) if r is not None)
            msgs = gen.send(replies)
    except StopIteration as stop:
        return stop.value


@pytest.mark.parametrize("bits", [64, 20])
def test_wire_values_are_uniform_for_a_constant_input(cluster, seed, bits):
    """With x = 0 (shares 0 and 0) every value P1 receives must still be uniform bits and
    differ between two runs: the first round swaps private words masked by u (P0) and v
    (P1), the tree opens values masked by A, B."""
    n = 4096
    zeros = torch.zeros(n, dtype=torch.int64)
    runs = []
    for _ in range(2):
        log: list = []

        def program(ctx, s):
            out = yield from _recording(cmp.msb(ctx, s, bits), log if ctx.party == 1 else [])
            return out

        o0, o1, _ = cluster.run(program, (zeros,), (zeros,))
        assert torch.equal(o0 ^ o1, zeros)
        runs.append(log)
    assert len(runs[0]) == cmp.msb_cost((n,), bits).rounds
    for (width, ts), (_, ts2) in zip(runs[0], runs[1]):
        for t, t2 in zip(ts, ts2):
            assert not torch.equal(t, t2)
            for k in range(width):
                freq = ((t >> k) & 1).double().mean().item()
                assert 0.44 < freq < 0.56, (width, k, freq)


def test_correlated_shares_in_a_narrow_container_match_int64(cluster):
    """`correlated(..., dtype=int16)`: both parties get int16 shares of the sources and
    derived values (P0 from its seed, P1 from the dealer's corrections), and they combine
    to the dealer's value; a domain wider than the container is refused."""
    from secformer_compiler.runtime.correlations import Dom

    def prog(ctx, dtype):
        u, v, w = ctx.corr.correlated(
            [((5, 7), Dom("xor", 16, owner=0)), ((5, 7), Dom("xor", 16, owner=1))],
            lambda u, v: [u & v], [Dom("xor", 16)], dtype=dtype)
        a, b, c = ctx.corr.correlated([((5, 7), Dom("xor", 4))] * 2, lambda a, b: [a & b],
                                      [Dom("xor", 4)], dtype=dtype)
        return [t.to(torch.int64) for t in (u, v, w, a, b, c)], [t.dtype for t in (u, w, c)]
        yield

    (n0, d0), (n1, d1), _ = cluster.run(prog, (torch.int16,))
    assert set(d0) == set(d1) == {torch.int16}
    m16 = (1 << 16) - 1
    u, v = n0[0] & m16, n1[1] & m16
    assert torch.equal((n0[2] ^ n1[2]) & m16, u & v)  # w0 ^ w1 = u & v
    a, b = n0[3] ^ n1[3], n0[4] ^ n1[4]
    assert torch.equal(n0[5] ^ n1[5], a & b)
    with pytest.raises(ValueError, match="wider than"):
        cluster.run(lambda ctx: (yield from _wide(ctx)))


def _wide(ctx):
    from secformer_compiler.runtime.correlations import Dom
    ctx.corr.correlated([((3,), Dom("xor", 20))], dtype=torch.int16)
    return None
    yield


@pytest.mark.parametrize("bits", [64, 17])
def test_msb_with_the_dealer_stream_in_tiny_chunks(monkeypatch, seed, bits):
    """P1 reads the comparison's narrow corrections across 61-byte chunks: items straddle
    several chunks (only the straddling item is copied), and the answer is unchanged."""
    from secformer_compiler.runtime.correlations import DealerCorrelations
    monkeypatch.setattr(DealerCorrelations, "default_chunk_bytes", 61)
    cluster = LocalCluster(FX)
    x = _in_range(bits, 999)
    program = _msb_program(x.shape, bits)
    got = _check_2pc_and_clear(cluster, program, x)
    assert torch.equal(got, (x < 0).long())
    got = _check_2pc_and_clear(cluster, program, x)  # a second program on the same session
    assert torch.equal(got, (x < 0).long())

