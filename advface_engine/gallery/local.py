"""``engine="local"``: the pending chunks protected in this process, reading the next chunk and writing the
previous one while one is computed (beside distributed.py, the same on Ray)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .formats import Chunk
from .worker import ChunkJob


class Prefetch:
    """Runs an iterator in a background thread, up to ``depth`` items queued, so reading overlaps compute."""

    def __init__(self, iterable, depth: int = 1):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(iterable),), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _fill(self, items) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
        except BaseException as err:  # handed to the consumer
            self._put((False, err))
            return
        self._put((False, None))

    def __iter__(self):
        while True:
            ok, item = self._queue.get()
            if ok:
                yield item
            elif item is None:
                return
            else:
                raise item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_local(job: ChunkJob, pending: list[int], record, fail: bool, progress=None, seen=None) -> None:
    """Protect the pending chunks in this process. While one chunk is computed, the next is read and checksummed
    (a reader thread) and the previous one is stored and recorded, then handed to ``seen(k, record, chunk, rows)``
    (the input's chunk and its protected rows: the summary's figures), by a writer thread."""

    def save(k: int, rec: dict, chunk: Chunk, rows: np.ndarray) -> None:
        rec = job.save(k, rec, rows, chunk.ids)
        record(k, rec)
        if seen is not None:
            seen(k, rec, chunk, rows)

    with Prefetch((k, job.read(k)) for k in pending) as chunks, ThreadPoolExecutor(1) as writer:
        saving = None
        for k, loaded in chunks:
            rec, rows = job.compute(k, loaded, fail=fail, progress=progress)
            if saving is not None:
                saving.result()  # one chunk in flight; a write error stops the job here
            if rows is None:
                record(k, rec)  # bad rows under "fail": raises
            saving = writer.submit(save, k, rec, loaded.chunk, rows)
        if saving is not None:
            saving.result()
