"""Triton kernels of the fused backend, one file per fused operation (installed as advface_engine.kernels).

On a CPU the kernels run under Triton's interpreter, which must be chosen before triton is
imported (``TRITON_INTERPRET=1``): that is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import os

import torch


def interpreted() -> bool:
    """Whether Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(*tensors: torch.Tensor | None) -> None:
    """A clear error instead of a Triton crash (or a wrong result) when CPU tensors meet the kernels,
    or tensors on different GPUs (a kernel runs on the current device and reads all its pointers there).
    None (an optional argument not given) is skipped."""
    tensors = tuple(t for t in tensors if t is not None)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"kernel arguments on different devices: {sorted(map(str, devices))}")
    for t in tensors:
        if t.device.type == "cuda":
            current = torch.cuda.current_device()
            if t.device.index is not None and t.device.index != current:
                raise ValueError(f"kernel arguments on {t.device} but the current device is cuda:{current}: "
                                 f"launch under torch.cuda.device({t.device.index})")
            continue
        if not interpreted():
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (got {t.device}); on a CPU they run only under the "
                "interpreter: set TRITON_INTERPRET=1 before triton is imported (testing only)"
            )
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the interpreter runs but computes garbage
            raise TypeError("Triton's interpreter does not compute bfloat16 correctly; on a CPU use float32 "
                            "or float16 (bf16 kernels are checked by compiling them: kernels/aot.py)")


def is_nhwc(t: torch.Tensor) -> bool:
    """4-D and channels_last (a shape whose two layouts coincide counts as contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def layout_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC tensor (``is_nhwc``), else the contiguous format."""
    return torch.channels_last if is_nhwc(t) else torch.contiguous_format


def same_layout(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], bool]:
    """The tensors in one dense memory order for kernels that index memory directly: channels_last
    when the first is 4-D channels_last (kept as it is: no copy), else contiguous. Also returns
    whether that order is channels_last, where a value's channel is its offset modulo C. Either way
    each sample's values are one contiguous block."""
    layout = layout_of(tensors[0])
    return tuple(t.contiguous(memory_format=layout) for t in tensors), layout == torch.channels_last


# Compile options given at every launch: FMA contraction on (Triton's default up to 3.9), stated so
# that a Triton whose default differs (3.10 turns it off) computes the same results, bit for bit.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def block_size(n: int, device: torch.device, gpu_block: int = 1024) -> int:
    """Elementwise block: fixed on a GPU; large under the interpreter (fewer, slower programs)."""
    import triton

    limit = gpu_block if device.type == "cuda" else 16384
    return min(limit, max(16, triton.next_power_of_2(n)))
