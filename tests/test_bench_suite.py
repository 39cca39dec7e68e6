"""The benchmark suite's own selection: ``--quick`` keeps a first look of every suite (bench/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def collected(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_quick_keeps_a_first_look_of_every_suite():
    everything, quick = collected(), collected("--quick")
    assert set(quick) < set(everything)
    names = {case.split("::")[1].split("[")[0] for case in quick}
    assert names == {case.split("::")[1].split("[")[0] for case in everything}  # every benchmark keeps a case
    online = [case for case in quick if "test_online_latency" in case]
    assert online and all(("[B1-T10-" in case or "[B64-T10-" in case) for case in online)
    assert all("[B256-T10-" in case for case in quick if "test_offline_throughput" in case)
    assert [case for case in quick if "gallery" in case] == [
        "bench/test_bench_gallery.py::test_gallery_job_vs_engine[tiny512]",
        "bench/test_bench_gallery.py::test_gallery_peak_rss[100000]"]
