"""Run the end-to-end benchmark suite (issue 5) and write benchmarks/RESULTS.md.

One command per suite; every measurement is a separate process (our e2e.py in .venv, or
CrypTen's run_crypten.py in benchmarks/crypten/.venv), run one at a time because the
machine has 2 cores and timings are only meaningful without a second benchmark beside them.
Each job writes its own JSON under benchmarks/results/; this script then merges them into
one record per (model, sequence length, layers) with our figures at the top level and
CrypTen's, under the same keys, in `crypten`, and renders the report and the plots.

    .venv/bin/python benchmarks/run.py --suite quick          # < 5 min smoke run
    .venv/bin/python benchmarks/run.py --suite scaling        # ours: base 32..512, large 128 (*)
    .venv/bin/python benchmarks/run.py --suite crypten        # CrypTen BERT-base seq 128
    .venv/bin/python benchmarks/run.py --suite all --reuse    # run only what has no JSON yet
    .venv/bin/python benchmarks/run.py --report-only          # RESULTS.md from committed JSON

`--suite quick` writes benchmarks/results/e2e_quick.json and benchmarks/results/quick.md;
the other suites write benchmarks/results/e2e_all.json and benchmarks/RESULTS.md, built from
every record of `--suite all` that exists on disk (so running one suite keeps the others'
committed results in the report). `--only base-256` restricts a suite to some jobs.

(*) A run that would not fit in this machine's memory is skipped with a message (the whole
BERT-large needs ~21 GiB at its peak since the weights load in groups; it needed ~40 before).
BERT-large's first 6 layers are measured as well, on both sides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RES = ROOT / "benchmarks" / "results"
OURS_PY = ".venv/bin/python"
CRYPTEN_PY = "benchmarks/crypten/.venv/bin/python"
KEYS = ["wall_s", "rounds", "bytes_sent_per_party", "dealer_bytes", "torch_wall_s", "max_abs_err"]
MIB = 2 ** 20


# Memory a run of ours needs in all (GiB), from BERT-large runs with 2 and 4 layers
# (2026-11-27, weights loaded in groups: compiled.Session._load_weights): each party ~0.7 GiB
# plus 18 bytes per weight (its weight share and the opened W - B, each in the matmul
# kernel's layout), the dealer ~0.6 GiB plus 14 (its split weight masks), the compiling
# parent ~0.5 GiB plus 16 at its peak (simulating the program in the clear). Before the
# grouped loading a party held ~41 bytes per weight at its peak. Under the limbs kernel a
# model this large keeps its shares as compact limbs (runtime/ring.py, compact_limbs): 20
# bytes per weight in a party, 12 in the dealer; whole BERT-large peaked at 7.4 / 7.7 / 4.7
# GB and the parent at 2.9 (2026-11-28), 21 GiB in all, as this estimate gives. Jobs that
# do not fit are skipped rather than run into the OOM killer.
PARAMS_M = {"base": 7.1, "large": 12.6, "tiny": 0.05}  # encoder weights per layer, millions
LAYERS = {"base": 12, "large": 24, "tiny": 2}


def need_gib(model: str, layers: int | None) -> float:
    w = PARAMS_M[model] * (layers or LAYERS[model]) * 1e6
    return 2 * (0.7 + 18 * w / 2 ** 30) + (0.6 + 14 * w / 2 ** 30) + (0.5 + 16 * w / 2 ** 30)


def ours(model: str, seq: int, layers: int | None = None, runs: int = 1, offline: str = "stream",
         trunc: str = "exact", fewer_rounds: bool = False, gelu_lookup: bool = False) -> dict:
    suffix = (f"_l{layers}" if layers else "") + ("_ahead" if offline == "ahead" else "") + \
        ("_local" if trunc == "local" else "") + ("_fewer_rounds" if fewer_rounds else "") + \
        ("_gelu_lookup" if gelu_lookup else "")
    path = f"benchmarks/results/e2e_{model}_{seq}{suffix}.json"
    argv = [OURS_PY, "benchmarks/e2e.py", "--model", model, "--seq", str(seq), "--runs", str(runs)]
    argv += (["--layers", str(layers)] if layers else []) + (["--offline", offline] if offline != "stream" else [])
    argv += (["--trunc", trunc] if trunc != "exact" else []) + (["--fewer-rounds"] if fewer_rounds else [])
    argv += ["--gelu-lookup"] if gelu_lookup else []
    return dict(name=f"{model}-{seq}{suffix.replace('_', '-')}", side="ours", model=model, seq=seq, layers=layers,
                offline=offline, trunc=trunc, fewer_rounds=fewer_rounds, gelu_lookup=gelu_lookup, json=path, argv=argv + ["--json", path], need_gib=need_gib(model, layers))


def crypten(seq: int, layers: int | None = None, kernel: str = "torch", model: str = "base") -> dict:
    # base-128 keeps the file names of the run committed with issue 2's CrypTen baseline
    tag = "" if (seq, layers) == (128, None) else f"_{seq}" + (f"_l{layers}" if layers else "")
    tag += "_colmajor" if kernel == "colmajor" else ""
    path = f"benchmarks/results/crypten_bert_{model}{tag}.json"
    argv = [CRYPTEN_PY, "benchmarks/crypten/run_crypten.py", "--bert", model, "--seq", str(seq)]
    argv += (["--layers", str(layers)] if layers else []) + (["--int64-matmul", kernel] if kernel != "torch" else [])
    return dict(name=f"crypten-{model}-{seq}" + (f"-l{layers}" if layers else "") + f"-{kernel}", side="crypten",
                model=model, seq=seq, layers=layers, kernel=kernel, json=path, argv=argv + ["--json", path])


# BERT-base seq 128 runs 3 requests per session: the first records the offline passes (the
# dealer runs the program on meta tensors, each party its prepare), the later ones replay them
# (engine.plan_key), so the median is a steady-state request; wall_s_runs keeps the first.
# BERT-large runs whole (24 layers) since 2026-11-27 15:00 UTC, when loading in groups brought
# its peak under this 23.5 GiB machine (it needed ~40 GiB before); until then its first 6 of 24
# layers were measured and scaled by 4 (every layer is the same), and they still run. Both
# run 3 requests like BERT-base at 128, since they are compared with CrypTen the same way.
SCALING = [ours("base", 32), ours("base", 64), ours("base", 128, runs=3), ours("large", 128, runs=3),
           ours("large", 128, layers=6, runs=3), ours("base", 256), ours("base", 512)]
# colmajor first: it is the fair kernel for the time comparison and takes ~5 min against
# ~12-28 min for CrypTen's as-installed int64 matmul
CRYPTEN = [crypten(128, kernel="colmajor"), crypten(128)]
# The same BERT-base run with the dealer's whole offline phase done before the online clock
# (as on its own host, working ahead of requests): the online time without the dealer's CPU.
OFFLINE = [ours("base", 128, runs=3, offline="ahead")]
# BERT-large on CrypTen: the whole model, and its first 6 layers (the comparison before ours fit)
LARGE = [crypten(128, kernel="colmajor", model="large"), crypten(128, layers=6, kernel="colmajor", model="large")]
# Our runtime with CrypTen's two-party truncation (local, probabilistic; DESIGN "Arithmetic"):
# the rounds our operators need when truncation costs none, as on CrypTen's side.
TRUNC = [ours("base", 128, trunc="local")]
# compile(fewer_rounds=True): LayerNorms fold their gain into the linear layers after them and
# compute those (passes/rounds.py), and GeLU's segment tests are one table lookup: 47 rounds
# fewer on BERT-base for more bytes and dealer traffic. (GeLU's lookup alone,
# e2e_base_128_gelu_lookup.json, was this suite on 2026-11-27 before the fold.)
ROUNDS = [ours("base", 128, runs=3, fewer_rounds=True), ours("large", 128, runs=3, fewer_rounds=True)]
SUITES = {"quick": [ours("base", 32, layers=2), crypten(32, layers=2), ours("tiny", 32)],
          "scaling": SCALING, "crypten": CRYPTEN, "offline": OFFLINE, "large": LARGE, "trunc": TRUNC,
          "rounds": ROUNDS, "all": SCALING + OFFLINE + TRUNC + ROUNDS + CRYPTEN + LARGE}


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def run_job(job: dict) -> bool:
    """Run one job in its own process; its JSON is written by the job itself."""
    if job["side"] == "crypten" and not (ROOT / CRYPTEN_PY).exists():
        print(f"skip {job['name']}: no {CRYPTEN_PY} (bash benchmarks/crypten/setup.sh)", flush=True)
        return False
    mem = _mem_gib() or 0
    if job.get("need_gib", 0) > mem:
        print(f"skip {job['name']}: needs ~{job['need_gib']:.0f} GiB, this machine has {mem} GiB", flush=True)
        return False
    print(f"run {job['name']}: {shlex.join(job['argv'])}  (load {load_avg()})", flush=True)
    t = time.time()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rc = subprocess.call(job["argv"], cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"  {job['name']}: rc {rc}, {time.time() - t:.0f} s  (load {load_avg()})", flush=True)
    if rc == 0 and job["side"] == "crypten":  # run_crypten.py records no date: add it
        recs = read(job)
        for r in recs:
            r.setdefault("started_utc", started)
        (ROOT / job["json"]).write_text(json.dumps(recs, indent=1))
    return rc == 0


def read(job: dict) -> list[dict] | None:
    p = ROOT / job["json"]
    return json.loads(p.read_text()) if p.exists() else None


def _crypten_view(rec: dict, path: str) -> dict:
    """A CrypTen record under our keys, plus what identifies the run."""
    la = rec.get("load_average_1_5_15min_before_after")
    out = {k: rec.get(k) for k in KEYS}
    out.update(config=rec["config"], provider=rec.get("provider"), int64_matmul=rec.get("int64_matmul", "torch"),
               runs=rec.get("runs"), max_abs_err_vs_exact=rec.get("max_abs_err_vs_exact"),
               breakdown_party0=rec.get("breakdown_party0"), command=rec.get("command"),
               started_utc=rec.get("started_utc"), json=path,
               load_average_1min_before_after=[la[0][0], la[1][0]] if la else None)
    return out


def combine(jobs: list[dict]) -> list[dict]:
    """One record per (model, seq, layers): ours at the top level, CrypTen's in `crypten`."""
    recs: dict[tuple, dict] = {}
    for job in jobs:
        data = read(job)
        if not data:
            continue
        key = (f"bert-{job['model']}", job["seq"], job["layers"])
        rec = recs.setdefault(key, {"model": key[0], "seq_len": key[1], "layers_override": key[2]})
        if job.get("offline") == "ahead":  # beside the default (streamed) record, not instead
            rec["ours_ahead"] = data[-1]
            continue
        if job.get("trunc", "exact") != "exact":
            rec["ours_local_trunc"] = data[-1]
            continue
        if job.get("fewer_rounds"):
            rec["ours_fewer_rounds"] = data[-1]
            continue
        if job.get("gelu_lookup"):
            rec["ours_gelu_lookup"] = data[-1]
            continue
        if job["side"] == "ours":
            r = data[-1]
            rec.update({k: r.get(k) for k in KEYS})
            rec["ours"] = r
            rec["command"] = r["command"]
        else:
            for r in data:  # one record per configuration (secformer, crypten)
                name = r["config"] + ("" if r.get("int64_matmul", "torch") == "torch" else "_" + r["int64_matmul"])
                rec.setdefault("crypten", {})[name] = _crypten_view(r, job["json"])
    order = ["secformer", "crypten", "secformer_colmajor", "crypten_colmajor"]
    for rec in recs.values():  # a fixed column order, whichever run came first
        if "crypten" in rec:
            rec["crypten"] = dict(sorted(rec["crypten"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9))
    return list(recs.values())


def machine() -> dict:
    import torch
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": _cpu_name(), "cpu_family_model": _cpu_family_model(), "avx512": _has_avx512(),
            "torch": torch.__version__, "memory_gib": _mem_gib(),
            "load_average_1_5_15min_now": list(os.getloadavg())}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cpu_field(name: str) -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_family_model() -> str | None:
    """"family F model M": which core generation (the host can change between sessions)."""
    fam, mod = _cpu_field("cpu family"), _cpu_field("model")
    return f"family {fam} model {mod}" if fam and mod else None


def _has_avx512() -> bool:
    return "avx512f" in (_cpu_field("flags") or "").split()


def _mem_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------- report

def fmt_s(x): return "" if x is None else f"{x:,.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"
def fmt_mib(b): return "" if b is None else f"{b / MIB:,.1f}"
def ratio(a, b): return a / b if a is not None and b else None


def _get(recs, model, seq, layers=None):
    return next((r for r in recs if r["model"] == model and r["seq_len"] == seq and r["layers_override"] == layers), None)


# Earlier measurements kept beside the current ones (same configuration, another day), so
# that time ratios can be taken between runs made on the same day under similar load.
EARLIER = {"ours": ["benchmarks/results/e2e_base_128_2026-11-25.json"],
           "crypten": ["benchmarks/results/crypten_bert_base_colmajor_2026-11-25.json"]}


def same_day(b: dict) -> dict[str, dict]:
    """BERT-base seq 128, ours and CrypTen, current and earlier runs, grouped by day."""
    ours = [b["ours"]] + [json.loads((ROOT / p).read_text())[-1] for p in EARLIER["ours"] if (ROOT / p).exists()]
    crs = list(b.get("crypten", {}).values())
    for p in EARLIER["crypten"]:
        if (ROOT / p).exists():
            crs += [_crypten_view(r, p) for r in json.loads((ROOT / p).read_text())]
    days: dict[str, dict] = {}
    for o in ours:
        days.setdefault((o.get("started_utc") or "2026-11-25")[:10], {"ours": o, "crypten": {}})
    for c in crs:
        day = _near(c, days) or _cdate(c)
        if day in days:
            days[day]["crypten"][c["config"] + ("" if c["int64_matmul"] == "torch" else "_" + c["int64_matmul"])] = c
    return dict(sorted(days.items()))


def _near(c: dict, days: dict[str, dict], hours: float = 3.0) -> str | None:
    """The day of the ours run started within `hours` of CrypTen run `c` (a series may cross
    midnight), or None."""
    def t(r):
        try:
            return datetime.datetime.fromisoformat(r["started_utc"])
        except (KeyError, TypeError, ValueError):
            return None
    tc = t(c)
    for day, d in days.items():
        to = t(d["ours"])
        if tc and to and abs((tc - to).total_seconds()) <= hours * 3600:
            return day
    return None


def _cdate(c: dict) -> str:
    return (c.get("started_utc") or "2026-11-25")[:10]  # CrypTen records before run.py have no date


def _date(r: dict) -> str:
    if "ours" in r and r["ours"].get("started_utc"):
        return r["ours"]["started_utc"][:10]
    return "2026-11-25 (earlier run)"


def large_128(recs: list[dict]) -> tuple[dict, float, str] | None:
    """BERT-large at seq 128: the whole model if measured, else 6 of its 24 layers x 4."""
    full = _get(recs, "bert-large", 128)
    if full and "ours" in full:
        return full, 1.0, "measured"
    part = _get(recs, "bert-large", 128, 6)
    if part and "ours" in part:
        return part, 4.0, "6 of 24 layers measured, x4"
    return None


def plots(recs: list[dict]) -> list[str]:
    """scaling_seq.png and base_vs_large.png; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    base = sorted((r for r in recs if r["model"] == "bert-base" and r["layers_override"] is None and "ours" in r),
                  key=lambda r: r["seq_len"])
    if len(base) >= 2:
        seqs = [r["seq_len"] for r in base]
        fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
        ax[0].plot(seqs, [r["wall_s"] for r in base], "o-", label="ours, 2PC online wall")
        ax[0].plot(seqs, [r["torch_wall_s"] for r in base], "^:", label="float torch, 1 thread")
        ax[1].plot(seqs, [r["bytes_sent_per_party"] / MIB for r in base], "o-", label="ours, online sent per party")
        ax[1].plot(seqs, [r["dealer_bytes"] / MIB for r in base], "s--", label="ours, dealer (offline)")
        ax[2].plot(seqs, [r["rounds"] for r in base], "o-", label="ours")
        c = _get(recs, "bert-base", 128)
        for name, style in (("secformer", "rx"), ("secformer_colmajor", "m+"), ("crypten", "kD")):
            cr = (c or {}).get("crypten", {}).get(name)
            if cr:
                lab = f"CrypTen ({name.replace('_', ', ')})"
                ax[0].plot([128], [cr["wall_s"]], style, ms=9, label=lab)
                if not name.endswith("colmajor"):
                    ax[1].plot([128], [cr["bytes_sent_per_party"] / MIB], style, ms=9, label=lab)
                    ax[2].plot([128], [cr["rounds"]], style, ms=9, label=lab)
        for a, t, yl in zip(ax, ["time", "bytes", "rounds"], ["seconds", "MiB", "rounds"]):
            a.set_xscale("log", base=2)
            a.set_xticks(seqs, [str(s) for s in seqs])
            a.set_xlabel("sequence length")
            a.set_ylabel(yl)
            a.set_title(f"BERT-base, {t}")
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        ax[0].set_yscale("log")
        ax[0].legend(fontsize=7, loc="center right")  # the upper left holds the CrypTen points
        dates = sorted({_date(r)[:10] for r in base})
        if len(dates) > 1:  # the points were measured on different days, under different loads
            ax[0].annotate("measured on " + ", ".join(f"{d}: seq " + ", ".join(str(r["seq_len"]) for r in base
                                                                           if _date(r)[:10] == d) for d in dates),
                           (0.02, 0.02), xycoords="axes fraction", fontsize=7)
        ax[1].set_yscale("log")
        ax[2].set_ylim(0, None)
        fig.tight_layout()
        fig.savefig(RES / "scaling_seq.png", dpi=110)
        plt.close(fig)
        written.append("scaling_seq.png")
    b, lg = _get(recs, "bert-base", 128), large_128(recs)
    if b and lg and "ours" in b:
        l, k_l, how = lg
        fig, ax = plt.subplots(1, 4, figsize=(14, 3.8))
        rows = [("online wall s", "wall_s", 1), ("MiB sent / party", "bytes_sent_per_party", MIB),
                ("dealer MiB", "dealer_bytes", MIB), ("rounds", "rounds", 1)]
        for a, (t, k, div) in zip(ax, rows):
            vals = [b[k] / div, l[k] * k_l / div]
            bars = a.bar(["base", "large"], vals, color=["tab:blue", "tab:orange"])
            a.bar_label(bars, [f"{v:,.0f}" for v in vals], fontsize=8)
            a.set_title(f"{t} (x{vals[1] / vals[0]:.2f})", fontsize=9)
            a.grid(axis="y", alpha=0.3)
        tb, tl = (b.get("ours") or {}).get("started_utc") or "?", (l.get("ours") or {}).get("started_utc") or "?"
        when = "" if tb[:13] == tl[:13] else (f"; base started {tb[:16]}, large {tl[:16]}: times from different "
                                              "runs (maybe hosts) are not comparable")
        fig.suptitle(f"BERT-base vs BERT-large ({how}), seq 128, ours (2PC, 3 processes){when}", fontsize=9)
        fig.tight_layout()
        fig.savefig(RES / "base_vs_large.png", dpi=110)
        plt.close(fig)
        written.append("base_vs_large.png")
    return written


def summary(recs: list[dict], title: str) -> list[str]:
    """The headline numbers, each with the run it comes from."""
    if "quick" in title.lower():
        return []
    b = _get(recs, "bert-base", 128)
    if not b or "ours" not in b:
        return []
    L = ["## Summary", "",
         f"- **BERT-base, seq 128, ours** (`e2e_base_128.json`, {_date(b)}): {fmt_s(b['wall_s'])} s online, "
         f"{b['rounds']} rounds, {fmt_mib(b['bytes_sent_per_party'])} MiB sent per party, "
         f"{fmt_mib(b['dealer_bytes'])} MiB from the dealer, max error {b['max_abs_err']:.4f} against the float "
         f"model with the same approximations (float torch: {fmt_s(b['torch_wall_s'])} s)."]
    sf = b.get("crypten", {}).get("secformer")
    if sf:
        ld = b["ours"]["load"]["bytes_sent_per_party"]
        L.append(f"- **Against CrypTen-SecFormer**: bytes x{b['bytes_sent_per_party'] / sf['bytes_sent_per_party']:.3f} "
                 f"per inference of a session, x{(b['bytes_sent_per_party'] + ld) / sf['bytes_sent_per_party']:.2f} for a single "
                 f"inference with our one-time weight load (goal ≤ 0.2), rounds x{b['rounds'] / sf['rounds']:.2f} (goal ≤ 0.33"
                 + (f"; x{b['ours_fewer_rounds']['rounds'] / sf['rounds']:.3f} with `fewer_rounds=True`, whose time is "
                    f"{fmt_s(b['ours_fewer_rounds']['wall_s'])} s" if b.get("ours_fewer_rounds") else "")
                 + "), time (goal ≤ 0.2), ours / CrypTen "
                 "measured on the same day: " + "; ".join(
                     f"x{d['ours']['wall_s'] / c['wall_s']:.2f} on {day} ({'column-major' if 'colmajor' in n else 'as-installed'} "
                     f"int64 matmul: {fmt_s(d['ours']['wall_s'])} s against {fmt_s(c['wall_s'])} s)"
                     for day, d in same_day(b).items() for n, c in d["crypten"].items() if n.startswith("secformer"))
                 + _ahead_summary(b) + ".")
    base = sorted((r for r in recs if r["model"] == "bert-base" and r["layers_override"] is None and "ours" in r),
                  key=lambda r: r["seq_len"])
    if len(base) > 1:
        L.append("- **Scaling, BERT-base** (online wall s / MiB per party): "
                 + ", ".join(f"seq {r['seq_len']}: {fmt_s(r['wall_s'])}{'*' if r['ours'].get('party_prepare_s') else ''}"
                             f" / {fmt_mib(r['bytes_sent_per_party'])}" for r in base)
                 + "; " + _rounds_by_length(base)
                 + ("; * = measured with the parties' prepare phase (one online ring matmul per linear layer), the "
                    "others before it (two)" if any(r["ours"].get("party_prepare_s") for r in base) else "")
                 + _requests_note(base) + ".")
    lg = large_128(recs)
    if lg:
        ll, k_l, how = lg
        L.append(f"- **BERT-large, seq 128** ({how}, started {(ll['ours'].get('started_utc') or '?')[:16]}): "
                 f"{'≈' if k_l != 1 else ''}{fmt_s(ll['wall_s'] * k_l)} s, "
                 f"{ll['rounds'] * k_l:.0f} rounds, {fmt_mib(ll['bytes_sent_per_party'] * k_l)} MiB per party.")
    prof = RES / "profile_base_l2_128.json"
    if prof.exists():
        pr = json.loads(prof.read_text())
        p0, w = pr["profiled"]["roles"]["P0"], pr["profiled"]["online_wall_s"]
        pc, plain = p0["protocols_cum_s"], pr["plain"]["roles"]
        cpu = {k: v["cpu_s"] for k, v in plain.items() if "cpu_s" in v}
        replay = RES / "dealer_replay.json"  # a steady-state profile's dealer replays: not profiled there
        if "dealer" not in cpu and replay.exists():
            cpu["dealer"] = json.loads(replay.read_text())["replay_cpu_s"]
        ahead = RES / "profile_base_l2_128_ahead.json"  # the parties' own work, no dealer beside them
        how = "default mode"
        if ahead.exists():
            pa = json.loads(ahead.read_text())
            p0, w, pc = pa["profiled"]["roles"]["P0"], pa["profiled"]["online_wall_s"], pa["profiled"]["roles"]["P0"]["protocols_cum_s"]
            how = "`--offline ahead`, so P0's own work"
        L.append(f"- **Where the time goes** (cProfile, BERT-base 2 layers seq 128, {pr['started_utc'][:10]}): in P0 "
                 f"({how}) the linear layers take {pc['mpc_interp.py:_linear'] / w:.0%} of the online wall, GeLU "
                 f"{pc['nonlinear.py:gelu_secformer'] / w:.0%}, openings {p0['cumulative_s']['dist.py:exchange'] / w:.0%}; "
                 + (f"in default mode the dealer uses {cpu['dealer'] / sum(cpu.values()):.0%} of the inference's CPU "
                    f"({'its replayed pass, `dealer_replay.json`' if 'cpu_s' not in plain.get('dealer', {}) else 'its first run'}) "
                    if "dealer" in cpu else "in default mode ") + f"and P1 waited "
                 f"{pr['profiled']['roles']['P1']['cumulative_s'].get('dist.py:recv_blob', 0):.2f} s for it.")
    return L + [""]


def _requests_note(rows: list) -> str:
    """Which rows are medians of several requests of one session and which a first request
    (where the roles record their offline passes; later requests replay them)."""
    n = {r["seq_len"]: len(r["ours"].get("wall_s_runs") or [1]) for r in rows}
    if len(set(n.values())) <= 1:
        return ""
    many = ", ".join(f"seq {k} the median of {v} requests" for k, v in n.items() if v > 1)
    return f"; {many} (the first of a session records the offline passes, later ones replay them), the others a first request"


# BERT-base seq 128 before each party computed A_i @ F ahead (two ring matmuls per linear
# layer online): kept to show what that change did, measured the same day.
BEFORE_PREPARE = "benchmarks/results/e2e_base_128_2026-11-26_before_prepare.json"


def offline_section(b: dict, cr: dict) -> list[str]:
    """Online against offline work: the effect of the parties' and the dealer's work-ahead."""
    rows = []
    p = ROOT / BEFORE_PREPARE
    if p.exists():
        rows.append(("two ring matmuls per linear layer online (before)", json.loads(p.read_text())[-1]))
    if b["ours"].get("party_prepare_s") is not None:
        rows.append(("A_i @ F prepared, dealer streaming beside the online phase (default)", b["ours"]))
    if b.get("ours_ahead"):
        rows.append(("A_i @ F prepared, dealer finished before the online phase (`--offline ahead`)", b["ours_ahead"]))
    if len(rows) < 2:
        return []
    col = cr.get("secformer_colmajor")
    L = ["### Online and offline work (BERT-base, seq 128)", "",
         "A linear layer with a fixed weight W computes X @ W = E @ W + A @ F + A @ B, where E = X - A is "
         "opened online, F = W - B was opened when the weights were loaded, and A is a fresh mask. A does not "
         "depend on the input, so each party computes its share of A @ F before the request arrives (its "
         "*prepare* phase, `runtime/engine.py` `Role.prepare`) and does one ring matmul online instead of "
         "two. `secformer party` prepares between requests; `e2e.py` runs it before starting the online "
         "clock and reports it separately. Bytes and rounds do not change.", "",
         "| run | date | online wall s | party prepare s | dealer s | rounds | MiB / party | ratio to CrypTen-SecFormer colmajor (online) | (online + prepare) |",
         "|---|---|---|---|---|---|---|---|---|"]
    earlier = ROOT / "benchmarks/results/crypten_bert_base_colmajor_2026-11-26_0208.json"
    paired = {}
    if earlier.exists():  # the CrypTen run made beside the "before" run, 15 min apart
        paired[rows[0][0]] = next((_crypten_view(r, str(earlier.relative_to(ROOT)))
                                   for r in json.loads(earlier.read_text()) if r["config"] == "secformer"), None)
    beside = ROOT / "benchmarks/results/crypten_bert_base_colmajor_2026-11-26_0751.json"
    if beside.exists() and len(rows) > 1 and (rows[1][1].get("started_utc") or "").startswith("2026-11-26T07"):
        # the default-mode run of 07:14 and the CrypTen run of 07:51 were made at the same load
        paired[rows[1][0]] = next((_crypten_view(r, str(beside.relative_to(ROOT)))
                                   for r in json.loads(beside.read_text()) if r["config"] == "secformer"), None)
    for label, o in rows:
        prep = o.get("party_prepare_s")
        c = paired.get(label) or (col if col and _cdate(col) == (o.get("started_utc") or "")[:10] else None)
        r1 = f"{o['wall_s'] / c['wall_s']:.3f}" if c else "(no same-day CrypTen run)"
        r2 = f"{(o['wall_s'] + (prep or 0)) / c['wall_s']:.3f}" if c else ""
        la = o.get("load_average_1min_before_after")
        L.append(f"| {label} | {(o.get('started_utc') or '')[:16]} (load {la[0]:.1f} / {la[1]:.1f}) | {fmt_s(o['wall_s'])} | "
                 f"{fmt_s(prep) if prep else '0 (none)'} | {fmt_s(o.get('offline_s'))} | {o['rounds']} | "
                 f"{fmt_mib(o['bytes_sent_per_party'])} | {r1} | {r2} |")
    if paired.get(rows[0][0]) and len(rows) > 1:
        c0 = paired[rows[0][0]]
        L += ["", f"The first row is paired with the CrypTen run made beside it ({fmt_s(c0['wall_s'])} s, "
              f"`{os.path.basename(c0['json'])}`, started {c0.get('started_utc')})"
              + (f"; the second with the one made beside it ({fmt_s(paired[rows[1][0]]['wall_s'])} s, "
                 f"`{os.path.basename(paired[rows[1][0]]['json'])}`, started {paired[rows[1][0]].get('started_utc')})"
                 if paired.get(rows[1][0]) else "") + "; the others with this one:"]
    if col:
        L += ["", f"CrypTen-SecFormer (column-major int64 matmul) in the same period: {fmt_s(col['wall_s'])} s "
              f"(`{os.path.basename(col['json'])}`, started {col.get('started_utc')}). CrypTen with TFP makes its "
              "Beaver triples inside its run, so its time holds its offline work too. The all-inclusive comparison "
              "on this machine is the default row's `online + prepare`: its online phase ran with our dealer "
              "generating beside it on the same 2 cores, and the prepare phase ran before it. The `ahead` row's "
              "online ratio is the online phase alone, with all input-independent work (dealer and prepare) "
              "done before the request, as in an offline/online deployment."]
    return L + [""]


def _ahead_summary(b: dict) -> str:
    """The online phase alone (`--offline ahead`) against the CrypTen column-major run of its day."""
    a, c = b.get("ours_ahead"), (b.get("crypten") or {}).get("secformer_colmajor")
    if not a or not c or _cdate(c) != (a.get("started_utc") or "")[:10]:
        return ""
    return (f"; the online phase alone (`--offline ahead`, dealer and prepare done before the request): "
            f"x{a['wall_s'] / c['wall_s']:.3f} ({fmt_s(a['wall_s'])} s against {fmt_s(c['wall_s'])} s)")


def _rounds_by_length(base: list[dict]) -> str:
    """'rounds R at every length', or each length's rounds when runs of different code are mixed."""
    rounds = {r["rounds"] for r in base}
    if len(rounds) == 1:
        return f"rounds {rounds.pop()} at every length"
    return "rounds " + ", ".join(f"{r['rounds']} (seq {r['seq_len']})" for r in base)


def committed_pairs() -> list[tuple[str, float, float, float | None, float | None]]:
    """Every committed same-series pair of BERT-base seq 128 (`results/series_*/` folders that
    hold ours and CrypTen-SecFormer column-major): (folder, ours default s, CrypTen s, ours
    ahead s or None, ours fewer_rounds s or None). The goal rows quote them all, not only the
    latest pair: CrypTen's own time moves by a third between runs on this shared host."""
    def first(path):
        if not path.exists():
            return None
        v = json.loads(path.read_text())
        return v[0] if isinstance(v, list) else v

    out = []
    for d in sorted(RES.glob("series_*")):
        try:
            o, c = first(d / "e2e_base_128.json"), first(d / "crypten_bert_base_colmajor.json")
            if not (o and c):
                continue
            a, fr = first(d / "e2e_base_128_ahead.json"), first(d / "e2e_base_128_fewer_rounds.json")
            if o.get("model") != "bert-base" or o.get("layers") != 12 or o.get("seq_len") != 128:
                continue
            out.append((o.get("started_utc") or "", d.name, float(o["wall_s"]), float(c["wall_s"]),
                        float(a["wall_s"]) if a else None, float(fr["wall_s"]) if fr else None))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue  # an incomplete folder is not a pair
    return [row[1:] for row in sorted(out)]  # in the order they were measured


def pairs_rows(last: int = 8) -> list[str]:
    """The goals table's row of the last `last` committed pairs (`committed_pairs`)."""
    pairs = committed_pairs()[-last:]
    if not pairs:
        return []
    cells = "; ".join(f"{n.replace('series_', '')}: {o / c:.3f}" + (f" / {a / c:.3f}" if a else "")
                      + (f" / fewer rounds {fr / c:.3f}" if fr else "") for n, o, c, a, fr in pairs)
    met = sum(o / c <= 0.2 for _, o, c, _, _ in pairs)
    with_ahead = [(c, a) for _, _, c, a, _ in pairs if a]
    met_ahead = sum(a / c <= 0.2 for c, a in with_ahead)
    with_fr = [(c, fr) for _, _, c, _, fr in pairs if fr]
    met_fr = f"; fewer_rounds: {sum(fr / c <= 0.2 for c, fr in with_fr)} of {len(with_fr)} met" if with_fr else ""
    return [f"| time, the last {len(pairs)} committed same-series pairs (`results/series_*/`, ratio default / "
            f"ahead, where run) | {cells} | default: {met} of {len(pairs)} met; ahead: {met_ahead} of "
            f"{len(with_ahead)} met{met_fr} |"]


def ok(cond: bool) -> str:
    """A goal's status cell."""
    return "**met**" if cond else "**missed**"


def fewer_rounds_row(fr: dict, c: dict, c_time: dict | None = None) -> str:
    """The goals table's row for compile(fewer_rounds=True) against CrypTen-SecFormer `c` (time
    against `c_time`, the column-major kernel's run, where given): all three ratios; a time
    beside a CrypTen run of another hour is only indicative (e2e_notes.md has the pairs)."""
    ct = c_time or c
    rt, rb, rr = fr["wall_s"] / ct["wall_s"], fr["bytes_sent_per_party"] / c["bytes_sent_per_party"], \
        fr["rounds"] / c["rounds"]
    return (f"| compiled with `fewer_rounds=True` (LayerNorms fold their gain into the linear layers after "
            f"them and compute those, GeLU's segment tests by lookup: passes/rounds.py; "
            f"`e2e_{fr.get('model', 'bert-base').replace('bert-', '')}_128_fewer_rounds.json`, started "
            f"{fr.get('started_utc', '?')[:16]}; "
            f"not our default: more bytes, dealer traffic and CPU) | rounds {fr['rounds']} / {c['rounds']} = "
            f"{rr:.3f}; bytes {fmt_mib(fr['bytes_sent_per_party'])} MiB ({rb:.3f}), dealer "
            f"{fmt_mib(fr['dealer_bytes'])} MiB; time {fmt_s(fr['wall_s'])} s / {fmt_s(ct['wall_s'])} s = {rt:.3f}; "
            f"err {fr['max_abs_err']:.4g} | rounds {ok(rr <= 1 / 3)}, bytes {ok(rb <= 0.2)}, time {ok(rt <= 0.2)} |")


def large_goal_row(recs: list[dict]) -> str:
    """The goals table's BERT-large row: ours / CrypTen-SecFormer on the whole model if both
    sides ran it, else on the same first 6 layers, if run."""
    full = _get(recs, "bert-large", 128)
    c_full = (full or {}).get("crypten", {}).get("secformer_colmajor")
    if full and "ours" in full and c_full:
        part, c, what = full, c_full, "the whole model, 24 layers"
    else:
        part = _get(recs, "bert-large", 128, 6)
        c, what = (part or {}).get("crypten", {}).get("secformer_colmajor"), "its first 6 of 24 layers on both sides"
    if not part or "ours" not in part or not c:
        return "| BERT-large in proportion | no CrypTen BERT-large run (ours only, below) | **not measured** |"
    rt, rb, rr = (part["wall_s"] / c["wall_s"], part["bytes_sent_per_party"] / c["bytes_sent_per_party"],
                  part["rounds"] / c["rounds"])
    extra = ("\n" + fewer_rounds_row(part["ours_fewer_rounds"], c)) if part.get("ours_fewer_rounds") else ""
    return (f"| BERT-large in proportion ({what}, seq 128; CrypTen column-major) | "
            f"time {fmt_s(part['wall_s'])} s / {fmt_s(c['wall_s'])} s = {rt:.3f}; bytes {rb:.3f}; rounds "
            f"{part['rounds']} / {c['rounds']} = {rr:.3f}; err {part['max_abs_err']:.4f} | "
            f"time {'met' if rt <= 0.2 else 'missed'}, bytes {'met' if rb <= 0.2 else 'missed'}, rounds "
            f"{'met' if rr <= 1 / 3 else 'missed'}, error {'met' if part['max_abs_err'] <= 0.05 else 'missed'} |"
            + extra)


def report(recs: list[dict], mach: dict, cmd: str, pngs: list[str], title: str) -> str:
    from secformer_compiler.cost import NETWORKS
    L = [f"# {title}", "",
         f"Generated by `{cmd}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
         "from the JSON files under `benchmarks/results/` (each record holds its own command, start date "
         "and the 1-minute load average before and after it; "
         f"`{'e2e_quick.json' if 'quick' in title.lower() else 'e2e_all.json'}` merges them).", "",
         *summary(recs, title),
         "## Machine", "",
         f"{mach['cpu_count']} cores ({mach['processor']}), {mach['memory_gib']} GiB, {mach['platform']}, "
         f"Python {mach['python']}, torch {mach['torch']}. One torch thread per party process; P0, P1 and the "
         "dealer (ours) or the two CrypTen parties are processes on this machine talking over loopback (gloo). "
         f"CPU {mach.get('cpu_family_model') or '?'}"
         f"{', AVX-512' if mach.get('avx512') else ''}. "
         "**The host changed between sessions**: every run up to 2026-11-26 22:03 UTC was on an AMD EPYC "
         "of family 23 model 1 (Zen 1: no AVX-512, 128-bit FMA units), every run from 2026-11-26 23:41 on "
         "an AMD EPYC of family 25 model 17 (Zen 4, AVX-512), and every run from 2026-11-27 23:36 on an AMD "
         "EPYC of family 25 model 1 (Zen 3: AVX2, no AVX-512). CrypTen-SecFormer's BERT-base run went from "
         "99.1-112.6 s to 35.9 s (its int64 matmuls gain most from AVX-512), ours less (ahead mode: 20.3 s "
         "to 8.1 s), and on the third host to 168.1 s against our 17.7 s, so time ratios of different hosts "
         "must not be compared; `results/e2e_notes.md` (ninth and twenty-fourth series) has them. **The 2 cores are shared** with other jobs: the 2026-11-25 runs had a 1-minute "
         "load average of 3 to 10, the 2026-11-26 runs up to 13:00 UTC 4 to 7; the later series had the "
         "machine to themselves (load 1.0 to 2.6: their own 2 or 3 processes). Load slows CrypTen more than "
         "ours, and so does a slow spell of the shared host that the load average does not show, so only "
         "same-time pairs give a time ratio. Bytes and rounds are deterministic (ours: asserted equal to the "
         "static cost model in every run).", "",
         "## Reproduce", "",
         "```bash",
         "bash benchmarks/crypten/setup.sh                      # CrypTen 0.4.1 in its own venv (once)",
         ".venv/bin/python benchmarks/run.py --suite quick      # < 5 min: BERT-base 2 layers seq 32, both sides; tiny",
         ".venv/bin/python benchmarks/run.py --suite all        # scaling (ours) + CrypTen BERT-base seq 128",
         ".venv/bin/python benchmarks/run.py --report-only      # RESULTS.md and the plots from the JSON",
         "```", "",
         "Each record was produced by one of these commands (run by `run.py`, one at a time):", ""]
    for r in recs:
        if "ours" in r:
            L.append(f"- `{r['command']}` (started {r['ours'].get('started_utc') or _date(r)})")
        for c in {c["command"]: c for c in r.get("crypten", {}).values()}.values():  # one run, two configs
            la = c["load_average_1min_before_after"]
            where = "" if c["json"] in c["command"] else f", copied to `{c['json']}`"
            L.append(f"- `{c['command']}` (CrypTen, both configurations{where}; started "
                     f"{c['started_utc'] or '2026-11-25 (earlier run)'}, load {la[0]:.1f} / {la[1]:.1f} before / after)")
    for prof in (RES / "profile_base_l2_128.json", RES / "profile_base_l2_128_ahead.json"):
        if prof.exists() and "quick" not in title.lower():
            p = json.loads(prof.read_text())
            L.append(f"- `{p['command']}` (profile; started {p['started_utc']})")
    L.append("")

    b = _get(recs, "bert-base", 128)
    cr = (b or {}).get("crypten", {})
    if b and cr:
        L += ["## BERT-base, sequence length 128: ours against CrypTen", "",
              "Encoder only (12 layers, 768, 12 heads, FFN 3072), random weights, batch 1, no embeddings and "
              "no mask, preset `secformer`. CrypTen 0.4.1, provider TFP (party 0 makes the Beaver triples: "
              "no dealer traffic), two parties. Ours: `e2e_base_128.json`, "
              f"{len(b['ours']['wall_s_runs'])} runs (median), {_date(b)}; CrypTen: "
              + "; ".join(f"`{os.path.basename(c['json'])}` ({n}), {c['runs']} run, {(c['started_utc'] or _date({}))[:10]}, "
                          f"load {c['load_average_1min_before_after'][0]:.1f} / {c['load_average_1min_before_after'][1]:.1f}"
                          for n, c in cr.items()) + ". "
              "Ours ran 3 processes (P0, P1 and the dealer, concurrently) on the 2 cores, CrypTen 2 (with TFP party 0 "
              "generates the triples itself). `colmajor`: the same CrypTen run with its "
              "int64 matmuls given a column-major second operand (bit-identical results; torch 2.13's "
              "row-major int64 kernel is 3 to 10x slower, see `benchmarks/crypten/README.md`).", "",
              "| | measured | float torch s (load probe) | wall s | rounds | MiB sent / party | dealer MiB | max abs err (same approx.) | time ratio | bytes ratio | rounds ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|",
              f"| **ours** | {_date(b)[:10]} | {fmt_s(b['torch_wall_s'])} | {fmt_s(b['wall_s'])} | {b['rounds']} | {fmt_mib(b['bytes_sent_per_party'])} | "
              f"{fmt_mib(b['dealer_bytes'])} | {b['max_abs_err']:.4f} | | | |"]
        for name, c in cr.items():
            other = "" if _cdate(c) == _date(b)[:10] else " (other day)"
            L.append(f"| CrypTen {name} | {_cdate(c)} | {fmt_s(c['torch_wall_s'])} | {fmt_s(c['wall_s'])} | {c['rounds']} | {fmt_mib(c['bytes_sent_per_party'])} | "
                     f"{fmt_mib(c['dealer_bytes'])} | {c['max_abs_err']:.4f} | "
                     f"{ratio(b['wall_s'], c['wall_s']):.3f}{other} | {ratio(b['bytes_sent_per_party'], c['bytes_sent_per_party']):.3f} | "
                     f"{ratio(b['rounds'], c['rounds']):.3f} |")
        L += ["", "`float torch s`: the exact model in float32, one thread, timed by each run before its 2PC part: "
              "a rough probe of how loaded the machine was. Time ratios between runs of different days mix "
              "different loads; the same-day pairs:", "",
              "| day | CrypTen configuration | CrypTen wall s (probe s) | ours wall s (probe s) | time ratio |",
              "|---|---|---|---|---|"]
        for day, d in same_day(b).items():
            for n, c in d["crypten"].items():
                L.append(f"| {day} | {n} | {fmt_s(c['wall_s'])} ({fmt_s(c['torch_wall_s'])}) | {fmt_s(d['ours']['wall_s'])} "
                         f"({fmt_s(d['ours']['torch_wall_s'])}) | {d['ours']['wall_s'] / c['wall_s']:.3f} |")
        L += ["",
              "Ratios are ours / CrypTen (below 1: ours is cheaper). Our dealer bytes are the correlated randomness "
              "the dealer sends P1 (offline, input-independent); CrypTen's TFP has no dealer, so its 0 is not "
              "comparable (with TTP the TTP would send the Beaver triples).", ""]
        sf, sfc = cr.get("secformer"), cr.get("secformer_colmajor")
        if sf:
            rt, rb, rr = (ratio(b["wall_s"], sf["wall_s"]), ratio(b["bytes_sent_per_party"], sf["bytes_sent_per_party"]),
                          ratio(b["rounds"], sf["rounds"]))
            rtc = ratio(b["wall_s"], sfc["wall_s"]) if sfc else None
            tpairs = {f"{day}, {'colmajor' if 'colmajor' in n else 'as installed'}": (d["ours"]["wall_s"], c["wall_s"])
                      for day, d in same_day(b).items() for n, c in d["crypten"].items() if n.startswith("secformer")}
            bo, bc = b["ours"]["breakdown_by_layer_type"], sf["breakdown_party0"]
            nl_o = sum(bo[k]["rounds"] for k in ("softmax", "LayerNorm", "GeLU"))
            nl_c = sum(bc[k]["rounds"] for k in ("softmax", "layernorm", "gelu"))
            mm_o = bo["linear"]["rounds"] + bo["attention matmul"]["rounds"]
            mm_c = bc["linear"]["rounds"] + bc["attention_matmul"]["rounds"]
            L += ["### The issue's goals (against CrypTen with SecFormer's operators)", "",
                  "| goal | measured | status |", "|---|---|---|",
                  "| time ≤ 1/5 of CrypTen-SecFormer (same-day pairs) | " + "; ".join(
                      f"{k}: {fmt_s(o)} s / {fmt_s(c)} s = {o / c:.3f}" for k, (o, c) in tpairs.items()) + " | "
                  + "; ".join(f"{ok(o / c <= 0.2)} ({k.split(',')[1].strip()})" for k, (o, c) in tpairs.items()) + " |",
                  *([f"| time, online phase alone (dealer and prepare done ahead, `e2e_base_128_ahead.json`) | "
                     f"{fmt_s(b['ours_ahead']['wall_s'])} s / {fmt_s(sfc['wall_s'])} s = {b['ours_ahead']['wall_s'] / sfc['wall_s']:.3f}"
                     f" (CrypTen's time includes its TFP triple generation) | {ok(b['ours_ahead']['wall_s'] / sfc['wall_s'] <= 0.2)} |"]
                    if b.get("ours_ahead") and sfc else []),
                  *pairs_rows(),
                  f"| bytes ≤ 1/5 | per inference of a session: {fmt_mib(b['bytes_sent_per_party'])} MiB / "
                  f"{fmt_mib(sf['bytes_sent_per_party'])} MiB = {rb:.3f}; a single inference with the one-time weight "
                  f"load: ({fmt_mib(b['bytes_sent_per_party'])} + {fmt_mib(b['ours']['load']['bytes_sent_per_party'])}) MiB = "
                  f"{(b['bytes_sent_per_party'] + b['ours']['load']['bytes_sent_per_party']) / sf['bytes_sent_per_party']:.3f} "
                  f"| {ok(rb <= 0.2)} per inference; {ok((b['bytes_sent_per_party'] + b['ours']['load']['bytes_sent_per_party']) / sf['bytes_sent_per_party'] <= 0.2)} with the load |",
                  f"| rounds ≤ 1/3 | {b['rounds']} / {sf['rounds']} = {rr:.3f} | {ok(rr <= 1 / 3)} |",
                  *([f"| rounds, with CrypTen's truncation on our side too (local, probabilistic: `--trunc local`, "
                     f"`e2e_base_128_local.json`; not our default) | {b['ours_local_trunc']['rounds']} / {sf['rounds']} = "
                     f"{b['ours_local_trunc']['rounds'] / sf['rounds']:.3f}; time {fmt_s(b['ours_local_trunc']['wall_s'])} s, "
                     f"err {b['ours_local_trunc']['max_abs_err']:.4g}"
                     + (" (**wrong output**: at least one local truncation failed, as DESIGN.md predicts, "
                        "probability ~|x|/2^63 per element over millions of elements; why exact truncation is our "
                        "default)" if b['ours_local_trunc']['max_abs_err'] > 0.05 else "")
                     + f" | {ok(b['ours_local_trunc']['rounds'] / sf['rounds'] <= 1 / 3)} |"]
                    if b.get("ours_local_trunc") else []),
                  *([fewer_rounds_row(b["ours_fewer_rounds"], sf, sfc)] if b.get("ours_fewer_rounds") else []),
                  *([f"| rounds, compiled with `gelu_lookup=True` (GeLU's segment tests by one table lookup, "
                     f"`e2e_base_128_gelu_lookup.json`; not our default: more bytes and dealer traffic, slower on "
                     f"this host) | {b['ours_gelu_lookup']['rounds']} / {sf['rounds']} = "
                     f"{b['ours_gelu_lookup']['rounds'] / sf['rounds']:.3f}; bytes "
                     f"{fmt_mib(b['ours_gelu_lookup']['bytes_sent_per_party'])} MiB "
                     f"({b['ours_gelu_lookup']['bytes_sent_per_party'] / sf['bytes_sent_per_party']:.3f}), dealer "
                     f"{fmt_mib(b['ours_gelu_lookup']['dealer_bytes'])} MiB; time "
                     f"{fmt_s(b['ours_gelu_lookup']['wall_s'])} s, err {b['ours_gelu_lookup']['max_abs_err']:.4g} | "
                     f"{ok(b['ours_gelu_lookup']['rounds'] / sf['rounds'] <= 1 / 3)} |"]
                    if b.get("ours_gelu_lookup") else []),
                  f"| max error ≤ 0.05 vs the float model with the same approximations | {b['max_abs_err']:.4f} | "
                  f"{ok(b['max_abs_err'] <= 0.05)} |",
                  large_goal_row(recs), "",
                  "The time comparison depends on CrypTen's int64 matmul kernel and on the load. As installed "
                  f"(torch 2.13, row-major) CrypTen's linear layers take {sf['breakdown_party0']['linear']['wall_s'] / sf['wall_s']:.0%} "
                  "of its time. Same-day pairs, with each run's float-torch load probe: "
                  + "; ".join(f"{day}, {n}: ours x{d['ours']['wall_s'] / c['wall_s']:.2f} (probes: ours "
                              f"{fmt_s(d['ours']['torch_wall_s'])} s, CrypTen {fmt_s(c['torch_wall_s'])} s)"
                              for day, d in same_day(b).items() for n, c in d["crypten"].items() if n.startswith("secformer"))
                  + f". Smallest same-day ratio: {min(o / c for o, c in tpairs.values()):.3f} (goal ≤ 0.2; see the "
                  "notes below on the load probes)" + f". Bytes {'meet' if rb <= 0.2 else 'miss'} the goal (GeLU dominates both sides: "
                  f"{fmt_mib(b['ours']['breakdown_by_layer_type']['GeLU']['bytes_sent'])} MiB ours against "
                  f"{fmt_mib(sf['breakdown_party0']['gelu']['bytes_sent'])} MiB on CrypTen-SecFormer's side). "
                  f"Rounds are {rr:.2f}x CrypTen-SecFormer's: the same operator algorithms on both sides fix most "
                  f"rounds (LayerNorm, softmax and GeLU: ours {nl_o} against CrypTen's {nl_c}), and our matmuls take "
                  f"2 rounds (the opening and an exact truncation; 1 where the truncation shares the next op's "
                  f"first round, `secformer_compiler/deferral.py`) where CrypTen's take 1 (with 2 parties it "
                  f"truncates locally, probabilistically): {mm_o} against {mm_c}, see the breakdown (ours counts "
                  "2Quad's reciprocal under the attention matmul by V, which normalizes after its product, "
                  "and a LayerNorm's output is truncated by the linear layers after it: `deferral.py`). Against CrypTen's "
                  f"own functions ({cr['crypten']['rounds']:,} rounds) the ratio is {ratio(b['rounds'], cr['crypten']['rounds']):.2f}."
                  if "crypten" in cr else "", ""]
        L += offline_section(b, cr)
        # breakdown by layer type
        kinds = [("linear", "linear"), ("attention matmul", "attention_matmul"), ("softmax", "softmax"),
                 ("LayerNorm", "layernorm"), ("GeLU", "gelu"), ("other", None)]
        bd = b["ours"]["breakdown_by_layer_type"]
        sfb = cr.get("secformer", next(iter(cr.values())))["breakdown_party0"]
        L += ["## Breakdown by layer type (BERT-base, seq 128)", "",
              "Ours: online bytes sent per party and rounds (counted per IR node; our runtime does not time "
              "layer types, see \"where the time goes\"). CrypTen: party 0's wall s / rounds / MiB.", "",
              "| layer type | ours MiB | ours rounds | " + " | ".join(f"CrypTen {n}: s / rounds / MiB" for n in cr) + " |",
              "|---|---|---|" + "---|" * len(cr)]
        for label, ck in kinds:
            o = bd.get(label, {"bytes_sent": 0, "rounds": 0})
            cells = []
            for c in cr.values():
                x = (c.get("breakdown_party0") or {}).get(ck) if ck else None
                cells.append(f"{fmt_s(x['wall_s'])} / {x['rounds']} / {fmt_mib(x['bytes_sent'])}" if x else "")
            L.append(f"| {label} | {fmt_mib(o['bytes_sent'])} | {o['rounds']} | " + " | ".join(cells) + " |")
        L += ["", "Embeddings are not part of this encoder-only benchmark (on either side); `other` is the "
              "attention score scaling by 1/sqrt(d) (`scale`, one truncation round per layer). Our linear layers send "
              f"{bd['linear']['bytes_sent'] / sfb['linear']['bytes_sent']:.2f}x CrypTen-SecFormer's bytes because the weights are fixed operands: their masked values are opened "
              f"once when the weights are loaded ({fmt_mib(b['ours']['load']['bytes_sent_per_party'])} MiB per party, "
              f"{b['ours']['load']['rounds']} rounds, not counted above), so an inference opens only the activations, "
              "while CrypTen's Beaver matmul opens both operands every time.", ""]
        # LAN / WAN
        L += ["## LAN / WAN estimates (BERT-base, seq 128)", "",
              "`rounds x RTT + bytes sent per party x 8 / bandwidth`, LAN = 1 Gbit/s, 0.5 ms RTT; WAN = "
              "100 Mbit/s, 40 ms RTT. Communication only (add local compute); the same formula for both sides.", "",
              "| | LAN s | WAN s |", "|---|---|---|"]
        est = lambda r, n: r["rounds"] * NETWORKS[n][1] + r["bytes_sent_per_party"] * 8 / NETWORKS[n][0]  # noqa: E731
        L.append(f"| ours | {est(b, 'LAN'):.2f} | {est(b, 'WAN'):.1f} |")
        for name, c in cr.items():
            if not name.endswith("colmajor"):
                L.append(f"| CrypTen {name} | {est(c, 'LAN'):.2f} | {est(c, 'WAN'):.1f} |")
        L.append("")

    scal = sorted((r for r in recs if "ours" in r), key=lambda r: (r["model"], r["seq_len"], r["layers_override"] or 99))
    if scal:
        L += ["## Scaling (ours)" if "quick" not in title.lower() else "## Our runs", "",
              "Preset `secformer`, batch 1, 3 processes on this machine. `wall` = online wall time (median of "
              "`runs`); `dealer s` = the dealer's clock, from receiving the program until P1 took its last "
              "blob of correlated randomness (it posts them at most 256 MiB ahead of what P1 has taken, so "
              "this tracks the online phase rather than the dealer's own work: see \"where the time goes\"); "
              "`err` = max abs error of the final hidden states against the float program with the same "
              "approximations; `vs exact` against the exact float model; `peak RSS` per process P0 / P1 / dealer; "
              "`load` = 1-minute load average before / after the run (2 cores).", "",
              "`prep s` = each party's prepare phase (A_i @ F, before the online clock; empty for runs made "
              "before it existed, whose wall holds two ring matmuls per linear layer).", "",
              "| model | layers | seq | runs | wall s | prep s | dealer s | rounds | MiB sent / party | dealer MiB | torch s | err | vs exact | peak RSS MiB | LAN s | WAN s | load | date |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in scal:
            o = r["ours"]
            rss = " / ".join(f"{v:,.0f}" for v in o["peak_rss_mib"].values())
            la = o.get("load_average_1min_before_after")
            L.append(f"| {r['model']} | {o.get('layers', LAYERS[r['model'][5:]])} | {r['seq_len']} | {len(o['wall_s_runs'])} | {fmt_s(r['wall_s'])} | "
                     f"{fmt_s(o.get('party_prepare_s'))} | {fmt_s(o['offline_s'])} | "
                     f"{r['rounds']} | {fmt_mib(r['bytes_sent_per_party'])} | {fmt_mib(r['dealer_bytes'])} | "
                     f"{fmt_s(r['torch_wall_s'])} | {r['max_abs_err']:.4f} | {o['max_abs_err_vs_exact_model']:.3f} | {rss} | "
                     f"{o['estimates_s']['LAN']:.2f} | {o['estimates_s']['WAN']:.1f} | "
                     + (f"{la[0]:.1f} / {la[1]:.1f}" if la else "not recorded") + f" | {_date(r)} |")
        base = [r for r in scal if r["model"] == "bert-base" and r["layers_override"] is None]
        if len(base) > 1:  # growth per doubling of the sequence length, first to last point
            lo, hi = base[0], base[-1]
            n = math.log2(hi["seq_len"] / lo["seq_len"])
            a, c = base[-2], base[-1]  # a straight line through the last two points, at seq 0
            fixed = a["wall_s"] - (c["wall_s"] - a["wall_s"]) / (c["seq_len"] - a["seq_len"]) * a["seq_len"]
            g = lambda k: (hi[k] / lo[k]) ** (1 / n)  # noqa: E731
            L += ["", f"BERT-base from seq {lo['seq_len']} to {hi['seq_len']}, per doubling of the sequence length: "
                  f"online wall x{g('wall_s'):.2f}, bytes per party x{g('bytes_sent_per_party'):.2f}, dealer bytes "
                  f"x{g('dealer_bytes'):.2f}, float torch x{g('torch_wall_s'):.2f}; " + _rounds_by_length(base) + " (every "
                  "opening covers the whole sequence; rounds differ only between code versions). Bytes grow a little faster than the length because of the "
                  "attention scores (seq²). Time grows slower than bytes: part of it does not grow with the "
                  f"sequence (a straight line through the seq {a['seq_len']} and {c['seq_len']} points meets seq 0 at "
                  f"{fixed:.0f} s; the points were measured under different loads, so this is rough)."]
        bl, lg = _get(recs, "bert-base", 128), large_128(recs)
        if bl and lg:
            ll, k_l, how = lg
            L += ["", f"BERT-large / BERT-base at seq 128 ({how}): "
                  + ", ".join(f"{n} x{ll[k] * k_l / bl[k]:.2f}" for n, k in (("online wall", "wall_s"),
                              ("bytes per party", "bytes_sent_per_party"), ("dealer bytes", "dealer_bytes"), ("rounds", "rounds")))
                  + f" (weights x3.5, layers x2; base measured {_date(bl)[:10]}, large {_date(ll)[:10]})."]
            if k_l != 1:
                L += ["", "The whole BERT-large needs about 40 GiB here (each party holds ~46 bytes per weight: "
                      "13 GiB per party for its 302M encoder weights, plus the dealer and the compiling parent, "
                      "which alone reached 9.9 GiB before it was stopped), more than this 23.5 GiB machine shared "
                      "with another job. Its first 6 layers are measured instead; all 24 layers have the same "
                      "shapes, so bytes, dealer bytes and rounds scale by 4 (up to the LayerNorm variant chosen "
                      "per layer) and time roughly so. The error column is that of the 6-layer model."]
        L.append("")
    side = [r for r in recs if r.get("crypten") and r is not b]  # other side-by-side records (quick suite)
    if side:
        L += ["## Side by side with CrypTen", "", "| model | layers | seq | side | wall s | rounds | MiB / party | dealer MiB | torch s | err |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in side:
            lay = r["layers_override"] or (r.get("ours") or {}).get("layers", "")
            if "ours" in r:
                L.append(f"| {r['model']} | {lay} | {r['seq_len']} | ours | {fmt_s(r['wall_s'])} | {r['rounds']} | "
                         f"{fmt_mib(r['bytes_sent_per_party'])} | {fmt_mib(r['dealer_bytes'])} | {fmt_s(r['torch_wall_s'])} | {r['max_abs_err']:.4f} |")
            for name, c in r.get("crypten", {}).items():
                L.append(f"| {r['model']} | {lay} | {r['seq_len']} | CrypTen {name} | {fmt_s(c['wall_s'])} | {c['rounds']} | "
                         f"{fmt_mib(c['bytes_sent_per_party'])} | {fmt_mib(c['dealer_bytes'])} | {fmt_s(c['torch_wall_s'])} | {c['max_abs_err']:.4f} |")
        L.append("")
    for extra in ("profile_base.md", "e2e_notes.md"):  # hand-written sections about these runs
        if (RES / extra).exists() and "quick" not in title.lower():
            L += [(RES / extra).read_text().strip(), ""]
    L += ["## More", "",
          "- Per-op 2PC cost and error, with CrypTen's figures: [results/ops.md](results/ops.md); CrypTen "
          "baseline details: [crypten/README.md](crypten/README.md).",
          *[f"- Plot: [results/{p}](results/{p})\n\n  ![{p}](results/{p})\n" for p in pngs],
          f"- Merged JSON: `results/{'e2e_quick.json' if 'quick' in title.lower() else 'e2e_all.json'}` "
          "(machine, every record with its command)."]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="all")
    ap.add_argument("--reuse", action="store_true", help="keep existing result JSON instead of re-running")
    ap.add_argument("--report-only", action="store_true", help="run nothing; regenerate from the JSON")
    ap.add_argument("--only", nargs="+", help="job names to run (e.g. base-256 crypten-base-128-torch)")
    args = ap.parse_args()
    os.chdir(ROOT)
    cmd = shlex.join([OURS_PY, "benchmarks/run.py", *sys.argv[1:]])
    jobs = SUITES[args.suite]
    if not args.report_only:
        for job in jobs:
            if args.only and job["name"] not in args.only:
                continue
            if args.reuse and (ROOT / job["json"]).exists():
                print(f"reuse {job['json']}", flush=True)
                continue
            run_job(job)
    quick = args.suite == "quick"
    recs = combine(jobs if quick else SUITES["all"])
    mach = machine()
    out = {"generated_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": cmd, "machine": mach, "keys": KEYS, "records": recs}
    (RES / ("e2e_quick.json" if quick else "e2e_all.json")).write_text(json.dumps(out, indent=1) + "\n")
    pngs = [] if quick else plots(recs)
    md = report(recs, mach, cmd, pngs, "Quick benchmark suite" if quick else "End-to-end benchmark results")
    dest = RES / "quick.md" if quick else ROOT / "benchmarks" / "RESULTS.md"
    if quick:  # links are written relative to benchmarks/; quick.md sits in benchmarks/results/
        md = md.replace("](results/", "](").replace("](crypten/", "](../crypten/")
    dest.write_text(md)
    print(f"wrote {dest.relative_to(ROOT)} and {len(recs)} records", flush=True)


if __name__ == "__main__":
    main()
