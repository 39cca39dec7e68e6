"""bench/gpu_check.py, the script a session with a lent GPU runs once: a CPU smoke run (interpreter,
tiny sizes) so that it does not fail for a reason unrelated to the GPU when its time comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.interpreter  # gpu-marked tests excepted (conftest)

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_on_cpu(tmp_path):
    env = os.environ | {"TRITON_INTERPRET": "1"}
    args = ["--device", "cpu", "--size", "16", "--feature-dim", "16", "--width", "4", "--batches", "2",
            "--steps", "2", "--encoder", "mobilefacenet", "--reps", "1", "1", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["provider"]: r for r in report["results"]}
    assert rows["reference"]["ms_median"] > 0 and rows["fused-fp32+graph"]["ms_median"] > 0
    assert rows["reference"]["peak_rss_mb"] > 0 and "energy_per_sample_j" not in rows["reference"]  # no NVML here
    assert "needs a GPU" in rows["fused-bf16"]["error"]  # refused with a reason, not a crash
    checks = report["checks"]
    assert checks["fused-fp32"]["within_2alpha_of_reference"] == 1.0
    assert checks["fused-fp16"]["within_2alpha_of_reference"] >= 0.98
    assert (tmp_path / "bench_table.txt").read_text().count("\n") >= 8  # header lines + 5 providers


def test_gpu_check_shell_script_plumbing(tmp_path):
    """bench/gpu_check.sh from another folder with a relative OUTDIR: every part runs and reports."""
    args = "--device cpu --size 16 --feature-dim 16 --width 4 --batches 2 --steps 1 --encoder mobilefacenet --reps 1 1"
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHON": sys.executable, "GPU_CHECK_ARGS": args}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    out = tmp_path / "out"
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" in (out / "env.txt").read_text()
    assert "pytest exit code 0" in (out / "pytest_gpu.txt").read_text()  # every gpu test skips cleanly here
    assert "<testsuite" in (out / "pytest_gpu.xml").read_text()
    assert "benchmark exit code 0" in (out / "bench_log.txt").read_text()
    assert json.loads((out / "bench.json").read_text())["results"]
