"""The dealer's CPU per inference: running the program on meta tensors against replaying its
recorded request list (`runtime.engine.Role.dealer_offline`).

Builds the BERT encoder of `e2e.py` with random weights, loads it into a dealer alone (its
weight masks are real; the parties are not needed: the dealer never receives anything),
then per repeat times one inference's offline pass both ways and checks that both streams
have the same size. Process CPU time, not wall: the machine is shared.

    python benchmarks/dealer_replay.py --layers 2 --seq 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import CONFIGS, Encoder  # noqa: E402

import secformer_compiler as sc  # noqa: E402
from secformer_compiler.mpc_interp import infer_program, load_program  # noqa: E402
from secformer_compiler.runtime.context import DEALER, DEALER_MODE, Context  # noqa: E402
from secformer_compiler.runtime.correlations import DealerCorrelations  # noqa: E402
from secformer_compiler.runtime import memory  # noqa: E402
from secformer_compiler.runtime.engine import Engine  # noqa: E402
from secformer_compiler.runtime.prg import PRG, new_seed  # noqa: E402
from secformer_compiler.runtime.ring import FixedPoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="base")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    memory.configure_for_requests()  # as a serving dealer process is (runtime/launch.py)
    cfg = BertConfig(**dict(CONFIGS[args.model], num_hidden_layers=args.layers), attn_implementation="eager")
    x = torch.randn(1, args.seq, cfg.hidden_size)
    graph = sc.compile(Encoder(cfg).eval(), (x,), preset="secformer", calibration=[(x,)]).graph
    sizes = []
    corr = DealerCorrelations(PRG(new_seed()), PRG(new_seed()), flush=lambda buf: sizes.append(buf.numel()))
    ctx = Context(DEALER, DEALER_MODE, corr, FixedPoint(16), "exact")
    engine = Engine(ctx)
    shares = {k: torch.empty(tuple(w.shape), dtype=torch.int64, device="meta") for k, w in graph.weights.items()}
    engine.run(load_program(ctx, graph, shares))
    corr.take_corrections()
    inputs = {n: torch.empty((1, args.seq, cfg.hidden_size), dtype=torch.int64, device="meta") for n in graph.inputs}

    def stream_bytes() -> int:
        n = sum(sizes) + corr.take_corrections().numel()
        sizes.clear()
        return n

    meta_s, replay_s = [], []
    for _ in range(args.repeats):
        t = time.process_time()
        log = corr.start_recording()
        engine.run(infer_program(ctx, graph, inputs))
        corr.stop_recording()
        n_meta = stream_bytes()
        meta_s.append(time.process_time() - t)
        t = time.process_time()
        corr.replay(log)
        n_replay = stream_bytes()
        replay_s.append(time.process_time() - t)
        assert n_meta == n_replay, "replay streamed a different amount"
    rec = {"model": f"bert-{args.model}", "layers": args.layers, "seq_len": args.seq, "repeats": args.repeats,
           "requests": len(log), "stream_bytes": n_meta,
           "meta_run_cpu_s": statistics.median(meta_s), "replay_cpu_s": statistics.median(replay_s),
           "meta_run_cpu_s_runs": meta_s, "replay_cpu_s_runs": replay_s,
           "load_average_1min": round(os.getloadavg()[0], 2),
           "command": "python benchmarks/dealer_replay.py " + " ".join(sys.argv[1:])}
    print(json.dumps(rec, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
