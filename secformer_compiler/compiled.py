"""`compile(model)` and the `CompiledModel` it returns: simulate, run under 2PC, cost, report.

The compiled model plays the model owner (it splits the weights into two shares, one per
computing party) and the client (it encodes and splits the inputs, and reconstructs the
outputs from the parties' shares). P0, P1 and the dealer only ever see shares, masked
openings and correlated randomness.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from . import float_interp
from .frontend import build_ir
from .ir import Graph
from .mpc_interp import infer_program, load_groups, load_program, plan_fixed
from .runtime.context import clear_context
from .runtime.domain import DomainViolation, violations
from .runtime.engine import run_clear
from .runtime.local import combine_stats
from .runtime.memory import release_free_memory
from .runtime.prg import PRG
from .runtime.ring import FixedPoint


def client_encode(graph: Graph, fxp: FixedPoint, inputs: Any) -> dict[str, torch.Tensor]:
    """Plaintext inputs -> ring tensors by input node: token ids one-hot (scale 0), reals at f bits,
    public inputs unchanged."""
    out = {}
    for name, v in float_interp.bind_inputs(graph, inputs).items():
        node = graph[name]
        kind = node.attrs["kind"]
        if kind == "ids":
            vocab = node.meta.get("vocab") or _vocab_of(graph, name)
            if int(v.max()) >= vocab or int(v.min()) < 0:
                raise ValueError(f"input {node.attrs['name']}: token id out of range [0, {vocab})")
            out[name] = torch.nn.functional.one_hot(v.to(torch.int64), vocab).to(torch.int64)
        elif kind == "float":
            out[name] = fxp.encode(v.double())
        else:
            out[name] = v
    return out


def _vocab_of(graph: Graph, ids_name: str) -> int:
    for n in graph:
        if n.op == "embedding" and n.inputs[0] == ids_name:
            return graph[n.inputs[1]].shape[0]
    raise ValueError(f"secret ids input {ids_name} feeds no embedding")


def split_shares(values: Mapping[str, torch.Tensor], prg: PRG | None = None) -> tuple[dict, dict]:
    """Additive shares (x - r, r) with r uniform from a cryptographic PRG."""
    prg = prg or PRG()
    s0, s1 = {}, {}
    for k, v in values.items():
        r = prg.ring(v.shape)
        s0[k], s1[k] = v - r, r
    return s0, s1


class DomainWarning(UserWarning):
    """Inputs the simulator saw outside a protocol's declared range: a 2PC run of the same
    inputs is likely wrong there (runtime/domain.py). `.violations` lists them."""

    def __init__(self, found: Sequence[DomainViolation]) -> None:
        self.violations = list(found)
        lines = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(
            f"{len(self.violations)} value range(s) outside what the protocols were set up for; the "
            f"simulator's result may still look right, but a 2PC run of these inputs is likely wrong "
            f"there:\n{lines}\nCompile with calibration inputs like these "
            f"(sc.compile(model, x, calibration=[...])) so each approximation's pre-scale fits them.")


class RingWeights(Mapping):
    """The model's weights in the ring, encoded when read (each read is a fresh tensor).

    Not a dict of encoded copies: those were 8 bytes per weight held for the whole life of
    a compiled model (2.7 GB for BERT-large) beside the float weights, although a session
    needs one load group's at a time and the simulator each weight once."""

    def __init__(self, weights: Mapping[str, torch.Tensor], fxp: FixedPoint) -> None:
        self._weights, self._fxp = weights, fxp

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fxp.encode(self._weights[name].detach().double())

    def __iter__(self):
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


def _load(ctx, graph, weights, keys=None):
    return load_program(ctx, graph, weights, keys)


def _infer(ctx, graph, inputs):
    return infer_program(ctx, graph, inputs)


@dataclass
class RunResult:
    """Outputs of a 2PC run with what it cost (bytes per party, rounds, dealer bytes)."""

    outputs: tuple[torch.Tensor, ...]
    stats: Any
    load_stats: Any = None
    extra: dict = field(default_factory=dict)


class CompiledModel:
    """A model compiled to the MPC IR. See `compile`."""

    def __init__(self, graph: Graph, fxp: FixedPoint | None = None, trunc: str = "exact",
                 preset: str = "secformer") -> None:
        self.graph = graph
        self.fxp = fxp or FixedPoint()
        self.trunc = trunc
        self.preset = preset
        plan_fixed(graph, self.fxp.frac_bits)
        self._ring_weights = RingWeights(graph.weights, self.fxp)
        # what the last `simulate` saw outside a protocol's declared range (runtime/domain.py)
        self.last_domain_violations: list[DomainViolation] = []

    @property
    def program(self) -> Graph:
        """The MPC IR (print it for the readable text form)."""
        return self.graph

    def _public_split(self, enc: dict) -> tuple[dict, dict]:
        secret = {k: v for k, v in enc.items() if self.graph[k].secret}
        public = {k: v for k, v in enc.items() if not self.graph[k].secret}
        s0, s1 = split_shares(secret)
        return {**s0, **public}, {**s1, **public}

    def simulate(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """Run the approximated fixed-point program in the clear (the parties' exact arithmetic).

        Warns (`DomainWarning`, also kept in `last_domain_violations`) where a value left the
        range its protocol was set up for: there a 2PC run is likely wrong even when this
        result looks right (runtime/domain.py)."""
        inputs = kwargs or (args[0] if len(args) == 1 and isinstance(args[0], Mapping) else args)
        ctx = clear_context(self.fxp, self.trunc)
        run_clear(_load, self.graph, self._ring_weights, ctx=ctx)
        outs, counter = run_clear(_infer, self.graph, client_encode(self.graph, self.fxp, inputs), ctx=ctx)
        self.last_simulation_counter = counter
        self.last_domain_violations = violations(ctx)
        if self.last_domain_violations:
            warnings.warn(DomainWarning(self.last_domain_violations), stacklevel=2)
        del ctx
        release_free_memory()  # the simulator's limb products and weight copies are dead
        return tuple(self.fxp.decode(o).float() for o in outs)

    def float(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """The program in float64 with exact nonlinearities (the original model's function)."""
        inputs = kwargs or (args[0] if len(args) == 1 and isinstance(args[0], Mapping) else args)
        return tuple(o.float() for o in float_interp.run(self.graph, inputs))

    def session(self, processes: bool = False, timeout: float = 300.0, offline: str = "stream") -> "Session":
        """Start P0, P1 and the dealer and load the weights once; then `session.infer(...)`.

        offline (processes only): "stream" lets the dealer generate beside the online
        phase; "ahead" finishes the dealer's work before the online clock starts."""
        return Session(self, processes=processes, timeout=timeout, offline=offline)

    def run(self, *args: Any, processes: bool = False, timeout: float = 300.0, **kwargs: Any) -> RunResult:
        """Real 2PC of one input: P0, P1 and the dealer as threads (default) or processes."""
        with self.session(processes=processes, timeout=timeout) as sess:
            return sess.infer(*args, **kwargs)

    def cost(self) -> "ProgramCost":
        """Static bytes and rounds per party, per op and per layer, with LAN/WAN estimates."""
        from .cost import program_cost
        return program_cost(self.graph, self.trunc, self.fxp.frac_bits)

    def report(self) -> str:
        """The chosen approximations, their parameters and declared error bounds."""
        lines = [f"preset: {self.preset}; fixed point: {self.fxp.frac_bits} fractional bits; "
                 f"truncation: {self.trunc}"]
        approx = self.graph.meta.get("approximations", {})
        for n in self.graph:
            if n.op in ("gelu", "layernorm", "softmax", "tanh"):
                spec = approx.get(n.name)
                bound = getattr(spec, "declared_max_abs_err", None)
                params = {k: (f"[{len(v)} values]" if isinstance(v, (list, tuple)) and len(v) > 4 else v)
                          for k, v in (n.attrs.get("params") or {}).items()}
                lines.append(f"  %{n.name:<24} {n.attrs.get('method')!s:<22} err<={bound}  {params}  # {n.module_path}")
        return "\n".join(lines)


def compile(model: torch.nn.Module, example_inputs: Any, *, preset: str = "secformer",
            calibration: Sequence[Any] | None = None, frac_bits: int = 16, trunc: str = "exact",
            overrides: Mapping[str, str] | None = None, range_margin: float | None = None,
            goldschmidt_target: float | None = None, fewer_rounds: bool = False,
            table_seeds: bool = True, gelu_lookup: bool | None = None, **per_op: str) -> CompiledModel:
    """Compile `model` for 2PC inference.

    Args:
        model: a HuggingFace Transformer or any nn.Module made of supported ops.
        example_inputs: tuple or dict of tensors fixing the (static) input shapes.
        preset: "secformer" (default), "mpcformer", "puma", "crypten",
            "secformer-exact-softmax", or "exact" (simulator only).
        calibration: sample inputs (a list of tuples/dicts like example_inputs); each
            approximated op's input range is measured on them, running the approximated
            program in float64, and its pre-scale and iteration count chosen to meet the
            declared bound. Default: the example inputs themselves; `[]` keeps the
            documented conservative defaults.
        range_margin: factor on the largest measured value that Goldschmidt must still
            converge for (default `calibrate.HI_MARGIN`, 2.5: real inputs exceed a sample's
            range, and past it the iterations diverge); larger costs about one iteration
            (2 rounds) per doubling.
        goldschmidt_target: the relative error every calibrated Goldschmidt step (LayerNorm's
            1/sqrt, 2Quad's 1/sum) must meet over its range (default
            `approx.CALIBRATION_TARGET_REL_ERR`, 1e-4). 1e-3 saves about one round per
            LayerNorm, for less margin outside the calibrated range (see that constant).
        fewer_rounds: every trade of bytes and CPU for rounds: LayerNorms fold their gain
            and shift into the linear layers after them and compute those layers with their
            1/sigma applied after the product (passes/rounds.py: one round fewer per
            LayerNorm followed by a linear), and GeLU's segment tests by lookup (unless
            gelu_lookup=False). Worth it on high-latency links; see README, "Fewer rounds".
        table_seeds: calibrated 2Quad divisions and LayerNorm inverse square roots start
            from a dealer's lookup table (one round) and take one Newton step where that
            meets the target, instead of Goldschmidt's iterations (runtime/protocols/lookup.py,
            approx/table_seed.py; BERT-base, seq 128: 277 rounds instead of 358, the same
            time, 167 MiB more from the dealer). False keeps Goldschmidt everywhere.
        gelu_lookup: the even-form GeLU's segment tests become one lookup of two bit tables
            where its input bound allows (2 rounds instead of 4: BERT-base 253 rounds), for
            16 MiB more per party and 566 MiB more from the dealer, about 0.5 s slower on
            this 2-core host: worth it only on high-latency links, so not the default.
            None (default): as fewer_rounds.
        per_op / overrides: per-op methods, e.g. softmax="puma".
    """
    from .calibrate import resolve_margin
    resolve_margin(range_margin)  # a bad value is refused before any tracing work
    graph = build_ir(model, example_inputs, preset=preset, overrides=overrides,
                     goldschmidt_target=goldschmidt_target, **per_op)  # refuses a bad target too
    if calibration is None:
        # The documented wide defaults cannot hold LayerNorm's variance range at 16 fractional
        # bits (DESIGN: choose pre-scales from measured ranges), so the example inputs are the
        # calibration sample unless the caller gives one; pass calibration=[] to opt out.
        calibration = [example_inputs]
    if calibration:
        # Ranges of the *approximated* program (training.measure_ranges): a replacement GeLU
        # (Quad, PUMA's polynomial) changes what the next LayerNorm sees (10x the variance on
        # all-MiniLM-L6-v2 with Quad), and Goldschmidt calibrated for the exact model's range
        # then diverges.
        from .training import measure_ranges
        ranges = measure_ranges(graph, calibration, hi_margin=range_margin)
        graph = build_ir(model, example_inputs, preset=preset, overrides=overrides,
                         calibration=ranges, goldschmidt_target=goldschmidt_target,
                         table_seeds=table_seeds, gelu_lookup=fewer_rounds if gelu_lookup is None else gelu_lookup,
                         **per_op)
    if fewer_rounds:
        from .passes import run_passes
        graph = run_passes(graph, ["fold_layernorm_affine", "commute_layernorm_scaling"])
    release_free_memory()  # calibration's float64 runs are done (runtime/memory.py)
    return CompiledModel(graph, FixedPoint(frac_bits), trunc, preset)


class Session:
    """A running deployment of one compiled model: the weights are shared and loaded once
    (W - B opened for every fixed operand), then any number of inferences."""

    def __init__(self, cm: CompiledModel, processes: bool = False, timeout: float = 300.0,
                 offline: str = "stream") -> None:
        self.cm = cm
        if processes:
            from .runtime.launch import ProcessCluster
            self.cluster = ProcessCluster(cm.fxp, cm.trunc, timeout=timeout, offline=offline)
        else:
            from .runtime.local import LocalCluster
            self.cluster = LocalCluster(cm.fxp, cm.trunc, timeout=timeout)
        # the parties get the program without the float weights: they only ever hold shares
        self.graph = Graph(cm.graph.nodes, weights={}, inputs=cm.graph.inputs,
                           outputs=cm.graph.outputs, meta={"level": "mpc"})
        try:
            self.load_stats = self._load_weights()
        except BaseException:
            self.close()
            raise

    def _load_weights(self) -> Any:
        """Share the weights and open W - B, one round-sized group at a time (`load_groups`).

        Why in groups: a whole model's shares sent at once are held several times over in
        transit (the owner's two splits and their pickles, each party's received bytes and
        tensors beside the loaded operands): about 40 bytes per weight in each party, which
        put BERT-large's 302M encoder weights out of reach of a 24 GiB machine. Group by group, only
        the loaded operands stay. Same rounds and bytes as one `load_program` run."""
        ring = self.cm._ring_weights
        plan = plan_fixed(self.cm.graph, self.cm.fxp.frac_bits)
        groups = load_groups(self.cm.graph, self.cm.fxp.frac_bits) or [[]]
        fixed = {plan[k][0] for g in groups for k in g}
        stats = []
        for i, keys in enumerate(groups):
            names = {plan[k][0] for k in keys}
            if i == len(groups) - 1:  # the weights read by value (embeddings, biases, gains)
                names |= {n for n in ring if n not in fixed}
            w0, w1 = split_shares({n: ring[n] for n in sorted(names)})  # the model owner's split
            stats.append(self.cluster.run(_load, (self.graph, w0, keys), (self.graph, w1, keys))[2])
            del w0, w1
        return combine_stats(stats)

    def infer(self, *args: Any, **kwargs: Any) -> RunResult:
        inputs = kwargs or (args[0] if len(args) == 1 and isinstance(args[0], Mapping) else args)
        i0, i1 = self.cm._public_split(client_encode(self.cm.graph, self.cm.fxp, inputs))
        o0, o1, stats = self.cluster.run(_infer, (self.graph, i0), (self.graph, i1))
        outs = tuple(self.cm.fxp.decode(a + b).float() for a, b in zip(o0, o1))
        return RunResult(outs, stats, self.load_stats)

    def close(self) -> None:
        if hasattr(self.cluster, "close"):
            self.cluster.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
