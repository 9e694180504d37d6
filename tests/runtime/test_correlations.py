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
