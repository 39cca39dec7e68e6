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
