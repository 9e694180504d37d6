"""How close the linear layers' ring products run to this core's float64 GEMM peak.

A ring product mod 2^64 is five float64 GEMMs on 21/22-bit limbs (`runtime.ring`), so its
floor on one core is five times one float64 GEMM of the same shape. This script times, with
one torch thread and the median of `--repeats` runs per shape of BERT-base / BERT-large at
sequence length 128: one float64 GEMM, one float32 GEMM (for scale), our `ring_matmul` with
a pre-split weight (what a party does online per linear layer: under an int64 kernel a
large weight is kept in 256 x 256 tiles), the same product untiled (one torch int64 matmul in
the kernel's layout) and torch's own int64 matmul with a column-major weight (what the
CrypTen runs here use). Memory is configured as a serving role's (`runtime.memory`), so no
product pays for fresh pages.

    python benchmarks/gemm_peak.py --json benchmarks/results/gemm_peak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from secformer_compiler.runtime import memory
from secformer_compiler.runtime.ring import SplitOperand, int64_layout, matmul_kernel, ring_matmul

SHAPES = [(128, 768, 768), (128, 768, 2304), (128, 768, 3072), (128, 3072, 768), (128, 1024, 1024),
          (128, 1024, 4096), (128, 4096, 1024)]


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up (first-touch of the output, MKL's dispatch)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    memory.configure_for_requests()
    kernel = matmul_kernel()
    rows = []
    for m, k, n in SHAPES:
        flops = 2 * m * k * n
        a64, b64 = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
        a32, b32 = a64.float(), b64.float()
        x = torch.randint(-2 ** 63, 2 ** 63 - 1, (m, k))
        w = torch.randint(-2 ** 63, 2 ** 63 - 1, (k, n))
        w_split = SplitOperand(w)
        w_col = w.t().contiguous().t()
        assert torch.equal(ring_matmul(x, w_split), torch.matmul(x, w_col))  # same ring product
        f64 = _median_s(lambda: a64 @ b64, args.repeats)
        f32 = _median_s(lambda: a32 @ b32, args.repeats)
        ring = _median_s(lambda: ring_matmul(x, w_split), args.repeats)
        i64 = _median_s(lambda: torch.matmul(x, w_col), max(3, args.repeats // 3))
        untiled = None
        if kernel != "limbs":
            w_kernel = int64_layout(w)
            untiled = _median_s(lambda: torch.matmul(x, w_kernel), args.repeats)
        rows.append({"shape": [m, k, n], "float64_gemm_s": f64, "float64_gflops": flops / f64 / 1e9,
                     "float32_gemm_s": f32, "float32_gflops": flops / f32 / 1e9,
                     "ring_matmul_split_s": ring, "ring_over_5_float64_gemms": ring / (5 * f64),
                     "int64_colmajor_s": i64, "int64_colmajor_over_ring": i64 / ring,
                     "int64_untiled_s": untiled, "tiled": w_split.tiles is not None})
        r = rows[-1]
        print(f"{m}x{k} @ {k}x{n}: float64 {f64 * 1e3:.1f} ms ({r['float64_gflops']:.1f} GFLOP/s), "
              f"float32 {f32 * 1e3:.1f} ms ({r['float32_gflops']:.1f}), ring_matmul {ring * 1e3:.1f} ms "
              f"= {r['ring_over_5_float64_gemms']:.2f} x five float64 GEMMs"
              + (f" ({'tiled' if r['tiled'] else 'whole'}; untiled {untiled * 1e3:.1f} ms)" if untiled else "")
              + f", int64 col-major {i64 * 1e3:.0f} ms",
              flush=True)
    rec = {"rows": rows, "kernel": kernel, "threads": 1, "repeats": args.repeats, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "mkl": torch.backends.mkl.is_available(),
           "load_average_1min": round(os.getloadavg()[0], 2),
           "command": "python benchmarks/gemm_peak.py " + " ".join(sys.argv[1:])}
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
