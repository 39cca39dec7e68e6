"""The fused kernels compiled for real GPUs (sm_90: H100/H200, sm_80: A100) without one.

kernels/aot.py runs Triton's compiler and the ptxas it ships on every variant the fused backend
launches (backends/launches.py says which); these tests run it as ``advface check-kernels`` in a
subprocess (the suite itself runs Triton's interpreter) and check each cubin: compiles, no
register spills, shared memory within the GPU's limit, and the gradient matmul's precision (no
tensor cores in fp32, tf32 only when asked, bf16/fp16 ops).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from advface_engine.kernels.aot import Report, problems, unavailable

ARCHES = ("90", "80")
CHECK = [sys.executable, "-m", "advface_engine.cli", "check-kernels"]  # advface check-kernels


pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


def _compiled_triton_env(cache: Path) -> dict:
    """This environment without the interpreter, and a fresh cache so that kernels really compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"TRITON_CACHE_DIR": str(cache)}


def _aot(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """The checker in a subprocess; the whole sweep (hundreds of compiles) gets 30 minutes: a busy 2-core machine's
    worst seen was over 10."""
    env = _compiled_triton_env(tmp)
    return subprocess.run([*CHECK, "--json", *args], env=env, capture_output=True, text=True, timeout=1800)


def _reports(tmp: Path, *args: str) -> list[dict]:
    done = _aot(tmp, "--arch", *ARCHES, *args)
    if done.returncode == 2:  # this Triton cannot be driven ahead of time here (not a fault of the kernels)
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.stdout, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    """Every variant for both architectures: the whole sweep (marker ``aot``, CI's own step)."""
    return _reports(tmp_path_factory.mktemp("triton-cache"))


def test_a_sample_of_the_variants_compiles_cleanly(tmp_path):
    """The default run's check: the first variant of each kernel in each dtype, for both architectures."""
    found = _reports(tmp_path, "--sample")
    bad = [f"sm_{r['arch']} {r['name']}: {'; '.join(r['problems'])}" for r in found if r["problems"]]
    assert not bad, "\n".join(bad)
    kernels = {r["name"].split()[0] for r in found}
    assert kernels >= {"l1_sign", "act_backward", "linear_step", "sign_step", "bias_act", "head_conv",
                       "head_conv_backward"}
    assert {r["arch"] for r in found} == set(map(int, ARCHES))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_compiler_workers_die_with_the_check(tmp_path):
    """A check killed from outside (a test's timeout, Ctrl-C) leaves no compiler process behind it."""
    import signal
    import time

    proc = subprocess.Popen([*CHECK, "--arch", "90", "--workers", "2"],
                            env=_compiled_triton_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.monotonic() + 120, []
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = _children(proc.pid)
        assert len(workers) == 2, "the compiler workers did not start"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)]


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting to be reaped."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.aot
def test_every_variant_compiles_cleanly_for_h100_and_a100(reports):
    bad = [f"sm_{r['arch']} {r['name']}: {'; '.join(r['problems'])}" for r in reports if r["problems"]]
    assert not bad, "\n".join(bad)


@pytest.mark.aot
def test_variants_cover_the_fused_backend(reports):
    names = {(r["arch"], r["name"].split()[0], r["name"].split()[1]) for r in reports}
    for arch in map(int, ARCHES):
        for dtype in ("fp32", "bf16", "fp16"):
            for kernel in ("l1_sign", "act_backward", "linear_step", "bias_act", "head_conv", "head_conv_backward"):
                assert (arch, kernel, dtype) in names
        assert (arch, "linear_step", "tf32") in names and (arch, "sign_step", "fp32") in names
    acts = {r["name"].split(maxsplit=2)[2] for r in reports if r["name"].startswith("act_backward")}
    assert {"relu", "relu +bn"} <= acts  # dcgan/upconv ReLU, nbnet's dense layers (BN before ReLU)


@pytest.mark.aot
def test_step_kernels_use_no_atomics(reports):
    """Split-K partial sums are added in a fixed order, so z is the same bit for bit on every run;
    the detector itself is live: the L1 loss monitor's atomic add is found."""
    assert all(r["atomics"] for r in reports if r["name"].endswith("+loss"))
    assert not [r["name"] for r in reports if r["atomics"] and not r["name"].endswith("+loss")]
    assert any("split-K sum" in r["name"] for r in reports)


@pytest.mark.aot
def test_matmul_precision_follows_the_dtype(reports):
    """The precision contract, read from the PTX: fp32 is IEEE (no tensor cores), tf32 only when asked
    (the gradient matmul and the fused head convolution, forward and backward)."""
    for kernel in ("linear_step", "head_conv", "head_conv_backward"):
        mma: dict[str, set] = {}
        for r in reports:
            if r["name"].split()[0] == kernel:
                mma.setdefault(r["name"].split()[1], set()).update(r["mma"])
        assert mma == {"fp32": set(), "tf32": {"tf32"}, "bf16": {"bf16"}, "fp16": {"fp16"}}, kernel


def _problems_of_changed_variant(tmp: Path, name: str, **changes) -> tuple[list | None, str]:
    """Compile the variant called ``name`` with some of its constants changed (in a subprocess
    with compiled Triton); its problems and the subprocess's stderr."""
    code = (
        "import json, dataclasses, sys; from advface_engine.kernels import aot\n"
        "from advface_engine.backends.launches import fused_launches\n"
        "name, changes = sys.argv[1], json.loads(sys.argv[2])\n"
        "v = [v for v in aot.variants(fused_launches()) if v.name == name][0]\n"
        "r = aot.compile_variant(dataclasses.replace(v, kwargs=tuple(sorted((dict(v.kwargs) | changes).items()))))\n"
        "print(json.dumps(aot.problems(r)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, name, json.dumps(changes)], env=_compiled_triton_env(tmp),
                          capture_output=True, text=True, timeout=300)
    return json.loads(done.stdout or "null"), done.stderr[-2000:]


@pytest.mark.aot
def test_shared_memory_counts_the_pipeline_buffers(reports):
    """The cubin states only static shared memory (about 1 KB); the matmul's staged tiles (D=512,
    fp32: 132 KB on sm_90) are requested at launch, and the limit must be checked against those."""
    for arch in map(int, ARCHES):
        row = next(r for r in reports if r["arch"] == arch and r["name"] == "linear_step fp32 D=512 B=1024 linf ball")
        assert row["shared"] >= 64 * 1024, row


def test_the_check_sees_spills_in_a_real_compile(tmp_path):
    """A feature row of 2048 does not fit the accumulator: compiled as such it spills, which is why
    linear_sign_step sends rows wider than MAX_FUSED_DIM through a matmul and the step kernel."""
    found, stderr = _problems_of_changed_variant(
        tmp_path, "linear_step bf16 D=1024 B=1024 linf ball normalize unguarded", BLOCK_D=2048)
    assert found and "spills" in found[0], stderr


def test_the_check_sees_64_bit_division(tmp_path):
    """The channel index of act_backward (offset // inner % channels) costs dozens of instructions
    per element in 64-bit arithmetic; the kernel takes 64-bit offsets only past 2**31 elements
    (WIDE), and the check finds the emulated division in that variant."""
    found, stderr = _problems_of_changed_variant(tmp_path, "act_backward fp32 relu +bn", WIDE=True)
    assert found and "64-bit integer divisions" in found[0], stderr


def test_problems_flags_each_kind_of_fault():
    ok = dict(name="linear_step bf16 D=512", arch=90, ok=True, registers=128, shared=1024, num_warps=8, mma=["bf16"])
    assert problems(Report(**ok)) == []
    assert "compile" in problems(Report(**ok | {"ok": False, "error": "boom"}))[0]
    assert "spills" in problems(Report(**ok | {"stack": 200}))[0]
    assert "shared" in problems(Report(**ok | {"shared": 300_000}))[0]
    assert "register file" in problems(Report(**ok | {"registers": 255, "num_warps": 16}))[0]
    assert "tensor-core" in problems(Report(**ok | {"mma": ["tf32"]}))[0]
    assert "atomics" in problems(Report(**ok | {"atomics": True}))[0]
    assert "64-bit" in problems(Report(**ok | {"name": "act_backward fp32 relu", "mma": [], "div64": 4}))[0]
    assert "tensor-core" in problems(Report(**ok | {"name": "linear_step fp32 D=512", "mma": ["tf32"]}))[0]
