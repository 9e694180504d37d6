"""End-to-end BERT encoders under 2PC: our runtime, P0, P1 and the dealer as processes.

BERT-base (12 layers, 768, 12 heads, FFN 3072) or BERT-large (24, 1024, 16, 4096) with
random weights, batch 1, the encoder only (hidden states in, hidden states out: no
embeddings and no mask, as in the CrypTen reference run), preset `secformer`. Reports the
median online wall time, online bytes per party, dealer (offline) bytes, rounds, peak memory
per process, a breakdown by layer type, float torch time, LAN/WAN estimates and the max
error of the final hidden states against the float program with the same approximations
(the simulator's fixed-point output is the reference for 2PC agreement).

    python benchmarks/e2e.py --model base --seq 128 --runs 3 --json benchmarks/results/e2e_base_128.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import platform
import statistics
import sys
import time
from collections import defaultdict

import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder

import secformer_compiler as sc
from secformer_compiler.cli import UserError, parse_overrides
from secformer_compiler.cost import NETWORKS, program_cost
from secformer_compiler.runtime.memory import release_free_memory

CONFIGS = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
           "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
           "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)}

ROLE = {0: "P0", 1: "P1", 2: "dealer"}
KINDS = {"linear": "linear", "matmul": "attention matmul", "gelu": "GeLU", "softmax": "softmax",
         "layernorm": "LayerNorm", "embedding": "embedding"}


class Encoder(torch.nn.Module):
    """BERT's encoder stack alone: hidden states (1, S, H) -> last hidden state."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.encoder = BertEncoder(cfg)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.encoder(hidden).last_hidden_state


def git_state() -> dict:
    """The commit and the uncommitted source edits this run used (others edit the tree too)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.split("\n")
        return {"commit": head, "modified_py": [ln[3:] for ln in dirty if ln.endswith(".py") and ln[:2] != "??"]}
    except OSError:
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="base")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (quick runs)")
    ap.add_argument("--preset", default="secformer")
    ap.add_argument("--offline", choices=["stream", "ahead"], default="stream",
                    help="stream: the dealer generates beside the online phase (same cores); "
                         "ahead: its whole offline phase finishes before the online clock")
    ap.add_argument("--trunc", choices=["exact", "local"], default="exact",
                    help="truncation after products: exact (default; one round each) or local "
                         "(SecureML, no round, fails with probability ~|x|/2^63 per element: what "
                         "CrypTen does with 2 parties)")
    ap.add_argument("--override", action="append", default=[], metavar="OP=METHOD",
                    help="per-op approximation override, e.g. gelu=gelu.secformer_erf (the paper's "
                         "erf-series GeLU; repeatable)")
    ap.add_argument("--fewer-rounds", action="store_true",
                    help="compile(fewer_rounds=True): LayerNorms fold their gain into the linear layers "
                         "after them and compute those, one round fewer each, and GeLU's tests by lookup: "
                         "fewer rounds for more bytes and CPU (passes/rounds.py)")
    ap.add_argument("--no-table-seeds", dest="table_seeds", action="store_false",
                    help="compile(table_seeds=False): 2Quad's division and LayerNorm's 1/sqrt by "
                         "Goldschmidt's iterations only, no lookup-table seed (what every run before "
                         "2026-11-27 21:00 UTC measured)")
    ap.add_argument("--gelu-lookup", action="store_true",
                    help="compile(gelu_lookup=True): GeLU's segment tests by one table lookup (2 rounds)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        overrides = parse_overrides(args.override)
    except UserError as e:
        ap.error(str(e))
    load_before = os.getloadavg()  # the machine is shared: record how busy it was
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    conf = dict(CONFIGS[args.model], **({"num_hidden_layers": args.layers} if args.layers else {}))
    cfg = BertConfig(**conf, attn_implementation="eager")
    model = Encoder(cfg).eval()
    x = torch.randn(1, args.seq, cfg.hidden_size)
    cal = [torch.randn(1, args.seq, cfg.hidden_size) for _ in range(2)]
    t0 = time.perf_counter()
    cm = sc.compile(model, (x,), preset=args.preset, calibration=[(c,) for c in cal], trunc=args.trunc,
                    overrides=overrides or None, fewer_rounds=args.fewer_rounds,
                    table_seeds=args.table_seeds, gelu_lookup=True if args.gelu_lookup else None)
    compile_s = time.perf_counter() - t0
    with torch.no_grad():
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t)
    torch_s = statistics.median(ts)
    with torch.no_grad():
        exact = model(x)
    exact = (exact[0] if isinstance(exact, (tuple, list)) else exact).detach()
    approx_float = None
    try:  # the float program with the same approximations (training view), when available
        from secformer_compiler.training import approximated_module
        with torch.no_grad():
            approx_float = approximated_module(cm.graph)(x)
            approx_float = approx_float[0] if isinstance(approx_float, (tuple, list)) else approx_float
    except Exception as e:  # noqa: BLE001
        print(f"(no float-approximated reference: {e}); using the simulator", file=sys.stderr)
    sim = cm.simulate(x)[0]
    ref = approx_float if approx_float is not None else sim
    # The model owner (this process) keeps only what loading needs from here on: P0, P1 and
    # the dealer share the machine with it, and BERT-large leaves ~1.4 GB of 24 GB spare.
    del model
    gc.collect()
    release_free_memory()
    walls, prepares, results, cpus = [], [], [], []
    with cm.session(processes=True, timeout=1800, offline=args.offline) as sess:
        load = sess.load_stats
        for _ in range(args.runs):
            res = sess.infer(x)
            walls.append(max(res.stats.online_s.values()))
            prepares.append(max(getattr(res.stats, "prepare_s", {}).values(), default=0.0))
            results.append(res)
            cpus.append({ROLE[r]: round(v, 3) for r, v in res.stats.cpu_s.items()}
                        | {f"{ROLE[r]}_online": round(v, 3) for r, v in res.stats.online_cpu_s.items()}
                        | {f"{ROLE[r]}_faults": v for r, v in res.stats.minor_faults.items()})
    res = results[-1]
    st = res.stats
    breakdown = defaultdict(lambda: {"bytes_sent": 0, "rounds": 0})
    for name, row in st.by_tag.items():
        kind = KINDS.get(cm.graph[name].op, "other") if name in cm.graph else "other"
        breakdown[kind]["bytes_sent"] += row["bytes_sent"]
        breakdown[kind]["rounds"] += row["rounds"]
    static = program_cost(cm.graph, args.trunc)
    assert static.rounds == st.rounds and static.bytes_per_party == st.bytes_sent[0], "cost model != counted"
    rec = {
        "model": f"bert-{args.model}", "seq_len": args.seq, "layers": cfg.num_hidden_layers,
        "preset": args.preset, "overrides": overrides, "batch": 1, "runs": args.runs, "offline_mode": args.offline,
        "trunc": args.trunc, "fewer_rounds": args.fewer_rounds, "table_seeds": args.table_seeds,
        "gelu_lookup": bool(args.gelu_lookup or args.fewer_rounds),  # --fewer-rounds implies it
        "wall_s": statistics.median(walls), "wall_s_runs": walls,
        # each party's own input-independent phase (A_i @ F of every linear layer), run before
        # the online clock starts; `secformer party` runs it between requests
        "party_prepare_s": statistics.median(prepares), "party_prepare_s_runs": prepares,
        # each role's process CPU per request (user + system; a party's prepare included,
        # "_online" its online phase alone): on 2 cores the three roles share, this is
        # steadier than wall time and bounds it from below (sum / cores)
        "cpu_s_runs": cpus,
        "offline_s": st.offline_s, "rounds": st.rounds, "bytes_sent_per_party": st.bytes_sent[0],
        "dealer_bytes": st.dealer_bytes, "peak_rss_mib": st.peak_rss_mib,
        "operand_form": {ROLE[r]: v for r, v in st.operand_form.items()},
        # this process: it compiles, simulates and splits the weights (Linux: KiB)
        "parent_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_wall_s": torch_s, "compile_s": compile_s,
        "max_abs_err": float((res.outputs[0] - ref).abs().max()),
        "max_abs_err_vs": "float program with the same approximations" if approx_float is not None else "simulator",
        "max_abs_2pc_minus_simulator": float((res.outputs[0] - sim).abs().max()),
        "max_abs_err_vs_exact_model": float((res.outputs[0] - exact).abs().max()),
        "estimates_s": {k: st.rounds * rtt + st.bytes_sent[0] * 8 / bw for k, (bw, rtt) in NETWORKS.items()},
        "breakdown_by_layer_type": dict(breakdown),
        "load": {"bytes_sent_per_party": load.bytes_sent[0], "rounds": load.rounds},
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "started_utc": started, "git": git_state(), "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "command": " ".join(["python"] + sys.argv),
    }
    print(json.dumps(rec, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([rec], fh, indent=1)


if __name__ == "__main__":
    main()
