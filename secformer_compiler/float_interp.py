"""Float reference interpreter: execute the IR in float64 with the exact nonlinearities.

The plaintext meaning of each op, one rule per op (`REFERENCE`), `method` ignored: the
test that lowering preserved the model (float_interp(IR)(inputs) == model(inputs)) and the
reference the fixed-point simulator and the 2PC runtime are compared to. It also runs
`frontend`-level graphs (the frontend-only ops have rules too), so passes can be checked
one at a time.

Masked softmax: positions with mask 0 get probability 0; a row with every position masked
gives zeros (HF's additive -3.4e38 masks give a uniform row there; no padding mask of a
real batch masks a whole row of keys).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .ir import OPS, Graph, Node

Rule = Callable[..., torch.Tensor]
REFERENCE: dict[str, Rule] = {}


def ref(*ops: str) -> Callable[[Rule], Rule]:
    def decorate(fn: Rule) -> Rule:
        for op in ops:
            if op in REFERENCE:
                raise ValueError(f"reference rule for {op} registered twice")
            REFERENCE[op] = fn
        return fn
    return decorate


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


@ref("input")
def _input(n: Node, g: Graph, value: torch.Tensor) -> torch.Tensor:
    return _f64(value)


@ref("weight")
def _weight(n: Node, g: Graph) -> torch.Tensor:
    return g.weights[n.attrs["name"]].double()


@ref("constant")
def _constant(n: Node, g: Graph) -> torch.Tensor:
    return _f64(n.attrs["value"])


@ref("public_fn")
def _public_fn(n: Node, g: Graph, *xs: torch.Tensor) -> torch.Tensor:
    return _f64(n.attrs["fn"](*xs))


_ELEMENTWISE: dict[str, Callable[..., torch.Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "neg": torch.neg,
    "matmul": torch.matmul, "tanh": torch.tanh, "relu": torch.relu, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal, "exp": torch.exp, "erf": torch.erf, "where": torch.where,
}
for _op, _fn in _ELEMENTWISE.items():
    ref(_op)(lambda n, g, *xs, _fn=_fn: _fn(*xs))

ref("scale")(lambda n, g, x: x * n.attrs["factor"])
ref("linear")(lambda n, g, x, w, b=None: F.linear(x, w, b))
ref("sum")(lambda n, g, x: x.sum(list(n.attrs["dims"]), keepdim=n.attrs["keepdim"]))
ref("mean")(lambda n, g, x: x.mean(list(n.attrs["dims"]), keepdim=n.attrs["keepdim"]))
ref("reshape")(lambda n, g, x: x.reshape(n.attrs["shape"]))
ref("permute")(lambda n, g, x: x.permute(n.attrs["dims"]))
ref("transpose")(lambda n, g, x: x.transpose(n.attrs["dim0"], n.attrs["dim1"]))
ref("expand")(lambda n, g, x: x.expand(n.attrs["shape"]))
ref("slice")(lambda n, g, x: x[(slice(None),) * n.attrs["dim"] + (slice(n.attrs["start"], n.attrs["end"], n.attrs["step"]),)])
ref("select")(lambda n, g, x: x.select(n.attrs["dim"], n.attrs["index"]))
ref("index_select")(lambda n, g, x, i: x.index_select(n.attrs["dim"], i))
ref("cat")(lambda n, g, *xs: torch.cat(xs, n.attrs["dim"]))
ref("unsqueeze")(lambda n, g, x: x.unsqueeze(n.attrs["dim"]))
ref("squeeze")(lambda n, g, x: x.squeeze(list(n.attrs["dims"])))
ref("embedding")(lambda n, g, ids, table: F.embedding(ids, table))
ref("gelu")(lambda n, g, x: F.gelu(x, approximate=n.attrs["approximate"]))


@ref("layernorm")
def _layernorm(n: Node, g: Graph, x: torch.Tensor, w: torch.Tensor | None = None,
               b: torch.Tensor | None = None) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-n.attrs["dims"]:], w, b, n.attrs["eps"])


@ref("softmax")
def _softmax(n: Node, g: Graph, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    dim = n.attrs["dim"]
    if mask is None:
        return torch.softmax(x, dim)
    keep = mask.expand_as(x) > 0
    m = torch.where(keep, x, -torch.inf).amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m) * keep
    return e / e.sum(dim, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def bind_inputs(graph: Graph, inputs: Any) -> dict[str, torch.Tensor]:
    """Map a tuple (in `graph.inputs` order), a dict (by input name) or a tensor to input nodes."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        by_name = {graph[i].attrs["name"]: i for i in graph.inputs}
        missing = [k for k in by_name if k not in inputs]
        if missing:
            raise TypeError(f"missing inputs {missing}; the program takes {list(by_name)}")
        return {by_name[k]: v for k, v in inputs.items() if k in by_name}
    if len(inputs) != len(graph.inputs):
        raise TypeError(f"the program takes {len(graph.inputs)} inputs {graph.inputs}, got {len(inputs)}")
    return dict(zip(graph.inputs, inputs))


def run(graph: Graph, inputs: Any, *, keep_all: bool = False) -> Any:
    """Execute `graph` on `inputs`; returns the outputs (a tuple), or every value if keep_all."""
    env: dict[str, torch.Tensor] = {}
    given = bind_inputs(graph, inputs)
    for n in graph:
        rule = REFERENCE.get(n.op)
        if rule is None:
            raise NotImplementedError(f"float reference has no rule for op {n.op!r} (%{n.name})")
        args = [env[i] for i in n.inputs]
        if n.op == "input":
            args = [given[n.name]]
        try:
            env[n.name] = rule(n, graph, *args)
        except Exception as e:
            e.add_note(f"while executing %{n.name} = {n.op}(...) at {n.module_path or '<top level>'}")
            raise
    return env if keep_all else tuple(env[o] for o in graph.outputs)


def missing_rules(ops: Sequence[str] = tuple(OPS)) -> list[str]:
    """IR ops without a reference rule (a test asserts this is empty)."""
    return [op for op in ops if op not in REFERENCE]
