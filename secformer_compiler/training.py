"""Training view: the compiled program as a differentiable float `torch.nn.Module`.

`approximated_module(graph)` executes the MPC IR in float (float32 for training, float64 for
checks) with every nonlinearity (`gelu`, `tanh`, `layernorm`, `softmax`) computed by the
float reference of the approximation the `approximate` pass attached to it
(`node.attrs["method"]`, an `ApproxSpec` name, called with `node.attrs["params"]`). It is
the function the fixed-point simulator and the 2PC run compute, minus fixed-point error,
and it is differentiable with respect to the graph's weights, which become
`nn.Parameter`s: this is what distillation trains (`secformer_compiler.distill`).

Every other op runs its float reference rule (`float_interp.REFERENCE`), so the view follows
the IR op table with no model-specific code. `exact=True` gives the original model's
function (the same graph with exact nonlinearities, like `float_interp.run`): the teacher
side of distillation, with the same taps at the same places.

Weights. `graph.weights` is keyed by the model's `state_dict` names, so trained values go
back into the model by name (`trained_state_dict`, `with_weights`). The exceptions are the
weights `fold_public` derived at compile time (`folded.*`, e.g. the position and token-type
embedding rows a public index selected): they are batch- and length-specific copies with no
name in the model, so they are buffers (frozen) unless `train_folded=True`.

Intermediates (for distillation): `forward_with_intermediates(inputs)` returns the outputs
and, in graph order, every softmax output (the attention probabilities, one per layer;
`softmax_inputs`: the scores before it) and the hidden states: the outputs of the LayerNorms
that end an embedding block or a Transformer layer (BERT-style post-LN models: every
LayerNorm whose module path does not contain "attention"). `taps=` names other nodes.

Goldschmidt steps (`goldschmidt=`): LayerNorm's inverse square root and 2Quad's division
converge only for inputs inside the range their public pre-scale was chosen for (calibration
at compile time). A view of an uncalibrated graph, or a student whose ranges drift while it
trains, can leave that range (2Quad row sums of long rows with large scores exceed the
default [1, 8192], Goldschmidt then diverges to inf/NaN). `goldschmidt="exact"` computes those
two steps exactly instead: the function the calibrated program approximates within the
calibration target (`approx.DEFAULT_TARGET_REL_ERR`, 1e-4 relative), so it is the right
thing to train; "reference" (default) runs the iterations with the node's parameters.

Static shapes: the IR is static in (batch, sequence length), so one view runs one shape.
Several views can share one set of parameters (`params=` another view's `params`), e.g. one
per sequence-length bucket.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from . import float_interp
from .ir import Graph, Node
from .passes.fuse import FUSED_WEIGHTS

NONLINEAR_OPS = ("gelu", "tanh", "layernorm", "softmax")
FOLDED_PREFIX = "folded."


def _key(name: str) -> str:
    """ParameterDict keys may not contain '.'."""
    return name.replace(".", "__")


def _cast(t: Any, dtype: torch.dtype, device: torch.device | None = None) -> Any:
    """Floating tensors to `dtype`; every tensor to `device` (the view's, when it was moved)."""
    if isinstance(t, torch.Tensor):
        if t.is_floating_point():
            t = t.to(dtype)
        if device is not None and t.device != device:
            t = t.to(device)
    return t


def _exact_nonlinear(n: Node, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    return float_interp.REFERENCE[n.op](n, None, x, *rest)


def _spec_for(n: Node):
    """The ApproxSpec of a node's method, or None for exact (no method, 'exact', '<op>.exact')."""
    from . import approx

    method = n.attrs.get("method")
    if method in (None, "exact", f"{n.op}.exact"):
        return None
    return approx.get_approx(method)


def _is_goldschmidt(params: Mapping[str, Any]) -> bool:
    return "prescale" in params and "iterations" in params


def _exact_division(n: Node, x: torch.Tensor, rest: Sequence[torch.Tensor], params: Mapping[str, Any]):
    """A Goldschmidt-based node with its iterative step exact (None if not such a node)."""
    if n.op == "layernorm":
        return _exact_nonlinear(n, x, *rest)  # only the inverse square root was approximated
    if n.op == "softmax" and "c" in params:  # 2Quad with exact division
        from .approx.softmax import quad2_exact
        return quad2_exact(x, rest[0] if rest else None, n.attrs["dim"], c=float(params["c"]))
    return None


def approximate_nonlinear(n: Node, x: torch.Tensor, *rest: torch.Tensor, exact: bool = False,
                          goldschmidt: str = "reference") -> torch.Tensor:
    """One nonlinear node in float: its method's float reference with the node's params
    (`goldschmidt="exact"`: Goldschmidt steps exact, see the module docstring)."""
    spec = None if exact else _spec_for(n)
    if spec is None:
        return _exact_nonlinear(n, x, *rest)
    params = dict(n.attrs.get("params") or spec.params)
    if goldschmidt == "exact" and _is_goldschmidt(params):
        out = _exact_division(n, x, rest, params)
        if out is not None:
            return out
    if n.op in ("gelu", "tanh"):
        return spec.fn(x, **params)
    if n.op == "softmax":
        mask = rest[0] if rest else None
        return spec.fn(x, mask, n.attrs["dim"], **params)
    if n.op == "layernorm":
        k = n.attrs["dims"]
        w = rest[0] if len(rest) > 0 else None
        b = rest[1] if len(rest) > 1 else None
        if k == 1:
            return spec.fn(x, w, b, n.attrs["eps"], **params)
        flat = x.reshape(*x.shape[:-k], -1)
        out = spec.fn(flat, None if w is None else w.reshape(-1), None if b is None else b.reshape(-1),
                      n.attrs["eps"], **params)
        return out.reshape(x.shape)
    raise NotImplementedError(f"no float approximation rule for op {n.op!r}")


def default_hidden_state_nodes(graph: Graph) -> list[str]:
    """LayerNorms that end a block (post-LN BERT family): module path without 'attention'."""
    return [n.name for n in graph if n.op == "layernorm" and "attention" not in (n.module_path or "")]


class TrainingView(torch.nn.Module):
    """The IR in float with approximated (or exact) nonlinearities; see the module docstring."""

    def __init__(self, graph: Graph, *, exact: bool = False, dtype: torch.dtype = torch.float32,
                 params: torch.nn.ParameterDict | None = None, train_folded: bool = False,
                 weights: Mapping[str, torch.Tensor] | None = None,
                 hidden_state_nodes: Sequence[str] | None = None, goldschmidt: str = "reference") -> None:
        super().__init__()
        if goldschmidt not in ("reference", "exact"):
            raise ValueError(f"goldschmidt must be 'reference' or 'exact', got {goldschmidt!r}")
        self.graph = graph
        self.exact = exact
        self.goldschmidt = goldschmidt
        self.dtype = dtype
        given = dict(weights or {})
        self._param_names: dict[str, str] = {}  # weight name -> ParameterDict key
        self._buffer_names: dict[str, str] = {}
        own = params is None
        self.params = torch.nn.ParameterDict() if own else params
        self._fused = fused_parts(graph)  # fused weight -> [(model weight, rows)] (passes/fuse.py)
        for name, value in graph.weights.items():
            value = given.get(name, value)
            if name in self._fused:  # the model's own parameters, concatenated when read
                rows = 0
                for part, n in self._fused[name]:
                    pv = given.get(part, value[rows:rows + n])
                    rows += n
                    self._add_param(part, pv, dtype)
                continue
            key = _key(name)
            if name.startswith(FOLDED_PREFIX) and not train_folded:
                bkey = "buf__" + key
                self.register_buffer(bkey, value.detach().to(dtype).clone(), persistent=False)
                self._buffer_names[name] = bkey
                continue
            self._add_param(name, value, dtype)
        self.softmax_nodes = [n.name for n in graph if n.op == "softmax"]
        self.hidden_state_nodes = list(hidden_state_nodes if hidden_state_nodes is not None
                                       else default_hidden_state_nodes(graph))

    # -- weights --------------------------------------------------------------------------

    def _add_param(self, name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
        key = _key(name)
        if key not in self.params:
            self.params[key] = torch.nn.Parameter(value.detach().to(dtype).clone())
        elif tuple(self.params[key].shape) != tuple(value.shape):
            raise ValueError(f"shared parameter {name}: shape {tuple(self.params[key].shape)} "
                             f"!= graph weight shape {tuple(value.shape)}")
        self._param_names[name] = key

    def weight(self, name: str) -> torch.Tensor:
        if name in self._fused:
            return torch.cat([self.params[self._param_names[p]] for p, _ in self._fused[name]], dim=0)
        if name in self._param_names:
            return self.params[self._param_names[name]]
        return getattr(self, self._buffer_names[name])

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """{model state_dict name: float32 value} of the trainable weights (not `folded.*`)."""
        return {name: self.params[key].detach().float().clone() for name, key in self._param_names.items()
                if not name.startswith(FOLDED_PREFIX)}

    # -- execution ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the weights are (`view.to("cuda")` moves them); inputs and constants follow."""
        for t in (*self.params.values(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def _run(self, inputs: Any, keep: Iterable[str] = ()) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        dev = self.device
        if dev.type == "cpu":
            return self._run_on(inputs, keep, None)
        # Off the CPU, tensors the float rules create without a device go to the view's device.
        with torch.device(dev):
            return self._run_on(inputs, keep, dev)

    def _run_on(self, inputs: Any, keep: Iterable[str], dev: torch.device | None
                ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        g = self.graph
        given = float_interp.bind_inputs(g, inputs)
        keep = set(keep)
        # Free values once their last user ran (long graphs, autograd keeps what it needs).
        last_use: dict[str, int] = {}
        nodes = g.nodes
        for i, n in enumerate(nodes):
            for a in n.inputs:
                last_use[a] = i
        pinned = set(g.outputs) | keep
        env: dict[str, torch.Tensor] = {}
        kept: dict[str, torch.Tensor] = {}
        for i, n in enumerate(nodes):
            args = [env[a] for a in n.inputs]
            try:
                if n.op == "input":
                    out = _cast(given[n.name], self.dtype, dev)
                elif n.op == "weight":
                    out = self.weight(n.attrs["name"])
                elif n.op == "constant":
                    out = _cast(n.attrs["value"], self.dtype, dev)
                elif n.op == "public_fn":
                    out = _cast(n.attrs["fn"](*args), self.dtype, dev)
                elif n.op in NONLINEAR_OPS:
                    out = approximate_nonlinear(n, *args, exact=self.exact, goldschmidt=self.goldschmidt)
                else:
                    rule = float_interp.REFERENCE.get(n.op)
                    if rule is None:
                        raise NotImplementedError(f"no float rule for op {n.op!r}")
                    out = rule(n, g, *args)
            except Exception as e:
                e.add_note(f"training view: while executing %{n.name} = {n.op}(...) at "
                           f"{n.module_path or '<top level>'}")
                raise
            env[n.name] = out
            if n.name in keep:
                kept[n.name] = out
            for a in set(n.inputs):
                if last_use.get(a) == i and a not in pinned:
                    env.pop(a, None)
        return tuple(env[o] for o in g.outputs), kept

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        inputs = kwargs or (args[0] if len(args) == 1 and isinstance(args[0], (Mapping, tuple)) else args)
        return self._run(inputs)[0]

    def forward_with_intermediates(self, inputs: Any, taps: Sequence[str] = (),
                                   softmax_inputs: bool = False) -> dict[str, Any]:
        """{"outputs", "attentions" (softmax outputs, graph order), "hidden_states",
        "scores" (softmax inputs, if softmax_inputs), "taps" ({name: value})}."""
        sm_in = [self.graph[s].inputs[0] for s in self.softmax_nodes] if softmax_inputs else []
        keep = [*self.softmax_nodes, *self.hidden_state_nodes, *taps, *sm_in]
        outs, kept = self._run(inputs, keep)
        res = {
            "outputs": outs,
            "attentions": [kept[s] for s in self.softmax_nodes],
            "hidden_states": [kept[h] for h in self.hidden_state_nodes],
            "taps": {t: kept[t] for t in taps},
        }
        if softmax_inputs:
            res["scores"] = [kept[s] for s in sm_in]
        return res


def approximated_module(graph: Graph, *, exact: bool = False, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> TrainingView:
    """The training view of `graph` (see the module docstring). kwargs: `params` (share another
    view's ParameterDict), `train_folded`, `weights` (override initial values by name),
    `hidden_state_nodes`, `goldschmidt` ("reference" or "exact")."""
    return TrainingView(graph, exact=exact, dtype=dtype, **kwargs)


# -- helpers for CompiledModel (the lead wires them in as methods) ------------------------------

def _graph_of(cm_or_graph: Any) -> Graph:
    return cm_or_graph if isinstance(cm_or_graph, Graph) else cm_or_graph.graph


def float_approx(cm_or_graph: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """The approximated program in float64 (no fixed point): what `simulate` computes, minus
    fixed-point error. Suggested as `CompiledModel.float_approx(*inputs)`."""
    inputs = kwargs or (args[0] if len(args) == 1 and isinstance(args[0], Mapping) else args)
    view = approximated_module(_graph_of(cm_or_graph), dtype=torch.float64)
    with torch.no_grad():
        return tuple(o.float() for o in view(inputs))


def float_approx_view(cm_or_graph: Any, device: str | torch.device = "cpu") -> TrainingView:
    """The view `float_approx` runs (float64), on `device`: build it once to run many batches."""
    return approximated_module(_graph_of(cm_or_graph), dtype=torch.float64).to(device).eval()


def training_module(cm_or_graph: Any, **kwargs: Any) -> TrainingView:
    """`approximated_module` of a CompiledModel's program. Suggested as `CompiledModel.training_module()`."""
    return approximated_module(_graph_of(cm_or_graph), **kwargs)


def fused_parts(graph: Graph) -> dict[str, list[tuple[str, int]]]:
    """{fused weight: [(model weight, rows), ...]} of `fuse_sibling_linears` (passes/fuse.py)."""
    return {k: [(p, int(n)) for p, n in v] for k, v in graph.meta.get(FUSED_WEIGHTS, {}).items()}


def with_weights(graph: Graph, weights: Mapping[str, torch.Tensor] | TrainingView) -> Graph:
    """A copy of `graph` whose weights are replaced by name (a view's trained values or a state
    dict); names the graph does not use are ignored. `CompiledModel(with_weights(cm.graph, view),
    cm.fxp, cm.trunc, cm.preset)` compiles the trained program without re-tracing."""
    if isinstance(weights, TrainingView):
        values = {name: weights.weight(name).detach() for name in graph.weights}
    else:
        values = dict(weights)
        for name, parts in fused_parts(graph).items():  # a state dict names the model's weights
            if name not in values and all(p in values for p, _ in parts):
                values[name] = torch.cat([values[p].detach().float() for p, _ in parts], dim=0)
    _refold(graph, values, given_view=isinstance(weights, TrainingView))
    g = graph.copy()
    g.weights = {k: (values[k].detach().float().clone() if k in values else v) for k, v in graph.weights.items()}
    for k, v in g.weights.items():
        if tuple(v.shape) != tuple(graph.weights[k].shape):
            raise ValueError(f"weight {k}: shape {tuple(v.shape)} != {tuple(graph.weights[k].shape)}")
    from .passes.bounds import bound_gelu_inputs
    return bound_gelu_inputs(g)  # GeLU's comparison range follows the weights before it


def _refold(graph: Graph, values: dict[str, torch.Tensor], given_view: bool) -> None:
    """Redo fold_layernorm_affine's weights (passes/rounds.py) from new values of their sources,
    in `values`; refuse a new gain or shift whose linear layers' own weights are not given
    (their folded weights would keep the old one)."""
    from .passes.rounds import LN_FOLDS, fold_value

    for name, recipe in graph.meta.get(LN_FOLDS, {}).items():
        if name not in graph.weights:
            continue
        sources = [recipe[k] for k in ("weight", "gain", "bias", "shift") if recipe.get(k)]
        if recipe["weight"] in values and not given_view:
            have = {k: values[k] if k in values else graph.weights.get(k) for k in sources}
            missing = [k for k, v in have.items() if v is None]
            if missing:
                raise ValueError(f"weight {name} is folded from {sources}; give {missing} too")
            values[name] = fold_value(recipe, have)
            continue
        changed = [k for k in sources if k in values and k in graph.weights
                   and not torch.equal(values[k].detach().float(), graph.weights[k].float())]
        if changed:
            raise ValueError(f"{changed} changed, but weight {name} was folded from them at compile time "
                             "(compile(fewer_rounds=True), passes.rounds.fold_layernorm_affine): train "
                             "the program compiled without fewer_rounds, then compile the trained model "
                             f"with it, or give {recipe['weight']} as well")


# -- calibration on the approximated program ---------------------------------------------------

def measure_ranges(graph: Graph, samples: Sequence[Any], device: str | torch.device = "cpu",
                   hi_margin: float | None = None) -> dict[str, tuple[float, float]]:
    """{node: (lo, hi)} of each Goldschmidt input (var + eps of a layernorm, masked 2Quad row sums
    of a softmax) as the *approximated* program computes them, with `calibrate.with_margins`
    (hi_margin: None for `calibrate.HI_MARGIN`).

    `calibrate.measure_ranges` runs the exact model (compile() used it until this was found): for a replacement preset the approximated program's ranges differ (Quad GeLU makes
    all-MiniLM-L6-v2's LayerNorm variances 10x larger than exact GeLU does; a distilled 2Quad
    student's differ too) and Goldschmidt, calibrated for the wrong range, diverges. This
    runs the training view with exact Goldschmidt steps, so what is measured does not depend
    on the parameters being chosen. device: where the view runs (a GPU makes this fast).
    """
    from .calibrate import with_margins

    view = approximated_module(graph, dtype=torch.float64, goldschmidt="exact").to(device)
    nodes = [n for n in graph if n.op in ("layernorm", "softmax")]
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    with torch.no_grad():
        for sample in samples:
            res = view.forward_with_intermediates(sample, taps=sorted({n.inputs[0] for n in nodes}
                                                                      | {n.inputs[1] for n in nodes
                                                                         if n.op == "softmax" and len(n.inputs) > 1}))
            for n in nodes:
                x = res["taps"][n.inputs[0]].double()
                if n.op == "layernorm":
                    k = n.attrs["dims"]
                    v = x.reshape(*x.shape[:-k], -1).var(-1, unbiased=False) + n.attrs["eps"]
                else:
                    c = float((n.attrs.get("params") or {}).get("c", 5.0))
                    q = (x + c) ** 2
                    if len(n.inputs) > 1:
                        q = q * res["taps"][n.inputs[1]].double()
                    v = q.sum(n.attrs["dim"])
                lo[n.name] = min(lo.get(n.name, float("inf")), float(v.min()))
                hi[n.name] = max(hi.get(n.name, 0.0), float(v.max()))
    return with_margins(lo, hi, hi_margin)


def compile_calibrated(model: torch.nn.Module, example_inputs: Any, samples: Sequence[Any], *,
                       preset: str = "secformer", frac_bits: int = 16, trunc: str = "exact",
                       overrides: Mapping[str, str] | None = None, device: str | torch.device = "cpu",
                       range_margin: float | None = None, goldschmidt_target: float | None = None):
    """`compile()` with Goldschmidt ranges measured on the approximated program (`measure_ranges`)
    instead of the exact model. Suggested as compile()'s calibration for every preset."""
    from .compiled import CompiledModel
    from .frontend import build_ir
    from .runtime.ring import FixedPoint

    graph = build_ir(model, example_inputs, preset=preset, overrides=overrides)
    if samples:
        graph = build_ir(model, example_inputs, preset=preset, overrides=overrides,
                         calibration=measure_ranges(graph, samples, device, range_margin),
                         goldschmidt_target=goldschmidt_target)
    cm = CompiledModel(graph, FixedPoint(frac_bits), trunc, preset)
    cm.calibration = "approximated program" if samples else "defaults"
    return cm


__all__ = [
    "compile_calibrated",
    "measure_ranges",
    "TrainingView",
    "approximated_module",
    "approximate_nonlinear",
    "default_hidden_state_nodes",
    "float_approx",
    "float_approx_view",
    "fused_parts",
    "training_module",
    "with_weights",
]
