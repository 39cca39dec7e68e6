"""Compile the fused backend's kernels for a CUDA GPU ahead of time, on a machine without one.

Triton's wheel ships ptxas, so every kernel variant the fused backend launches (each dtype,
each decoder family's head and activations, the gradient matmul's block shapes, the split-K
and epilogue variants) can be compiled here to a cubin, through the same argument
specialisation as a real launch, and inspected. Each launcher module declares its variants
next to itself (``aot_variants``, kernels/variants.py); this tool iterates them (``LAUNCHERS``) for
the ``Launches`` its caller gives: what the fused backend launches kernels for, which the backends
build (advface_engine/backends/launches.py; this package imports nothing above it):

- registers, shared memory, and spills (stack frame): at most MAX_SPILL bytes, the few that
  ptxas may trade for occupancy; more means the tile does not fit the register file;
- the gradient matmul's instructions: no tensor-core op in fp32 (IEEE, as the reference),
  tf32 ops only with dtype "tf32", bf16 / fp16 ops with those dtypes;
- no atomics in the step kernels, so that z is the same bit for bit on every run;
- no 64-bit integer division in the elementwise kernels (emulated, it would dominate them).

    advface check-kernels --arch 90 80      (or python -m advface_engine.cli check-kernels ...)

Needs compiled Triton, not the interpreter: unset TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from . import COMPILE_OPTIONS, act_backward, bias_act, head_conv, interpreted, l1_sign, linear_step, sign_step
from .variants import Launches, Variant, tensor, variant

# the launcher modules, each declaring the variants it launches (aot_variants)
LAUNCHERS = (l1_sign, act_backward, linear_step, head_conv, bias_act, sign_step)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block
MAX_SPILL = 32  # bytes
MMA_KINDS = {"tf32": "tf32", "bf16": "bf16", "f16": "fp16"}


@dataclass
class Report:
    name: str
    arch: int
    ok: bool
    error: str = ""
    registers: int = 0
    shared: int = 0
    local: int = 0
    stack: int = 0
    num_warps: int = 0
    mma: list[str] = field(default_factory=list)  # tensor-core input types found in the PTX
    atomics: bool = False  # atomic or reduction instructions in the PTX
    div64: int = 0  # 64-bit integer divisions / remainders in the PTX (emulated: dozens of instructions each)


def variants(launches: Launches) -> list[Variant]:
    """Every specialisation the fused backend launches for ``launches`` (its dtypes, heads, activations and
    feature dims: backends/launches.py's fused_launches), as each launcher declares them."""
    return [v for launcher in LAUNCHERS for v in launcher.aot_variants(launches)]


def unavailable() -> str | None:
    """Why ahead-of-time compilation cannot run here (None when it can): it needs Triton's CUDA
    backend with its ptxas and cuobjdump, and the launcher internals it reuses (Triton 3.4+)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401

        tools = [get_ptxas(80).path, get_ptxas(90).path, triton.knobs.nvidia.cuobjdump.path]
    except Exception as err:
        return f"this Triton cannot compile for CUDA here ({type(err).__name__}: {err})"
    if not hasattr(JITFunction, "_pack_args"):
        return f"Triton {triton.__version__} lacks the launcher internals this check reuses"
    missing = [t for t in tools if not t or not os.path.exists(t)]
    return f"missing CUDA tools: {missing}" if missing else None


def _resources(cubin: bytes) -> dict[str, int]:
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text))
    return {"registers": int(found["REG"]), "shared": int(found["SHARED"]), "local": int(found["LOCAL"]),
            "stack": int(found["STACK"])}


def compile_variant(variant: Variant, arch: int = 90) -> Report:
    """Compile one variant for sm_<arch> with the JIT's own argument specialisation; never raises."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = {**dict(variant.kwargs), **COMPILE_OPTIONS}  # compiled as launched
    try:
        kernel = getattr(importlib.import_module(f"{__package__}.{variant.module}"), variant.kernel)
        args = [torch.empty(a[2], dtype=getattr(torch, a[1])) if isinstance(a, tuple) else a for a in variant.args]
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        mma = sorted({MMA_KINDS[m] for m in re.findall(r"mma\S*\.(tf32|bf16|f16)\b", compiled.asm["ptx"])})
        atomics = re.search(r"^\s*(@%p\d+\s+)?(atom|red)\.", compiled.asm["ptx"], re.MULTILINE) is not None
        div64 = len(re.findall(r"\b(?:div|rem)\.[su]64\b", compiled.asm["ptx"]))
        resources = _resources(compiled.asm["cubin"])
        # the cubin states static shared memory only; what the pipeline's buffers take is requested at launch
        resources["shared"] = max(resources["shared"], int(getattr(compiled.metadata, "shared", 0)))
        return Report(variant.name, arch, True, num_warps=options.num_warps, mma=mma, atomics=atomics,
                      div64=div64, **resources)
    except Exception as err:  # a report per variant: one failure must not hide the others
        return Report(variant.name, arch, False, error=f"{type(err).__name__}: {err}"[:2000])


def problems(report: Report) -> list[str]:
    """What is wrong with a compiled variant (empty when all is well)."""
    if not report.ok:
        return [f"does not compile: {report.error}"]
    found = []
    if report.local + report.stack > MAX_SPILL:
        found.append(f"spills {report.local + report.stack} B to local memory (at most {MAX_SPILL})")
    if report.shared > SHARED_LIMIT.get(report.arch, 99 * 1024):
        found.append(f"needs {report.shared} B of shared memory")
    if report.registers * 32 * report.num_warps > 65536:
        found.append(f"{report.registers} registers x {32 * report.num_warps} threads exceed the register file")
    if report.atomics and report.name.split()[0] in ("linear_step", "sign_step"):
        found.append("atomics in a step kernel: z would depend on the order programs finish")
    if report.div64 and report.name.split()[0] in ("l1_sign", "act_backward", "bias_act", "head_conv",
                                                   "head_conv_backward"):
        found.append(f"{report.div64} 64-bit integer divisions per element in a memory-bound kernel")
    if report.name.startswith("linear_step"):
        dtype = report.name.split()[1]
        want = [] if dtype == "fp32" else [dtype]
        if report.mma != want:
            found.append(f"gradient matmul uses tensor-core inputs {report.mma}, expected {want}")
    return found


def sample(selection: list[Variant]) -> list[Variant]:
    """The first variant of each kernel in each dtype: every kernel's code compiled, in minutes less than the
    whole list (the default test run; the whole list runs as CI's own step)."""
    seen, out = set(), []
    for v in selection:
        key = (v.kernel, v.name.split()[1] if len(v.name.split()) > 1 else "")
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def _die_with_parent() -> None:
    """In a compiler worker: be killed when the process that started it dies (Linux's parent-death signal),
    so a check killed by a timeout or Ctrl-C leaves no compiler running behind it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the signal was armed
            os._exit(1)


def compile_all(arches, selection: list[Variant], workers: int = 2) -> list[Report]:
    """Compile each variant of ``selection`` (``variants(launches)`` or part of it) for each arch."""
    if interpreted():
        raise RuntimeError("ahead-of-time compilation needs compiled Triton: unset TRITON_INTERPRET")
    jobs = [(v, arch) for arch in arches for v in selection]
    with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent) as pool:
        return list(pool.map(compile_variant, *zip(*jobs, strict=True)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities x10 (90: H100/H200)")
    parser.add_argument("--filter", default="", help="only variants whose name contains this text")
    parser.add_argument("--sample", action="store_true",
                        help="only the first variant of each kernel in each dtype (a quick check)")
    parser.add_argument("--workers", type=int, default=2, help="compiler processes (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")


def probe_error(arch: int = 90) -> str | None:
    """Compile a trivial kernel (kernels/_probe.py): an error here is the toolchain's, not the kernels'."""
    report = compile_variant(variant("probe", "_probe", "_probe_kernel", [tensor(torch.float32), 100], BLOCK=128), arch)
    return None if report.ok else f"a trivial kernel does not compile for sm_{arch} either ({report.error})"


def run(args: argparse.Namespace, launches: Launches) -> int:
    """Compile and check the variants of ``launches`` (the parsed ``add_arguments`` select among them); exit
    status 1 when a variant has a problem, 2 when nothing can be compiled here."""
    why = unavailable() or ("TRITON_INTERPRET is set: this check needs compiled Triton" if interpreted() else None)
    why = why or probe_error(args.arch[0])
    if why is not None:
        print(f"cannot compile ahead of time: {why}", file=sys.stderr)
        return 2
    selection = [v for v in variants(launches) if args.filter in v.name]
    if args.sample:
        selection = sample(selection)
    if not selection:
        print(f"no kernel variant matches {args.filter!r}", file=sys.stderr)
        return 2
    reports = compile_all(args.arch, selection, args.workers)
    if args.json:
        print(json.dumps([asdict(r) | {"problems": problems(r)} for r in reports]))
    else:
        print(f"{'variant':<62}{'sm':>4}{'regs':>6}{'smem':>7}{'spill':>7}  mma   atomic  problems")
        for r in reports:
            print(f"{r.name:<62}{r.arch:>4}{r.registers:>6}{r.shared:>7}{r.local + r.stack:>7}  "
                  f"{','.join(r.mma) or '-':<6}{'yes' if r.atomics else '-':<8}{'; '.join(problems(r)) or 'ok'}")
    return 1 if any(problems(r) for r in reports) else 0


def main(argv: list[str] | None = None, launches: Launches | None = None) -> int:
    """The check for ``launches``; without them (``python -m advface_engine.kernels.aot``), exit status 2 and
    a pointer to ``advface check-kernels``, which builds them from the fused backend."""
    parser = argparse.ArgumentParser(description="Compile the fused kernels for CUDA archs (no GPU needed).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if launches is None:
        print("the kernel variants to check come from the fused backend: run `advface check-kernels` "
              "(python -m advface_engine.cli check-kernels)", file=sys.stderr)
        return 2
    return run(args, launches)


if __name__ == "__main__":
    sys.exit(main())
