"""CUDA graphs of the fused backend: the protection of a batch captured once per padded batch size and
replayed, with an eager stand-in of the same contract for tests on a CPU."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

MAX_GRAPHS = 8  # captures kept per plan; the oldest goes first


@contextlib.contextmanager
def _host_syncs_refused():
    """Ops that make the host wait for the GPU raise instead (torch's sync debug mode), for the call."""
    saved = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(saved)


def graph_size(batch: int) -> int:
    """The captured batch size that serves ``batch`` rows: a function of the batch alone, so a batch
    runs at the same padded size whatever ran before (split-K and cuDNN choices depend on the size,
    and a resumed gallery job must reproduce its chunks bit for bit). Powers of two up to 64, then
    multiples of 64: at most twice the rows for small batches, fewer than 64 extra rows beyond."""
    if batch <= 64:
        return 1 << (batch - 1).bit_length()
    return -(-batch // 64) * 64


class CudaGraph:
    """The protection of one batch size captured once: static z and noise in, static out and losses.

    Warm-up (Triton compilation, cuDNN algorithm choice) runs twice on the backend's capture stream,
    the second time with host syncs refused: an encoder that waits for the host (an ONNX session)
    fails there, before the capture, rather than invalidating it (which on torch 2.11 leaves the
    caching allocator unable to release memory). Then the whole loop is captured into the memory
    pool the backend's captures share; ``replay`` reruns it on whatever the static inputs hold.
    """

    eager = False

    def __init__(self, z: Tensor, noise: Tensor | None):
        self.z, self.noise = z, noise
        self.out: Tensor | None = None
        self.losses: Tensor | None = None

    def capture(self, protect, stream, pool) -> None:
        device = self.z.device
        self.graph = torch.cuda.CUDAGraph()
        # the outer stream context restores the caller's stream even if the capture fails midway
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)):
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                protect(self.z, self.noise)
                with _host_syncs_refused():
                    protect(self.z, self.noise)
            torch.cuda.current_stream(device).wait_stream(stream)
            # thread_local: other threads (a gallery job's reader pinning memory) may call CUDA meanwhile
            with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                self.out, self.losses = protect(self.z, self.noise)

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph(CudaGraph):
    """CudaGraph's contract run eagerly (any device): replay recomputes into the same output tensors.

    For tests of what surrounds the capture (batch sizes, padding, noise, eviction) on a CPU.
    """

    eager = True

    def capture(self, protect, stream=None, pool=None) -> None:
        self._protect = protect
        self.out, self.losses = protect(self.z, self.noise)

    def replay(self) -> None:
        out, losses = self._protect(self.z, self.noise)
        self.out.copy_(out)
        if losses is not None:
            self.losses.copy_(losses)


class CaptureFailed(RuntimeError):
    """A capture raised (its error is the cause); every capture was dropped."""


class Captures(dict):
    """The captures of one plan by ``graph_size``, oldest first, at most MAX_GRAPHS; one capture stream
    and memory pool shared by all sizes, made at the first capture on the batch's device."""

    def __init__(self):
        super().__init__()
        self.stream = self.pool = None

    def clear(self) -> None:
        super().clear()
        self.stream = self.pool = None

    def run(self, protect, graph_type: type[CudaGraph], z: Tensor,
            noise: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``protect(z, noise)`` replayed from the capture for z's batch size, captured first if new; a batch
        is padded up to that size. Raises CaptureFailed when the capture does."""
        batch, size = z.shape[0], graph_size(z.shape[0])
        graph = self.get(size)
        if graph is None:
            if len(self) >= MAX_GRAPHS:  # the oldest capture goes
                self.pop(next(iter(self)))
            static = z.new_empty(size, z.shape[1])
            graph = graph_type(static, None if noise is None else torch.empty_like(static))
            _fill(graph, z, noise)
            if self.stream is None and not graph.eager:
                self.stream, self.pool = torch.cuda.Stream(device=z.device), torch.cuda.graph_pool_handle()
            try:
                graph.capture(protect, self.stream, self.pool)
            except RuntimeError as err:  # e.g. an encoder that synchronises with the host
                super().clear()
                raise CaptureFailed(str(err)) from err
            self[size] = graph
        _fill(graph, z, noise)
        graph.replay()
        losses = graph.losses[:, :batch].clone() if graph.losses is not None else None
        return graph.out[:batch].clone(), losses


def _fill(graph: CudaGraph, z: Tensor, noise: Tensor | None) -> None:
    """Copy a batch into a capture's static inputs; padding rows are copies of a real row."""
    batch, size = z.shape[0], graph.z.shape[0]
    graph.z[:batch].copy_(z)
    graph.z[batch:].copy_(z[:1].expand(size - batch, -1))
    if noise is not None:
        graph.noise[:batch].copy_(noise)
        graph.noise[batch:].copy_(noise[:1].expand(size - batch, -1))
