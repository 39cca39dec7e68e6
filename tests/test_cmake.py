"""CMakeLists.txt: configures with the running Python, and hands ctest the tests and the kernel check."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake is not installed")
def test_cmake_configures_targets_and_ctest(tmp_path):
    done = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DPython3_EXECUTABLE={sys.executable}",
                           "-DADVFACE_CUDA_ARCHS=90;86"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = subprocess.run(["ctest", "--test-dir", str(tmp_path), "-N"], capture_output=True, text=True, timeout=60)
    assert "Test #1: pytest" in listed.stdout and "Test #2: kernels_aot" in listed.stdout
    tests = (tmp_path / "CTestTestfile.cmake").read_text()
    assert '"advface_engine.cli" "check-kernels" "--arch" "90" "86"' in tests  # the arch list as separate arguments
    assert sys.executable in tests and "--unset=TRITON_INTERPRET" in tests
