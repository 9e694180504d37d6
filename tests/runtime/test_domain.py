"""The simulator's range checks (runtime/domain.py): what they record, where, and when not."""

from __future__ import annotations

import warnings

import pytest
import torch

import secformer_compiler as sc
from secformer_compiler.compiled import DomainWarning
from secformer_compiler.ir import Node
from secformer_compiler.runtime.context import DEALER, DEALER_MODE, PARTY, Context, clear_context
from secformer_compiler.runtime.correlations import ClearCorrelations
from secformer_compiler.runtime.domain import NODE, check_range, violations
from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.protocols.goldschmidt import reciprocal_goldschmidt
from secformer_compiler.runtime.protocols.trunc import Pending
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint()


def test_records_the_range_seen_per_node_and_check_and_merges_repeats():
    ctx = clear_context(FX)
    ctx.state[NODE] = Node("ln", "layernorm", module_path="encoder.layer.0.output.LayerNorm")
    check_range(ctx, "p y", FX.encode(torch.tensor([0.5, 1.0])), FX.frac_bits, 0.1, 2.0)  # inside
    assert violations(ctx) == []
    check_range(ctx, "p y", FX.encode(torch.tensor([0.01, 1.0])), FX.frac_bits, 0.1, 2.0)
    check_range(ctx, "p y", Pending(FX.encode(torch.tensor([3.0]))), FX.frac_bits, 0.1, 2.0)
    check_range(ctx, "|x|", FX.encode(torch.tensor([-5.0, 1.0])), FX.frac_bits, 0.0, 4.0, magnitude=True)
    (a, b) = violations(ctx)
    assert (a.node, a.what, a.domain) == ("ln", "p y", (0.1, 2.0))
    assert a.observed[0] == pytest.approx(0.01, abs=1e-4) and a.observed[1] == 3.0
    assert b.observed == (1.0, 5.0)
    assert str(a) == ("%ln (encoder.layer.0.output.LayerNorm): p y ranged over [0.009995, 3], "
                      "outside its domain [0.1, 2]")


@pytest.mark.parametrize("mode,party", [(PARTY, 0), (DEALER_MODE, DEALER)])
def test_parties_and_the_dealer_never_check(mode, party):
    ctx = Context(party=party, mode=mode, corr=ClearCorrelations(), fxp=FX)
    check_range(ctx, "p y", FX.encode(torch.tensor([100.0])), FX.frac_bits, 0.1, 2.0)
    assert violations(ctx) == []


def test_goldschmidt_reciprocal_reports_an_input_below_its_domain():
    def program(ctx, y):
        return (yield from reciprocal_goldschmidt(ctx, y, 2.0 ** -10, 8))

    for values, bad in (([4.0, 100.0, 1000.0], False), ([1e-3, 100.0], True)):
        ctx = clear_context(FX)
        run_clear(program, FX.encode(torch.tensor(values, dtype=torch.float64)), ctx=ctx)
        found = violations(ctx)
        assert bool(found) == bad, found
        if bad:
            assert "1/y" in found[0].what and found[0].observed[0] < 2.0 ** -16


@pytest.fixture(scope="module")
def tiny(make_tiny_bert):
    return make_tiny_bert(layers=1)


def test_simulate_warns_where_uncalibrated_defaults_miss_the_inputs(tiny):
    """This random-init model's embedding LayerNorm sees a variance near 1e-3: the documented
    defaults (calibration=[]) pre-scale it below the rsqrt's domain, and 2PC goes wrong
    there while the simulator's output still looks right. Calibrated, nothing is reported."""
    model, x = tiny
    cm = sc.compile(model, x, calibration=[])
    with pytest.warns(DomainWarning, match="embeddings.LayerNorm") as rec:
        cm.simulate(**x)
    found = rec[0].message.violations
    assert found == cm.last_domain_violations
    assert any("1/sqrt" in v.what and v.node == "layer_norm" for v in found)
    assert "calibration=" in str(rec[0].message)
    cal = sc.compile(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DomainWarning)
        cal.simulate(**x)
    assert cal.last_domain_violations == []
