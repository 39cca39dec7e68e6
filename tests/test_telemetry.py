"""Telemetry: FLOP counts, the peak table, and NVML fields that are absent (never faked) without NVML."""

from __future__ import annotations

import sys
import time
import types

import pytest
import torch
from conftest import tiny_models
from torch import nn

from advface_engine.speed import telemetry as tm


@pytest.mark.parametrize("batch,n_in,n_out", [(1, 16, 8), (7, 33, 130)])
def test_flops_of_a_linear(batch, n_in, n_out):
    linear = nn.Linear(n_in, n_out)
    x = torch.randn(batch, n_in)
    assert tm.count_flops(lambda: linear(x)) == 2 * batch * n_in * n_out


def test_step_flops_forward_and_input_gradient_only():
    """A Linear "decoder": forward 2*B*in*out and the gradient to z as much again; no weight gradient."""
    linear = nn.Linear(16, 24)
    assert tm.step_flops(linear, torch.randn(5, 16)) == 2 * (2 * 5 * 16 * 24)
    assert all(p.requires_grad and p.grad is None for p in linear.parameters())  # flags restored, nothing kept
    shadow, _ = tiny_models()
    one, four = tm.step_flops(shadow, torch.randn(1, 16)), tm.step_flops(shadow, torch.randn(4, 16))
    assert one > 0 and four == 4 * one


def test_peak_table():
    assert tm.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert tm.peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 495.0
    assert tm.peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert tm.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert tm.peak_tflops("cpu") is None and tm.peak_tflops("NVIDIA H100 80GB HBM3", "fp8") is None
    assert tm.peak_tflops("NVIDIA H100 NVL", "bf16") is None  # not the SXM peak: unknown


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-case peak RSS reads /proc")
def test_cpu_peak_memory_is_per_case_after_a_reset():
    import numpy as np

    big = np.ones(200 * 2**20 // 8)  # 200 MiB touched
    del big
    assert tm.reset_peak_memory("cpu")
    after = tm.peak_memory("cpu")
    assert after["peak_rss_scope"] == "since reset"
    big = np.ones(100 * 2**20 // 8)
    grown = tm.peak_memory("cpu")["peak_rss_mb"]
    del big
    assert grown - after["peak_rss_mb"] > 90  # the new peak, not the earlier 200 MiB one


def test_conv_tf32_reads_inherited_and_mixed_settings(monkeypatch):
    cudnn = torch.backends.cudnn
    if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision settings")
    saved = [(k, k.fp32_precision) for k in (torch.backends, cudnn, cudnn.conv, cudnn.rnn)]
    try:
        torch.backends.fp32_precision = "none"  # whatever an earlier test or library left there
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "none", "ieee"  # legacy getter would raise
        cudnn.fp32_precision = "ieee"
        assert tm.conv_tf32() is False  # inherited from cudnn
        cudnn.fp32_precision = "none"
        assert tm.conv_tf32() is True  # PyTorch's default for convolutions
        torch.backends.fp32_precision = "ieee"
        assert tm.conv_tf32() is False  # inherited from torch.backends, two levels up
        cudnn.conv.fp32_precision = "tf32"
        assert tm.conv_tf32() is True  # the nearest setting wins
    finally:
        for knob, value in saved:
            knob.fp32_precision = value


def test_nvml_fields_absent_without_nvml(monkeypatch):
    assert tm.nvml_readings("cpu") == {}
    with tm.EnergyMeter("cpu") as meter:
        pass
    assert meter.joules is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert tm.nvml_handle("cuda:0") is None and tm.nvml_readings("cuda:0") == {}
    assert "peak_rss_mb" in tm.peak_memory("cpu") and "peak_memory_mb" not in tm.peak_memory("cpu")


def fake_nvml(energy_mj: list[int], power_error: bool = False) -> types.ModuleType:
    """A stand-in for pynvml: fixed readings, an energy counter that advances per read."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def power(handle):
        if power_error:
            raise NVMLError("not supported")
        return 250_000  # mW

    def energy(handle):
        if not energy_mj:
            raise NVMLError("no energy counter on this GPU")
        return energy_mj.pop(0)

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: "handle"
    nvml.nvmlDeviceGetHandleByIndex = lambda index: "handle"
    nvml.nvmlDeviceGetName = lambda handle: b"NVIDIA H100 80GB HBM3"
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=3 * 2**30)
    nvml.nvmlDeviceGetPowerUsage = power
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    return nvml


def test_nvml_readings_through_the_library(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="1234"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([1_000, 4_500]))
    assert tm.nvml_readings("cuda") == {"gpu_name": "NVIDIA H100 80GB HBM3", "memory_used_mb": 3072.0,
                                        "power_w": 250.0}
    with tm.EnergyMeter("cuda") as meter:
        pass
    assert meter.joules == pytest.approx(3.5) and meter.seconds >= 0
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], power_error=True))
    readings = tm.nvml_readings("cuda")
    assert "power_w" not in readings and readings["memory_used_mb"] == 3072.0  # unsupported field: absent
    with tm.EnergyMeter("cuda") as meter:
        pass
    assert meter.joules is None


def test_energy_window_topped_up_to_min_seconds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="1234"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([1_000, 2_000]))
    calls = []
    with tm.EnergyMeter("cuda") as meter:
        extra = meter.top_up(lambda: calls.append(time.sleep(0.01)), min_seconds=0.05)
    assert extra == len(calls) >= 2 and meter.seconds >= 0.05 and meter.joules == pytest.approx(1.0)
    with tm.EnergyMeter("cpu") as meter:  # no counter: nothing to measure, no time spent
        assert meter.top_up(lambda: pytest.fail("called without an energy counter")) == 0


def test_conv_tf32_reads_the_per_operation_setting():
    conv = getattr(torch.backends.cudnn, "conv", None)
    if not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has no per-operation fp32_precision settings")
    before = conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision
    try:
        for value, want in (("tf32", True), ("ieee", False)):
            conv.fp32_precision = value
            torch.backends.cudnn.rnn.fp32_precision = "tf32"  # conv and rnn differ: the legacy getter refuses
            assert tm.conv_tf32() is want
    finally:
        conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = before
