"""The command line's CPU threads (advface_engine.threads): one thread per free core by default,
``--threads N``, the caller's setting restored after a command."""

from __future__ import annotations

import os

import pytest
import torch

import advface_engine.threads as threads
from advface_engine.cli import main


@pytest.mark.parametrize("cores, load, want", [(2, 0.1, 2), (2, 0.7, 1), (2, 1.2, 1), (2, 5.0, 1), (8, 2.4, 6)])
def test_auto_threads_leaves_the_busy_cores(monkeypatch, cores, load, want):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda: load)
    assert threads.auto_threads() == want


def test_busy_cores_sees_processes_running_now(monkeypatch, tmp_path):
    """The load average lags a minute: processes runnable right now count too (this one left out)."""
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    assert threads.busy_cores() >= 0.2
    if os.path.exists("/proc/loadavg"):
        import builtins

        real_open = builtins.open
        fake = tmp_path / "loadavg"
        fake.write_text("0.20 0.10 0.10 3/345 12345\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(fake if path == "/proc/loadavg"
                                                                               else path, *a, **k))
        assert threads.busy_cores() == 2  # three runnable: this process and two others


def test_threads_flag_holds_for_the_command_and_is_restored(monkeypatch):
    import advface_engine.speed.report as bench_report

    seen = []
    monkeypatch.setattr(bench_report, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    monkeypatch.setattr(threads, "auto_threads", lambda: 2)
    before = torch.get_num_threads()
    assert main(["bench-report", "x.json", "--threads", "3"]) == 0
    assert main(["bench-report", "x.json"]) == 0
    assert seen == [3, 2] and torch.get_num_threads() == before
    with pytest.raises(SystemExit):
        main(["bench-report", "x.json", "--threads", "0"])


def test_the_command_keeps_freed_memory_only_as_a_program(monkeypatch):
    """As the process's command (argv from sys.argv) it calls keep_freed_memory; called in-process with its
    arguments, it leaves the allocator as it was."""
    import advface_engine.cli as cli
    import advface_engine.speed.report as bench_report

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(bench_report, "run", lambda args: 0)
    assert main(["bench-report", "x.json"]) == 0 and calls == []
    monkeypatch.setattr("sys.argv", ["advface", "bench-report", "x.json"])
    assert main() == 0 and calls == [1]


FAULTS = """
import resource, sys, torch
from advface_engine.threads import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):  # a 64 MiB tensor made, written and freed, as each step's activations are
        torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
plain = faults()
applied = keep_freed_memory()
faults()
print(applied, plain, faults())
"""


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_keep_freed_memory_stops_the_page_faults_of_large_tensors():
    """Without it, each large tensor is a fresh mapping whose every page faults on first touch; with it, the
    freed block is reused (a fresh process, so the test's own allocator is left as it is)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FAULTS], check=True, capture_output=True, text=True, timeout=120)
    applied, plain, kept = out.stdout.split()
    assert applied == "True"
    assert int(plain) > 8 * 8000  # about 16k pages of 4 KiB per 64 MiB tensor
    assert int(kept) < int(plain) / 20
