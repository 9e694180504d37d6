"""Frontend: trace a model with `torch.export` and import it as an `aten`-level IR graph.

`torch.export.export(..., strict=False)` (the training IR, no decomposition) keeps the ops
pattern recognition wants whole: `aten.linear`, `aten.layer_norm`, `aten.gelu`,
`aten.softmax`, `aten.scaled_dot_product_attention` (decomposed by `decompose_aten`, so
eager and sdpa attention give the same program). transformers 5 has no fx tracer of its
own; HF models trace as they are, with an `attention_mask` for padding.

`build_ir` is the whole front half of the compiler: trace, import, then the pass pipeline
(`passes.DEFAULT_PIPELINE`) down to the verified, approximated MPC IR.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from .errors import CompileError
from .ir import Graph, Node, Ref, dtype_tag

DEFAULT_PUBLIC_INPUTS = ("attention_mask",)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Trace in eval mode (dropout off) and give the model back in the mode it came in."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """`example_inputs` is a tuple of positional tensors, a dict of keyword tensors, or one tensor."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def trace(model: torch.nn.Module, example_inputs: Any) -> ExportedProgram:
    """Export `model` on `example_inputs` to an ATen-level program (training IR, eval mode)."""
    args, kwargs = split_inputs(example_inputs)
    with _eval_mode(model), torch.no_grad():
        try:
            return torch.export.export(model, args, kwargs, strict=False)
        except Exception as e:  # noqa: BLE001 - export errors are long; keep them, add context
            raise CompileError(f"torch.export could not trace {type(model).__name__}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _module_path(fx_node: torch.fx.Node) -> str:
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "")


def _tensor_meta(val: Any) -> tuple[tuple[int, ...] | None, str]:
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape), dtype_tag(val.dtype)
    return None, "f32"


def import_program(ep: ExportedProgram, example_inputs: Any = None,
                   public_inputs: Sequence[str] = DEFAULT_PUBLIC_INPUTS) -> Graph:
    """The exported program as an `aten`-level Graph: one node per FX node.

    Parameters become secret `weight` nodes. Integer/bool buffers (position ids, token type
    ids) and lifted constants become public `constant` nodes; float buffers are model data
    and stay secret weights. User inputs become `input` nodes: integer ones are secret token
    ids (kind `ids`), float ones secret tensors (kind `float`), and those named in
    `public_inputs` are public (kind `public`: the padding mask, per the threat model).
    """
    sig = ep.graph_signature
    specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    state = {**ep.state_dict, **ep.constants}
    g = Graph(meta={"level": "aten", "public_examples": {}, "assumptions": []})
    user_names = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    examples = _examples_by_name(user_names, example_inputs) if example_inputs is not None else {}
    env: dict[torch.fx.Node, str] = {}
    for fx in ep.graph.nodes:
        shape, dtype = _tensor_meta(fx.meta.get("val"))
        if fx.op == "placeholder":
            spec = specs[fx.name]
            node = _import_placeholder(g, fx.name, spec, state, shape, dtype, public_inputs, examples)
            if node is None:
                continue
        elif fx.op == "call_function":
            node = _import_call(fx, env, shape, dtype)
        elif fx.op == "output":
            outs = [s.arg.name for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT and hasattr(s.arg, "name")]
            g.outputs = [env[n] for n in fx.all_input_nodes if n.name in outs]
            continue
        else:
            raise CompileError(f"unexpected FX node kind {fx.op!r} ({fx.name}) in the exported program")
        g.add(node)
        env[fx] = node.name
    g.inputs = [n for n in user_names if n in g]
    return g


def _examples_by_name(user_names: list[str], example_inputs: Any) -> dict[str, torch.Tensor]:
    """Keyword tensors by name; positional tensors fill the remaining input names in order."""
    args, kwargs = split_inputs(example_inputs)
    out = {k: v for k, v in kwargs.items() if k in user_names and isinstance(v, torch.Tensor)}
    rest = [n for n in user_names if n not in out]
    out.update(zip(rest, [a for a in args if isinstance(a, torch.Tensor)]))
    return out


def _import_placeholder(g: Graph, name: str, spec: Any, state: dict, shape: Any, dtype: str,
                        public_inputs: Sequence[str], examples: dict) -> Node | None:
    if spec.kind == InputKind.USER_INPUT:
        if shape is None:
            return None
        public = name in public_inputs
        kind = "public" if public else ("float" if dtype == "f32" else "ids")
        if kind == "ids" and dtype == "bool":
            raise CompileError(f"input {name!r} is a secret bool tensor; pass it in public_inputs")
        if public and name in examples:
            g.meta["public_examples"][name] = examples[name]
        return Node(name, "input", [], {"name": name, "kind": kind}, shape, dtype, not public)
    value = state[spec.target].detach()
    if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and value.is_floating_point()):
        g.weights[spec.target] = value.float()
        return Node(name, "weight", [], {"name": spec.target}, tuple(value.shape), "f32", True)
    if spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
        return Node(name, "constant", [], {"value": value}, tuple(value.shape), dtype_tag(value.dtype), False)
    raise CompileError(f"unsupported program input {name} of kind {spec.kind}")


def _import_call(fx: torch.fx.Node, env: dict, shape: Any, dtype: str) -> Node:
    inputs: list[str] = []

    def template(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            name = env[a]
            if name not in inputs:
                inputs.append(name)
            return Ref(inputs.index(name))
        if isinstance(a, (list, tuple)):
            return type(a)(template(x) for x in a)
        return a

    args = template(tuple(fx.args))
    kwargs = {k: template(v) for k, v in fx.kwargs.items()}
    target = fx.target
    op = "getitem" if target is operator.getitem else _op_name(target)
    node = Node(fx.name, op, inputs, {"target": target, "args": args, "kwargs": kwargs}, shape, dtype,
                True, _module_path(fx))
    if fx.meta.get("val") is None:
        node.meta["no_value"] = True
    return node


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # "aten.add.Tensor", "mylib.custom.default"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def build_ir(model: torch.nn.Module, example_inputs: Any, *, preset: str = "secformer",
             overrides: Mapping[str, str] | None = None, calibration: Mapping[str, Any] | None = None,
             public_inputs: Sequence[str] = DEFAULT_PUBLIC_INPUTS, pipeline: Sequence[Any] | None = None,
             goldschmidt_target: float | None = None, table_seeds: bool = True,
             gelu_lookup: bool = False, **per_op: str) -> Graph:
    """Compile `model` to the verified MPC IR.

    Args:
        model: any `torch.nn.Module` (HF models included) made of supported ops.
        example_inputs: a tuple of positional tensors or a dict of keyword tensors. Shapes
            (batch, sequence length) are fixed by it: the program is static.
        preset: approximation preset (`passes.approximate.PRESETS`), e.g. "secformer", "exact".
        overrides / per_op: per-op method overrides, e.g. `softmax="puma"` or
            `overrides={"gelu": "gelu.quad"}` (a preset name or a full approximation name).
        calibration: {node name: (lo, hi)} measured input ranges of the approximated ops'
            iterative parts (see `passes.approximate`); None uses the documented defaults.
        public_inputs: names of inputs that are public (default: the attention mask).
        pipeline: pass names or callables replacing `passes.DEFAULT_PIPELINE`.
        goldschmidt_target: relative error each calibrated Goldschmidt step must meet on its
            range (None: `approx.CALIBRATION_TARGET_REL_ERR`, 1e-4).
        table_seeds: let calibrated 2Quad divisions and LayerNorm inverse square roots start
            from a lookup table and Newton steps where that takes fewer rounds than
            Goldschmidt (approx/table_seed.py).
        gelu_lookup: let the even-form GeLU's segment tests be one table lookup where its
            input bound allows (runtime/protocols/nonlinear.py: 2 rounds instead of 4).
    Raises:
        CompileError (UnsupportedOpsError) listing every op without an MPC lowering at once.
    """
    from .passes import DEFAULT_PIPELINE, PassManager

    ep = trace(model, example_inputs)
    graph = import_program(ep, example_inputs, public_inputs)
    options = {"approximate": {"preset": preset, "overrides": {**(overrides or {}), **per_op},
                               "calibration": calibration, "target_rel_err": goldschmidt_target,
                               "table_seeds": table_seeds, "gelu_lookup": gelu_lookup}}
    return PassManager(pipeline or DEFAULT_PIPELINE, options).run(graph)


__all__ = ["trace", "import_program", "build_ir", "split_inputs", "DEFAULT_PUBLIC_INPUTS"]
