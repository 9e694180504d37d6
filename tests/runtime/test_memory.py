"""runtime.memory: freed heap memory goes back to the operating system."""

import sys

import pytest
import torch

from secformer_compiler.runtime.memory import release_free_memory


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_release_gives_back_memory_that_live_blocks_between_would_pin():
    """Blocks below glibc's mmap threshold come from the heap. Freeing every other one
    leaves free chunks between live ones: no heap-top trim can return them, so their memory
    stays resident after they are freed, until `release_free_memory`. (Freeing a run of
    blocks with one small live block after them was flaky: the small block could land in
    an older hole below, and then plain free() already trimmed the heap top.)"""
    release_free_memory()
    blocks = [torch.ones(1 << 13, dtype=torch.int64) for _ in range(8000)]  # 8000 x 64 KiB, touched
    del blocks[::2]  # 250 MiB freed, each chunk between two live ones
    before = _rss_mib()
    assert release_free_memory() is True
    after = _rss_mib()
    assert before - after > 150, (before, after)
    assert all(int(b.sum()) == 1 << 13 for b in blocks)  # live tensors are untouched


_REUSE = r"""
import resource, sys, torch
from secformer_compiler.runtime import memory

def touch():  # one "request": 64 tensors of 3 MiB (and a 16 MiB chunk), written, then freed
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.ones(393216, dtype=torch.int64) for _ in range(64)] + [torch.ones(16 << 20, dtype=torch.uint8)]
    del ts
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

if sys.argv[1] == "configured":
    assert memory.configure_for_requests() is True
first, second = touch(), touch()
kept = memory.release_if_over(keep=1 << 40)  # a budget nothing exceeds: keep all
third = touch()
released = memory.release_if_over(keep=0)  # anything free is over a zero budget
fourth = touch()
print(first, second, third, fourth, kept, released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt / mallinfo2 are Linux's")
def test_a_configured_process_reuses_its_pages_between_requests():
    """configure_for_requests: a second request of the same shapes touches no fresh pages
    (each costs ~2 us of kernel time here; runtime/memory.py), release_if_over keeps memory
    under its budget and gives it back over it (then the next request faults again). An
    unconfigured process faults in most of the pages on every request (the old behaviour:
    big blocks mapped and unmapped, the heap trimmed on free)."""
    import subprocess

    def run(mode):
        out = subprocess.run([sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, check=True)
        first, second, third, fourth, kept, released = out.stdout.split()
        return int(first), int(second), int(third), int(fourth), kept == "True", released == "True"

    first, second, third, fourth, kept, released = run("configured")
    pages = (64 * 3 + 16) * 256  # 4 KiB pages a request writes
    assert first > pages // 2, first  # fresh memory at first
    assert second < pages // 8 and third < pages // 8, (second, third)  # then reused (seen: 0, 4096)
    assert not kept and released and fourth > pages // 2, (kept, released, fourth)
    _, plain_second, *_ = run("plain")
    assert plain_second > pages // 2, plain_second


def test_keep_free_budget_is_read_and_checked():
    import os
    import subprocess

    code = "from secformer_compiler.runtime import memory; print(memory.KEEP_FREE_BYTES)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SECFORMER_KEEP_FREE_MIB": "16"})
    assert int(out.stdout) == 16 << 20
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "SECFORMER_KEEP_FREE_MIB": "lots"})
    assert bad.returncode != 0 and "SECFORMER_KEEP_FREE_MIB must be a whole number of MiB >= 0, got 'lots'" in bad.stderr
