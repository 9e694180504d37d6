"""Ring arithmetic, fixed-point encoding, exact ring matmul, packing, PRG."""

import pytest
import torch

from secformer_compiler.runtime.packing import pack, packed_nbytes, unpack
from secformer_compiler.runtime.prg import PRG
from secformer_compiler.runtime import ring
from secformer_compiler.runtime.ring import FixedPoint, SplitOperand, ring_matmul


@pytest.fixture(params=["limbs", "int64", "int64-colmajor"])
def kernel(request, monkeypatch):
    """Every exact ring product, whichever this machine's measurement would pick."""
    monkeypatch.setattr(ring, "_KERNEL", request.param)
    return request.param


def _extreme(shape, g):
    """Ring values whose two low limbs sit at the bottom of their range (-2^21 + a little):
    the Karatsuba factor l0 + l1 is then as large as it gets (2^22)."""
    low = -(2 ** 21) + torch.randint(0, 64, shape, generator=g)
    mid = -(2 ** 21) + torch.randint(0, 64, shape, generator=g)
    top = torch.randint(-(2 ** 19), 2 ** 19, shape, generator=g)
    return low + (mid << 22) + (top << 44)


def test_encode_decode_negative_values_round_trip(seed):
    fx = FixedPoint(16)
    x = torch.tensor([-1.0, -0.5, -2 ** -16, 0.0, 2 ** -16, 3.25, -1000.125])
    assert torch.equal(fx.decode(fx.encode(x)), x.double())
    r = torch.randn(1000, dtype=torch.float64) * 100
    assert (fx.decode(fx.encode(r)) - r).abs().max() <= 2 ** -17


def test_decode_of_reconstructed_shares_is_exact_for_negatives():
    """CrypTen decodes negative values off by one; we reconstruct in the ring then decode."""
    fx = FixedPoint(16)
    x = fx.encode(torch.tensor([-3.0, -0.0000152587890625]))
    r = PRG().ring(x.shape)
    assert torch.equal(fx.decode((x - r) + r), torch.tensor([-3.0, -2 ** -16], dtype=torch.float64))


def test_encode_rejects_overflow():
    with pytest.raises(OverflowError, match="fractional bits"):
        FixedPoint(16).encode(torch.tensor([2.0 ** 50]))


@pytest.mark.parametrize("shapes", [((7, 33), (33, 5)), ((3, 8, 2100), (2100, 4)), ((2, 4, 9), (2, 9, 6)), ((5,), (5, 2))])
def test_ring_matmul_exact_mod_2_64(shapes, kernel):
    g = PRG()
    a, b = g.ring(shapes[0]), g.ring(shapes[1])
    assert torch.equal(ring_matmul(a, b), torch.matmul(a, b))


@pytest.mark.parametrize("shapes", [((7, 33), (33, 5)), ((3, 8, 4200), (4200, 4)), ((2, 4, 9), (2, 9, 6))])
def test_split_operand_gives_the_same_product(shapes, kernel):
    """A right operand split once into limbs (a fixed weight's share) gives the exact product,
    also across K chunks (4200 > 2 x 2048) and with batch dims, and can be reused."""
    g = PRG()
    a, b = g.ring(shapes[0]), g.ring(shapes[1])
    split = SplitOperand(b)
    assert torch.equal(ring_matmul(a, split), torch.matmul(a, b))
    a2 = g.ring(shapes[0])
    assert torch.equal(ring_matmul(a2, split), torch.matmul(a2, b))
    assert split.shape == b.shape
    assert torch.equal(split.value, b)  # the limbs (or the int64 operand) rebuild it exactly
    assert (split.chunks is None) == (kernel != "limbs")
    kept = split.dense if split.tiles is None else split.tiles[2][0][0]
    if kernel == "int64-colmajor":
        assert kept.transpose(-1, -2).is_contiguous()
    elif kernel == "int64":
        assert kept.is_contiguous()


@pytest.mark.parametrize("shapes", [((7, 33), (33, 5)), ((3, 8, 4200), (4200, 2100)), ((2, 4, 9), (2, 9, 6)),
                                    ((5,), (5, 1030))])
def test_compact_limbs_give_the_same_product_in_12_bytes(shapes, monkeypatch):
    """Compact limbs (float32, widened a block of 1024 columns at a time) are exact across K
    chunks (4200), column blocks (2100, 1030: a last block narrower) and batch dims, keep
    12 bytes an element against the full limbs' 32, and rebuild the operand exactly."""
    monkeypatch.setattr(ring, "_KERNEL", "limbs")
    g = PRG()
    a, b = g.ring(shapes[0]), g.ring(shapes[1])
    small, full = SplitOperand(b, compact=True), SplitOperand(b)
    assert small.compact and not full.compact
    assert small.nbytes == 12 * b.numel() and full.nbytes == 32 * b.numel()
    assert torch.equal(ring_matmul(a, small), torch.matmul(a, b))
    assert torch.equal(small.value, b)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        ring_matmul(g.ring(shapes[0][:-1] + (shapes[0][-1] + 1,)), small)


def test_compact_limbs_exact_at_the_limb_extremes(monkeypatch):
    """float32 holds every limb exactly (|limb| <= 2^21 < 2^24): limbs at the bottom of their
    range, where the widened Karatsuba factor l0 + l1 reaches -2^22, still give the exact product."""
    monkeypatch.setattr(ring, "_KERNEL", "limbs")
    g = torch.Generator().manual_seed(1)
    a, b = _extreme((6, 2048), g), _extreme((2048, 1100), g)
    assert torch.equal(ring_matmul(a, SplitOperand(b, compact=True)), torch.matmul(a, b))


def test_compact_only_when_full_limbs_pass_the_budget(kernel, monkeypatch):
    """One decision per process by the total: full limbs (32 bytes an element) up to the
    budget, compact past it, and never under an int64 kernel (8 bytes an element anyway)."""
    monkeypatch.setenv(ring.LIMB_BUDGET_ENV, "1")  # 1 MiB: 32768 full elements
    assert ring.limb_budget_bytes() == 1 << 20
    assert not ring.compact_limbs(32768)
    assert ring.compact_limbs(32769) == (kernel == "limbs")
    if kernel != "limbs":
        assert not SplitOperand(PRG().ring((40, 30)), compact=True).compact
    monkeypatch.setenv(ring.LIMB_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="whole number of MiB"):
        ring.limb_budget_bytes()
    monkeypatch.delenv(ring.LIMB_BUDGET_ENV)
    assert 0 < ring.limb_budget_bytes() < 1 << 50  # a sixth of this machine's memory


@pytest.mark.parametrize("shape", [(1000, 300), (300, 1800), (1000, 1800), (769, 769)])
def test_int64_kernels_tile_a_large_operand_exactly(shape, kernel):
    """Under an int64 kernel a matrix with a dim over 768 is kept as 256 x 256 tiles (the
    last ones smaller when 256 does not divide it); the tiled product is exact, with batch
    dims on the left operand, and `value` rebuilds the operand."""
    g = PRG()
    b = g.ring(shape)
    split = SplitOperand(b)
    if kernel == "limbs":
        assert split.tiles is None
        return
    tk, tn, tiles = split.tiles
    assert (tk, tn) == ring.tile_sizes(shape) == tuple(256 if d > 768 else d for d in shape)
    assert len(tiles) == -(-shape[1] // tn) and all(len(col) == -(-shape[0] // tk) for col in tiles)
    for a in (g.ring((7, shape[0])), g.ring((2, 5, shape[0]))):
        assert torch.equal(ring_matmul(a, split), torch.matmul(a, b))
    assert torch.equal(split.value, b)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        ring_matmul(g.ring((3, shape[0] + 1)), split)


def test_small_and_batched_operands_stay_whole(kernel):
    assert ring.tile_sizes((768, 768)) == (768, 768)
    assert ring.tile_sizes((4, 1000, 1000)) == (1000, 1000)  # batched: never tiled
    if kernel != "limbs":
        assert SplitOperand(PRG().ring((768, 768))).tiles is None


def test_public_operand_keeps_no_more_memory_than_the_matrix(kernel):
    """F = W - B is kept once: as a SplitOperand (int64 layout or tiles, 8 bytes an element)
    under an int64 kernel, as a plain tensor under the limbs kernel; vectors stay tensors."""
    g = PRG()
    b, v = g.ring((900, 40)), g.ring((40,))
    kept = ring.public_operand(b)
    assert ring.public_operand(v) is v
    if kernel == "limbs":
        assert isinstance(kept, torch.Tensor) and torch.equal(kept, b)
    else:
        assert isinstance(kept, SplitOperand) and torch.equal(kept.value, b)
        assert sum(t.numel() for col in kept.tiles[2] for t in col) == b.numel()
    a = g.ring((3, 900))
    assert torch.equal(ring_matmul(a, kept), torch.matmul(a, b))


def test_kernel_choice_measured_or_fixed_by_environment(monkeypatch):
    monkeypatch.setattr(ring, "_KERNEL", None)
    monkeypatch.setenv(ring.KERNEL_ENV, "limbs")
    assert ring.matmul_kernel() == "limbs"
    monkeypatch.setattr(ring, "_KERNEL", None)
    monkeypatch.setenv(ring.KERNEL_ENV, "gpu")
    with pytest.raises(ValueError, match="'limbs', 'int64' or 'int64-colmajor'"):
        ring.matmul_kernel()
    monkeypatch.setattr(ring, "_KERNEL", None)
    monkeypatch.setenv(ring.KERNEL_ENV, "int64-colmajor")
    assert ring.matmul_kernel() == "int64-colmajor"
    monkeypatch.setattr(ring, "_KERNEL", None)
    monkeypatch.delenv(ring.KERNEL_ENV)
    assert ring.matmul_kernel() in ring.KERNELS  # measured on this machine


def test_split_operand_rejects_a_vector():
    with pytest.raises(ValueError, match="2 or more dims"):
        SplitOperand(torch.zeros(5, dtype=torch.int64))


def test_ring_matmul_edge_values(kernel):
    edge = torch.tensor([-2 ** 63, 2 ** 63 - 1, -1, 0, 1, 2 ** 62, -(2 ** 21), 2 ** 21 - 1])
    a = edge.repeat(8, 1)
    assert torch.equal(ring_matmul(a, a.t()), torch.matmul(a, a.t()))


def test_ring_matmul_exact_at_the_limb_extremes(kernel):
    """Limbs at the bottom of their range make the Karatsuba factors (a0 + a1)(b0 + b1) as
    large as they get (2^22 each): a full K chunk (2048) of them is exact only because their
    product is summed over at most 512 terms at a time (1024 would pass 2^53 and round)."""
    g = torch.Generator().manual_seed(0)
    a, b = _extreme((6, 2048), g), _extreme((2048, 5), g)
    assert torch.equal(ring_matmul(a, b), torch.matmul(a, b))
    assert torch.equal(ring_matmul(a, SplitOperand(b)), torch.matmul(a, b))


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 16, 21, 32, 40, 64])
def test_pack_round_trip(bits):
    t = PRG().ring((3, 37), bits)
    buf = pack(t, bits)
    assert buf.dtype == torch.uint8 and buf.numel() == packed_nbytes(t.numel(), bits)
    assert torch.equal(unpack(buf, t.shape, bits), t)


def test_prg_is_deterministic_per_seed_and_uniform():
    s = b"0123456789abcdef"
    assert torch.equal(PRG(s).ring((100,)), PRG(s).ring((100,)))
    bits = PRG().ring((200000,), 1)
    assert abs(bits.double().mean().item() - 0.5) < 0.01
    assert not torch.equal(PRG().ring((4,)), PRG().ring((4,)))
    with pytest.raises(ValueError, match="16 bytes"):
        PRG(b"short")


def test_prg_streams_are_independent_and_reproducible():
    s = b"0123456789abcdef"
    main, other = PRG(s).ring((64,)), PRG(s).stream(1).ring((64,))
    assert torch.equal(PRG(s, stream=0).ring((64,)), main)  # stream 0 is the plain stream
    assert torch.equal(PRG(s, stream=1).ring((64,)), other)
    assert not torch.equal(main, other)
    # no overlap: stream 1's keystream is not a shifted copy of stream 0's
    long0 = PRG(s).ring((4096,))
    assert not any(torch.equal(long0[i:i + 4], other[:4]) for i in range(4093))


@pytest.mark.parametrize("sizes", [[5, 3, 8], [1 << 22, 17, (1 << 22) + 9]])
def test_prg_draws_are_the_aes_ctr_keystream(sizes):
    """Draws of any size (also across the 4 MiB zero source) concatenate to the AES-128-CTR
    keystream of the seed, with the stream number in the counter block's high half."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    s = b"0123456789abcdef"
    g = PRG(s, stream=3)
    got = b"".join(bytes(g.bytes(n)) for n in sizes)
    enc = Cipher(algorithms.AES(s), modes.CTR((3).to_bytes(8, "big") + bytes(8))).encryptor()
    assert got == enc.update(bytes(sum(sizes)))
    assert g.bytes_drawn == sum(sizes)


@pytest.mark.parametrize("bits,width", [(1, 1), (3, 1), (8, 1), (12, 2), (16, 2), (21, 4), (32, 4),
                                        (33, 8), (63, 8), (64, 8)])
def test_prg_narrow_draws_take_the_fewest_keystream_bytes(bits, width):
    """A b-bit draw is the low b bits of 1, 2, 4 or 8 keystream bytes per element: in range,
    the same values as the keystream read at that width, and uniform."""
    s = b"fedcba9876543210"
    n = 1 << 14
    g = PRG(s)
    t = g.ring((n,), bits)
    assert g.bytes_drawn == width * n
    assert t.dtype == torch.int64
    if bits < 64:
        assert int(t.min()) >= 0 and int(t.max()) < 1 << bits
    dt = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.int64}[width]
    raw = torch.frombuffer(PRG(s).bytes(width * n), dtype=dt).to(torch.int64)
    assert torch.equal(t, raw & ((1 << bits) - 1) if bits < 64 else raw)
    # uniform: each of the 8 top buckets of the range holds 1/8 of the draws (+-6 sigma)
    top = (t >> max(bits - 3, 0)) & 7 if bits >= 3 else t
    counts = torch.bincount(top, minlength=1 << min(bits, 3)).double()
    p = 1 / counts.numel()
    assert (counts / n - p).abs().max() < 6 * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("bits", [1, 3, 8, 12, 15, 16, 21, 32])
def test_narrow_containers_hold_the_same_bit_patterns(bits, dtype):
    """PRG draws and unpacked wire values in an int16 / int32 container equal the int64 ones
    mod 2^bits (what the comparisons' narrow words rely on); a value that fills the
    container is its bit pattern (negative when the top bit is set)."""
    width = torch.iinfo(dtype).bits
    if bits > width:
        with pytest.raises(ValueError, match="do not fit"):
            PRG().ring((4,), bits, dtype)
        with pytest.raises(ValueError, match="do not fit"):
            unpack(pack(PRG().ring((4,), bits), bits), (4,), bits, dtype)
        return
    s = b"0123456789abcdef"
    wide = PRG(s).ring((3, 1001), bits)
    narrow = PRG(s).ring((3, 1001), bits, dtype)
    assert narrow.dtype == dtype
    m = (1 << bits) - 1
    assert torch.equal(narrow.to(torch.int64) & m, wide)
    if bits < width:  # in range, no stray high bits
        assert int(narrow.min()) >= 0 and int(narrow.max()) <= m
    back = unpack(pack(narrow, bits), wide.shape, bits, dtype)
    assert back.dtype == dtype and torch.equal(back, narrow)
    assert torch.equal(unpack(pack(wide, bits), wide.shape, bits), wide)  # int64 as before


def test_bit_forms_are_the_products_at_the_ring_edges():
    """signed_by_bit = (1 - 2c) v and bit_select = c z + (1 - 2c) v mod 2^64, for 0 / 1 bits
    broadcast against the values."""
    v = torch.tensor([[-2 ** 63, 2 ** 63 - 1, -1, 0, 1, 12345, -(2 ** 40)]] * 2)
    z = torch.flip(v, [1])
    c = torch.tensor([[0], [1]])
    assert torch.equal(ring.signed_by_bit(v, c), (1 - 2 * c) * v)
    assert torch.equal(ring.signed_by_bit(v, torch.tensor(1)), -v)
    assert torch.equal(ring.bit_select(c, z, v), c * z + (1 - 2 * c) * v)
