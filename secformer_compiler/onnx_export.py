"""The MPC IR as ONNX: one node per IR node in the custom domain `ai.secformer`, and back.

`graph_to_onnx(graph)` gives a `ModelProto` that passes `onnx.checker.check_model` and
opens in Netron: each IR node is an ONNX node of the same name whose op_type is the IR op
(domain `ai.secformer`, version `OPSET_VERSION`), every value has its shape and element
type in `value_info`, secrecy and the module path are node metadata (`secformer.secret`,
`secformer.module_path`; the module path is also the node's doc string). An IR `input`
node reads an ONNX graph input named `<name>:arg`; `weight` nodes name their tensor in
`weights.safetensors` (the weights are not in the ONNX file: they are secret, and the
parties receive shares instead).

Attributes keep their Python types exactly, so the loaded graph prints the same text:

| Python value                     | ONNX attribute                 | doc_string  |
|----------------------------------|--------------------------------|-------------|
| str                              | STRING                         |             |
| int (not bool)                   | INT                            |             |
| list of ints                     | INTS                           |             |
| tuple of ints                    | INTS                           | `tuple`     |
| torch.Tensor                     | TENSOR                         |             |
| public function (public_fn.fn)   | STRING (JSON program)          | `public_fn` |
| anything else (float, bool, dict)| STRING (tagged JSON)           | `json`      |

Floats go through JSON because ONNX FLOAT attributes are float32 (an eps of 1e-12 must
survive). A public function is data, not code: `PublicFn` (ATen calls replayed in the
clear), `Then` (a function followed by a named helper) and `MaskProduct` are serialized
by `PUBLIC_FN_KINDS`; on load every ATen target must resolve to `torch.ops.aten`, every
helper to `PUBLIC_HELPERS`, and an unknown kind or target is an error naming the node, so
an artifact can never make a party call arbitrary code.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from .ir import OPS, Graph, Node

DOMAIN = "ai.secformer"
OPSET_VERSION = 1
IR_VERSION = 10  # node metadata_props need ONNX IR >= 10 (onnx 1.16)
ELEM = {"f32": TensorProto.FLOAT, "i64": TensorProto.INT64, "bool": TensorProto.BOOL}
ELEM_TAG = {v: k for k, v in ELEM.items()}
ARG_SUFFIX = ":arg"
META_KEYS = ("level", "preset", "assumptions", "approximation_notes")


class ProgramFormatError(ValueError):
    """program.onnx cannot be turned back into an IR graph; the message says where and why."""


# --- tagged JSON: Python values (tuples, tensors, dtypes, ...) that survive a round trip ---

def _enc_tensor(t: torch.Tensor) -> dict:
    t = t.detach().cpu().contiguous()
    raw = t.numpy().tobytes() if t.numel() else b""
    return {"$tensor": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                        "data": base64.b64encode(raw).decode("ascii")}}


def _dec_tensor(d: dict) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ProgramFormatError(f"unknown tensor dtype {d['dtype']!r}")
    raw = base64.b64decode(d["data"])
    arr = np.frombuffer(raw, dtype=torch.empty(0, dtype=dtype).numpy().dtype) if raw else None
    if arr is None:
        return torch.zeros(d["shape"], dtype=dtype)
    return torch.from_numpy(arr.copy()).reshape(d["shape"])


def encode_value(v: Any, where: str = "") -> Any:
    """A JSON-able structure for `v` (tuples, dicts, tensors, dtypes tagged with `$` keys)."""
    from .passes.secrecy import _Var

    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [encode_value(x, where) for x in v]
    if isinstance(v, tuple):
        return {"$tuple": [encode_value(x, where) for x in v]}
    if isinstance(v, dict):
        return {"$dict": [[encode_value(k, where), encode_value(x, where)] for k, x in v.items()]}
    if isinstance(v, torch.Tensor):
        return _enc_tensor(v)
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    if isinstance(v, torch.layout):
        return {"$layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"$memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, _Var):
        return {"$var": v.name}
    if callable(v):
        return {"$fn": encode_public_fn(v, where)}
    raise ProgramFormatError(f"{where}: cannot store a value of type {type(v).__name__} ({v!r})")


def decode_value(v: Any, where: str = "") -> Any:
    from .passes.secrecy import _Var

    if isinstance(v, list):
        return [decode_value(x, where) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        raise ProgramFormatError(f"{where}: malformed tagged value {sorted(v)}")
    (tag, body), = v.items()
    if tag == "$tuple":
        return tuple(decode_value(x, where) for x in body)
    if tag == "$dict":
        return {decode_value(k, where): decode_value(x, where) for k, x in body}
    if tag == "$tensor":
        return _dec_tensor(body)
    if tag in ("$dtype", "$layout", "$memory_format"):
        obj = getattr(torch, body, None)
        kind = {"$dtype": torch.dtype, "$layout": torch.layout, "$memory_format": torch.memory_format}[tag]
        if not isinstance(obj, kind):
            raise ProgramFormatError(f"{where}: unknown torch {tag[1:]} {body!r}")
        return obj
    if tag == "$device":
        return torch.device(body)
    if tag == "$var":
        return _Var(body)
    if tag == "$fn":
        return decode_public_fn(body, where)
    raise ProgramFormatError(f"{where}: unknown value tag {tag!r}")


# --- public functions: a registry of the kinds the compiler emits ------------------------

def _check_target(target: str, where: str) -> None:
    """Only ATen ops, `getitem` and the named public helpers may run on load."""
    from .passes.secrecy import PUBLIC_HELPERS

    if target == "getitem":
        return
    if target.startswith("helper:"):
        if target[len("helper:"):] not in PUBLIC_HELPERS:
            raise ProgramFormatError(f"{where}: unknown public helper {target!r}; known: "
                                     f"{', '.join(sorted(PUBLIC_HELPERS))}")
        return
    parts = target.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        raise ProgramFormatError(f"{where}: public function step {target!r} is not an ATen op")
    try:
        getattr(getattr(torch.ops.aten, parts[1]), parts[2])
    except (AttributeError, RuntimeError) as e:
        raise ProgramFormatError(f"{where}: unknown ATen op {target!r} (this torch has none)") from e


def _enc_publicfn(fn: Any, where: str) -> dict:
    for _, target, _, _ in fn.steps:
        _check_target(target, where)
    return {"label": fn.label, "params": list(fn.params), "out": fn.out,
            "steps": [[name, target, encode_value(args, where), encode_value(kwargs, where)]
                      for name, target, args, kwargs in fn.steps],
            "consts": {k: encode_value(v, where) for k, v in fn.consts.items()}}


def _dec_publicfn(d: dict, where: str) -> Any:
    from .passes.secrecy import PublicFn

    steps = []
    for name, target, args, kwargs in d["steps"]:
        _check_target(target, where)
        steps.append((name, target, decode_value(args, where), decode_value(kwargs, where)))
    consts = {k: decode_value(v, where) for k, v in d["consts"].items()}
    return PublicFn(d["label"], list(d["params"]), steps, consts, d["out"])


def _enc_then(fn: Any, where: str) -> dict:
    return {"fn": encode_public_fn(fn.fn, where), "helper": fn.helper, "extra": encode_value(fn.extra, where)}


def _dec_then(d: dict, where: str) -> Any:
    from .passes.secrecy import Then

    _check_target("helper:" + d["helper"], where)
    return Then(decode_public_fn(d["fn"], where), d["helper"], *decode_value(d["extra"], where))


def _enc_maskproduct(fn: Any, where: str) -> dict:
    return {"fa": encode_public_fn(fn.fa, where), "na": fn.na, "fb": encode_public_fn(fn.fb, where), "nb": fn.nb}


def _dec_maskproduct(d: dict, where: str) -> Any:
    from .passes.patterns import MaskProduct

    return MaskProduct(decode_public_fn(d["fa"], where), d["na"], decode_public_fn(d["fb"], where), d["nb"])


def _kinds() -> dict[str, tuple[type, Callable, Callable]]:
    from .passes.patterns import MaskProduct
    from .passes.secrecy import PublicFn, Then

    return {"PublicFn": (PublicFn, _enc_publicfn, _dec_publicfn),
            "Then": (Then, _enc_then, _dec_then),
            "MaskProduct": (MaskProduct, _enc_maskproduct, _dec_maskproduct)}


PUBLIC_FN_KINDS = _kinds  # called lazily: the passes import the IR, not the other way round


def encode_public_fn(fn: Any, where: str = "") -> dict:
    """{"kind": ..., ...} for a public function the compiler emitted; other callables are refused."""
    for kind, (cls, enc, _) in PUBLIC_FN_KINDS().items():
        if type(fn) is cls:
            return {"kind": kind, **enc(fn, where)}
    raise ProgramFormatError(
        f"{where}: public function {getattr(fn, 'label', fn)!r} of type {type(fn).__name__} cannot be "
        f"stored; storable kinds: {', '.join(PUBLIC_FN_KINDS())}")


def decode_public_fn(d: dict, where: str = "") -> Any:
    kinds = PUBLIC_FN_KINDS()
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in kinds:
        raise ProgramFormatError(f"{where}: unknown public function kind {kind!r} (known: "
                                 f"{', '.join(kinds)}); was the artifact made by a newer secformer?")
    try:
        return kinds[kind][2](d, where)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ProgramFormatError):
            raise
        raise ProgramFormatError(f"{where}: malformed public function: {type(e).__name__}: {e}") from e


# --- attributes ----------------------------------------------------------------------------

def _is_ints(v: Any) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _attr(name: str, v: Any, where: str) -> AttributeProto:
    a = AttributeProto()
    a.name = name
    if isinstance(v, str):
        a.type, a.s = AttributeProto.STRING, v.encode("utf-8")
    elif isinstance(v, int) and not isinstance(v, bool):
        a.type, a.i = AttributeProto.INT, v
    elif isinstance(v, (list, tuple)) and _is_ints(v) and (v or isinstance(v, list)):
        a.type = AttributeProto.INTS
        a.ints.extend(v)
        if isinstance(v, tuple):
            a.doc_string = "tuple"
    elif isinstance(v, torch.Tensor):
        a.type = AttributeProto.TENSOR
        a.t.CopyFrom(numpy_helper.from_array(v.detach().cpu().contiguous().numpy(), name))
    elif callable(v) and not isinstance(v, type):
        a.type, a.doc_string = AttributeProto.STRING, "public_fn"
        a.s = json.dumps(encode_public_fn(v, where), separators=(",", ":")).encode("utf-8")
    else:
        a.type, a.doc_string = AttributeProto.STRING, "json"
        a.s = json.dumps(encode_value(v, where), separators=(",", ":")).encode("utf-8")
    return a


def _attr_value(a: AttributeProto, where: str) -> Any:
    where = f"{where}, attribute {a.name!r}"
    try:
        if a.type == AttributeProto.STRING:
            s = a.s.decode("utf-8")
            if a.doc_string == "public_fn":
                return decode_public_fn(json.loads(s), where)
            if a.doc_string == "json":
                return decode_value(json.loads(s), where)
            return s
        if a.type == AttributeProto.INT:
            return int(a.i)
        if a.type == AttributeProto.INTS:
            v = [int(x) for x in a.ints]
            return tuple(v) if a.doc_string == "tuple" else v
        if a.type == AttributeProto.TENSOR:
            return torch.from_numpy(numpy_helper.to_array(a.t).copy())
    except json.JSONDecodeError as e:
        raise ProgramFormatError(f"{where}: malformed JSON: {e}") from e
    raise ProgramFormatError(f"{where}: unsupported ONNX attribute type {a.type}")


# --- graph <-> model -----------------------------------------------------------------------

def _value_info(name: str, dtype: str, shape: Any) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, ELEM[dtype], list(shape))


def graph_to_onnx(graph: Graph, *, name: str = "secformer_program", doc: str = "") -> onnx.ModelProto:
    """The MPC IR `graph` as an ONNX model (custom domain; weights referenced by name)."""
    nodes, inputs, infos = [], [], []
    for n in graph:
        where = f"node %{n.name} ({n.op})"
        if n.shape is None:
            raise ProgramFormatError(f"{where}: tuple-valued nodes cannot be exported (not an MPC-level graph?)")
        if n.dtype not in ELEM:
            raise ProgramFormatError(f"{where}: dtype {n.dtype!r} has no ONNX element type")
        ins = list(n.inputs)
        if n.op == "input":
            arg = n.name + ARG_SUFFIX
            inputs.append(_value_info(arg, n.dtype, n.shape))
            ins = [arg]
        p = onnx.NodeProto()
        p.op_type, p.domain, p.name = n.op, DOMAIN, n.name
        p.input.extend(ins)
        p.output.append(n.name)
        p.attribute.extend(_attr(k, v, where) for k, v in n.attrs.items())
        if n.module_path:
            p.doc_string = n.module_path
        for k, v in (("secformer.secret", "1" if n.secret else "0"), ("secformer.module_path", n.module_path)):
            entry = p.metadata_props.add()
            entry.key, entry.value = k, v
        nodes.append(p)
        if n.name not in graph.outputs:
            infos.append(_value_info(n.name, n.dtype, n.shape))
    outputs = [_value_info(o, graph[o].dtype, graph[o].shape) for o in graph.outputs]
    g = helper.make_graph(nodes, name, inputs, outputs, value_info=infos, doc_string=doc)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid(DOMAIN, OPSET_VERSION),
                                                helper.make_opsetid("", 17)],
                              producer_name="secformer-compiler", producer_version=_version())
    model.ir_version = IR_VERSION
    meta = {k: graph.meta[k] for k in META_KEYS if k in graph.meta}
    meta["inputs"] = list(graph.inputs)  # the call signature's order
    helper.set_model_props(model, {"secformer.graph_meta": json.dumps(encode_value(meta))})
    return model


def _version() -> str:
    from . import __version__

    return __version__


def onnx_to_graph(model: onnx.ModelProto, weights: dict[str, torch.Tensor] | None = None) -> Graph:
    """Rebuild the IR graph from `graph_to_onnx`'s model. Raises `ProgramFormatError`."""
    versions = {o.domain: o.version for o in model.opset_import}
    if DOMAIN not in versions:
        raise ProgramFormatError(f"program.onnx imports no '{DOMAIN}' opset: not a secformer program")
    if versions[DOMAIN] > OPSET_VERSION:
        raise ProgramFormatError(f"program.onnx uses {DOMAIN} opset version {versions[DOMAIN]}, newer than "
                                 f"this secformer reads ({OPSET_VERSION}): upgrade secformer-compiler")
    g = model.graph
    infos = {v.name: v for v in list(g.value_info) + list(g.output) + list(g.input)}
    nodes = []
    for p in g.node:
        where = f"node %{p.name} ({p.op_type})"
        if p.domain != DOMAIN:
            raise ProgramFormatError(f"{where}: domain {p.domain!r}, expected {DOMAIN!r}")
        if p.op_type not in OPS:
            raise ProgramFormatError(f"{where}: unknown IR op {p.op_type!r} (known: {', '.join(OPS)})")
        if list(p.output) != [p.name]:
            raise ProgramFormatError(f"{where}: outputs {list(p.output)}, expected [{p.name!r}]")
        info = infos.get(p.name)
        if info is None:
            raise ProgramFormatError(f"{where}: no value_info (shape and type) for its output")
        tt = info.type.tensor_type
        if tt.elem_type not in ELEM_TAG:
            raise ProgramFormatError(f"{where}: unsupported element type {tt.elem_type}")
        shape = tuple(int(d.dim_value) for d in tt.shape.dim)
        props = {e.key: e.value for e in p.metadata_props}
        attrs = {a.name: _attr_value(a, where) for a in p.attribute}
        inputs = [] if p.op_type == "input" else list(p.input)
        nodes.append(Node(p.name, p.op_type, inputs, attrs, shape, ELEM_TAG[tt.elem_type],
                          props.get("secformer.secret", "1") == "1", props.get("secformer.module_path", "")))
    meta = {}
    for prop in model.metadata_props:
        if prop.key == "secformer.graph_meta":
            meta = decode_value(json.loads(prop.value), "graph metadata")
    meta.setdefault("level", "mpc")
    inputs = meta.pop("inputs", None) or [i.name[: -len(ARG_SUFFIX)] for i in g.input]
    graph = Graph(nodes, weights=weights or {}, inputs=inputs, outputs=[o.name for o in g.output], meta=meta)
    return graph


def check(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model` (structure, opsets, SSA); raises `ProgramFormatError`."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ProgramFormatError(f"program.onnx fails the ONNX checker: {str(e).splitlines()[0]}") from e
