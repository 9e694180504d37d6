"""Where each role's online CPU goes, from a py-spy recording of a 2PC run.

py-spy samples without tracing overhead (cProfile roughly doubles the Python share), so it
gives the shares of a whole BERT-base run. Record a run, then read the raw file:

    py-spy record --subprocesses --rate 100 --format raw -o spy.txt -- \\
        python benchmarks/e2e.py --runs 3
    python benchmarks/spy_shares.py spy.txt

A sample counts when its stack is inside a request's program (`infer_program`, or the
dealer's `replay`) and outside a party's prepare; it is filed under the innermost frame in
this repository's code (`runtime/`, `secformer_compiler/`, `passes/`). Roles are told
apart by process id (P0 draws its dealt shares from its seed: AES; P1 receives them:
`irecv`; the dealer assembles corrections); the launcher's process shows up too, with the
clear simulator's run that `e2e.py` checks the 2PC output against. py-spy itself is not a
dependency.
"""

from __future__ import annotations

import argparse
import collections
import re

_OURS = re.compile(r"\((runtime|secformer_compiler|passes)/")

# (category, test on the innermost own frame, test on the innermost frame of all)
CATEGORIES = [
    ("ring matmul kernels", lambda f, last: "ring.py" in f and ("_matmul_tiles" in f or "ring_matmul" in f)),
    ("AES-CTR keystream", lambda f, last: "PRG.bytes" in f),
    ("other PRG draws", lambda f, last: "prg.py" in f),
    ("GeLU's series (sine.py)", lambda f, last: "sine.py" in f),
    ("exact truncation", lambda f, last: "trunc.py" in f or "_and_times" in f),
    ("comparisons (compare.py)", lambda f, last: "compare.py" in f),
    ("receiving (irecv)", lambda f, last: "irecv" in last or "irecv" in f),
    ("corrections: split, pack, unpack, concatenate",
     lambda f, last: any(k in f for k in ("take_corrections", "Dom.split", "pack (", "mask_bits"))),
    ("transport", lambda f, last: "dist.py" in f or "distributed_c10d" in last),
]


def category(frames: list[str]) -> str:
    own = [f for f in frames if _OURS.search(f)]
    inner = own[-1] if own else ""
    for name, test in CATEGORIES:
        if test(inner, frames[-1]):
            return name
    return "everything else"


def shares(path: str) -> dict[str, tuple[int, collections.Counter]]:
    """{process: (online samples, Counter of categories)} of a py-spy raw recording."""
    total: collections.Counter = collections.Counter()
    cats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            procs = [f for f in frames if f.startswith("process ")]
            if not procs or any("prepare" in f for f in frames):
                continue
            if not any("infer_program" in f or "replay" in f for f in frames):
                continue
            proc = procs[-1].split(":")[0]
            total[proc] += int(count)
            cats[proc][category(frames)] += int(count)
    return {p: (total[p], cats[p]) for p in total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", help="py-spy record --format raw output")
    args = ap.parse_args()
    for proc, (n, cats) in sorted(shares(args.raw).items()):
        print(f"{proc}: {n} samples in the online phase")
        for name, c in cats.most_common():
            print(f"  {100 * c / n:5.1f}%  {name}")


if __name__ == "__main__":
    main()
