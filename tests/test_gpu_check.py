"""bench/gpu_check.py, the script a session with a lent GPU runs once: a CPU smoke run (interpreter,
tiny sizes) so that it does not fail for a reason unrelated to the GPU when its time comes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import HAS_CXX

import advface_engine as afe

pytestmark = pytest.mark.interpreter  # gpu-marked tests excepted (conftest)

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_on_cpu(tmp_path):
    env = os.environ | {"TRITON_INTERPRET": "1"}
    args = ["--device", "cpu", "--size", "16", "--feature-dim", "16", "--width", "4", "--batches", "2", "3",
            "--steps", "2", "--encoder", "mobilefacenet", "--reps", "1", "1", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    # the targets' pair first at every batch size, so a spent time budget skips only the others
    assert [(r["provider"], r["batch"]) for r in report["results"][:4]] == [
        ("reference", 2), ("reference", 3), ("fused-bf16+graph", 2), ("fused-bf16+graph", 3)]
    rows = {r["provider"]: r for r in report["results"] if r["batch"] == 2}
    assert rows["reference"]["ms_median"] > 0 and rows["fused-fp32+graph"]["ms_median"] > 0
    assert rows["fused-fp32+graph"]["speedup_vs_reference"] == pytest.approx(
        rows["reference"]["ms_median"] / rows["fused-fp32+graph"]["ms_median"])
    assert rows["reference"]["peak_rss_mb"] > 0 and "energy_per_sample_j" not in rows["reference"]  # no NVML here
    assert "needs a GPU" in rows["fused-bf16"]["error"]  # refused with a reason, not a crash
    checks = report["checks"]
    assert checks["fused-fp32"]["within_2alpha_of_reference"] == 1.0
    assert checks["fused-fp16"]["within_2alpha_of_reference"] >= 0.98
    assert checks["fused-fp32-nhwc"]["within_2alpha_of_reference"] == 1.0
    assert (tmp_path / "bench_table.txt").read_text().count("\n") == 4 + 12  # header lines + 6 providers x 2 B


def test_profile_script_runs_on_cpu(tmp_path):
    """bench/profile_fused.py, the breakdown to run beside gpu_check.py: every part reported."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    args = ["--device", "cpu", "--size", "16", "--feature-dim", "16", "--width", "4", "--batch", "2",
            "--steps", "2", "--encoder", "mobilefacenet", "--reps", "1", "--dtype", "fp16", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_fused.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "profile_B2.json").read_text())
    assert report["channels_last"] and report["encoder"]["copy"]  # fp16: NHWC copy with fp16 weights
    assert report["encoder"]["as_given_ms"] > 0 and report["encoder"]["copy_ms"] > 0
    encoder = report["encoder"]  # torch.compile'd (inductor's CPU code): timed and within rounding
    if HAS_CXX:
        assert encoder["compiled_copy_ms"] > 0 and encoder["compiled_cosine_min"] > 0.999, encoder
        assert report["call_compile_encoder"]["compiled"] and report["call_compile_encoder"]["total_ms"] > 0
    else:  # no C++ compiler: said, not a crash
        assert encoder["compiled_copy_ms"] is None and encoder["compiled_copy_error"]
    assert report["call"]["total_ms"] >= report["call"]["host_ms"] > 0
    assert report["protector_call"]["total_ms"] >= report["protector_call"]["host_ms"] > 0
    assert set(report["phases_ms"]) == {"S(z)", "E(x~)", "steps"} and min(report["phases_ms"].values()) > 0
    assert report["kernel_launches"] == 0  # host-side launches of CUDA kernels: none on a CPU
    assert report["weights_check_host_ms"] > 0 and "call_cudnn_benchmark" not in report  # that one: GPU only
    assert "E(x~) alone" in (tmp_path / "profile_B2.txt").read_text()


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FallingBackToEager:
    """A graph provider whose capture failed: it warns, turns graphs off and runs eagerly."""

    graphs = True

    def run(self, z):
        if self.graphs:
            warnings.warn("CUDA graph capture failed (operation not permitted when stream is capturing)", stacklevel=2)
            self.graphs = False
        return z


def test_gpu_check_refuses_an_eager_timing_for_a_graph_provider():
    gpu_check = _gpu_check_module()
    with pytest.raises(RuntimeError, match="fell back to eager: CUDA graph capture failed \\(operation"):
        gpu_check.measure(FallingBackToEager(), "fused-bf16+graph", torch.zeros(2, 4), reps=1)
    row = gpu_check.measure(FallingBackToEager(), "fused-bf16", torch.zeros(2, 4), reps=2)  # eager: fine
    assert len(row["ms_all"]) == 2 and row["samples_per_s"] > 0


def test_gpu_check_provider_names_set_the_backend_options():
    from advface_engine.models import build_model

    gpu_check = _gpu_check_module()
    shadow = build_model("dcgan", feature_dim=16, size=16, width=4).eval()
    encoder = build_model("mobilefacenet", num_features=16, input_size=16).eval()
    cfg = afe.ProtectConfig(steps=1)
    for name, options in [("fused-fp16+graph", (True, True, False)), ("fused-fp16-nchw", (False, False, False)),
                          ("fused-fp32-nhwc", (False, True, False)), ("fused-fp16-compile+graph", (True, True, True))]:
        backend = gpu_check.make_backend(name, shadow, encoder, cfg)
        assert (backend.graphs, backend.channels_last, backend.compile_encoder) == options, name
    assert gpu_check.COMPILED not in gpu_check.PROVIDERS  # timed apart: at B=1, on a GPU, last


ONLY_THE_COPY = """
import importlib.machinery, sys

class OnlyTheCopy:  # advface_engine and its submodules from the copied tree alone, whatever is installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] != "advface_engine":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [{root!r}] if name == "advface_engine" else path)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {{name!r}} in the copied tree", name=name)
        return spec

sys.meta_path.insert(0, OnlyTheCopy)
"""

FAILING_PIP = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "pip: no network here (test)" >&2; exit 1; fi
PYTHONPATH="{hide}${{PYTHONPATH:+:$PYTHONPATH}}" exec {python} "$@"
"""


def test_gpu_check_shell_script_runs_from_the_source_tree_where_pip_fails(tmp_path):
    """bench/gpu_check.sh on a machine where the package is not installed and pip cannot install it
    (no network, or a setuptools older than pyproject.toml needs): kernels/ is linked into the source
    tree and every part runs. From another folder, with a relative OUTDIR; on a copy of the tree."""
    root = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    for name in ("advface_engine", "kernels", "bench", "tests"):
        shutil.copytree(ROOT / name, root / name, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", root)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(ONLY_THE_COPY.format(root=str(root)))
    python = tmp_path / "python"
    python.write_text(FAILING_PIP.format(hide=hide, python=sys.executable))
    python.chmod(0o755)
    args = "--device cpu --size 16 --feature-dim 16 --width 4 --batches 2 --steps 1 --encoder mobilefacenet --reps 1 1"
    profile = "--device cpu --size 16 --feature-dim 16 --width 4 --batch 2 --steps 1 --encoder mobilefacenet " \
              "--reps 1 --dtype fp16 --no-compile-encoder"
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHON": str(python), "GPU_CHECK_ARGS": args, "PROFILE_ARGS": profile}
    done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    out = tmp_path / "out"
    assert done.returncode == 0, done.stderr[-2000:]
    env_txt = (out / "env.txt").read_text()
    assert "torch" in env_txt and "pip install failed: running from the source tree" in env_txt, env_txt
    assert (root / "advface_engine" / "kernels").is_symlink()
    assert "pytest exit code 0" in (out / "pytest_gpu.txt").read_text()  # every gpu test skips cleanly here
    assert "<testsuite" in (out / "pytest_gpu.xml").read_text()
    assert "benchmark exit code 0" in (out / "bench_log.txt").read_text(), (out / "bench_log.txt").read_text()[-2000:]
    assert json.loads((out / "bench.json").read_text())["results"]
    assert "profile exit code 0" in (out / "profile_log.txt").read_text(), (out / "profile_log.txt").read_text()[-2000:]
    assert json.loads((out / "profile_B2.json").read_text())["phases_ms"]


def test_count_kernels_counts_a_call_on_cpu():
    """bench/count_kernels.py on tiny models: a step launches its convolutions and Triton kernels and
    copies or casts nothing; the call adds up; the split-K finisher counts where asked."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    counts = []
    for split in ("1", "2"):
        args = ["--size", "16", "--width", "4", "--encoder", "mobilefacenet", "--steps", "3", "--split-k", split,
                "--json"]
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "count_kernels.py"), *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        counts.append(json.loads(done.stdout.splitlines()[-1]))
    one, two = counts
    assert one["call"] == one["targets"] + 1 + 3 * one["step"]  # fp16: one cast of z before the loop
    assert one["step_ops"]["convolution"] == 2 and one["step_ops"]["triton._linear_step_kernel"] == 1
    assert not {"_to_copy", "clone", "copy_"} & set(one["step_ops"]), one["step_ops"]
    assert two["step"] == one["step"] + 1 and two["step_ops"]["triton._sign_step_kernel"] == 1
