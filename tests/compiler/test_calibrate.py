"""Calibration margins (secformer_compiler/calibrate.py): the ranges Goldschmidt is chosen for.

Above the measured range Goldschmidt diverges, so the high-side margin must cover inputs a
deployment sees beyond the calibration sample (STS-B dev rows reached 2.9x the training
rows' maximum); these tests pin the margins and show what the default buys.
"""

import pytest
import torch

import secformer_compiler as sc
from secformer_compiler import calibrate
from secformer_compiler.approx.softmax import quad2_exact
from secformer_compiler.training import float_approx


def test_margins_widen_the_high_side_more():
    assert calibrate.with_margins({"a": 1.0}, {"a": 10.0}) == {"a": (0.8, 10.0 * calibrate.HI_MARGIN)}
    assert calibrate.HI_MARGIN == 2.5 and calibrate.MARGIN == 1.25
    assert calibrate.with_margins({"a": 1.0}, {"a": 10.0}, hi_margin=4) == {"a": (0.8, 40.0)}
    with pytest.raises(ValueError, match="range_margin must be >= 1"):
        calibrate.with_margins({"a": 1.0}, {"a": 10.0}, hi_margin=0.5)
    cal = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="range_margin must be >= 1"):  # even with no calibration to apply it to
        sc.compile(_Softmax(), (cal,), calibration=[], range_margin=0.9)


class _Softmax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


def _two_quad(x: torch.Tensor) -> torch.Tensor:
    """2Quad with an exact division: what the Goldschmidt reciprocal must reproduce."""
    return quad2_exact(x, None, -1, c=5.0)


def _scores() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cal = torch.rand(1, 4, 16) * 2 - 1  # scores in [-1, 1]: 2Quad row sums of (x + 5)^2 near 400
    big = torch.full((1, 4, 16), 4.0)
    big[..., 0] = 5.0  # row sums 1,315: about 2.6x the sample's largest
    return cal, big


def test_default_margin_converges_past_the_sample_range():
    cal, big = _scores()
    cm = sc.compile(_Softmax(), (cal,), calibration=[(cal,)])
    ref = _two_quad(big)
    assert (float_approx(cm, big)[0] - ref).abs().max().item() < 1e-3
    assert (cm.simulate(big)[0] - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("table_seeds,wrong", [(False, 1.0), (True, 0.1)])
def test_a_narrow_margin_diverges_there(table_seeds, wrong):
    """What the default prevents: with x1.25 (the margin before STS-B), the same input leaves
    the convergence interval and the fixed-point result is garbage (Goldschmidt diverges;
    the table's index wraps); the simulator says where (runtime/domain.py), a 2PC run could
    not."""
    from secformer_compiler.compiled import DomainWarning

    cal, big = _scores()
    cm = sc.compile(_Softmax(), (cal,), calibration=[(cal,)], range_margin=1.25, table_seeds=table_seeds)
    ref = _two_quad(big)
    with pytest.warns(DomainWarning, match="1/y's pre-scaled input"):
        out = cm.simulate(big)[0]
    assert (out - ref).abs().max().item() > wrong
    assert cm.last_domain_violations[0].observed[1] > 2.0  # past the reciprocal's domain (0, 2)


def test_wider_margin_costs_iterations_not_accuracy():
    cal, _ = _scores()
    its = {}
    for m in (1.25, 2.5, 10.0):
        cm = sc.compile(_Softmax(), (cal,), calibration=[(cal,)], range_margin=m)
        its[m] = next(n.attrs["params"]["iterations"] for n in cm.graph if n.op == "softmax")
        assert (cm.simulate(cal)[0] - _two_quad(cal)).abs().max().item() < 1e-3
    assert its[1.25] <= its[2.5] <= its[10.0] and its[1.25] < its[10.0]


def test_goldschmidt_target_trades_iterations_for_accuracy():
    """compile(goldschmidt_target=...): a looser target needs no more iterations, each step
    declares (and meets, in float and in fixed point) the error it was chosen for, and the
    graph records the target; the default is approx.CALIBRATION_TARGET_REL_ERR (1e-4)."""
    from secformer_compiler.approx import CALIBRATION_TARGET_REL_ERR

    cal, _ = _scores()
    its = {}
    for t in (None, 1e-3, 1e-2):
        cm = sc.compile(_Softmax(), (cal,), calibration=[(cal,)], goldschmidt_target=t, table_seeds=False)
        node = next(n for n in cm.graph if n.op == "softmax")
        spec = cm.graph.meta["approximations"][node.name]
        want = CALIBRATION_TARGET_REL_ERR if t is None else t
        assert cm.graph.meta["goldschmidt_target"] == want
        assert spec.declared_max_abs_err <= want * 1.01 + 1e-15
        its[want] = node.attrs["params"]["iterations"]
        assert (float_approx(cm, cal)[0] - _two_quad(cal)).abs().max().item() <= want
        assert (cm.simulate(cal)[0] - _two_quad(cal)).abs().max().item() <= want + 1e-3
    assert its[1e-4] >= its[1e-3] >= its[1e-2] and its[1e-4] > its[1e-2]


@pytest.mark.parametrize("bad", [0.0, -1e-3, 0.5, float("nan")])
def test_goldschmidt_target_out_of_range_is_refused(bad):
    from secformer_compiler.errors import CompileError

    cal, _ = _scores()
    with pytest.raises(CompileError, match="goldschmidt_target must be a relative error in"):
        sc.compile(_Softmax(), (cal,), calibration=[(cal,)], goldschmidt_target=bad)
    with pytest.raises(CompileError, match="goldschmidt_target must be"):  # even uncalibrated
        sc.compile(_Softmax(), (cal,), calibration=[], goldschmidt_target=bad)
