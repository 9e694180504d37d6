"""How a process's freed memory is kept or given back to the operating system.

Two opposite costs, both measured here:

* **Retained memory.** glibc's malloc keeps freed blocks in its heap while any live block
  sits above them, so a process that once held big temporaries (the simulator's limb
  products, a sequence-512 attention, the weight-loading phase) keeps that memory resident
  for good. A process that had compiled and simulated 3 BERT-base layers at sequence length
  512 held 2.8 GB, 0.66 GB after `malloc_trim(0)`; on a machine where the parent, P0, P1
  and the dealer share 24 GB, that retained memory is what ran BERT-base at sequence length
  512 out of memory. `release_free_memory` is called where a one-off phase's temporaries
  are dead: after compiling and after a simulation.

* **Fresh pages.** Memory given back must be faulted in and zeroed by the kernel when it
  is used again: about 2 microseconds of system time per 4 KiB page here (400 MB of fresh
  tensors: 98 thousand faults, 0.18 to 0.21 s). A role that gave its memory back after every
  request touched that many fresh pages on every request: per 2 BERT-base layers at
  sequence length 128, 60 thousand (P0), 97 thousand (P1) and 100 to 127 thousand (the
  dealer), 0.1 to 0.25 s of CPU each, about a fifth of what the three roles spend. Tensors
  above glibc's mmap threshold (the dealer's 64 MiB correction chunks and P1's receive
  buffers) were unmapped on free and faulted in anew each time as well.

So a role serving requests (`configure_for_requests`, called when a role's process
starts) keeps freed blocks for the next request: blocks up to 32 MiB (glibc's largest mmap
threshold; the correction chunks are 16 MiB) come from the heap, and the heap is not
trimmed on free. After each request `release_if_over` gives memory back only when more than
`KEEP_FREE_BYTES` (2 GiB; `SECFORMER_KEEP_FREE_MIB`) lies free: a steady request reuses its
predecessor's pages, and a one-off large program (the weight load, a longer sequence) does
not pin its peak. A role's peak resident memory is unchanged (it reaches it on every request
anyway); only what it holds between requests is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest glibc accepts
TRIM_THRESHOLD = 1 << 30  # free() never trims below this much free space at the heap's top
TOP_PAD = 64 << 20  # grow the heap in steps of at least this (fewer brk calls)


def env_mib_bytes(name: str, default_mib: int | None = None) -> int | None:
    """Bytes from the environment variable `name`, given in whole MiB (>= 0); `default_mib`
    (None: None) when it is unset or blank. A malformed value is an error naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None if default_mib is None else default_mib << 20
    try:
        mib = int(raw)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"{name} must be a whole number of MiB >= 0, got {raw!r}")
    return mib << 20


KEEP_FREE_BYTES = env_mib_bytes("SECFORMER_KEEP_FREE_MIB", 2048)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (not macOS, not musl)
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS (glibc `malloc_trim(0)`); False where the C
    library has no such call. Live tensors are untouched; only freed memory is released."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def free_heap_bytes() -> int | None:
    """Bytes malloc holds free in its arenas (glibc >= 2.33 `mallinfo2`), None elsewhere."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    return int(fn().fordblks)


def configure_for_requests() -> bool:
    """Keep freed blocks in this process for the next request (module docstring): blocks
    up to MMAP_THRESHOLD from the heap, no trimming on free. False where it is not glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = all(libc.mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                   (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return ok


def release_if_over(keep: int = KEEP_FREE_BYTES) -> bool:
    """After a request: give free memory back only when more than `keep` bytes lie free (a
    steady request reuses its predecessor's pages; a one-off large program's are released).
    Where the free amount cannot be read, release (the safe side). True if it released."""
    free = free_heap_bytes()
    if free is not None and free <= keep:
        return False
    return release_free_memory()
