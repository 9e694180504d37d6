"""all-MiniLM-L6-v2 under real 2PC on SST-2 dev sentences: embedding fidelity per preset.

For each preset, compiles the sentence encoder (mean pooling) calibrated on other SST-2
sentences, runs the first N dev sentences under 2PC (P0, P1 and the dealer as threads),
and reports the mean cosine similarity of the 2PC embeddings with the float model's,
and the simulator's agreement with 2PC.

    python benchmarks/minilm_sst2.py --data ../shared/data/glue/SST-2/dev.tsv --n 16 \\
        --json benchmarks/results/minilm_sst2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

import secformer_compiler as sc
from secformer_compiler.models import load_sentence_encoder

PRESETS = ["secformer-exact-softmax", "secformer", "mpcformer", "crypten", "puma"]


def read_sst2(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh]
    return [r[0] for r in rows[1:] if r and r[0]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="SST-2 dev.tsv")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--simulate-only", action="store_true",
                    help="run the fixed-point simulator only (equal to 2PC up to truncation ulps)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_sentence_encoder()
    sents = read_sst2(args.data)
    test, calib = sents[:args.n], sents[-32:]

    def enc(batch):
        e = tok(batch, padding="max_length", max_length=args.seq_len, truncation=True, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    cal = [enc(calib[i:i + args.batch]) for i in range(0, len(calib), args.batch)]
    records = []
    for preset in args.presets.split(","):
        t0 = time.time()
        try:
            cm = sc.compile(model, cal[0], preset=preset, calibration=cal)
        except Exception as e:  # noqa: BLE001 - a preset may lack a 2PC protocol; report it
            records.append({"preset": preset, "error": f"{type(e).__name__}: {e}"})
            print(f"{preset}: compile failed: {e}", file=sys.stderr)
            continue
        cos_2pc, cos_sim, agree, stats = [], [], [], None
        if args.simulate_only:
            for i in range(0, len(test), args.batch):
                x = enc(test[i:i + args.batch])
                with torch.no_grad():
                    ref = model(**x)
                sim = cm.simulate(**x)[0]
                cos_sim += torch.nn.functional.cosine_similarity(sim, ref).tolist()
            rec = {"preset": preset, "mode": "simulate", "n_sentences": len(cos_sim), "seq_len": args.seq_len,
                   "mean_cosine_sim_vs_float": sum(cos_sim) / len(cos_sim), "min_cosine_sim_vs_float": min(cos_sim),
                   "static_cost_per_batch": cm.cost().as_dict() | {"by_op": None, "by_layer": None},
                   "wall_s": time.time() - t0}
            records.append(rec)
            print(json.dumps(rec))
            continue
        try:
            with cm.session() as sess:
                for i in range(0, len(test), args.batch):
                    x = enc(test[i:i + args.batch])
                    with torch.no_grad():
                        ref = model(**x)
                    res = sess.infer(x)
                    sim = cm.simulate(**x)[0]
                    cos_2pc += torch.nn.functional.cosine_similarity(res.outputs[0], ref).tolist()
                    cos_sim += torch.nn.functional.cosine_similarity(sim, ref).tolist()
                    agree.append(float((res.outputs[0] - sim).abs().max()))
                    stats = res.stats
        except Exception as e:  # noqa: BLE001
            records.append({"preset": preset, "error": f"{type(e).__name__}: {e}"})
            print(f"{preset}: 2PC failed: {e}", file=sys.stderr)
            continue
        rec = {"preset": preset, "mode": "2pc", "n_sentences": len(cos_2pc), "seq_len": args.seq_len, "batch": args.batch,
               "mean_cosine_2pc_vs_float": sum(cos_2pc) / len(cos_2pc), "min_cosine_2pc_vs_float": min(cos_2pc),
               "mean_cosine_sim_vs_float": sum(cos_sim) / len(cos_sim), "max_abs_2pc_minus_sim": max(agree),
               "rounds_per_batch": stats.rounds, "bytes_sent_per_party_per_batch": stats.bytes_sent[0],
               "dealer_bytes_per_batch": stats.dealer_bytes, "wall_s": time.time() - t0}
        records.append(rec)
        print(json.dumps(rec))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(sys.argv), "machine": platform.platform(), "records": records}, fh, indent=1)


if __name__ == "__main__":
    main()
