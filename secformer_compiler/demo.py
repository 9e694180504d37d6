"""One machine, three roles: `secformer run`, `secformer demo`, and the cost tables.

`LocalDeployment` is the real deployment on loopback: it splits the weights into share
files in a temporary folder, writes a parties.toml on free ports and starts three
`secformer party` processes; the client then talks to them exactly as `secformer infer`
does across hosts. The processes die with the launcher (they watch its pid), and the
folder is removed on exit.

Latency estimates use online rounds and the larger party's bytes: a round costs one RTT,
and both parties send at once over a full-duplex link, so
    estimate = rounds * RTT + max(bytes P0, bytes P1) * 8 / bandwidth.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

NETWORKS = {"LAN": (1e9, 0.5e-3), "WAN": (100e6, 40e-3)}  # bandwidth (bit/s), RTT (s)

DEMO_PAIRS = [
    ("A man is playing a guitar.", "Someone is playing an instrument."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("A woman is slicing an onion.", "Stock markets fell sharply today."),
]
DEMO_SEQ_LEN = 12  # the longest demo sentence has 11 tokens with [CLS] and [SEP]
DEMO_PRESET = "secformer-exact-softmax"  # 2Quad needs a distilled model; MiniLM here is not distilled


def estimate(rounds: int, nbytes: int, network: str) -> float:
    bw, rtt = NETWORKS[network]
    return rounds * rtt + nbytes * 8 / bw


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# --- texts -> program inputs ---------------------------------------------------------------------

def encode_texts(art: Any, texts: list[str], truncate: bool = False) -> dict[str, torch.Tensor]:
    """Token ids and attention mask for every text, padded to the compiled sequence length."""
    from .party import PartyError

    tok, L = art.tokenizer(), art.seq_len
    lens = [len(ids) for ids in tok(list(texts), truncation=False)["input_ids"]]
    long = [(i, n) for i, n in enumerate(lens) if n > L]
    if long and not truncate:
        what = "; ".join(f"text {i + 1} has {n} tokens" for i, n in long[:5])
        raise PartyError(f"{what}, but the program was compiled for {L} tokens: pass --truncate to cut "
                         f"(the model then sees only the first {L} tokens), or compile with a larger --seq-len")
    enc = tok(list(texts), padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    names = [spec["name"] for spec in art.manifest["inputs"]]
    missing = [n for n in names if n not in enc]
    if missing:
        raise PartyError(f"the program takes inputs {missing} that the tokenizer does not produce")
    return {n: enc[n] for n in names}


def batches(art: Any, inputs: dict[str, torch.Tensor]) -> list[tuple[dict, int]]:
    """Chunks of the compiled batch size; the last is padded with copies of its first row."""
    B = art.batch
    n = next(iter(inputs.values())).shape[0]
    out = []
    for s in range(0, n, B):
        chunk = {k: v[s:s + B] for k, v in inputs.items()}
        real = next(iter(chunk.values())).shape[0]
        if real < B:
            chunk = {k: torch.cat([v, v[:1].expand(B - real, *v.shape[1:])]) for k, v in chunk.items()}
        out.append((chunk, real))
    return out


def run_texts(client: Any, art: Any, texts: list[str], truncate: bool = False,
              on_progress: Callable[[int, dict], None] | None = None) -> tuple[list[torch.Tensor], dict]:
    """Private inference on texts (as many runs as batches); rows of output 0 and summed stats."""
    rows: list[torch.Tensor] = []
    total: dict[str, dict] = {}
    for k, (chunk, real) in enumerate(batches(art, encode_texts(art, texts, truncate))):
        cb = (lambda done, k=k: on_progress(k, done)) if on_progress else None
        res = client.infer(chunk, cb)
        rows += list(res.outputs[0][:real])
        for role, st in res.stats.items():
            t = total.setdefault(role, {"seconds": 0.0, "bytes_sent": 0, "rounds": 0, "runs": 0})
            t["seconds"] += st["seconds"]
            t["bytes_sent"] += st["bytes_sent"]
            t["rounds"] += st["rounds"]
            t["runs"] += 1
            if st.get("prepare_s") is not None:
                t["prepare_s"] = t.get("prepare_s", 0.0) + st["prepare_s"]
        total.setdefault("client", {"seconds": 0.0})["seconds"] += res.seconds
    return rows, total


def float_rows(art: Any, texts: list[str], truncate: bool = False) -> list[torch.Tensor]:
    """The float model's outputs (the program in float64 with exact nonlinearities)."""
    from . import float_interp

    rows = []
    for chunk, real in batches(art, encode_texts(art, texts, truncate)):
        rows += list(float_interp.run(art.graph, chunk)[0].float()[:real])
    return rows


# --- printing ------------------------------------------------------------------------------------

def _labels(art: Any) -> dict[int, str]:
    return {int(k): v for k, v in (art.manifest.get("labels") or {}).items()}


def format_result(art: Any, texts: list[str], rows: list[torch.Tensor], ref: list[torch.Tensor] | None = None) -> str:
    lines = []
    for i, (t, r) in enumerate(zip(texts, rows)):
        short = t if len(t) <= 60 else t[:57] + "..."
        if art.task == "classification":
            p = torch.softmax(r.double(), -1)
            names = _labels(art)
            lab = names.get(int(p.argmax()), str(int(p.argmax())))
            line = f"{i + 1}. {short!r}\n   2PC:   {lab}  scores " + " ".join(f"{x:.4f}" for x in p.tolist())
            if ref is not None:
                q = torch.softmax(ref[i].double(), -1)
                line += (f"\n   float: {names.get(int(q.argmax()), str(int(q.argmax())))}  scores "
                         + " ".join(f"{x:.4f}" for x in q.tolist()))
        else:
            head = " ".join(f"{x:+.4f}" for x in r[:4].tolist())
            line = f"{i + 1}. {short!r}\n   2PC:   dim {r.numel()}  norm {r.norm():.4f}  [{head} ...]"
            if ref is not None:
                f = ref[i]
                cos = torch.nn.functional.cosine_similarity(r.double(), f.double(), 0)
                fh = " ".join(f"{x:+.4f}" for x in f[:4].tolist())
                line += (f"\n   float: dim {f.numel()}  norm {f.norm():.4f}  [{fh} ...]"
                         f"\n   cosine(2PC, float) {cos:.5f}   max |diff| {(r - f).abs().max():.4f}")
        lines.append(line)
    return "\n".join(lines)


def format_costs(stats: dict, setup: dict | None = None) -> str:
    p0, p1, d = stats["p0"], stats["p1"], stats["dealer"]
    runs = p0.get("runs", 1)
    lines = [f"cost ({runs} inference{'s' if runs > 1 else ''}, measured)      P0            P1",
             f"  time (online; with a streaming dealer, incl. its offline work)\n"
             f"                               {p0['seconds']:>8.2f} s    {p1['seconds']:>8.2f} s",
             f"  bytes sent                   {_mb(p0['bytes_sent']):>10}    {_mb(p1['bytes_sent']):>10}",
             f"  rounds                       {p0['rounds']:>10}    {p1['rounds']:>10}",
             f"  dealer (correlated randomness, offline): {_mb(d['bytes_sent'])} sent, {d['seconds']:.2f} s"]
    if p0.get("prepare_s") is not None and p1.get("prepare_s") is not None:
        lines.insert(2, f"  prepare (each party's A_i @ F, offline, done before the request)\n"
                        f"                               {p0['prepare_s']:>8.2f} s    {p1['prepare_s']:>8.2f} s")
    nbytes = max(p0["bytes_sent"], p1["bytes_sent"])
    for net, (bw, rtt) in NETWORKS.items():
        lines.append(f"  estimated online latency, {net} ({bw / 1e6:g} Mbit/s, {rtt * 1e3:g} ms RTT): "
                     f"{estimate(p0['rounds'], nbytes, net):.2f} s")
    if setup:
        lines.append(f"  setup (once per session, weights opened masked): {_mb(setup['p0']['bytes_sent'])} per party, "
                     f"{setup['p0']['rounds']} round(s)")
    return "\n".join(lines)


# --- the local deployment ---------------------------------------------------------------------------

# One-shot runs: the dealer streams 16 MiB chunks during the run, so P0 and P1 start after the
# first chunk and the offline phase overlaps the online one (measured on the demo: 53 s vs 60 s
# end to end with the dealer working ahead, which only pays when clients arrive later).
LOCAL_EXTRA = "dealer_ahead = false\ndealer_chunk_mb = 16\n"


class LocalDeployment:
    """Share files, a parties.toml on free loopback ports, three `secformer party` processes."""

    def __init__(self, art: Any, workdir: str | Path, threads: int = 1, peer_timeout: float = 120.0,
                 log: Callable[[str], None] | None = None, extra: str = LOCAL_EXTRA) -> None:
        from .artifact import make_shares
        from .party import free_ports, write_config

        self.workdir = Path(workdir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        make_shares(art, self.workdir / "shares")
        self.config = write_config(self.workdir / "parties.toml", Path(art.path).resolve(), self.workdir / "shares",
                                   free_ports(4),
                                   timeouts={"peer": peer_timeout}, threads=threads, extra=extra)
        env = {**os.environ, "SECFORMER_PARENT_PID": str(os.getpid()), "OMP_NUM_THREADS": str(threads)}
        try:
            for role in ("p0", "p1", "dealer"):
                self.logs[role] = self.workdir / f"{role}.log"
                with open(self.logs[role], "wb") as f:
                    self.procs[role] = subprocess.Popen(
                        [sys.executable, "-m", "secformer_compiler.cli", "party", "--role", role,
                         "--config", str(self.config)],
                        stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env)
        except BaseException:
            self.close()
            raise

    def log_tail(self, role: str, n: int = 6) -> str:
        try:
            lines = self.logs[role].read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(ln.strip() for ln in lines[-n:])

    def alive(self, role: str) -> str | None:
        """None while the role's process runs, else why it stopped (exit code and log tail)."""
        p = self.procs.get(role)
        if p is None or p.poll() is None:
            return None
        return f"exit code {p.returncode}: {self.log_tail(role)}"

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        end = time.monotonic() + 5
        for p in self.procs.values():
            try:
                p.wait(max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Bars:
    """A rich progress bar per layer (nodes completed), on stderr."""

    def __init__(self, graph: Any, runs: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .party import layer_groups

        self.groups = layer_groups(graph)
        self.progress = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self.tasks = {g: self.progress.add_task(g, total=n * runs) for g, n in self.groups.items()}
        self.base: dict[int, dict] = {}

    def __enter__(self) -> "_Bars":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, run: int, done: dict) -> None:
        for g, n in done.items():
            if g in self.tasks:
                self.progress.update(self.tasks[g], completed=run * self.groups[g] + n)


def private_run(art: Any, texts: list[str], *, truncate: bool = False, threads: int = 1, timeout: float = 120.0,
                bars: bool = True, log: Callable[[str], None] | None = None) -> tuple[list, dict]:
    """Start the three roles locally, run the texts privately, stop the roles."""
    from .party import Client, load_config

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    encode_texts(art, texts, truncate)  # fail on too-long texts before starting anything
    runs = len(batches(art, encode_texts(art, texts, truncate)))
    with tempfile.TemporaryDirectory(prefix="secformer-run-") as work:
        log("starting P0, P1 and the dealer on loopback (secret-sharing the weights)")
        with LocalDeployment(art, work, threads=threads, peer_timeout=timeout) as dep:
            cfg = load_config(dep.config)
            with Client(cfg, art) as client:
                client.connect(ready_timeout=cfg.startup_timeout, alive=dep.alive)
                log("parties ready; running the private inference")
                if bars:
                    with _Bars(art.graph, runs) as b:
                        rows, stats = run_texts(client, art, texts, truncate, on_progress=b.update)
                else:
                    rows, stats = run_texts(client, art, texts, truncate)
    return rows, stats


def run_command(artifact: Path, texts: list[str], *, truncate: bool, threads: int, timeout: float) -> None:
    from .artifact import load_artifact

    t0 = time.perf_counter()
    art = load_artifact(artifact)
    rows, stats = private_run(art, texts, truncate=truncate, threads=threads, timeout=timeout)
    ref = float_rows(art, texts, truncate)
    print(format_result(art, texts, rows, ref))
    print(format_costs(stats))
    print(f"total {time.perf_counter() - t0:.1f} s")


# --- the demo -----------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("SECFORMER_CACHE") or Path.home() / ".cache" / "secformer")


def source_digest(dirs: Sequence[Path]) -> str:
    """A digest of every .py file under `dirs` (names and contents): part of the demo cache
    key, so that an artifact compiled by other code of the same version (an editable
    checkout between releases) is compiled again instead of reused."""
    h = hashlib.blake2b(digest_size=8)
    for d in sorted({Path(d).resolve() for d in dirs}):
        for f in sorted(d.rglob("*.py")):
            h.update(str(f.relative_to(d)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _package_dirs() -> list[Path]:
    """The compiler's source folders (the passes and the runtime live outside the package
    folder in a checkout: pyproject's package-dir)."""
    from . import passes, runtime
    return [Path(m.__file__).parent for m in (sys.modules[__package__], passes, runtime)]


def demo_artifact(preset: str, log: Callable[[str], None]) -> Any:
    """The compiled all-MiniLM-L6-v2 SentenceEncoder for the demo batch, from the cache or compiled now."""
    from . import __version__
    from .artifact import ArtifactError, load_artifact
    from .cli import compile_checkpoint
    from .models import default_model_path

    src = default_model_path()
    st = (src / "model.safetensors").stat()
    texts = [s for pair in DEMO_PAIRS for s in pair]
    key = (f"all-MiniLM-L6-v2-{preset}-b{len(texts)}-s{DEMO_SEQ_LEN}-v{__version__}-{st.st_size:x}{int(st.st_mtime):x}"
           f"-c{source_digest(_package_dirs())}")
    path = cache_dir() / key
    if path.exists():
        try:
            art = load_artifact(path)
            log(f"using the cached artifact {path}")
            return art
        except ArtifactError as e:
            log(f"cached artifact unusable ({e}); compiling again")
    calib = Path(tempfile.mkstemp(suffix=".txt", prefix="secformer-calib-")[1])
    try:
        from .cli import BUILTIN_SENTENCES

        calib.write_text("\n".join(texts + BUILTIN_SENTENCES[:len(texts)]) + "\n")
        compile_checkpoint(src, path, task="embedding", preset=preset, seq_len=DEMO_SEQ_LEN, batch=len(texts),
                           calibrate=calib, samples=2 * len(texts), force=True, log=log)
    finally:
        calib.unlink(missing_ok=True)
    for old in cache_dir().glob(f"all-MiniLM-L6-v2-{preset}-*"):  # superseded by this one
        if old.is_dir() and old != path:
            shutil.rmtree(old, ignore_errors=True)
            log(f"removed the superseded cached artifact {old}")
    return load_artifact(path)


def run_demo(threads: int = 1, preset: str = DEMO_PRESET) -> None:
    import torch.nn.functional as F

    t0 = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    print("secformer demo: private sentence similarity with all-MiniLM-L6-v2 (6 layers, hidden 384).\n"
          "P0 and P1 hold additive shares of the weights and of your sentences; neither sees either.\n")
    art = demo_artifact(preset, log)
    texts = [s for pair in DEMO_PAIRS for s in pair]
    rows, stats = private_run(art, texts, threads=threads)
    ref = float_rows(art, texts)

    def cos(rows: list, i: int) -> float:
        return float(F.cosine_similarity(rows[2 * i].double(), rows[2 * i + 1].double(), 0))

    print(f"\n{'sentence pair':<72} {'float':>7} {'2PC':>7}")
    for i, (a, b) in enumerate(DEMO_PAIRS):
        print(f"{(a + ' / ' + b)[:72]:<72} {cos(ref, i):>7.3f} {cos(rows, i):>7.3f}")
    worst = max(float(1 - F.cosine_similarity(r.double(), f.double(), 0)) for r, f in zip(rows, ref))
    print(f"\nembeddings: 2PC vs float, min cosine {1 - worst:.4f} (preset {art.manifest['preset']}: "
          f"{_preset_note(art.manifest['preset'])})\n")
    print(format_costs(stats))
    print(f"\ntotal {time.perf_counter() - t0:.1f} s (artifact cached in {cache_dir()})")


def _preset_note(preset: str) -> str:
    return {"secformer": "2Quad softmax replaces softmax, which changes the undistilled model; SecFormer "
                         "distills the model to recover accuracy",
            "mpcformer": "Quad GeLU and 2Quad softmax change the undistilled model: they need distillation",
            "secformer-exact-softmax": "SecFormer's Fourier GeLU and LayerNorm (its 1/sqrt from a lookup table "
                                       "and a Newton step where calibration allows, else Goldschmidt), softmax by "
                                       "exp and a Newton reciprocal: no distillation needed"}.get(
        preset, "approximations of the exact functions")


# --- static cost report ------------------------------------------------------------------------------

def cost_report(artifact: Path) -> dict:
    """Static cost of one inference per layer and per op type (the cost model, `cost.py`, which
    equals what the runtime counts), with the approximations and their declared bounds."""
    from .artifact import load_artifact
    from .cost import program_cost

    art = load_artifact(artifact, weights=False)  # the program alone decides the cost
    cost = program_cost(art.graph, art.trunc, art.fxp.frac_bits)
    by_layer: dict[str, dict] = {}
    by_op: dict[str, dict] = {}
    for n in art.graph:
        if n.op in ("input", "weight", "constant"):
            continue
        c = cost.by_node[n.name]
        op = n.op if n.op not in ("gelu", "tanh", "layernorm", "softmax") else f"{n.op}:{n.attrs.get('method')}"
        for table, key in ((by_layer, layer_of_node(n)), (by_op, op)):
            t = table.setdefault(key, {"nodes": 0, "bytes": 0, "rounds": 0})
            t["nodes"] += 1
            t["bytes"] += c.bytes
            t["rounds"] += c.rounds
    return {
        "artifact": str(art.path), "sha256": art.sha256, "task": art.task, "preset": art.manifest["preset"],
        "batch": art.batch, "seq_len": art.seq_len, "fixed_point": art.manifest["fixed_point"],
        "inference": {"rounds": cost.rounds, "bytes_per_party": cost.bytes_per_party,
                      "lan_s": estimate(cost.rounds, cost.bytes_per_party, "LAN"),
                      "wan_s": estimate(cost.rounds, cost.bytes_per_party, "WAN"),
                      "by_layer": by_layer, "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["bytes"]))},
        "approximations": art.manifest.get("approximations", {}),
        "assumptions": art.manifest.get("assumptions", []),
    }


def layer_of_node(n: Any) -> str:
    from .party import layer_of

    return layer_of(n.module_path)


def format_report(rep: dict) -> str:
    inf = rep["inference"]
    fx = rep["fixed_point"]
    lines = [f"{rep['artifact']}  ({rep['task']}, preset {rep['preset']}, batch {rep['batch']} x seq "
             f"{rep['seq_len']}, ring 2^64 with {fx['frac_bits']} fractional bits, {fx['truncation']} truncation)",
             f"one inference: {inf['rounds']} rounds, {_mb(inf['bytes_per_party'])} sent per party; "
             f"LAN {inf['lan_s']:.2f} s, WAN {inf['wan_s']:.2f} s (estimated)",
             "(rounds per row are the rows' own rounds; independent nodes share rounds, so they add up to more "
             "than the total)", ""]
    for title, table in (("per layer", inf["by_layer"]), ("per op", inf["by_op"])):
        lines.append(f"{title:<34} {'nodes':>6} {'bytes':>10} {'rounds':>7}")
        for k, t in table.items():
            lines.append(f"  {k:<32} {t['nodes']:>6} {_mb(t['bytes']):>10} {t['rounds']:>7}")
        lines.append("")
    lines.append("approximations (node, method, parameters, declared bound)")
    for node, a in rep["approximations"].items():
        params = {k: (f"[{len(v)} values]" if isinstance(v, list) and len(v) > 4 else v)
                  for k, v in a["params"].items()}
        bound = (f"abs<={a['declared_max_abs_err']:.3g}" if a.get("declared_max_abs_err") is not None else
                 f"rel<={a['declared_max_rel_err']:.3g}" if a.get("declared_max_rel_err") is not None else "exact")
        dom = a.get("domain")
        dom = f" on [{dom[0]:.4g}, {dom[1]:.4g}]" if dom else ""
        lines.append(f"  %{node:<28} {a['method']:<20} {params} {bound}{dom}  # {a['module_path']}")
    return "\n".join(lines)
