"""Where the time of one 2PC inference goes: cProfile inside P0, P1 and the dealer.

BERT-base (random weights, encoder only, preset `secformer`, as benchmarks/e2e.py) with
fewer layers (default 2) at sequence length 128, P0, P1 and the dealer as processes. One
plain inference first (its wall time and each role's CPU time are the unprofiled
reference), then one with cProfile running in every role. The inference program is wrapped
in a generator that starts the profiler at its first step and stops it at its end, so the
engine, the transport and the protocols of that run are all profiled. Each role's profile
is reduced to: CPU time, time blocked on the peer or the dealer, int64 matmuls, other torch
kernels, AES-CTR (PRG), Python, and the cumulative time of each IR op's protocol.

    .venv/bin/python benchmarks/profile_e2e.py --layers 2 --seq 128 --json benchmarks/results/profile_base_l2_128.json
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# The roles are forked from multiprocessing's fork server: they find this module (which
# holds the wrapper they unpickle) through PYTHONPATH, set before the server starts.
os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
sys.path.insert(0, HERE)

ROLE = {0: "P0", 1: "P1", 2: "dealer"}


def _profiled(program, outdir, profile, ctx, *args):
    """Run `program` as this role's protocol, measuring (and maybe profiling) all of it."""
    prof = cProfile.Profile() if profile else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    out = yield from program(ctx, *args)
    if prof:
        prof.disable()
    rank = int(ctx.party) if hasattr(ctx, "party") else -1
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # sys time and minor faults: fresh pages of big temporaries are zeroed by the kernel
    info = {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
            "sys_s": ru.ru_stime - ru0.ru_stime, "minor_faults": ru.ru_minflt - ru0.ru_minflt,
            "peak_rss_mib": ru.ru_maxrss / 1024}
    with open(os.path.join(outdir, f"role{rank}.json"), "w") as fh:
        json.dump(info, fh)
    if prof:
        prof.dump_stats(os.path.join(outdir, f"role{rank}.pstats"))
    return out


def categorize(path: str) -> dict:
    """Reduce a pstats file: exclusive time per category, top functions, per-op protocols."""
    st = pstats.Stats(path).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    cats = {"communication (gloo send/recv/wait)": 0.0, "matmul kernels (ring products)": 0.0, "AES-CTR PRG": 0.0,
            "other torch kernels": 0.0, "Python (interpreter)": 0.0}
    ops: dict[str, float] = {}
    cum: dict[str, float] = {}
    total = 0.0
    rows = []
    for (file, line, name), (cc, nc, tt, ct, callers) in st.items():
        total += tt
        rows.append((tt, ct, nc, f"{os.path.basename(file)}:{line}({name})" if file != "~" else name))
        if file == "~":
            low = name.lower()
            if any(k in low for k in ("wait", "recv", "send", "_distributed_c10d")):
                cats["communication (gloo send/recv/wait)"] += tt
            elif any(k in low for k in ("matmul", "'mm'", "bmm", "addmm", "linear", "einsum", " mm ")):
                cats["matmul kernels (ring products)"] += tt
            elif "method 'update" in low:  # cryptography's CipherContext.update / update_into
                cats["AES-CTR PRG"] += tt
            else:
                cats["other torch kernels"] += tt
        else:
            cats["Python (interpreter)"] += tt
        # cumulative views (they overlap the categories above): the whole ring matmul (limb
        # split, float64 products, recombination), the whole PRG draw, P1 waiting for the
        # dealer's corrections (recv_blob) and the parties' openings (exchange)
        if (file.endswith("ring.py") and name == "ring_matmul") or (file.endswith("prg.py") and name == "ring") \
                or (file.endswith("dist.py") and name in ("recv_blob", "exchange", "send_blob")):
            cum[f"{os.path.basename(file)}:{name}"] = cum.get(f"{os.path.basename(file)}:{name}", 0.0) + ct
        # each IR op's rule runs as a generator: its cumulative time covers its compute
        # (and so do the protocols they call; nested ones overlap their callers)
        if file.endswith(("mpc_interp.py", "mpc_nonlinear.py")) or "protocols" in file:
            key = f"{os.path.basename(file)}:{name}"
            ops[key] = ops.get(key, 0.0) + ct
    rows.sort(reverse=True)
    return {"profiled_total_s": total, "categories_s": cats, "cumulative_s": cum,
            "top_by_self_time": [{"self_s": r[0], "cum_s": r[1], "calls": r[2], "function": r[3]} for r in rows[:25]],
            "protocols_cum_s": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:40])}


class Profiled:
    """Picklable wrapper of a program; the roles check they run the same program by its
    module and qualified name, so give it a stable one (a partial's repr has addresses)."""

    def __init__(self, program, outdir: str, profile: bool) -> None:
        self.program, self.outdir, self.profile = program, outdir, profile
        self.__module__ = __name__
        self.__qualname__ = f"Profiled({program.__qualname__}, profile={profile})"

    def __call__(self, ctx, *args):
        return _profiled(self.program, self.outdir, self.profile, ctx, *args)

    # Equal wrappers are the same program to the roles' recorded offline passes
    # (runtime.engine.plan_key), so a request after a warm-up one replays them, as in a
    # deployment's steady state.
    def __eq__(self, other):
        return isinstance(other, Profiled) and (self.program, self.outdir, self.profile) == \
            (other.program, other.outdir, other.profile)

    def __hash__(self):
        return hash((self.program, self.outdir, self.profile))


# (label, key in protocols_cum_s / cumulative_s / top_by_self_time) of the table's rows
TABLE_ROWS = [
    ("linear layers (Beaver matmul with the fixed weight, whole rule)", "proto", "mpc_interp.py:_linear"),
    ("of which ring matmul kernels (`torch.matmul`: int64 or float64 limbs, all matmuls)", "self", "<built-in method torch.matmul>"),
    ("of which limb splits (`ring._limbs`, all matmuls)", "self", "(_limbs)"),
    ("GeLU (whole protocol)", "proto", "nonlinear.py:gelu_secformer"),
    ("of which the two segment comparisons (`msb`)", "proto", "compare.py:msb"),
    ("of which the secure sine series (erf form)", "proto", "sine.py:x_sine_series"),
    ("of which the secure cosine series (even form, the default)", "proto", "sine.py:x_cos_series"),
    ("attention matmuls (secret x secret)", "proto", "mpc_interp.py:_product"),
    ("LayerNorm", "proto", "nonlinear.py:layernorm_goldschmidt"),
    ("softmax (2Quad)", "proto", "nonlinear.py:softmax_2quad"),
    ("exact truncations (all ops)", "proto", "trunc.py:trunc_exact"),
    ("openings (`exchange`: gloo send/recv/wait)", "cum", "dist.py:exchange"),
    ("AES-CTR PRG draws (overlaps the rows above)", "cum", "prg.py:ring"),
]


def table(result: dict, role: str = "P0") -> str:
    """The profiled run of `role` as a markdown table: seconds and share of its online wall."""
    r, wall = result["profiled"]["roles"][role], result["profiled"]["online_wall_s"]
    self_s: dict[str, float] = {}
    for label, kind, key in TABLE_ROWS:  # functions by name ("(_limbs)" matches any line number)
        if kind == "self":
            hits = [t["self_s"] for t in r["top_by_self_time"] if t["function"] == key or t["function"].endswith(key)]
            if hits:
                self_s[key] = sum(hits)
    src = {"proto": r["protocols_cum_s"], "cum": r["cumulative_s"], "self": self_s}
    lines = [f"| {role}, profiled run ({wall:.1f} s online wall, {r['cpu_s']:.1f} s CPU) | s | share of wall |",
             "|---|---|---|"]
    for label, kind, key in TABLE_ROWS:
        v = src[kind].get(key)
        if v is not None:
            lines.append(f"| {label} | {v:.2f} | {v / wall:.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--offline", choices=["stream", "ahead"], default="stream",
                    help="the dealer beside the online phase (stream) or done before it (ahead)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cold", action="store_true",
                    help="measure first requests (the roles record their offline passes) instead of "
                         "a steady-state request after a warm-up one")
    ap.add_argument("--table-from", default=None, metavar="JSON",
                    help="print the markdown table of a saved profile and exit")
    args = ap.parse_args()
    if args.table_from:
        with open(args.table_from) as fh:
            print(table(json.load(fh)))
        return
    import torch
    from transformers import BertConfig

    import profile_e2e  # this module under its importable name (the roles unpickle it)
    import secformer_compiler as sc
    from e2e import CONFIGS, Encoder
    from secformer_compiler.runtime.launch import ProcessCluster

    load_before = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = BertConfig(**dict(CONFIGS[args.model], num_hidden_layers=args.layers), attn_implementation="eager")
    model = Encoder(cfg).eval()
    x = torch.randn(1, args.seq, cfg.hidden_size)
    cm = sc.compile(model, (x,), preset="secformer", calibration=[(torch.randn_like(x),)])

    outdir = tempfile.mkdtemp(prefix="sf_profile_")
    mode = {"profile": False}
    orig_run = ProcessCluster.run

    def run(self, program, args0=(), args1=None):  # wrap only the inference, not the weight load
        if getattr(program, "__name__", "") == "_infer":
            program = profile_e2e.Profiled(program, outdir, mode["profile"])
        return orig_run(self, program, args0, args1)

    ProcessCluster.run = run
    result = {"model": f"bert-{args.model}", "layers": args.layers, "seq_len": args.seq, "started_utc": started,
              "cpu_count": os.cpu_count(), "command": " ".join(["python"] + sys.argv)}
    result["offline_mode"] = args.offline
    result["requests"] = "first (cold)" if args.cold else "steady state (after a warm-up request)"
    with cm.session(processes=True, timeout=1800, offline=args.offline) as sess:
        for label, prof in (("plain", False), ("profiled", True)):
            mode["profile"] = prof
            if not args.cold:  # a warm-up request: the roles record their offline passes
                sess.infer(x)
            for f in os.listdir(outdir):  # only the measured request's files count
                os.remove(os.path.join(outdir, f))
            res = sess.infer(x)
            assert args.cold or all(res.stats.replayed.values()), res.stats.replayed
            roles = {}
            for rank, name in ROLE.items():
                path = os.path.join(outdir, f"role{rank}.json")
                if not os.path.exists(path):  # the dealer replayed its recorded requests: the
                    # program did not run there (benchmarks/dealer_replay.py times that)
                    roles[name] = {"replayed_not_profiled": True}
                    continue
                with open(path) as fh:
                    roles[name] = json.load(fh)
                if prof:
                    roles[name].update(categorize(os.path.join(outdir, f"role{rank}.pstats")))
            result[label] = {"online_wall_s": max(res.stats.online_s.values()), "dealer_offline_s": res.stats.offline_s,
                             "rounds": res.stats.rounds, "bytes_sent_per_party": res.stats.bytes_sent[0],
                             "dealer_bytes": res.stats.dealer_bytes, "roles": roles}
    result["load_average_1min_before_after"] = [load_before, os.getloadavg()[0]]
    print(json.dumps({k: v for k, v in result.items()}, indent=1)[:20000])
    print(table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
