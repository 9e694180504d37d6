"""`ApproxSpec`: one approximation of a nonlinear op as data, and the registry of them.

An approximation is a method, its parameters (coefficients, segment bounds, iteration
counts, public pre-scales), the input domain on which it is claimed to hold, and a
declared maximum error over that domain against an exact target function. The error
claim is checked by one generic test that sweeps every registered spec's domain
(`tests/compiler/test_approximations.py`, via `measure.measure_error`). The spec also
carries a float reference implementation written in differentiable torch ops: it is the
plaintext reference the 2PC kernels are compared to and the "training view" the
distillation step trains through.

Registration follows torch._decomp: a decorator (`approximation`) declares specs next to
the reference function they use, and registering a name twice is an error.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

OPS = ("gelu", "softmax", "layernorm", "rsqrt", "reciprocal", "exp", "tanh")

APPROXIMATIONS: dict[str, ApproxSpec] = {}


class DuplicateApproximationError(ValueError):
    """Raised when a spec name is registered twice."""


class UnknownApproximationError(KeyError):
    """Raised by `get_approx` for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0])


@dataclass(frozen=True, kw_only=True)
class ApproxSpec:
    """An approximation of `op` by `method`, with its parameters and its error claim.

    Fields:
        name: registry key, "<op>.<variant>" (e.g. "gelu.secformer").
        op: the exact op replaced, one of `OPS`.
        method: short method tag ("fourier_erf", "goldschmidt", "newton", ...).
        domain: (lo, hi) the claim covers. Its meaning depends on `op`: the scalar input
            for gelu/exp/reciprocal/rsqrt; each score entry for softmax (rows of up to
            `measure.SOFTMAX_ROW_LENGTHS[-1]` entries); var + eps for layernorm.
        params: keyword parameters of `fn`; also readable as attributes (`spec.period`).
        fn: the float reference, called as `fn(x, *args, **kwargs, **params)`.
        declared_max_abs_err / declared_max_rel_err: max |approx - target| (and
            |approx - target| / |target|) over the domain. At least one is given; each
            given one is asserted by the generic sweep test.
        target: exact function the error is measured against; None means the op's
            exact function (`measure.EXACT[op]`).
        replacement: True when the method changes the model rather than approximating the
            op (MPCFormer's Quad GeLU, 2Quad softmax): accuracy needs distillation, and
            `target` is then the replacement's own exact form (see each spec's notes).
        source: citation of the paper or code the method and constants come from.
        notes: anything a user must know (domain caveats, why these constants).
    """

    name: str
    op: str
    method: str
    domain: tuple[float, float]
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    fn: Callable[..., Any] = field(repr=False)
    declared_max_abs_err: float | None = None
    declared_max_rel_err: float | None = None
    target: Callable[..., Any] | None = field(default=None, repr=False)
    replacement: bool = False
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.op not in OPS:
            problems.append(f"op {self.op!r} is not one of {OPS}")
        if not self.name.startswith(self.op + "."):
            problems.append(f"name must start with '{self.op}.'")
        lo, hi = self.domain
        if not lo < hi:
            problems.append(f"empty domain {self.domain}")
        if self.declared_max_abs_err is None and self.declared_max_rel_err is None:
            problems.append("declare declared_max_abs_err or declared_max_rel_err (or both)")
        for bound in (self.declared_max_abs_err, self.declared_max_rel_err):
            if bound is not None and not bound >= 0:
                problems.append(f"error bounds must be >= 0, got {bound}")
        if problems:
            raise ValueError(f"invalid ApproxSpec {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "domain", (float(lo), float(hi)))
        # Read-only view over a private copy: the registry's data cannot drift at runtime.
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))

    def __getattr__(self, key: str) -> Any:
        params = self.__dict__.get("params")
        if params is not None and key in params:
            return params[key]
        raise AttributeError(
            f"ApproxSpec {self.__dict__.get('name')!r} has no field or param {key!r}"
            + (f"; params: {sorted(params)}" if params is not None else "")
        )

    def __reduce__(self):  # MappingProxyType does not pickle; rebuild from a plain dict
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        kwargs["params"] = dict(self.params)
        return (_spec_from_kwargs, (kwargs,))

    def reference(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Evaluate the float reference (differentiable torch ops) with this spec's params."""
        return self.fn(x, *args, **kwargs, **self.params)

    __call__ = reference

    def derive(
        self,
        *,
        name: str | None = None,
        domain: tuple[float, float] | None = None,
        declared_max_abs_err: float | None = None,
        declared_max_rel_err: float | None = None,
        notes: str | None = None,
        **params: Any,
    ) -> ApproxSpec:
        """A variant with some params changed (e.g. calibrated pre-scale and iterations).

        The declared bounds are not inherited, since they held for the old params: pass
        the new ones (e.g. `calibrate.choose_goldschmidt`'s achieved error). The variant
        is not registered.
        """
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise TypeError(f"{self.name}: unknown params {unknown}; params: {sorted(self.params)}")
        return ApproxSpec(
            name=name or self.name,
            op=self.op,
            method=self.method,
            domain=domain or self.domain,
            params={**self.params, **params},
            fn=self.fn,
            declared_max_abs_err=declared_max_abs_err,
            declared_max_rel_err=declared_max_rel_err,
            target=self.target,
            replacement=self.replacement,
            source=self.source,
            notes=self.notes if notes is None else notes,
        )


def _spec_from_kwargs(kwargs: dict[str, Any]) -> ApproxSpec:
    return ApproxSpec(**kwargs)


def register(spec: ApproxSpec) -> ApproxSpec:
    """Add `spec` to `APPROXIMATIONS`; a name already registered is an error."""
    if spec.name in APPROXIMATIONS:
        raise DuplicateApproximationError(
            f"approximation {spec.name!r} is already registered "
            f"(method {APPROXIMATIONS[spec.name].method!r}); pick another name or use "
            f"spec.derive(...) for an unregistered variant"
        )
    APPROXIMATIONS[spec.name] = spec
    return spec


def approximation(
    name: str, **spec_fields: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `ApproxSpec(name=name, fn=<decorated>, **spec_fields)`.

    Stack several on one reference function to register several parameterisations of it.
    The function is returned unchanged.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        register(ApproxSpec(name=name, fn=fn, **spec_fields))
        return fn

    return decorate


def get_approx(name: str) -> ApproxSpec:
    """The registered spec called `name`; unknown names list what is available."""
    try:
        return APPROXIMATIONS[name]
    except KeyError:
        raise UnknownApproximationError(
            f"no approximation named {name!r}; available: {', '.join(sorted(APPROXIMATIONS))}"
        ) from None


def approximations_for(op: str) -> list[ApproxSpec]:
    """All registered specs of `op`, sorted by name."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {OPS}")
    return [s for n, s in sorted(APPROXIMATIONS.items()) if s.op == op]
