"""CPU threads for the command line: one per core that is free when a command starts.

torch's CPU default is a thread per core, and a GNU OpenMP thread that finds no work spins for a long
while before it sleeps. On a machine whose cores other processes use (another advface job, a test
run), those spinning threads hold the cores the others need and everything slows down by an order of
magnitude (docs/cli.md, Threads, has the measured figures). So each command runs as many threads as
there are usable cores less the ones busy when it starts (``--threads N`` chooses;
``torch.set_num_threads`` in Python).

The commands also keep freed memory in the process (``keep_freed_memory``): glibc's malloc otherwise
maps fresh pages for every large tensor and unmaps them when it is freed, so each step of a protection
faults in its activations again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores() -> float:
    """How many cores other processes keep busy: the larger of the one-minute load average and the
    processes runnable right now besides this one (Linux's /proc/loadavg; the average lags a minute)."""
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average here
        busy = 0.0
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        busy = max(busy, running - 1)
    except (OSError, ValueError, IndexError):
        pass
    return busy


def auto_threads() -> int:
    """One thread per usable core that is not busy now (rounded), at least one."""
    cores = usable_cores()
    return max(1, min(cores, int(cores - busy_cores() + 0.5)))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads for a command (None: ``auto_threads()``), the previous count restored
    after (a command called in-process, by a test or a notebook, leaves the process as it was)."""
    import torch

    saved = torch.get_num_threads()
    chosen = auto_threads() if threads is None else threads
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(saved)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30  # blocks below this come from the heap, and up to this much free heap is kept
OLD_GLIBC_MAX = 32 << 20  # the largest mmap threshold glibc accepted before 2.35


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve blocks under KEEP_BYTES from its heap and keep up to that much freed heap,
    instead of a fresh mmap per large tensor (page faults on every first touch) and munmap on free.

    Process-wide and for the process's life: memory freed after a peak is reused, not returned to the
    system. The command line calls it; a library user may. Results do not change, only where memory
    comes from. Returns whether it applied (glibc only; elsewhere it does nothing)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False
    applied = mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) or mallopt(M_MMAP_THRESHOLD, OLD_GLIBC_MAX)
    return bool(applied) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
