"""A trivial kernel that aot.py compiles first: if even this fails, the installed Triton cannot be
driven ahead of time here (a toolchain or API change), which is not a fault of the real kernels."""

import triton
import triton.language as tl


@triton.jit
def _probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)
