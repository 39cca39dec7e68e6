"""Where the fused backend's time goes at one batch size: the next question after bench/gpu_check.py.

    python bench/profile_fused.py --out OUTDIR [--batch 1] [--dtype bf16]

Same models as gpu_check.py (dcgan shadow, iresnet50 encoder, random weights, calibrated BatchNorm).
Writes OUTDIR/profile_B{batch}.json and .txt:
- ``call``: one ``backend.run`` on the captured graph, host time (until the call returns, the GPU
  work queued) and total time (until the GPU is done), medians; ``protector_call``: the same for
  a Protector call (what an online caller sees: the models frozen and z checked around the run);
  ``weights_check_host_ms``: the host time of the weights check a call makes (weights_key);
- ``encoder``: E(x~) alone, each form captured in its own CUDA graph: the caller's encoder under
  autocast (which casts every weight at every call) against the backend's copy of it (BatchNorm
  folded, weights stored cast; NHWC with channels_last), so the copy's gain is measured, not
  assumed; and, as a candidate (the backend's compile_encoder option, off by default), that copy
  through torch.compile, and then a whole call with that option on (``call_compile_encoder``);
- ``phases``: the loop run eagerly under torch.profiler, device time of S(z), E(x~) and the
  steps, the number of kernels it launched (what the graph replays) and those that take the most;
- ``call_cudnn_benchmark`` (a candidate, GPU only): ``call`` for a backend captured under cuDNN's
  benchmark mode (every convolution algorithm timed, the fastest kept).
On a CPU (TRITON_INTERPRET=1, small --size) it runs as a smoke test: host clock, eager, no graphs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_check import benchmark_models, time_ms, write_json
from torch.profiler import ProfilerActivity, profile, record_function

import advface_engine as afe
from advface_engine.backends.encoder import CompiledEncoder, encode
from advface_engine.backends.fused import FusedBackend, _tf32
from advface_engine.backends.modules import weights_key
from advface_engine.protect import frozen

PHASES = ("S(z)", "E(x~)", "steps")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def median_ms(fn, reps: int, device: torch.device) -> float:
    fn()
    return statistics.median(time_ms(fn, reps, device))


def graphed(fn, device: torch.device):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); ``fn`` itself off the GPU."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn(), fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def call_times(call, z: torch.Tensor, reps: int) -> dict:
    """Host and total milliseconds of call(z), medians (the first call captures, untimed)."""
    call(z)
    host, total = [], []
    for _ in range(reps):
        if z.is_cuda:
            torch.cuda.synchronize(z.device)
        start = time.perf_counter()
        call(z)
        host.append(1e3 * (time.perf_counter() - start))
        if z.is_cuda:
            torch.cuda.synchronize(z.device)
        total.append(1e3 * (time.perf_counter() - start))
    return {"host_ms": statistics.median(host), "total_ms": statistics.median(total)}


def median_host_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def cudnn_benchmark_call(shadow, encoder, cfg, dtype: str, layout, z: torch.Tensor, reps: int) -> dict:
    """A whole call (``call_times``) whose capture ran with cuDNN's benchmark mode, which times every
    algorithm for each convolution's shape and keeps the fastest (the backend does not do this: the
    choice may differ between processes, and gallery jobs must be repeatable bit for bit)."""
    cudnn = torch.backends.cudnn
    backend = FusedBackend(shadow, encoder, cfg, dtype=dtype, channels_last=layout)
    with cudnn.flags(enabled=cudnn.enabled, benchmark=True, benchmark_limit=0, deterministic=False,
                     allow_tf32=cudnn.allow_tf32):
        backend.run(z)  # warm-up and capture
    return call_times(backend.run, z, reps) | {"graphs": backend.graphs}


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def phases(backend: FusedBackend, z: torch.Tensor, steps: int, rows: int) -> tuple[dict, int, str]:
    """Device time of each phase of one eager protection, the kernels it launched (what its graph
    replays), and the kernel table (host time off a GPU, and no launches)."""
    cuda = z.is_cuda
    # on a GPU the host side too: a range's device time is that of the kernels launched within it
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]

    def once():
        with record_function("S(z)"):
            x_shadow, _ = backend.plan.forward(z, keep=False)
        with record_function("E(x~)"):
            anchor = F.normalize(backend._encode(x_shadow).float(), dim=1)
        z_t = anchor.clone()
        with record_function("steps"):
            for t in range(steps):
                backend.step(z_t, anchor, [x_shadow], last=t == steps - 1)

    once()
    if cuda:
        torch.cuda.synchronize(z.device)
    with profile(activities=activities) as prof:
        once()
        if cuda:
            torch.cuda.synchronize(z.device)
    events = prof.key_averages()
    attr = "device_time_total" if cuda else "cpu_time_total"
    times: dict[str, float] = {}
    for e in events:  # on a GPU a range may show twice (host side, device annotation): the larger
        if e.key in PHASES:
            times[e.key] = max(times.get(e.key, 0.0), getattr(e, attr, getattr(e, "cuda_time_total", 0)) / 1e3)
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return times, launches, events.table(sort_by=sort, row_limit=rows, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="profile_fused")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--channels-last", choices=["default", "on", "off"], default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (needs TRITON_INTERPRET=1 and small sizes)")
    parser.add_argument("--encoder", default="iresnet50", choices=["iresnet50", "mobilefacenet"])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--feature-dim", type=int, default=512)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25, help="kernels listed in the table")
    parser.add_argument("--no-compile-encoder", dest="compile_encoder", action="store_false",
                        help="skip timing torch.compile of the encoder's copy (inductor; about a minute for iresnet50)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(0)
    dim = args.feature_dim
    shadow, encoder = benchmark_models(device, dim, args.size, args.width, args.encoder)
    cfg = afe.ProtectConfig(eps=0.03, alpha=0.01, steps=args.steps, anchor="shadow", random_start=False)
    layout = {"default": None, "on": True, "off": False}[args.channels_last]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"gpu": name, "torch": torch.__version__, "args": vars(args)}
    z = F.normalize(torch.randn(args.batch, dim, device=device), dim=1)
    stem = out / f"profile_B{args.batch}"
    # what an online caller sees: a Protector call (freezing the models, checking z) around the backend's run
    protector = afe.Protector(shadow, encoder, cfg, backend="fused",
                              backend_options={"dtype": args.dtype, "channels_last": layout})
    report["protector_call"] = call_times(protector, z, args.reps)
    del protector
    # slowest part last; the JSON is rewritten after each. TF32 as backend.run sets it (for --dtype tf32)
    with frozen(shadow, encoder), torch.no_grad(), _tf32(args.dtype == "tf32"):
        backend = FusedBackend(shadow, encoder, cfg, dtype=args.dtype, channels_last=layout)
        report["channels_last"] = backend.channels_last
        report["call"] = call_times(backend.run, z, args.reps)
        report["weights_check_host_ms"] = median_host_ms(lambda: weights_key(shadow, encoder), args.reps)
        write_json(stem.with_suffix(".json"), report)

        x_shadow, _ = backend.plan.forward(z, keep=False)
        copied, nhwc = backend._encoder_for(x_shadow)
        report["encoder"] = {"copy": copied is not backend.encoder, "nhwc": nhwc}

        def time_encoder(label: str, module, layout: bool) -> bool:
            try:
                run = graphed(lambda: encode(x_shadow, module, backend.dtype, layout), device)
                report["encoder"][label] = median_ms(run, args.reps, device)
            except Exception as err:  # noqa: BLE001 - e.g. no compiler toolchain: report it, keep going
                report["encoder"][label] = None
                report["encoder"][label.replace("_ms", "_error")] = f"{type(err).__name__}: {str(err)[:300]}"
            write_json(stem.with_suffix(".json"), report)
            return report["encoder"][label] is not None

        time_encoder("as_given_ms", backend.encoder, False)
        time_encoder("copy_ms", copied, nhwc)
        report["phases_ms"], report["kernel_launches"], table = phases(backend, z, args.steps, args.rows)
        write_json(stem.with_suffix(".json"), report)
        if args.compile_encoder:  # a candidate, measured here before the backend would use it
            compiled = torch.compile(copied)
            if time_encoder("compiled_copy_ms", compiled, nhwc):
                want, got = (encode(x_shadow, m, backend.dtype, nhwc).float() for m in (copied, compiled))
                report["encoder"]["compiled_cosine_min"] = F.cosine_similarity(want, got).min().item()
                # the whole call with the option on (FusedBackend(compile_encoder=True)), beside "call"
                on = FusedBackend(shadow, encoder, cfg, dtype=args.dtype, channels_last=layout, compile_encoder=True)
                report["call_compile_encoder"] = call_times(on.run, z, args.reps)
                copy = on._encoder_copy[0] if on._encoder_copy else None
                report["call_compile_encoder"].update(  # graphs False: the capture fell back to eager
                    compiled=isinstance(copy, CompiledEncoder) and copy.failure is None, graphs=on.graphs)
        if device.type == "cuda":  # a candidate: cuDNN's algorithms chosen by timing them at the capture
            try:
                report["call_cudnn_benchmark"] = cudnn_benchmark_call(shadow, encoder, cfg, args.dtype, layout, z,
                                                                      args.reps)
            except Exception as err:  # noqa: BLE001 - report it, keep the rest
                report["call_cudnn_benchmark"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    write_json(stem.with_suffix(".json"), report)
    call, enc = report["call"], report["encoder"]
    text = (f"{name}  torch {torch.__version__}  {args.encoder}  B={args.batch}  T={args.steps}  {args.dtype}  "
            f"channels_last={backend.channels_last}\n"
            f"backend.run on the graph: host {call['host_ms']:.3f} ms, total {call['total_ms']:.3f} ms; "
            f"Protector call: host {report['protector_call']['host_ms']:.3f} ms, "
            f"total {report['protector_call']['total_ms']:.3f} ms\n"
            f"E(x~) alone, graphed: as given (autocast casts) {enc['as_given_ms']:.3f} ms, "
            f"backend's copy {enc['copy_ms']:.3f} ms (copy made: {enc['copy']}, NHWC: {enc['nhwc']}), "
            f"torch.compile'd copy {_ms(enc.get('compiled_copy_ms'))} (least cosine to the copy's features: "
            f"{enc.get('compiled_cosine_min', float('nan')):.6f})\n"
            + (f"backend.run with compile_encoder: {_ms(report['call_compile_encoder']['total_ms'])} total "
               f"(encoder compiled: {report['call_compile_encoder']['compiled']}, "
               f"graph: {report['call_compile_encoder']['graphs']})\n"
               if "call_compile_encoder" in report else "")
            + (f"backend.run captured with cuDNN benchmark mode: "
               f"{_ms(report['call_cudnn_benchmark'].get('total_ms'))} total "
               f"{report['call_cudnn_benchmark'].get('error', '')}\n" if "call_cudnn_benchmark" in report else "")
            + f"weights check alone (host): {report['weights_check_host_ms']:.3f} ms\n"
            + "eager phases (device ms): " + ", ".join(f"{k} {v:.3f}" for k, v in report["phases_ms"].items())
            + f"; {report['kernel_launches']} kernel launches"
            + f"\n{table}\n")
    stem.with_suffix(".txt").write_text(text)
    print(text)

if __name__ == "__main__":
    main()
