"""Benchmark telemetry: FLOPs of a protection step, device peaks, peak memory and NVML readings.

NVML (nvidia-ml-py, the ``gpu`` extra) is optional. Without it, without a driver or on a CPU the
NVML fields are absent from the returned dicts, never estimated.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

# Dense peak TFLOP/s by precision, from the vendor datasheets (no sparsity: half the sparse
# figures). The first name fragment found in the device name wins, so the PCIe and NVL entries
# come before the SXM ones.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {},  # lower clocks than SXM; peaks not recorded here, so no fraction is reported
    "H200 NVL": {},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},  # SXM
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},  # same compute as H100 SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_tflops(device_name: str, precision: str = "fp32") -> float | None:
    """The dense peak of a known GPU at ``precision`` ("bf16", "fp16", "tf32", "fp32"); None if unknown
    (better no fraction of peak than one against another variant's peak)."""
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or "cpu"."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` as counted by torch.utils.flop_counter (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(shadow: nn.Module, z: Tensor) -> int:
    """FLOPs of one protection step on the batch ``z``: S(z_t) forward and the gradient back to z_t.

    Weight gradients are not counted (the engine never computes them): the shadow is frozen for
    the count. ``.backward()`` is used because the FLOP counter does not follow ``autograd.grad``
    to a leaf.
    """
    from ..protect import frozen

    with frozen(shadow):
        with torch.no_grad():
            x_shadow = shadow(z)
        z_t = z.detach().clone().requires_grad_(True)
        return count_flops(lambda: (shadow(z_t) - x_shadow).abs().sum().backward())


def _vm_hwm_kib() -> int | None:
    """The process's peak resident set (VmHWM, KiB) from /proc on Linux; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def reset_peak_memory(device: torch.device | str) -> bool:
    """Start a new peak: PyTorch's allocator peak on a GPU; on Linux the process's peak resident
    set (writing 5 to /proc/self/clear_refs). False where the peak cannot be reset."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device | str) -> dict:
    """{"peak_memory_mb": ..., "peak_reserved_mb": ...}: MiB allocated by PyTorch and reserved by its
    caching allocator on a GPU since ``reset_peak_memory``; on a
    CPU {"peak_rss_mb": ...}: the process's peak resident set, since ``reset_peak_memory`` on Linux,
    else since the process began ("peak_rss_scope" says which)."""
    device = torch.device(device)
    if device.type == "cuda":  # reserved: also the blocks a CUDA graph's private pool holds
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    kib = _vm_hwm_kib()
    if kib is not None:
        return {"peak_rss_mb": kib / 2**10, "peak_rss_scope": "since reset"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10), "peak_rss_scope": "process"}


def nvml_handle(device: torch.device | str):
    """An NVML handle for a CUDA device (matched by UUID, else by index), or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except pynvml.NVMLError:
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except pynvml.NVMLError:
        return None


def nvml_readings(device: torch.device | str) -> dict:
    """GPU name, memory used (MiB) and power draw (W) from NVML; {} where NVML is absent."""
    handle = nvml_handle(device)
    if handle is None:
        return {}
    import pynvml

    out = {}
    readers = {
        "gpu_name": lambda: pynvml.nvmlDeviceGetName(handle),
        "memory_used_mb": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
        "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
    }
    for key, read in readers.items():
        try:
            value = read()
            out[key] = value.decode() if isinstance(value, bytes) else value
        except pynvml.NVMLError:  # a field this GPU or driver does not report stays absent
            pass
    return out


class EnergyMeter:
    """Energy used by the GPU during a ``with`` block, in joules, from NVML's total-energy counter,
    and the block's duration in seconds.

    ``joules`` stays None where NVML or the counter is absent (e.g. on a CPU). The counter advances
    in steps of tens of milliseconds, so a short window reads 0 or one step: ``top_up`` lengthens it.
    """

    MIN_SECONDS = 1.0

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.handle = nvml_handle(self.device)
        self.joules: float | None = None
        self.seconds = 0.0
        self._start: int | None = None
        self._began = 0.0

    def _read(self) -> int | None:
        if self.handle is None:
            return None
        import pynvml

        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # mJ since the driver loaded
        except pynvml.NVMLError:
            return None

    def __enter__(self) -> EnergyMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._start = self._read()
        self._began = time.perf_counter()
        return self

    def top_up(self, fn: Callable[[], object], min_seconds: float = MIN_SECONDS) -> int:
        """Call ``fn`` until the window has lasted ``min_seconds``; returns how many calls that took
        (0 without an energy counter: nothing to measure)."""
        calls = 0
        while self._start is not None and time.perf_counter() - self._began < min_seconds:
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            calls += 1
        return calls

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._began
        end = self._read()
        if self._start is not None and end is not None:
            self.joules = (end - self._start) / 1e3


def conv_tf32() -> bool:
    """Whether cuDNN runs fp32 convolutions in TF32 at PyTorch's current settings (its default)."""
    cudnn = torch.backends.cudnn
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        # torch 2.9+: "none" inherits from the parent setting (conv -> cudnn -> torch.backends); none at every
        # level is PyTorch's default for convolutions, TF32 (the legacy getter would read a flag that other
        # code may have left behind, or refuse)
        for owner in (cudnn.conv, cudnn, torch.backends):
            if owner.fp32_precision in ("tf32", "ieee"):
                return owner.fp32_precision == "tf32"
        return True
    return bool(cudnn.allow_tf32)  # torch < 2.9: the one flag
