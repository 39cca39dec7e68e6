"""Kernels one fused protection launches, counted without a GPU: the B=1 latency of a captured call is
a chain of small kernels, so their number is what a change for B=1 can be judged by on a CPU.

    python bench/count_kernels.py [--dtype fp16] [--batch 1] [--steps 20]

Same models as gpu_check.py (dcgan shadow at 112x112, iresnet50 encoder, random weights, calibrated
BatchNorm). Counts the aten ops that launch a kernel (views and allocations left out) and the Triton
launches, for x~ and the anchor (``targets``) and for one step, and the call as ``targets`` + the
cast of z before the loop (bf16/fp16) + T steps. On a CPU the kernels run under Triton's
interpreter (fp32, fp16), and linear_step is one launch where a GPU at small batches splits it in
two (split-K and its finisher: ``--split-k 2`` counts that). cuDNN may take more than one kernel for
a convolution; a GPU's own count is ``kernel_launches`` in profile_fused.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from gpu_check import benchmark_models  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import advface_engine as afe  # noqa: E402
from advface_engine.backends.fused import FusedBackend  # noqa: E402
from advface_engine.protect import frozen  # noqa: E402

NO_KERNEL = {"view", "_unsafe_view", "_reshape_alias", "reshape", "permute", "t", "transpose", "expand", "slice",
             "select", "as_strided", "unsqueeze", "squeeze", "alias", "detach", "lift_fresh", "empty", "empty_like",
             "new_empty", "empty_strided", "resize_", "set_"}


class Counting(TorchDispatchMode):
    """aten ops that launch a kernel, by name; Triton launches (triton.<kernel>), by kernel."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._launchers = []
        for cls in {type(fn) for fn in _kernels()}:  # JITFunction on a GPU, InterpretedFunction under the interpreter
            run = cls.run
            self._launchers.append((cls, run))

            def counted(fn, *args, _run=run, _ops=self.ops, **kwargs):
                _ops[f"triton.{fn.__name__}"] += 1
                with torch.utils._python_dispatch._disable_current_modes():  # the interpreter's copies are not kernels
                    return _run(fn, *args, **kwargs)

            cls.run = counted
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, run in self._launchers:
            cls.run = run
        return super().__exit__(*exc)


def _kernels() -> list:
    """One Triton kernel object of each kind the fused backend launches (for their class's ``run``)."""
    from advface_engine.kernels import bias_act, sign_step

    return [bias_act._bias_act_kernel, sign_step._sign_step_kernel]


def count(dtype: str = "fp16", batch: int = 1, steps: int = 20, size: int = 112, width: int = 32,
          encoder_arch: str = "iresnet50", split_k: int | None = None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shadow, encoder = benchmark_models(device, 512, size, width, encoder_arch)
    z = F.normalize(torch.randn(batch, 512, device=device), dim=1)
    with frozen(shadow, encoder), torch.no_grad():
        backend = FusedBackend(shadow, encoder, afe.ProtectConfig(steps=1), dtype=dtype, graphs=False, split_k=split_k)
        backend.protect(z, None)  # warm: the encoder's copy is made, slopes and matrices cached
        with Counting() as targets:
            x_shadow, anchor = backend.targets(z)
        z_t = anchor.clone()
        z_low = z_t.to(backend.plan.dtype) if backend.plan.dtype != torch.float32 else None
        with Counting() as step:
            backend.step(z_t, anchor, x_shadow, last=False, z_low=z_low)
    total = sum(targets.ops.values()) + (z_low is not None) + steps * sum(step.ops.values())
    return {"dtype": dtype, "batch": batch, "steps": steps, "size": size, "encoder": encoder_arch,
            "triton": triton.__version__, "torch": torch.__version__, "device": device.type,
            "targets": sum(targets.ops.values()), "step": sum(step.ops.values()), "call": total,
            "targets_ops": dict(targets.ops), "step_ops": dict(step.ops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp16", choices=["fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--encoder", default="iresnet50", choices=["iresnet50", "mobilefacenet"])
    parser.add_argument("--split-k", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = count(args.dtype, args.batch, args.steps, args.size, args.width, args.encoder, args.split_k)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['device']}, {args.dtype}, B={args.batch}, T={args.steps}, {args.size}px, {args.encoder}: "
          f"{result['call']} kernels per call = {result['targets']} (x~ and the anchor)"
          f"{' + 1 (z cast)' if args.dtype in ('bf16', 'fp16') else ''} + {args.steps} x {result['step']} (a step)")
    print("a step:", ", ".join(f"{k} {v}" for k, v in sorted(result["step_ops"].items())))


if __name__ == "__main__":
    main()
