"""The public API for plugin packages: add an approximation, its 2PC protocol and cost, or a pass.

A plugin is an installed package that declares an entry point in the group
`secformer_compiler.passes` (pyproject.toml):

    [project.entry-points."secformer_compiler.passes"]
    my_plugin = "my_package"

The entry point names a module (or a function in one) whose import registers things with
the functions below. It is loaded the first time the compiler is asked for a name it does
not know: a pass name in a pipeline (`passes.get_pass`) or an approximation name in a
preset override (`compile(model, x, softmax="softmax.myvariant")`). `load_plugins()` loads
every plugin now.

What a new nonlinearity method needs, all under one name `<op>.<variant>`:

1. `register_approximation(spec)`: an `ApproxSpec` with the float reference (differentiable
   torch ops; the "training view" and the plaintext reference of the protocol), its
   parameters, domain and declared error bound against an exact target. The `approximate`
   pass then accepts the name and attaches `method=name, params=spec.params` to the node.
2. `register_protocol(op, name, protocol, cost)`: the protocol run by P0, P1, the dealer
   and the simulator, and its static cost, which must equal what a run counts.

       protocol(ctx, node, ins, params) -> Protocol  # a generator, docs/PROTOCOLS.md
       cost(node, ins, mode, frac_bits) -> Cost      # runtime/protocols/cost.py

   `ins` are the node's input values (the op's secret input as this party's int64 share
   at `ctx.f` fractional bits; softmax's optional public 0/1 mask as a plain tensor),
   `node.attrs` holds the op's attributes (softmax: `dim`) and `params` the spec's
   parameters as the `approximate` pass attached them. In `cost`, `ins` are the input
   *nodes* (shapes via `.shape`) and `mode` the truncation mode.

Passes are registered with `register_pass(name)` (re-exported from `passes.registry`): a
function `graph -> graph` with a docstring, run by naming it in a pipeline
(`frontend.build_ir(..., pipeline=[*DEFAULT_PIPELINE, "my_pass"])`).

Every registry refuses a name registered twice (`DuplicateApproximationError`,
`DuplicateProtocolError`, `DuplicatePassError`); use `spec.derive(...)` for an unregistered
variant of a spec. `examples/secformer-relu-softmax` is a complete plugin package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .approx.spec import ApproxSpec, DuplicateApproximationError
from .approx.spec import register as _register_spec
from .cost import NONLINEAR_COST
from .mpc_interp import NONLINEAR
from .passes.registry import ENTRY_POINT_GROUP, DuplicatePassError, load_plugins, register_pass
from .runtime.protocols.cost import Cost

#: IR ops whose protocol is chosen by the node's approximation method.
PROTOCOL_OPS = ("gelu", "tanh", "layernorm", "softmax")

ProtocolFn = Callable[..., Any]  # (ctx, node, ins, params) -> Protocol generator
CostFn = Callable[..., Cost]  # (node, ins, mode, frac_bits) -> Cost


class DuplicateProtocolError(ValueError):
    """A protocol (or cost rule) for an (op, method) pair that already has one."""


def register_approximation(spec: ApproxSpec) -> ApproxSpec:
    """Register `spec` under `spec.name` so that presets and overrides can select it.

    Raises `DuplicateApproximationError` if the name is taken (by the built-in catalog or
    another plugin). Returns the spec.
    """
    return _register_spec(spec)


def register_protocol(op: str, method: str, protocol: ProtocolFn, cost: CostFn) -> ProtocolFn:
    """Register the 2PC/simulator protocol of `op` computed by `method`, and its static cost.

    op: one of `PROTOCOL_OPS`; method: the approximation name (`"softmax.2relu"`), which
    must start with `op + "."`. Both registries are checked before either is changed, so a
    refused registration leaves nothing behind. Raises `DuplicateProtocolError` if
    (op, method) already has a protocol or a cost rule. Returns `protocol`.
    """
    if op not in PROTOCOL_OPS:
        raise ValueError(f"op {op!r} has no method dispatch; ops: {PROTOCOL_OPS}")
    if not method.startswith(op + "."):
        raise ValueError(f"method {method!r} must be named '{op}.<variant>'")
    if not callable(protocol) or not callable(cost):
        raise TypeError("protocol and cost must be callables")
    key = (op, method)
    taken = [what for what, table in (("protocol", NONLINEAR), ("cost rule", NONLINEAR_COST))
             if key in table]
    if taken:
        owner = NONLINEAR.get(key) or NONLINEAR_COST.get(key)
        raise DuplicateProtocolError(
            f"{op} method {method!r} already has a {' and a '.join(taken)} "
            f"(from {getattr(owner, '__module__', '?')}); pick another method name")
    NONLINEAR[key] = protocol
    NONLINEAR_COST[key] = cost
    return protocol


__all__ = [
    "ENTRY_POINT_GROUP",
    "PROTOCOL_OPS",
    "ApproxSpec",
    "Cost",
    "DuplicateApproximationError",
    "DuplicatePassError",
    "DuplicateProtocolError",
    "load_plugins",
    "register_approximation",
    "register_pass",
    "register_protocol",
]
