"""`softmax.2relu`: MPCFormer's 2ReLU softmax as an `ApproxSpec` (float reference and error claim).

2ReLU replaces softmax(x) by relu(x) / sum(relu(x)) (MPCFormer, Li et al., ICLR 2023,
Sec. 3.3): a comparison per score instead of exp and max. Like 2Quad it is a *replacement*,
not an approximation of softmax: a model needs distilling with it to stay accurate.

Definition used here (the spec's exact form, `relu2_exact`), per row of the softmax dim:

    y = relu(x) * mask / (sum(relu(x) * mask) + eps),   eps = 2^-4

* `mask` is the public 0/1 padding mask (1 = attend), applied multiplicatively as for 2Quad:
  masked positions give exactly 0 and do not enter the sum.
* `eps` is the guard for rows with no positive unmasked score, where relu(x) / sum(relu(x))
  is 0/0: with it such rows give 0 (not NaN), and the divisor never drops below eps, which
  is what lets a Goldschmidt reciprocal with a public pre-scale handle every row: its input
  range is [eps, 128 * 3 + eps] for the declared domain. A power of two, so the fixed-point
  program adds it exactly. It is part of the replaced function (the target uses it too);
  changing it changes the model, so it is a constant here, not a tuning knob.

The reference computes the division as the protocol does, by Goldschmidt iterations
(`secformer_compiler.approx.goldschmidt.reciprocal_goldschmidt`) with pre-scale p = 2^-8
(p * 387 < 2: convergence needs p * divisor in (0, 2)) and 15 iterations. The iteration's
relative error at divisor d is (1 - p d)^(2^15), largest at d = eps, but there the numerators
are small too (they sum to d - eps), so the absolute error of every output is at most
max_d (1 - eps/d)(1 - p d)^(2^15) = 1.38e-5: the declared bound, measured by
`secformer_compiler.approx.measure_error` over rows of 1 to 128 scores in [-4, 3].

Parameter names: `recip_prescale` / `recip_iterations`, not `prescale` / `iterations`.
The compiler's calibration (`compile(..., calibration=...)`) re-derives any softmax spec
with `prescale` and `iterations` params from the measured range of *2Quad's* row sums
((x + 5)^2), which is the wrong quantity for 2ReLU; distinct names keep this spec at its
documented defaults under calibration.
"""

from __future__ import annotations

import torch

from secformer_compiler.approx.goldschmidt import reciprocal_goldschmidt
from secformer_compiler.plugins import ApproxSpec, register_approximation

NAME = "softmax.2relu"
EPS = 2.0 ** -4
DEFAULT_PARAMS = {"eps": EPS, "recip_prescale": 2.0 ** -8, "recip_iterations": 15}
DOMAIN = (-4.0, 3.0)
MAX_ROW = 128  # measure.SOFTMAX_ROW_LENGTHS[-1]: the longest row the claim covers


def _masked_relu(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    r = torch.relu(x)
    return r if mask is None else r * mask.to(r.dtype)


def relu2_exact(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1,
                *, eps: float = EPS) -> torch.Tensor:
    """relu(x) mask / (sum(relu(x) mask) + eps) with exact division: the spec's target."""
    num = _masked_relu(x, mask)
    return num / (num.sum(dim, keepdim=True) + eps)


def softmax_2relu(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1, *,
                  eps: float, recip_prescale: float, recip_iterations: int) -> torch.Tensor:
    """relu(x) mask * Goldschmidt(1 / (sum(relu(x) mask) + eps)): the float reference."""
    num = _masked_relu(x, mask)
    den = num.sum(dim, keepdim=True) + eps
    return num * reciprocal_goldschmidt(den, prescale=recip_prescale, iterations=recip_iterations)


def _target(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    return relu2_exact(x, mask, dim, eps=EPS)


SPEC = register_approximation(ApproxSpec(
    name=NAME,
    op="softmax",
    method="2relu",
    domain=DOMAIN,
    params=DEFAULT_PARAMS,
    fn=softmax_2relu,
    declared_max_abs_err=1.4e-5,
    target=_target,
    replacement=True,
    source="MPCFormer (Li et al., ICLR 2023) 2ReLU softmax; division by Goldschmidt as in "
    "SecFormer (Luo et al., Findings of ACL 2024); eps guard: secformer-relu-softmax example",
    notes=f"a replacement for softmax (distill the model with it); the bound is the Goldschmidt "
    f"division's error against relu(x)/(sum relu(x) + {EPS:g}) with exact division, for scores in "
    f"[-4, 3] and rows of <= {MAX_ROW} unmasked positions (divisors in [{EPS:g}, {3 * MAX_ROW + EPS:g}]); "
    f"divisors above 2/recip_prescale = 512 make the iteration diverge; not calibrated",
))
