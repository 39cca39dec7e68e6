"""Protection speed, backends side by side: online latency (small batches) and offline throughput.

    pytest bench --benchmark-only --benchmark-json=bench.json
    advface bench-report bench.json --out bench_report
"""

from __future__ import annotations

import pytest
from conftest import BACKENDS, OFFLINE, ONLINE
from harness import measure


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,steps", ONLINE, ids=[f"B{b}-T{t}" for b, t in ONLINE])
def test_online_latency(benchmark, models, backend, batch, steps):
    measure(benchmark, backend, models, batch, steps, mode="online")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,steps", OFFLINE, ids=[f"B{b}-T{t}" for b, t in OFFLINE])
def test_offline_throughput(benchmark, models, backend, batch, steps):
    measure(benchmark, backend, models, batch, steps, mode="offline")
