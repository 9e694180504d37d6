"""Measure how often local (SecureML) truncation fails, against the exact protocol.

Local truncation shifts each share on its own. It is off by about 2^(64-f) (a catastrophic
error) when the two shares wrap around 2^64 in an unlucky way, with probability about
|x| / 2^63 per element. We share values of magnitude 2^m (m = bits of the fixed-point
integer) with uniform masks from the PRG, truncate locally, and count results that are
more than 1 ulp away from floor(x / 2^f). The exact protocol never fails (tests check it).

    python benchmarks/truncation.py --json benchmarks/results/truncation.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from secformer_compiler.runtime.prg import PRG


def failure_rate(magnitude_bits: int, n: int, f: int = 16) -> float:
    prg = PRG()
    x = prg.ring((n,)) & ((1 << magnitude_bits) - 1)
    x = torch.where(prg.ring((n,), 1) == 1, -x, x)
    r = prg.ring((n,))
    x0, x1 = r, x - r
    out = (x0 >> f) - ((-x1) >> f)  # P0 shifts its share; P1 negates, shifts, negates
    want = torch.div(x, 1 << f, rounding_mode="floor")
    return float(((out - want).abs() > 1).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2_000_000, help="samples per magnitude")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for m in (20, 32, 40, 48, 52, 56, 60):
        rate = failure_rate(m, args.n)
        rows.append({"magnitude_bits": m, "samples": args.n, "failure_rate": rate,
                     "predicted": 2.0 ** (m - 1) / 2.0 ** 63})
        print(f"|x| < 2^{m:2d}: measured failure rate {rate:.3e}  (|x|/2^63 averages {2.0 ** (m - 1) / 2 ** 63:.3e})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.platform(), "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
