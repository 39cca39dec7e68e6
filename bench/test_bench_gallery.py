"""Gallery job benchmarks: throughput against the engine on in-memory batches of the same size, and peak
RSS as the gallery grows (100k and 1M rows of 512-d).

    pytest bench/test_bench_gallery.py --benchmark-only [--benchmark-json gallery.json]

Both sides of the throughput pair use the same torch threads (bench/conftest.py: one unless
--bench-threads says otherwise), models, config and batch size; the job's time includes loading
the checkpoints, the manifest, the part files and assembling the output. Figures (rows/s for
each side and their ratio, peak RSS) are in each case's extra_info: pass --benchmark-json to keep them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import advface_engine as afe
from advface_engine.demo import DEMO
from advface_engine.gallery import protect_gallery
from advface_engine.models import build_model, save_model
from advface_engine.threads import usable_cores

# name: (feature_dim, image size, width, steps, rows, batch size, chunk rows); "demo" is the demo's CPU scale
# (its shadow decoder is the benchmarks' default on CPU), "tiny512" a decoder so small that the job's I/O weighs most.
SCALES = {"demo": (DEMO.feature_dim, DEMO.size, DEMO.decoder_width, 10, 1024, 512, 65536),
          "tiny512": (512, 16, 1, 1, 65536, 4096, 16384)}
ROUNDS = 3  # job/engine pairs timed after the warm-up pair (their median)

# VmHWM, not ru_maxrss: after fork + exec, ru_maxrss starts from the parent's peak (pytest's, here)
RSS_JOB = """
import sys
from advface_engine import ProtectConfig
from advface_engine.demo import DEMO
from advface_engine.gallery import protect_gallery
protect_gallery(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], ProtectConfig(steps=1), batch_size=4096,
                device="cpu", progress=False, force=True)  # random models: past the preflight
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def _models(folder: Path, dim: int, size: int, width: int) -> tuple[str, str]:
    """Checkpoints of a random dcgan shadow decoder and mobilefacenet encoder (speed does not depend on weights)."""
    torch.manual_seed(0)
    shadow = build_model("dcgan", feature_dim=dim, size=size, width=width).eval()
    encoder = build_model("mobilefacenet", num_features=dim, input_size=size, width=width).eval()
    save_model(shadow, folder / "shadow.safetensors")
    save_model(encoder, folder / "encoder.safetensors")
    return str(folder / "shadow.safetensors"), str(folder / "encoder.safetensors")


def _write_gallery(path: Path, rows: int, dim: int, block: int = 65536) -> None:
    """Random unit rows written block by block (the file can be larger than memory)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(0)
    for i in range(0, rows, block):
        z = rng.standard_normal((min(block, rows - i), dim), dtype=np.float32)
        out[i:i + len(z)] = z / np.linalg.norm(z, axis=1, keepdims=True)
    out.flush()
    del out


@pytest.mark.parametrize("scale", list(SCALES))
def test_gallery_job_vs_engine(benchmark, tmp_path, scale):
    """Each round runs the job, then the engine on in-memory batches; interleaving keeps a shared CPU's load fair."""
    dim, size, width, steps, rows, batch, chunk = SCALES[scale]
    shadow, encoder = _models(tmp_path, dim, size, width)
    config = afe.ProtectConfig(steps=steps)
    _write_gallery(tmp_path / "gallery.npy", rows, dim)
    z = torch.from_numpy(np.load(tmp_path / "gallery.npy"))
    protector = afe.Protector(afe.load_model(shadow), afe.load_model(encoder), config=config)
    seconds = {"job": [], "engine": []}

    def pair():
        start = time.perf_counter()
        protect_gallery(tmp_path / "gallery.npy", tmp_path / "out.npy", shadow, encoder, config, batch_size=batch,
                        chunk_rows=chunk, device="cpu", progress=False, overwrite=True, force=True)
        seconds["job"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, rows, batch):
            protector(z[i:i + batch])
        seconds["engine"].append(time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    job, engine = (rows / statistics.median(seconds[k][-ROUNDS:]) for k in ("job", "engine"))
    benchmark.extra_info.update(job_rows_per_s=job, engine_rows_per_s=engine, job_over_engine=job / engine)


@pytest.mark.parametrize("rows", [100_000, 1_000_000])
def test_gallery_peak_rss(benchmark, tmp_path, rows):
    """Peak RSS of a job in a fresh process: flat memory means about the same figure at 10x the rows. The job
    uses every core this process may run on (pytest only waits for it), the same number at both sizes."""
    shadow, encoder = _models(tmp_path, 512, 16, 1)
    _write_gallery(tmp_path / "gallery.npy", rows, 512)
    peak, threads = {}, usable_cores()

    def run():
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", RSS_JOB, str(tmp_path / "gallery.npy"), str(tmp_path / "out.npy"),
                              shadow, encoder], check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        peak["kib"], peak["s"] = int(out.stdout.split()[-1]), time.perf_counter() - start

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_mib"] = peak["kib"] / 1024
    benchmark.extra_info["rows_per_s"] = rows / peak["s"]  # the whole process, start-up included
    benchmark.extra_info["threads"] = threads
    assert np.load(tmp_path / "out.npy", mmap_mode="r").shape == (rows, 512)
