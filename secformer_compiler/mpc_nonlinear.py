"""2PC/simulator rules for the approximated nonlinearities: (op, method) -> protocol.

`method` is the name of an approximation spec (secformer_compiler/approx); its `params`
(as the `approximate` pass attached them, possibly calibrated) are passed to the protocol.
`*.exact` methods are for the simulator only: they decode P0's value (which is the whole
value in the clear simulator), apply the exact function and re-encode; a real party
refuses them, because no protocol computes them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .mpc_interp import _fixed_key, nonlinear
from .runtime.context import CLEAR, Context
from .runtime.messages import Protocol
from .runtime.protocols import arith, baselines, nonlinear as nl
from .runtime.protocols.trunc import Raw, trunc


def _mask(node, ins):
    return ins[1] if len(ins) > 1 else None


def _exact(fn: Callable[..., torch.Tensor]):
    def rule(ctx: Context, node, ins, params) -> Any:
        if ctx.mode != CLEAR:
            raise RuntimeError(f"{node.op} method 'exact' runs only in the simulator (preset 'exact'); "
                               "choose an approximating preset for 2PC")
        x = ctx.fxp.decode(ins[0])
        others = [ctx.fxp.decode(v) if n.secret else v.double()
                  for v, n in zip(ins[1:], node.meta["in_nodes"][1:])]
        return ctx.fxp.encode(fn(node, x, *others))
    return rule


def _ln_exact(node, x, w=None, b=None):
    k = node.attrs["dims"]
    return torch.nn.functional.layer_norm(x, x.shape[-k:], w, b, node.attrs["eps"])


def _sm_exact(node, x, mask=None):
    if mask is not None:
        x = x.masked_fill(mask == 0, float("-inf"))
    out = torch.softmax(x, node.attrs["dim"])
    return out if mask is None else out * mask


def _gelu_exact(node, x):
    return torch.nn.functional.gelu(x, approximate=node.attrs.get("approximate", "none"))


nonlinear("gelu", "gelu.exact", "exact")(_exact(_gelu_exact))
nonlinear("tanh", "tanh.exact", "exact")(_exact(lambda node, x: torch.tanh(x)))
nonlinear("layernorm", "layernorm.exact", "exact")(_exact(_ln_exact))
nonlinear("softmax", "softmax.exact", "exact")(_exact(_sm_exact))


@nonlinear("gelu", "gelu.secformer", "gelu.secformer_erf")
def _gelu_secformer(ctx, node, ins, p) -> Protocol:
    table = nl.gelu_table_from_params(p, ctx.f)
    if table is not None:  # segment tests by a lookup table: 2 rounds (nonlinear.py)
        return nl.gelu_secformer_table(ctx, ins[0], p["coeffs"], int(p["period"]), float(p["threshold"]),
                                       *table, const=float(p.get("const", 0.0)))
    bits, drop = nl.gelu_cmp_from_params(p, ctx.f)
    # programs compiled before the even form existed hold erf coefficients and no "form"
    return nl.gelu_secformer(ctx, ins[0], p["coeffs"], int(p["period"]), float(p["threshold"]),
                             bits=bits, drop=drop, form=p.get("form", "erf"),
                             const=float(p.get("const", 0.0)))


def _flatten_trailing(x: torch.Tensor, k: int) -> torch.Tensor:
    return x if k == 1 else x.reshape(*x.shape[:-k], -1)


@nonlinear("layernorm", "layernorm.secformer")
def _layernorm_secformer(ctx, node, ins, p) -> Protocol:
    k = node.attrs["dims"]
    x = _flatten_trailing(ins[0], k)
    w = ctx.state[arith.FIXED_OPERANDS][_fixed_key(node, 1)] if len(ins) > 1 else None
    if w is not None and k > 1:
        raise NotImplementedError("layernorm over several trailing dims with a gain")
    b = ins[2] if len(ins) > 2 else None
    prescale, gamma = float(p["prescale"]), float(p.get("gamma", 3.0))
    fixed = ctx.state[arith.FIXED_OPERANDS]
    commute = {name: fixed[key] for name, (key, _) in node.meta.get("commute_into", {}).items()}
    table_bits = int(p.get("table_bits", 0))  # a table-seeded 1/sqrt runs one pass
    if table_bits and int(p.get("table_width", 0)) != x.shape[-1]:
        raise ValueError(f"{node.name}: its 1/sqrt table was calibrated for width {p.get('table_width')}, "
                         f"not {x.shape[-1]}: recompile")
    out = yield from nl.layernorm_goldschmidt(ctx, x, w, b, float(node.attrs["eps"]), prescale, int(p["iterations"]),
                                              center_first=not table_bits and nl.layernorm_needs_center_first(
                                                  x.shape[-1], prescale, ctx.f, gamma),
                                              gamma=gamma, raw="raw" in node.meta, commute=commute or None,
                                              table_bits=table_bits, table_exp=int(p.get("table_exp", 0)))
    if isinstance(out, nl.Commuted):  # it computed the linear layers' products (deferral.py)
        return out  # LayerNorm over the last dim only: shapes are the graph's already
    if isinstance(out, Raw):  # the linear layers after it truncate it (deferral.py)
        return Raw(out.value.reshape(ins[0].shape), out.frac)
    return out.reshape(ins[0].shape)


@nonlinear("layernorm", "layernorm.crypten")
def _layernorm_crypten(ctx, node, ins, p) -> Protocol:
    """CrypTen's LayerNorm: mean, variance, Newton inverse square root, scale and shift."""
    k = node.attrs["dims"]
    x = _flatten_trailing(ins[0], k)
    n = x.shape[-1]
    from .mpc_interp import scale_public
    mu = yield from scale_public(ctx, x.sum(-1, keepdim=True), 1.0 / n)
    d = x - mu
    sq = yield from arith.square(ctx, d)
    var = yield from trunc(ctx, sq.sum(-1, keepdim=True))
    var = yield from scale_public(ctx, var, 1.0 / n)
    var = ctx.add_public(var, ctx.fxp.encode(float(node.attrs["eps"])))
    r = yield from baselines.rsqrt_newton(ctx, var, int(p["iterations"]), int(p["exp_iterations"]))
    y = yield from trunc(ctx, (yield from arith.mul(ctx, d, r)))
    if len(ins) > 1:
        y = yield from trunc(ctx, (yield from arith.mul_fixed(ctx, y, ctx.state[arith.FIXED_OPERANDS][_fixed_key(node, 1)])))
    if len(ins) > 2:
        y = y + ins[2]
    return y.reshape(ins[0].shape)


@nonlinear("softmax", "softmax.2quad")
def _softmax_2quad(ctx, node, ins, p) -> Protocol:
    if node.meta.get("unnormalized"):  # its matmul normalizes (deferral.py)
        return nl.softmax_2quad_rows(ctx, ins[0], node.attrs["dim"], float(p["c"]), _mask(node, ins),
                                     prescale=float(p["prescale"]), iters=int(p["iterations"]),
                                     gamma=float(p.get("gamma", 2.0)), table_bits=int(p.get("table_bits", 0)))
    return nl.softmax_2quad(ctx, ins[0], node.attrs["dim"], float(p["c"]), _mask(node, ins),
                            prescale=float(p["prescale"]), iters=int(p["iterations"]),
                            gamma=float(p.get("gamma", 2.0)), table_bits=int(p.get("table_bits", 0)))


@nonlinear("softmax", "softmax.crypten")
def _softmax_crypten(ctx, node, ins, p) -> Protocol:
    iters, exp_n = int(p["reciprocal_iterations"]), int(p["exp_iterations"])

    def recip(c, s):
        return baselines.reciprocal_newton(c, s, iters, exp_n)
    return baselines.softmax_exp(ctx, ins[0], node.attrs["dim"], _mask(node, ins), exp_n=exp_n, recip=recip)


# --- baseline activations (runtime/protocols/activations.py): keyword names = spec params ---

from .runtime.protocols import activations as act  # noqa: E402


def _by_params(proto):
    def rule(ctx, node, ins, p) -> Protocol:
        return proto(ctx, ins[0], **p)
    return rule


nonlinear("gelu", "gelu.quad")(_by_params(act.gelu_quad))
nonlinear("gelu", "gelu.puma")(_by_params(act.gelu_puma))
nonlinear("gelu", "gelu.crypten")(_by_params(act.gelu_crypten))
nonlinear("tanh", "tanh.secformer")(_by_params(act.tanh_secformer))
nonlinear("tanh", "tanh.crypten")(_by_params(act.tanh_crypten))


# --- PUMA softmax -----------------------------------------------------------------------------
# PUMA (SPU) normalises the row sum by its highest set bit before 2 Goldschmidt steps; that
# needs a bit decomposition we do not implement. The row sum of exp(z - max) lies in
# [1, n], so a pre-scaled Goldschmidt reciprocal chosen for that range (to 1e-4 relative
# error) stands in for it. exp with n = 5 squarings and the z > -14 cutoff are PUMA's.

def puma_recip_plan(n: int) -> tuple[float, int]:
    from .approx import choose_goldschmidt
    choice = choose_goldschmidt(1.0, float(n), 1e-4, kind="reciprocal")
    return float(choice[0]), int(choice[1])


@nonlinear("softmax", "softmax.puma")
def _softmax_puma(ctx, node, ins, p) -> Protocol:
    from .runtime.protocols.goldschmidt import reciprocal_goldschmidt
    prescale, iters = puma_recip_plan(node.shape[node.attrs["dim"]])

    def recip(c, s):
        return reciprocal_goldschmidt(c, s, prescale, iters)
    return baselines.softmax_exp(ctx, ins[0], node.attrs["dim"], _mask(node, ins),
                                 exp_n=int(p["exp_iterations"]), recip=recip, cutoff=float(p["cutoff"]))
