"""Benchmark fixtures: the models and case sizes, chosen by the device.

On a CUDA GPU: the default shadow build_model("dcgan") (112x112, feature_dim 512) and a
mobilefacenet(512, 112) encoder. Without CUDA: the demo's models (advface_engine.demo.DEMO) and
smaller offline sizes, so the whole suite runs in minutes on a small CPU, on one thread unless
``--bench-threads`` says otherwise. Weights are random (speed does not depend on them);
BatchNorm statistics come from one pass so activations stay in range.

Benchmarks run with ``pytest bench --benchmark-only``; a plain ``pytest bench`` skips them and says so.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advface_engine.demo import DEMO
from advface_engine.models import build_model

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BACKENDS = ("naive", "reference", "reference-bf16", "compiled", "fused", "fused+graph", "fused-bf16+graph",
            "fused-bf16-nchw+graph")
STEPS = (10, 20, 50)
ONLINE = [(batch, steps) for batch in (1, 8, 64) for steps in STEPS]
OFFLINE = [(256, 10), (1024, 10), (4096, 10), (256, 20), (256, 50)] if ON_GPU else [(256, 10), (1024, 10)]


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=1,
                     help="torch CPU threads (default 1: steady on a shared machine; 0: torch's default)")
    parser.addoption("--quick", action="store_true",
                     help="a first look: one online and one offline size per backend, the cost pairs, the small "
                          "gallery cases (``quick``)")


def quick(item) -> bool:
    """Whether a case is in the ``--quick`` selection: B=1 and B=64 online and B=256 offline at T=10, every cost
    pair, the gallery job's I/O-bound case and its 100k-row memory case."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = item.originalname
    if name == "test_online_latency":
        return params["batch"] in (1, 64) and params["steps"] == 10
    if name == "test_offline_throughput":
        return (params["batch"], params["steps"]) == (256, 10)
    if name == "test_gallery_job_vs_engine":
        return params["scale"] == "tiny512"
    if name == "test_gallery_peak_rss":
        return params["rows"] == 100_000
    return True


@pytest.fixture(scope="session", autouse=True)
def cpu_threads(request):
    """torch's CPU threads for the session (restored after)."""
    threads = request.config.getoption("--bench-threads")
    saved = torch.get_num_threads()
    if threads > 0 and not ON_GPU:
        torch.set_num_threads(threads)
    yield
    torch.set_num_threads(saved)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--quick"):
        dropped = [item for item in items if not quick(item)]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if quick(item)]
    wanted = any(config.getoption(name, default=None) for name in
                 ("benchmark_only", "benchmark_enable", "benchmark_disable", "benchmark_json"))
    if wanted:
        return
    skip = pytest.mark.skip(reason="benchmarks run with `pytest bench --benchmark-only` "
                                   "(or --benchmark-disable: each case once, as a smoke test)")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def calibrate(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics from one pass over ``inputs``, then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the batch statistics
    with torch.no_grad():
        model.train()(inputs)
    return model.eval()


@pytest.fixture(scope="session")
def models() -> tuple[nn.Module, nn.Module, int]:
    """(shadow, encoder, feature_dim) on the benchmark device."""
    torch.manual_seed(0)
    if ON_GPU:
        dim = 512
        shadow = build_model("dcgan")
        encoder = build_model("mobilefacenet", num_features=dim, input_size=112)
    else:
        dim = DEMO.feature_dim
        shadow = build_model(DEMO.shadow_arch, feature_dim=dim, size=DEMO.size, width=DEMO.decoder_width)
        encoder = build_model("mobilefacenet", num_features=dim, input_size=DEMO.size, width=DEMO.encoder_width)
    shadow, encoder = shadow.to(DEVICE), encoder.to(DEVICE)
    z = F.normalize(torch.randn(64, dim, device=DEVICE), dim=1)
    calibrate(shadow, z)
    with torch.no_grad():
        calibrate(encoder, shadow(z))
    return shadow, encoder, dim


@pytest.fixture(scope="session")
def ensemble_shadows(models) -> list[nn.Module]:
    """The benchmark shadow, then an nbnet and an upconv decoder of its size: the ensembles' members."""
    shadow, encoder, dim = models
    size = shadow(torch.zeros(1, dim, device=DEVICE)).shape[-1]
    width = {} if ON_GPU else {"width": DEMO.decoder_width}  # as the benchmark shadow's
    z = F.normalize(torch.randn(64, dim, device=DEVICE), dim=1)
    torch.manual_seed(1)
    others = [calibrate(build_model(family, feature_dim=dim, size=size, **width).to(DEVICE), z)
              for family in ("nbnet", "upconv")]
    return [shadow, *others]
