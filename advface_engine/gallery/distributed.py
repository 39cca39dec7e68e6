"""``engine="ray"``: the same chunks, protected by a pool of Ray Data actors (one per GPU, or per CPU worker).

``map_batches`` hands chunk numbers to ``ChunkWorker`` actors. Each holds a Protector and the open
gallery, reads its chunk's rows from the input file (which every node must see at the same path),
writes the chunk's part file (the sharded output) and returns the chunk's record. The driver records
finished chunks in the same manifest as the local engine and assembles the output in the same format,
so the result equals the local one row for row and a killed Ray job resumes like a local one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator

import numpy as np

from .worker import ChunkJob, JobSpec, deterministic_cudnn


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise ImportError("engine 'ray' needs Ray Data: pip install 'advface-engine[ray]'") from err
    return ray


@contextlib.contextmanager
def ray_session(address: str | None, workers: int | None) -> Iterator:
    """The running Ray, else one started here (on ``address``, or local with ``workers`` CPUs), shut down after."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        where = {"address": address} if address else {"num_cpus": workers or os.cpu_count()}
        ray.init(include_dashboard=False, log_to_driver=False, **where)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def use_gpus(ray, device: str) -> bool:
    """GPU actors when the cluster has GPUs (device "auto"), or when asked for ("cuda")."""
    if device == "cpu":
        return False
    has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    if device != "auto" and not has_gpus:
        raise ValueError(f"device {device!r} asked for, but the Ray cluster has no GPU")
    return has_gpus


class ChunkWorker:
    """A Ray Data actor: one Protector and the open gallery; turns chunk numbers into part files and records."""

    def __init__(self, spec: JobSpec, fail: bool):
        self.job, self.fail = ChunkJob(spec), fail

    def __call__(self, batch: dict) -> dict:
        with deterministic_cudnn():  # as for a local job: a recomputed chunk gives the same bytes
            records = [json.dumps(self.job.run(int(k), fail=self.fail)) for k in batch["chunk"]]
        return {"chunk": batch["chunk"], "record": np.array(records, dtype=object)}


def run_ray(ray, spec: JobSpec, pending: list[int], record: Callable[[int, dict], None], workers: int | None,
            gpus: bool, fail: bool) -> None:
    """Protect the pending chunks on the Ray cluster; ``record`` is called as each one finishes."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    size = workers or max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1)))
    chunks = ray.data.from_items([{"chunk": k} for k in pending], override_num_blocks=len(pending))
    results = chunks.map_batches(
        ChunkWorker, fn_constructor_kwargs={"spec": spec, "fail": fail}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(size, len(pending))), num_cpus=1, num_gpus=1 if gpus else 0,
    )
    for row in results.iter_rows():
        record(int(row["chunk"]), json.loads(row["record"]))
