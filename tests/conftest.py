"""Shared fixtures: tiny models and features, and the ``gpu`` marker that skips without CUDA."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run under its CPU interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and shared machines thrash

import pytest  # noqa: E402

from advface_engine.models import build_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture
def models():
    return tiny_models()


@pytest.fixture
def features():
    torch.manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
