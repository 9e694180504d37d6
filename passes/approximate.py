"""`approximate`: choose each nonlinearity's MPC method and parameters from a preset.

Every `gelu`, `layernorm`, `softmax` and `tanh` node gets `method` (the name of an
`ApproxSpec` in `secformer_compiler.approx`, or "exact") and `params` (the spec's
parameters, possibly calibrated). `graph.meta["approximations"]` maps node name -> spec
(for `cm.report()`: method, declared error bound, domain, source).

Presets (methods per op; see docs in `secformer_compiler/approx/*.py` and BASELINES.md):

| preset                  | gelu            | layernorm           | softmax        |
| secformer (default)     | gelu.secformer  | layernorm.secformer | softmax.2quad  |
| mpcformer               | gelu.quad       | layernorm.secformer | softmax.2quad  |
| puma                    | gelu.puma       | layernorm.secformer*| softmax.puma*  |
| crypten                 | gelu.crypten    | layernorm.crypten   | softmax.crypten|
| secformer-exact-softmax | gelu.secformer  | layernorm.secformer | softmax.crypten|
| exact                   | gelu.exact      | layernorm.exact     | softmax.exact  |

* PUMA normalises by the highest set bit for its reciprocal and inverse square root; that
needs a bit decomposition this runtime does not have, so under 2PC the `puma` preset uses
calibrated Goldschmidt for both (mpc_nonlinear.py). `layernorm.puma` remains available to
the float reference and as an override for simulation studies.

`tanh` (BERT's pooler) uses SecFormer's segmented sine series (`tanh.secformer`, the same
secure-sine protocol as its GeLU) in the SecFormer presets and CrypTen's 2 sigmoid(2x) - 1
(`tanh.crypten`) in the baselines.

Overrides: `{"softmax": "puma"}` (a preset name: that preset's method for the op),
`{"softmax": "softmax.puma"}` (a spec name), or `{<node name>: <spec name>}` for one node.

Calibration: `{node name: (lo, hi)}`, the measured range of the Goldschmidt input (var + eps
for layernorm, 2Quad row sums for softmax). Specs with `prescale`/`iterations` params are
re-derived for that range by `approx.calibrate_goldschmidt` (declared bound = achieved
error); without calibration a spec keeps its documented conservative defaults
(`approx.GOLDSCHMIDT_DEFAULTS`: var + eps in [1e-3, 1e3], row sums in [1, 8192]).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import CompileError, Problem
from ..ir import Graph
from . import registry
from .registry import register_pass

APPROXIMATED_OPS = ("gelu", "layernorm", "softmax", "tanh")

PRESETS: dict[str, dict[str, str]] = {
    "secformer": {"gelu": "gelu.secformer", "layernorm": "layernorm.secformer", "softmax": "softmax.2quad",
                  "tanh": "tanh.secformer"},
    "mpcformer": {"gelu": "gelu.quad", "layernorm": "layernorm.secformer", "softmax": "softmax.2quad",
                  "tanh": "tanh.crypten"},
    # PUMA's own rsqrt (highest-set-bit normalisation) has no 2PC protocol here: its preset
    # uses SecFormer's calibrated Goldschmidt LayerNorm (simulate layernorm.puma by override).
    "puma": {"gelu": "gelu.puma", "layernorm": "layernorm.secformer", "softmax": "softmax.puma",
             "tanh": "tanh.crypten"},
    "crypten": {"gelu": "gelu.crypten", "layernorm": "layernorm.crypten", "softmax": "softmax.crypten",
                "tanh": "tanh.crypten"},
    "secformer-exact-softmax": {"gelu": "gelu.secformer", "layernorm": "layernorm.secformer",
                                "softmax": "softmax.crypten", "tanh": "tanh.secformer"},
    "exact": {"gelu": "gelu.exact", "layernorm": "layernorm.exact", "softmax": "softmax.exact",
              "tanh": "tanh.exact"},
}
FALLBACK = {"tanh.crypten": "tanh.exact"}  # ops the approximation registry may not cover yet


def _ln_features(node) -> int | None:
    """The width a LayerNorm normalizes over, where a table-seeded 1/sqrt may serve it (one
    trailing dim); None elsewhere."""
    if node.op != "layernorm" or node.attrs.get("dims", 1) != 1:
        return None
    return int(node.shape[-1])


def _applied_prescale(node):
    """The prescale a node's 2PC protocol applies for a requested one where that differs
    (LayerNorm: `nonlinear.layernorm_seeded_prescale`; the default 16 fractional bits); None
    elsewhere (2Quad keeps its 4-bit prescale exactly)."""
    if node.op != "layernorm":
        return None
    from ..runtime.protocols.nonlinear import layernorm_seeded_prescale

    n = 1
    for d in node.shape[len(node.shape) - node.attrs.get("dims", 1):]:
        n *= d
    return lambda p: layernorm_seeded_prescale(n, p)


def _registry() -> Any:
    from .. import approx  # imported lazily: the approximation package is optional for the IR

    return approx


def resolve_method(op: str, preset: str, overrides: Mapping[str, str], node_name: str) -> str:
    """The spec name for one node: node override > op override > preset."""
    if preset not in PRESETS:
        raise CompileError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    choice = overrides.get(node_name) or overrides.get(op) or PRESETS[preset][op]
    if "." in choice:
        return choice
    if choice not in PRESETS:
        raise CompileError(f"override {op}={choice!r} is neither a preset ({', '.join(PRESETS)}) "
                           f"nor an approximation name like '{op}.puma'")
    return PRESETS[choice][op]


def check_override(op: str, method: str) -> None:
    """Raise CompileError unless `method` may replace the preset's choice for `op`: a preset
    name, `<op>.exact`, or a registered approximation of `op` (plugins are loaded on a miss,
    as `approximate` does). Lets a caller refuse a bad override before any expensive work."""
    if op not in APPROXIMATED_OPS:
        raise CompileError(f"{op!r} is not one of {', '.join(APPROXIMATED_OPS)}")
    if method in PRESETS or method == f"{op}.exact":
        return
    approx = _registry()
    if method not in approx.APPROXIMATIONS and not registry._plugins_loaded:
        registry.load_plugins()
    if method.startswith(op + ".") and method in approx.APPROXIMATIONS:
        return
    names = sorted({n for n in approx.APPROXIMATIONS if n.startswith(op + ".")} | {f"{op}.exact"})
    raise CompileError(f"{method!r} is neither a preset ({', '.join(PRESETS)}) nor an approximation of "
                       f"{op} ({', '.join(names)})")


@register_pass("approximate")
def approximate(graph: Graph, preset: str = "secformer", overrides: Mapping[str, str] | None = None,
                calibration: Mapping[str, Any] | None = None,
                target_rel_err: float | None = None, table_seeds: bool = True,
                gelu_lookup: bool = False) -> Graph:
    """Attach method and params to every gelu / layernorm / softmax / tanh node.

    calibration: {node: (lo, hi)} input ranges of the Goldschmidt steps; each calibrated step
    gets the prescale and fewest iterations that meet `target_rel_err` there (None:
    `approx.CALIBRATION_TARGET_REL_ERR`, 1e-4 relative). table_seeds: a calibrated 2Quad
    division or LayerNorm 1/sqrt may be a table seed and Newton steps where that takes fewer
    rounds (approx/table_seed.py). gelu_lookup: gelu.secformer gets params["lookup"] = 1 (its
    segment tests by a table where the bound allows, nonlinear.gelu_table_from_params)."""
    approx = _registry()
    target = approx.CALIBRATION_TARGET_REL_ERR if target_rel_err is None else float(target_rel_err)
    if not 0 < target < 0.5:
        raise CompileError(f"goldschmidt_target must be a relative error in (0, 0.5), got {target_rel_err!r} "
                           "(1e-4 is the default; 1e-3 saves about one iteration per Goldschmidt step)")
    graph = graph.copy()  # the input graph keeps its methods (re-approximate after calibrating)
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in APPROXIMATED_OPS and k not in graph]
    if unknown:
        raise CompileError(f"overrides name neither an op ({', '.join(APPROXIMATED_OPS)}) nor a node: {unknown}")
    chosen, notes, problems = {}, [], []
    for n in graph:
        if n.op not in APPROXIMATED_OPS:
            continue
        name = resolve_method(n.op, preset, overrides, n.name)
        if name not in approx.APPROXIMATIONS and not registry._plugins_loaded:
            registry.load_plugins()  # a plugin package may register the approximation
        if name not in approx.APPROXIMATIONS and name in FALLBACK:
            notes.append(f"%{n.name}: no {name} approximation registered; using {FALLBACK[name]}")
            name = FALLBACK[name]
        if not name.startswith(n.op + "."):
            problems.append(Problem(f"method {name!r} does not approximate {n.op}", n.module_path, n.name))
            continue
        if name not in approx.APPROXIMATIONS:
            if name == f"{n.op}.exact":  # the exact function needs no spec
                n.attrs.update(method=name, params={})
                continue
            problems.append(Problem(f"no approximation named {name!r}", n.module_path, n.name))
            continue
        spec = approx.get_approx(name)
        rng = (calibration or {}).get(n.name)
        if rng is not None and "prescale" in spec.params and "iterations" in spec.params:
            lo, hi = rng
            spec = approx.calibrate_goldschmidt(spec, float(lo), float(hi), target,
                                                applied=_applied_prescale(n), table_seed=table_seeds,
                                                features=_ln_features(n))
        params = dict(spec.params)
        if gelu_lookup and name == "gelu.secformer":  # segment tests may be a lookup table
            params["lookup"] = 1  # (runtime/protocols/nonlinear.py: gelu_table_from_params)
        n.attrs.update(method=name, params=params)
        chosen[n.name] = spec
    if problems:
        raise CompileError(f"{len(problems)} approximation(s) could not be chosen:", problems,
                           hint="registered: " + ", ".join(sorted(approx.APPROXIMATIONS)))
    graph.meta = {**graph.meta, "approximations": chosen, "preset": preset, "approximation_notes": notes}
    if calibration:
        graph.meta["goldschmidt_target"] = target
        graph.meta["table_seeds"] = bool(table_seeds)
    return graph
