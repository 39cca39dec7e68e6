"""Protection speed, backends side by side: online latency (small batches) and offline throughput.

    pytest bench --benchmark-only --benchmark-json=bench.json
    advface bench-report bench.json --output bench_report
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from conftest import BACKENDS, OFFLINE, ON_GPU, ONLINE
from harness import PAPER, make_protector, measure, synchronize, warm_up

from advface_engine import ProtectConfig


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,steps", ONLINE, ids=[f"B{b}-T{t}" for b, t in ONLINE])
def test_online_latency(benchmark, models, backend, batch, steps):
    measure(benchmark, backend, models, batch, steps, mode="online")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,steps", OFFLINE, ids=[f"B{b}-T{t}" for b, t in OFFLINE])
def test_offline_throughput(benchmark, models, backend, batch, steps):
    measure(benchmark, backend, models, batch, steps, mode="offline")


GUARD_CASES = [(64, 10), (1024, 20)] if ON_GPU else [(64, 10)]


@pytest.mark.parametrize("backend", ("reference", "fused-bf16+graph"))
@pytest.mark.parametrize("batch,steps", GUARD_CASES, ids=[f"B{b}-T{t}" for b, t in GUARD_CASES])
def test_guard_cost(benchmark, models, backend, batch, steps):
    """The utility guard's cost: each round runs the case without the guard, then with the default one;
    interleaving keeps a shared machine's load fair to both. extra_info: ms of each, and their ratio."""
    shadow, encoder, dim = models
    device = next(shadow.parameters()).device
    z = torch.nn.functional.normalize(torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch)),
                                      dim=1).to(device)
    configs = {name: ProtectConfig(eps=0.03, alpha=0.01, steps=steps, min_cosine=c, **PAPER)
               for name, c in (("unguarded", None), ("guarded", ProtectConfig.min_cosine))}
    protect = {name: make_protector(backend, shadow, encoder, cfg) for name, cfg in configs.items()}
    seconds = {name: [] for name in protect}
    for fn in protect.values():
        warm_up(fn, z, calls=1)

    def pair():
        for name, fn in protect.items():
            start = time.perf_counter()
            fn(z)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)

    benchmark.group = f"guard B={batch} T={steps}"
    benchmark.pedantic(pair, rounds=10, iterations=1)
    ms = {name: 1e3 * statistics.median(values) for name, values in seconds.items()}
    benchmark.extra_info.update(backend=backend, batch=batch, steps=steps, unguarded_ms=ms["unguarded"],
                                guarded_ms=ms["guarded"], guarded_over_unguarded=ms["guarded"] / ms["unguarded"])
