"""Shared fixtures: tiny models and features; the ``gpu`` and ``interpreter`` markers skip where they cannot run."""

from __future__ import annotations

import os
import shutil

import torch

if not torch.cuda.is_available():  # Triton kernels run under its CPU interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and shared machines thrash

import pytest  # noqa: E402

from advface_engine.models import build_model  # noqa: E402

# torch.compile on a CPU (inductor) builds C++: a system compiler, not a Python dependency
HAS_CXX = bool(os.environ.get("CXX")) or any(shutil.which(c) for c in ("g++", "clang++", "c++"))
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="torch.compile on a CPU needs a C++ compiler (g++ or clang++)")


def _interpreter_problem() -> str | None:
    """Why Triton kernels cannot run on the CPU in this process (None when they can)."""
    from advface_engine.kernels import interpreted

    if not interpreted():
        return ("Triton kernels run compiled in this process (a CUDA GPU is present): "
                "TRITON_INTERPRET=1 pytest runs the CPU interpreter tests")
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def loop(x_ptr, n):  # a loop with a runtime bound, as the step kernels have
        acc = 0.0
        for i in range(1, n):
            acc += tl.load(x_ptr + i)
        tl.store(x_ptr, acc)

    x = torch.arange(4.0)
    try:
        loop[(1,)](x, 4)
    except Exception as err:
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {np.__version__} ({err}): "
                "use Triton >= 3.7 or NumPy < 2.3")
    return None if x[0].item() == 6.0 else f"Triton {triton.__version__}'s interpreter computes a loop wrongly"


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA and compiled Triton; ``interpreter`` tests need Triton's CPU interpreter
    working (the two cannot share a process: the interpreter is chosen when triton is imported)."""
    from advface_engine.kernels import interpreted

    gpu_problem = None if torch.cuda.is_available() else "needs a CUDA GPU"
    if gpu_problem is None and interpreted():
        gpu_problem = "gpu tests need compiled Triton: unset TRITON_INTERPRET"
    cpu_problem = -1  # probed once, and only if an interpreter test was collected
    for item in items:
        if "gpu" in item.keywords:
            if gpu_problem:
                item.add_marker(pytest.mark.skip(reason=gpu_problem))
        elif "interpreter" in item.keywords:
            if cpu_problem == -1:
                cpu_problem = _interpreter_problem()
            if cpu_problem:
                item.add_marker(pytest.mark.skip(reason=cpu_problem))


def tiny_models(family: str = "dcgan", feature_dim: int = 16, size: int = 16, seed: int = 0, dtype=torch.float32):
    """A randomly initialised (shadow decoder, encoder) pair, eval mode, BN statistics perturbed."""
    torch.manual_seed(seed)
    shadow = build_model(family, feature_dim=feature_dim, size=size, width=4)
    encoder = build_model("mobilefacenet", num_features=feature_dim, input_size=size, width=4)
    for m in list(shadow.modules()) + list(encoder.modules()):
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return shadow.to(dtype).eval(), encoder.to(dtype).eval()


def fitting_models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random tiny shadow and a linear encoder fitted to invert it (least squares on 4096 features):
    E(S(z)) near z, as for a shadow trained for its encoder."""
    shadow, _ = tiny_models(seed=seed)
    z = torch.nn.functional.normalize(torch.randn(4096, 16, generator=torch.Generator().manual_seed(seed)), dim=1)
    with torch.no_grad():
        images = shadow(z).flatten(1)
    weight = torch.linalg.lstsq(images.double(), z.double()).solution.T.float()
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(images.shape[1], 16, bias=False))
    encoder[1].weight.data.copy_(weight)
    return shadow, encoder.eval()


@pytest.fixture
def models():
    return tiny_models()


@pytest.fixture
def features():
    torch.manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
