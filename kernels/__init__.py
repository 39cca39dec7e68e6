"""Triton kernels of the fused backend, one file per fused operation (installed as advface_engine.kernels)."""
