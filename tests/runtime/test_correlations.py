"""Shape inference of derive functions (`correlations.derived_shapes`): cached, never stale."""

import functools

import torch

from secformer_compiler.runtime import correlations
from secformer_compiler.runtime.correlations import derived_shapes
from secformer_compiler.runtime.ring import ring_matmul


def test_shapes_follow_the_inputs_and_what_the_function_captured():
    def make(c):
        return lambda a: [c * a, a * a]

    def meta(*shape):  # what a derive function captures is meta too (ctx.pub on the dealer)
        return torch.empty(shape, dtype=torch.int64, device="meta")

    row, col = meta(1, 5), meta(4, 1)
    # the same code, different captured tensors: the cache must not mix them up
    assert derived_shapes(make(row), [(4, 5)]) == [(4, 5), (4, 5)]
    assert derived_shapes(make(col), [(4, 1)]) == [(4, 1), (4, 1)]
    assert derived_shapes(make(col), [(1, 5)]) == [(4, 5), (1, 5)]
    assert derived_shapes(make(meta(3, 4, 5)), [(4, 5)]) == [(3, 4, 5), (4, 5)]
    # a captured function (the op of a Beaver product) is part of the key too
    for op, want in ((torch.mul, (6, 6)), (ring_matmul, (6, 2))):
        assert derived_shapes(lambda a, b: [op(a, b)], [(6, 3) if op is ring_matmul else (6, 6),
                                                        (3, 2) if op is ring_matmul else (6, 6)]) == [want]


CALLS: list[str] = []


def _derive(a):
    CALLS.append(a.device.type)
    return [a * a]


def test_a_cached_shape_skips_the_meta_run_and_odd_functions_are_not_cached():
    calls, derive = CALLS, _derive
    calls.clear()

    correlations._SHAPES.clear()
    assert derived_shapes(derive, [(7, 9)]) == [(7, 9)]
    assert derived_shapes(derive, [(7, 9)]) == [(7, 9)]
    assert calls == ["meta"]  # computed once, on meta tensors
    assert derived_shapes(derive, [(2, 9)]) == [(2, 9)] and len(calls) == 2

    def scaled(a, k):
        calls.append("partial")
        return [a.repeat(k, 1)]

    for k in (1, 3, 3):  # a partial's bound arguments are not inspected: never cached
        assert derived_shapes(functools.partial(scaled, k=k), [(2, 4)]) == [(2 * k, 4)]
    assert calls.count("partial") == 3

    def capturing(a):  # captures a list: not cached either
        calls.append("list")
        return [a]

    derived_shapes(capturing, [(1,)])
    derived_shapes(capturing, [(1,)])
    assert calls.count("list") == 2


def test_the_cache_is_bounded():
    correlations._SHAPES.clear()
    for n in range(correlations._SHAPES_MAX + 5):
        derived_shapes(lambda a: [a], [(n + 1,)])
    assert len(correlations._SHAPES) <= correlations._SHAPES_MAX


def _requests(corr):
    """A mix of dealt values: ring products, 1-bit, 16-bit and 40-bit domains, odd sizes
    (so 64-bit items land on unaligned offsets and straddle small chunks)."""
    from secformer_compiler.runtime.correlations import RING, Dom, mod_dom

    corr.correlated([((64, 8), RING)], lambda a: [a + 1], [Dom("xor", 64)])  # aligned: in place
    corr.correlated([((3, 5), RING), ((3, 5), RING)], lambda a, b: [a * b], [RING])
    corr.correlated([((13,), Dom("xor", 1))], lambda r: [r], [RING])  # 2 bytes packed: misaligns
    corr.correlated([((7, 9), RING)], lambda a: [a * a, a * 3], [RING, RING])
    corr.correlated([((5,), Dom("xor", 1, owner=0)), ((5,), Dom("xor", 1, owner=1))],
                    lambda u, v: [u * v], [mod_dom(16)])
    corr.correlated([((300,), RING)], lambda a: [a, a ^ 5], [RING, mod_dom(40)])
    corr.correlated([((64, 8), RING)], lambda a: [a + 1], [Dom("xor", 64)])


def test_chunked_dealer_stream_is_byte_for_byte_the_listed_one():
    """With `flush` the dealer writes corrections into fixed-size chunks (64-bit ones in
    place); the stream P1 reads must be exactly the one the list mode concatenates, for
    chunk sizes that split items anywhere."""
    from secformer_compiler.runtime.correlations import DealerCorrelations
    from secformer_compiler.runtime.prg import PRG, new_seed

    s0, s1 = new_seed(), new_seed()
    listed = DealerCorrelations(PRG(s0), PRG(s1))
    _requests(listed)
    want = listed.take_corrections()
    assert listed.correction_bytes == want.numel() > 0
    for size in (7, 64, 1000, 4096, 1 << 20):
        chunks = []
        chunked = DealerCorrelations(PRG(s0), PRG(s1), flush=chunks.append, chunk_bytes=size)
        _requests(chunked)
        chunks.append(chunked.take_corrections())
        assert all(c.numel() == size for c in chunks[:-1])  # every flushed chunk is full
        assert torch.equal(torch.cat(chunks), want), size
        assert chunked.correction_bytes == want.numel()
        assert chunked.take_corrections().numel() == 0


def test_flush_set_after_some_corrections_keeps_their_order():
    from secformer_compiler.runtime.correlations import DealerCorrelations
    from secformer_compiler.runtime.prg import PRG, new_seed

    s0, s1 = new_seed(), new_seed()
    listed = DealerCorrelations(PRG(s0), PRG(s1))
    _requests(listed)
    _requests(listed)
    want = listed.take_corrections()
    mixed, chunks = DealerCorrelations(PRG(s0), PRG(s1), chunk_bytes=100), []
    _requests(mixed)  # no flush yet: kept in the list
    mixed.flush = chunks.append
    _requests(mixed)
    chunks.append(mixed.take_corrections())
    assert torch.equal(torch.cat(chunks), want)
