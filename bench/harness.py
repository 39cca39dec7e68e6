"""Building the benchmarked backends and measuring one case into pytest-benchmark's ``extra_info``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
from pgd_naive import NaivePGD
from torch import Tensor, nn

from advface_engine import ProtectConfig, Protector
from advface_engine.backends.reference import ReferenceBackend, weights_key
from advface_engine.speed import telemetry as tm

# the protection the benchmarks time: the paper's (anchor E(S(z)), no random start), which the naive loop
# implements too; the defaults' anchor z skips the encoder pass
PAPER = dict(anchor="shadow", random_start=False)
ROUND_BUDGET_S = 2.0  # measured time aimed at per case, within the bounds below
MIN_ROUNDS, MAX_ROUNDS = 3, 50


class CompiledReference(ReferenceBackend):
    """The reference loop with its decoder through ``torch.compile`` (the forward, and through
    AOTAutograd the input-gradient backward). Compiled once per shadow and shared by all cases."""

    name = "compiled"
    compiled: dict = {}
    failure: str | None = None  # why compilation failed here: later cases skip at once

    def step_shadow(self) -> nn.Module:
        key = (id(self.shadow), weights_key(self.shadow))
        if key not in self.compiled:
            self.compiled[key] = torch.compile(super().step_shadow())
        return self.compiled[key]


def make_protector(name: str, shadow: nn.Module | list, encoder: nn.Module, config: ProtectConfig,
                   keep_out: torch.Tensor | None = None) -> Callable:
    """``z -> z_adv`` for backend ``name`` (with a keep_out basis: the reference or fused backend); skips the test
    where the backend cannot run here."""
    if keep_out is not None and name in ("naive", "compiled"):
        raise ValueError(f"backend {name!r} takes no keep_out basis")
    if name == "naive":
        return NaivePGD(shadow, encoder, config)
    if name.startswith("fused"):
        if not torch.cuda.is_available():
            pytest.skip("the fused backend needs a CUDA GPU")
        try:
            import advface_engine.backends.fused  # noqa: F401
        except ImportError as err:
            pytest.skip(f"the fused backend is not importable: {err}")
        dtype = "bf16" if "-bf16" in name else "fp32"  # fused[-bf16][-nchw][+graph]
        return Protector(shadow=shadow, encoder=encoder, config=config, backend="fused", keep_out=keep_out,
                         backend_options={"graphs": name.endswith("+graph"), "dtype": dtype,
                                          "channels_last": False if "-nchw" in name else None})
    if name not in ("reference", "reference-bf16", "compiled"):
        raise ValueError(f"unknown backend {name!r}")
    options = {"dtype": "bf16"} if name == "reference-bf16" else {}
    protector = Protector(shadow=shadow, encoder=encoder, config=config, backend="reference", backend_options=options,
                          keep_out=keep_out)
    if name == "compiled":
        if CompiledReference.failure:
            pytest.skip(CompiledReference.failure)
        protector.backend = CompiledReference(shadow, encoder, config)
    return protector


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(protect: Callable, z: Tensor, calls: int) -> float:
    """Run ``calls`` times (compilation, graph capture, caches); seconds taken by the last call."""
    took = 0.0
    for _ in range(calls):
        start = time.perf_counter()
        protect(z)
        synchronize(z.device)
        took = time.perf_counter() - start
    return took


def measure(benchmark, name: str, models: tuple, batch: int, steps: int, mode: str) -> None:
    """Benchmark backend ``name`` on a batch of ``batch`` unit-norm features for ``steps`` steps.

    extra_info: embeddings/s, ms per batch (CUDA events on a GPU), FLOPs of one step and of the
    whole protection, achieved TFLOP/s and fraction of the device's peak, peak memory, and
    on a GPU the NVML readings with the energy per embedding.
    """
    shadow, encoder, dim = models
    device = next(shadow.parameters()).device
    config = ProtectConfig(eps=0.03, alpha=0.01, steps=steps, **PAPER)
    generator = torch.Generator().manual_seed(batch)
    z = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=1).to(device)
    protect = make_protector(name, shadow, encoder, config)
    benchmark.group = f"{mode} B={batch} T={steps}"
    try:
        took = warm_up(protect, z, calls=2 if name == "compiled" else 1)
    except torch.cuda.OutOfMemoryError as err:
        pytest.skip(f"out of GPU memory at B={batch}: {err}")
    except Exception as err:
        if name == "compiled":  # no compiler toolchain, an unsupported op, ...
            CompiledReference.failure = f"torch.compile failed here: {type(err).__name__}: {str(err)[:300]}"
            pytest.skip(CompiledReference.failure)
        raise
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, ROUND_BUDGET_S / max(took, 1e-6))))

    event_ms: list[float] = []

    def call() -> None:
        if device.type != "cuda":
            protect(z)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        protect(z)
        end.record()
        end.synchronize()
        event_ms.append(start.elapsed_time(end))

    tm.reset_peak_memory(device)
    with tm.EnergyMeter(device) as energy:
        benchmark.pedantic(call, rounds=rounds, iterations=1)
        extra = energy.top_up(lambda: protect(z))  # NVML's counter needs about a second of work
    if benchmark.disabled or benchmark.stats is None:
        return

    ms = statistics.median(event_ms) if event_ms else benchmark.stats.stats.median * 1e3
    # FLOPs grow exactly with the batch: count one row (cheap even where B rows would not fit twice)
    one_step = batch * tm.step_flops(shadow, z[:1])
    with torch.no_grad():
        targets = batch * tm.count_flops(lambda: encoder(shadow(z[:1])))
    flops = targets + steps * one_step
    tflops = flops / (ms * 1e-3) / 1e12
    info = {
        "backend": name, "mode": mode, "batch": batch, "steps": steps, "min_cosine": config.min_cosine,
        "device": tm.device_name(device),
        "embeddings_per_s": batch / (ms * 1e-3), "ms_per_batch": ms,
        "ms_source": "cuda events (median)" if event_ms else "benchmark timer (median)",
        "step_flops": one_step, "protect_flops": flops, "tflops": tflops, "threads": torch.get_num_threads(),
    }
    # the fused backend's default is IEEE fp32; PyTorch's convolutions run in TF32 on a GPU by default
    tf32 = device.type == "cuda" and not name.startswith("fused") and tm.conv_tf32()
    info["precision"] = "bf16" if "-bf16" in name else "tf32" if tf32 else "fp32"
    peak = tm.peak_tflops(info["device"], info["precision"])
    if peak:
        info.update(peak_tflops=peak, peak_fraction=tflops / peak)
    info.update(tm.peak_memory(device))
    info.update(tm.nvml_readings(device))
    if energy.joules is not None:  # over the measured rounds and the top-up; the power is their average
        info.update(energy_per_embedding_j=energy.joules / ((rounds + extra) * batch),
                    power_w=energy.joules / energy.seconds)
    benchmark.extra_info.update(info)
