"""A gallery job on a GPU equals the engine there, byte for byte.

Apart from tests/test_gallery.py, which needs every format's library (FAISS is not on the lent GPU
machines), so that this test runs where only NumPy and safetensors are installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_models

import advface_engine as afe
from advface_engine.gallery import protect_gallery
from advface_engine.gallery.job import deterministic_cudnn
from advface_engine.models import save_model

DIM = 16
CONFIG = afe.ProtectConfig(steps=2, random_start=True)


@pytest.mark.gpu
def test_cuda_job_equals_engine_on_cuda(tmp_path):
    shadow, encoder = tiny_models(feature_dim=DIM)
    save_model(shadow, tmp_path / "shadow.safetensors")
    save_model(encoder, tmp_path / "encoder.safetensors")
    z = np.random.default_rng(0).standard_normal((1000, DIM))
    rows = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
    np.save(tmp_path / "in.npy", rows)
    protect_gallery(tmp_path / "in.npy", tmp_path / "out.npy", tmp_path / "shadow.safetensors",
                    tmp_path / "encoder.safetensors", CONFIG, batch_size=128, chunk_rows=256, device="cuda",
                    backend="reference", progress=False, force=True)
    protector = afe.Protector(shadow.cuda(), encoder.cuda(), config=CONFIG, backend="reference")
    with deterministic_cudnn():  # as the job runs: cuDNN's choice of algorithm may change the last bits
        expected = torch.cat([protector(torch.from_numpy(rows[i:i + 128]).cuda()).cpu()
                              for i in range(0, 1000, 128)])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected.numpy())
