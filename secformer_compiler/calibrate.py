"""Calibration: measure each approximated op's iterative input range on sample inputs.

For LayerNorm the Goldschmidt inverse square root sees var + eps; for 2Quad softmax the
Goldschmidt reciprocal sees the masked row sums of (x + c)^2. We run the program in float64
(exact nonlinearities: the model the approximations must match) and record the extremes.
Margins widen the measured range before the pre-scale and iterations are chosen, because the
inputs a deployment sees are not the calibration sample's:

* below (`MARGIN`, /1.25): a value under the range only under-converges (Goldschmidt's
  error grows smoothly, nothing blows up), so a small margin is enough;
* above (`HI_MARGIN`, x2.5): a value past the convergence interval (2 for the reciprocal,
  3 for rsqrt, after the pre-scale) makes the iterations diverge: NaN in float, garbage in
  fixed point, with no error any party could see. On STS-B, the dev set's 2Quad row sums and
  LayerNorm variances reached 2.9x the maximum over 1,000 training rows; with x1.25, 19 of
  1,500 dev rows of a distilled student diverged, with x2.5 none did. The price is about one
  Goldschmidt iteration per instance (2 rounds): +6 rounds per BERT layer.
  `compile(range_margin=...)` changes it.

`compile()` uses `training.measure_ranges`, the same measurement on the *approximated*
program (what the Goldschmidt steps actually see); this exact-model version is the
reference the tests compare it with.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import float_interp
from .ir import Graph

MARGIN = 1.25  # below the smallest measured value
HI_MARGIN = 2.5  # above the largest (see the module docstring for why it is wider)


def resolve_margin(hi_margin: float | None, name: str = "range_margin") -> float:
    """The top margin to use (None: `HI_MARGIN`); ValueError, naming `name`, if below 1."""
    m = HI_MARGIN if hi_margin is None else float(hi_margin)
    if not m >= 1:
        raise ValueError(f"{name} must be >= 1 (a factor on the largest calibrated value), got {hi_margin}")
    return m


def with_margins(lo: dict[str, float], hi: dict[str, float], hi_margin: float | None = None
                 ) -> dict[str, tuple[float, float]]:
    """{node: (lo / MARGIN, hi * hi_margin)}, the ranges Goldschmidt is chosen for."""
    m = resolve_margin(hi_margin)
    return {k: (max(lo[k] / MARGIN, 1e-6), hi[k] * m) for k in lo}


def measure_ranges(graph: Graph, samples: Sequence[Any], hi_margin: float | None = None
                   ) -> dict[str, tuple[float, float]]:
    """{node name: (lo, hi)} for every layernorm and softmax node of `graph`, with margins."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for sample in samples:
        env = float_interp.run(graph, sample, keep_all=True)
        for n in graph:
            if n.op == "layernorm":
                x = env[n.inputs[0]].double()
                k = n.attrs["dims"]
                v = x.reshape(*x.shape[:-k], -1).var(-1, unbiased=False) + n.attrs["eps"]
            elif n.op == "softmax":
                x = env[n.inputs[0]].double()
                c = float((n.attrs.get("params") or {}).get("c", 5.0))
                q = (x + c) ** 2
                if len(n.inputs) > 1:
                    q = q * env[n.inputs[1]].double()
                v = q.sum(n.attrs["dim"])
            else:
                continue
            lo[n.name] = min(lo.get(n.name, float("inf")), float(v.min()))
            hi[n.name] = max(hi.get(n.name, 0.0), float(v.max()))
    return with_margins(lo, hi, hi_margin)
