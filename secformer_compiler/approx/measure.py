"""Measure a spec's error over its declared domain: the check behind every declared bound.

`measure_error(spec)` evaluates `spec.reference` and the spec's target (the op's exact
function unless the spec names another) in float64 on a dense, deterministic sweep of
the domain, chosen per op:

* gelu, exp, reciprocal, rsqrt: 200001 points, equispaced (plus log-spaced when the
  domain is positive), both ends included.
* softmax: rows of 1, 2, 7 and 128 entries from the domain: constant rows, ramps,
  a single peak over a flat background, and seeded uniform and normal rows, each with
  no mask and with a seeded random 0/1 mask (first position always kept).
* layernorm: 2001 log-spaced values v of var + eps; rows z * sqrt(v - eps) + 3 with a
  fixed standardized z of 16 nonzero entries (so relative errors are well defined).

Relative errors are taken where the target is nonzero. Specs are declared from these
measurements with a small margin; the generic test asserts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from .spec import ApproxSpec, get_approx

SOFTMAX_ROW_LENGTHS = (1, 2, 7, 128)
LAYERNORM_EPS = 1e-5


class ErrorReport(NamedTuple):
    """Max absolute and relative error over a sweep, and the input where each occurs."""

    max_abs: float
    max_rel: float
    worst_abs_input: str
    worst_rel_input: str


def target_of(spec: ApproxSpec) -> Callable[..., torch.Tensor]:
    """The exact function `spec` is measured against."""
    return spec.target if spec.target is not None else get_approx(f"{spec.op}.exact").reference


def _points(lo: float, hi: float, n: int) -> torch.Tensor:
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    if lo > 0:
        x = torch.cat([x, torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)])
    return x


def _softmax_rows(lo: float, hi: float) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(0)
    levels = torch.linspace(lo, hi, 17, dtype=torch.float64)
    for n in SOFTMAX_ROW_LENGTHS:
        batches = [levels[:, None].expand(17, n)]  # constant rows
        t = torch.linspace(0, 1, n, dtype=torch.float64)
        batches.append(
            (levels[:, None, None] + (levels[None, :, None] - levels[:, None, None]) * t).reshape(
                -1, n
            )
        )
        peak = levels[None, :, None].expand(17, 17, n).clone()  # background b, peak p at position 0
        peak[:, :, 0] = levels[:, None]
        batches.append(peak.reshape(-1, n))
        batches.append(lo + (hi - lo) * torch.rand(256, n, generator=gen, dtype=torch.float64))
        normal = (lo + hi) / 2 + (hi - lo) / 6 * torch.randn(
            256, n, generator=gen, dtype=torch.float64
        )
        batches.append(normal.clamp(lo, hi))
        rows = torch.cat(batches)
        yield rows, None
        mask = (torch.rand(rows.shape, generator=gen) < 0.7).to(torch.float64)
        mask[:, 0] = 1
        yield rows, mask


def _layernorm_rows(lo: float, hi: float) -> torch.Tensor:
    z = torch.linspace(-1, 1, 16, dtype=torch.float64)  # even count: no zero entry
    z = (z - z.mean()) / z.pow(2).mean().sqrt()
    v = torch.logspace(math.log10(lo), math.log10(hi), 2001, dtype=torch.float64)
    return z * (v[:, None] - LAYERNORM_EPS).clamp_min(0).sqrt() + 3.0


def _short(t: torch.Tensor, k: int = 8) -> str:
    vals = ", ".join(f"{v:.4g}" for v in t[:k].tolist())
    return f"[{vals}{', ...' if t.numel() > k else ''}]"


def _accumulate(
    report: list, approx: torch.Tensor, exact: torch.Tensor, describe: Callable[[int], str]
) -> None:
    diff = (approx - exact).abs().reshape(-1)
    ex = exact.abs().reshape(-1)
    nz = ex > 0
    rel = torch.where(nz, diff / torch.where(nz, ex, torch.ones_like(ex)), torch.zeros_like(diff))
    for slot, errs in ((0, diff), (1, rel)):
        errs = torch.nan_to_num(errs, nan=math.inf)
        i = int(errs.argmax())
        if float(errs[i]) > report[slot]:
            report[slot] = float(errs[i])
            report[slot + 2] = describe(i)


def measure_error(spec: ApproxSpec, points: int = 200_001) -> ErrorReport:
    """Max abs and rel error of `spec` against its target over its declared domain (float64)."""
    lo, hi = spec.domain
    target = target_of(spec)
    report: list = [0.0, 0.0, "", ""]
    with torch.no_grad():
        if spec.op == "softmax":
            for rows, mask in _softmax_rows(lo, hi):
                n = rows.shape[-1]

                def describe(i: int, rows=rows, mask=mask, n=n) -> str:
                    r = i // n
                    m = "" if mask is None else f", mask {_short(mask[r])}"
                    return f"row of {n} {_short(rows[r])}{m}, position {i % n}"

                _accumulate(report, spec.reference(rows, mask), target(rows, mask), describe)
        elif spec.op == "layernorm":
            rows = _layernorm_rows(lo, hi)
            var = rows.var(-1, unbiased=False) + LAYERNORM_EPS

            def describe(i: int) -> str:
                return f"var + eps = {float(var[i // rows.shape[-1]]):.6g}"

            out = spec.reference(rows, eps=LAYERNORM_EPS)
            _accumulate(report, out, target(rows, eps=LAYERNORM_EPS), describe)
        else:
            x = _points(lo, hi, points)
            _accumulate(report, spec.reference(x), target(x), lambda i: f"x = {float(x[i])!r}")
    return ErrorReport(*report)
