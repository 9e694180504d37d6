"""Calibration: measure each approximated op's iterative input range on sample inputs.

For LayerNorm the Goldschmidt inverse square root sees var + eps; for 2Quad softmax the
Goldschmidt reciprocal sees the masked row sums of (x + c)^2. We run the program in float64
(exact nonlinearities: the model the approximations must match) and record the extremes.
A 25% margin on each side covers inputs outside the calibration sample.

`compile()` uses `training.measure_ranges`, the same measurement on the *approximated*
program (what the Goldschmidt steps actually see); this exact-model version is the
reference the tests compare it with.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import float_interp
from .ir import Graph

MARGIN = 1.25


def measure_ranges(graph: Graph, samples: Sequence[Any]) -> dict[str, tuple[float, float]]:
    """{node name: (lo, hi)} for every layernorm and softmax node of `graph`."""
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
    return {k: (max(lo[k] / MARGIN, 1e-6), hi[k] * MARGIN) for k in lo}
