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

from advface_engine import ProtectConfig, principal_directions


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
    """The utility guard's cost: the paper's protection without the guard, then with the default one."""
    cases = {name: (models[0], ProtectConfig(eps=0.03, alpha=0.01, steps=steps, min_cosine=c, **PAPER))
             for name, c in (("unguarded", None), ("guarded", ProtectConfig.min_cosine))}
    interleaved(benchmark, models, backend, batch, cases, f"guard B={batch} T={steps}")


@pytest.mark.parametrize("backend", ("reference", "fused-bf16+graph"))
@pytest.mark.parametrize("batch,steps", GUARD_CASES, ids=[f"B{b}-T{t}" for b, t in GUARD_CASES])
def test_default_start_cost(benchmark, models, backend, batch, steps):
    """The defaults' start against the paper's: anchor z with a random start (no encoder pass for the anchor,
    but the counter-based noise of advface_engine.noise, drawn on the device), then E(S(z))."""
    cases = {"paper": (models[0], ProtectConfig(steps=steps, **PAPER)),
             "defaults": (models[0], ProtectConfig(steps=steps))}
    interleaved(benchmark, models, backend, batch, cases, f"start B={batch} T={steps}")


@pytest.mark.parametrize("backend", ("reference", "fused-bf16+graph"))
@pytest.mark.parametrize("batch,steps", GUARD_CASES, ids=[f"B{b}-T{t}" for b, t in GUARD_CASES])
def test_ensemble_cost(benchmark, models, ensemble_shadows, backend, batch, steps):
    """K = 1, 2, 3 shadows (dcgan, + nbnet, + upconv) at the defaults, beside each family alone: an ensemble
    should cost no more than its shadows one after the other (extra_info: K=k_over_members, the ensemble's
    time over the sum of its members' times alone)."""
    config = ProtectConfig(steps=steps)
    names = ["dcgan", "nbnet", "upconv"]
    cases = {f"K={k}": (ensemble_shadows[:k], config) for k in (1, 2, 3)}
    cases.update({name: (shadow, config) for name, shadow in zip(names[1:], ensemble_shadows[1:])})
    ms = interleaved(benchmark, models, backend, batch, cases, f"ensemble B={batch} T={steps}")
    alone = [ms["K=1"], ms["nbnet"], ms["upconv"]]
    benchmark.extra_info.update({f"K={k}_over_members": ms[f"K={k}"] / sum(alone[:k]) for k in (2, 3)})


@pytest.mark.parametrize("backend", ("reference", "fused-bf16+graph"))
@pytest.mark.parametrize("batch,steps", GUARD_CASES, ids=[f"B{b}-T{t}" for b, t in GUARD_CASES])
def test_keep_out_cost(benchmark, models, backend, batch, steps):
    """The defaults with the steps kept out of 16 principal directions (keep_out: per step two (B, D) x (D, 16)
    matmuls, and on the fused backend the guard as torch operations after the step kernel) against the
    defaults alone."""
    shadow, _, dim = models
    gallery = torch.nn.functional.normalize(torch.randn(4096, dim, generator=torch.Generator().manual_seed(2)), dim=1)
    basis = principal_directions(gallery * torch.linspace(2, 0.5, dim), 16).to(next(shadow.parameters()).device)
    config = ProtectConfig(steps=steps)
    interleaved(benchmark, models, backend, batch, {"defaults": (shadow, config), "keep_out": (shadow, config, basis)},
                f"keep_out B={batch} T={steps}")


def interleaved(benchmark, models, backend: str, batch: int, cases: dict, group: str) -> dict[str, float]:
    """Cases ({name: (shadow or shadows, config[, keep_out basis])}) timed in alternation, each round one call of
    each, so a shared machine's load is fair to all; extra_info: the median ms of each and each one's over the
    first's. Returns the medians."""
    _, encoder, dim = models
    device = next(encoder.parameters()).device
    z = torch.nn.functional.normalize(torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch)),
                                      dim=1).to(device)
    protect = {name: make_protector(backend, shadow, encoder, *case) for name, (shadow, *case) in cases.items()}
    seconds = {name: [] for name in protect}
    for fn in protect.values():
        warm_up(fn, z, calls=1)

    def each():
        for name, fn in protect.items():
            start = time.perf_counter()
            fn(z)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)

    benchmark.group = group
    benchmark.pedantic(each, rounds=6, iterations=1)
    ms = {name: 1e3 * statistics.median(values) for name, values in seconds.items()}
    first, *others = ms
    benchmark.extra_info.update(backend=backend, batch=batch, **{f"{name}_ms": v for name, v in ms.items()},
                                **{f"{name}_over_{first}": ms[name] / ms[first] for name in others})
    return ms
