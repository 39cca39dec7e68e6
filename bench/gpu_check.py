"""Benchmark of the protection loop on a GPU: reference vs fused vs fused + CUDA graph.

Default shadow decoder build_model("dcgan") (feature_dim 512, 112x112), encoder iresnet50 (or
mobilefacenet(512, 112)), T = 20 steps, B in {1, 64, 1024}. Models are randomly initialised,
with BatchNorm statistics taken from one pass over random inputs so activations stay in range.
Fused providers run the backend's default layout (channels_last for bf16 and fp16, NCHW for
fp32 and tf32); "-nhwc" and "-nchw" ask for one (FusedBackend(channels_last=True / False)).
On a GPU, "fused-bf16-compile+graph" (FusedBackend(compile_encoder=True), a candidate for small
batches) is timed last, at B=1 only.

Achieved TFLOP/s counts the reference computation's FLOPs (torch.utils.flop_counter: the
encoder once and T decoder forward + input-gradient passes) over each provider's time; the
fraction is of the bf16 dense peak (989 TFLOP/s on H100/H200 SXM). Each timing also records the
peak GPU memory, allocated and reserved, from before the warm-up (so a graph's capture counts) and,
through NVML, the energy per sample and mean power over at least a second of calls. The reference
and fused-bf16+graph run first at every B, so a spent time budget skips only the others; a graph
provider whose capture fell back to eager is an error, not an eager timing. OUTDIR/bench.json and
the table OUTDIR/bench_table.txt are rewritten after every measurement, so a failure keeps what
was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import advface_engine as afe
from advface_engine.backends.fused import FusedBackend, _tf32
from advface_engine.backends.reference import ReferenceBackend
from advface_engine.models import build_model
from advface_engine.protect import frozen
from advface_engine.speed import telemetry as tm

BF16_DENSE_PEAK = {"H100": 989.4, "H200": 989.4}  # TFLOP/s, SXM datasheets
PROVIDERS = ("reference", "fused-bf16+graph", "fused-bf16-nchw+graph", "fused-fp32+graph", "fused-bf16", "fused-fp32")
KEY = PROVIDERS[:2]  # the targets: fused + graph against the reference
# a candidate timed at B=1 only, on a GPU, last: the compile_encoder option (each batch size compiles anew)
COMPILED = "fused-bf16-compile+graph"
SLOW_CALL_MS = 2000.0  # a provider whose first timed call took longer is timed once
WARM_S = 0.25  # untimed calls after the warm-up, for every provider alike (clocks and caches settle)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def calibrate(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics from one pass (cumulative average), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(inputs)
    return model.eval()


def benchmark_models(device: torch.device, dim: int = 512, size: int = 112, width: int = 32,
                     encoder: str = "iresnet50") -> tuple[nn.Module, nn.Module]:
    """The benchmarks' (shadow, encoder): dcgan and ``encoder`` with random weights (from the current
    seed) and BatchNorm statistics calibrated on 64 random features (the encoder's on their images)."""
    shadow = build_model("dcgan", feature_dim=dim, size=size, width=width).to(device)
    enc = build_model(encoder, num_features=dim, input_size=size).to(device)
    z_calib = F.normalize(torch.randn(64, dim, device=device), dim=1)
    calibrate(shadow, z_calib)
    with torch.no_grad():
        calibrate(enc, shadow(z_calib))
    return shadow, enc


def make_backend(name: str, shadow, encoder, cfg):
    if name == "reference":
        return ReferenceBackend(shadow, encoder, cfg)
    spec = name.removeprefix("fused-").removesuffix("+graph")  # fused-<dtype>[-nhwc|-nchw|-compile][+graph]
    dtype, _, option = spec.partition("-")
    return FusedBackend(shadow, encoder, cfg, dtype=dtype, graphs=name.endswith("+graph"),
                        channels_last={"nhwc": True, "nchw": False}.get(option), compile_encoder=option == "compile")


def time_ms(fn, reps: int, device: torch.device) -> list[float]:
    """Milliseconds per call: CUDA events on a GPU, the host clock on a CPU (warm up first)."""
    times = []
    for _ in range(reps):
        if device.type != "cuda":
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def reference_flops(shadow: nn.Module, encoder: nn.Module, z: torch.Tensor, steps: int) -> int:
    """FLOPs of the reference loop for z: E(S(z)) once, then per step S forward and the gradient to z.

    (Written with .backward(): FlopCounterMode does not accept autograd.grad on a leaf.)
    """
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            x_shadow = shadow(z)
            encoder(x_shadow)
        z_t = z.clone().requires_grad_(True)
        for _ in range(steps):
            (shadow(z_t) - x_shadow).abs().sum().backward()
    return counter.get_total_flops()


def agreement(a: torch.Tensor, b: torch.Tensor, alpha: float) -> float:
    return ((a - b).abs() <= 2 * alpha).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--encoder", default="iresnet50", choices=["iresnet50", "mobilefacenet"])
    parser.add_argument("--budget", type=float, default=200.0, help="seconds; later measurements are skipped")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (needs TRITON_INTERPRET=1 and small sizes)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--feature-dim", type=int, default=512)
    parser.add_argument("--width", type=int, default=32, help="decoder width (32 is build_model's default)")
    parser.add_argument("--reps", type=int, nargs=2, default=[10, 3], help="repeats for B <= 64 and for larger B")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in BF16_DENSE_PEAK.items() if k in name), None)
    report: dict = {"gpu": name, "torch": torch.__version__, "bf16_dense_peak_tflops": peak, "args": vars(args),
                    "results": [], "checks": {}, "errors": []}
    import triton

    report["triton"] = triton.__version__
    report["nvml"] = tm.nvml_readings(device)  # name, memory used, power at the start; {} without NVML
    report["reference_precision"] = f"cuDNN fp32 convolutions: {'tf32' if tm.conv_tf32() else 'ieee'}"
    json_path = out / "bench.json"

    torch.manual_seed(0)
    dim = args.feature_dim
    shadow, encoder = benchmark_models(device, dim, args.size, args.width, args.encoder)
    cfg = afe.ProtectConfig(eps=0.03, alpha=0.01, steps=args.steps, anchor="shadow", random_start=False)

    with frozen(shadow, encoder):
        z1 = F.normalize(torch.randn(1, dim, device=device), dim=1)
        flops_per_sample = reference_flops(shadow, encoder, z1, args.steps)
        report["flops_per_sample"] = flops_per_sample
        write_json(json_path, report)

        # correctness on this model: each fused dtype (eager, and fp32/bf16 graphed) vs the IEEE fp32 reference
        z = F.normalize(torch.randn(64, dim, device=device), dim=1)
        with _tf32(False):
            want = ReferenceBackend(shadow, encoder, cfg).run(z)
        for provider in ("fused-fp32", "fused-fp32+graph", "fused-fp32-nhwc", "fused-tf32", "fused-fp16",
                         "fused-bf16", "fused-bf16+graph", "fused-bf16-nchw+graph"):
            try:
                got = make_backend(provider, shadow, encoder, cfg).run(z)
                report["checks"][provider] = {"within_2alpha_of_reference": agreement(got, want, cfg.alpha),
                                              "max_abs_diff": (got - want).abs().max().item()}
            except Exception as err:  # keep going: the other checks and the timings are still worth having
                report["checks"][provider] = {"error": f"{type(err).__name__}: {err}"}
                report["errors"].append(traceback.format_exc())
        write_json(json_path, report)

        # the targets first (reference and bf16 + graph at every B), so a spent budget skips the rest
        zs = {batch: F.normalize(torch.randn(batch, dim, device=device), dim=1) for batch in args.batches}
        plan = [(batch, provider) for provider in KEY for batch in args.batches]
        plan += [(batch, provider) for provider in PROVIDERS if provider not in KEY for batch in args.batches]
        plan += [(1, COMPILED)] if device.type == "cuda" and 1 in args.batches else []
        for batch, provider in plan:
            row = {"provider": provider, "batch": batch}
            if time.time() - began > args.budget:
                row["skipped"] = "time budget"
            else:
                try:
                    reps = args.reps[0] if batch <= 64 else args.reps[1]
                    row.update(measure(make_backend(provider, shadow, encoder, cfg), provider, zs[batch], reps))
                    row["tflops"] = flops_per_sample * batch / (row["ms_median"] * 1e-3) / 1e12
                    row["frac_bf16_peak"] = row["tflops"] / peak if peak else None
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {err}"
                    report["errors"].append(traceback.format_exc())
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            report["results"].append(row)
            add_speedups(report["results"])
            write_json(json_path, report)
            write_table(out / "bench_table.txt", report, args)
            print(row_text(row), flush=True)

    print(write_table(out / "bench_table.txt", report, args))


def measure(backend, provider: str, z: torch.Tensor, reps: int) -> dict:
    """One provider at one batch: median ms, samples/s, peak memory (the warm-up and any capture
    included) and, through NVML, energy per sample and mean power over at least a second of calls.
    Timing starts after a warm-up call and WARM_S more seconds of calls (at least one). A call slower
    than SLOW_CALL_MS is timed once."""
    device = z.device
    tm.reset_peak_memory(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.run(z)  # warm-up: compilation, cuDNN choices, graph capture
    if provider.endswith("+graph") and not backend.graphs:  # else an eager timing would pass for a graph's
        raise RuntimeError("CUDA graph capture fell back to eager: " + "; ".join(str(w.message) for w in caught))
    warm_until = time.perf_counter() + WARM_S  # steady state: at least one more call, then WARM_S of them
    while True:
        time_ms(lambda: backend.run(z), 1, device)  # (each call waited for, as the timed ones are)
        if time.perf_counter() >= warm_until:
            break
    with tm.EnergyMeter(device) as energy:
        times = time_ms(lambda: backend.run(z), 1, device)
        if times[0] < SLOW_CALL_MS:
            times += time_ms(lambda: backend.run(z), reps - 1, device)
        extra = energy.top_up(lambda: backend.run(z))
    ms = statistics.median(times)
    row = {"ms_median": ms, "ms_all": times, "samples_per_s": z.shape[0] / (ms * 1e-3), **tm.peak_memory(device)}
    if energy.joules is not None:
        row.update(energy_per_sample_j=energy.joules / ((len(times) + extra) * z.shape[0]),
                   power_w=energy.joules / energy.seconds)
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_reference on every timed row whose batch has a timed reference row."""
    reference = {r["batch"]: r["ms_median"] for r in rows if r["provider"] == "reference" and "ms_median" in r}
    for r in rows:
        if "ms_median" in r and r["batch"] in reference:
            r["speedup_vs_reference"] = reference[r["batch"]] / r["ms_median"]


def write_table(path: Path, report: dict, args) -> str:
    """The results as text, by batch then provider (rewritten after every measurement)."""
    lines = [f"{report['gpu']}  torch {report['torch']}  triton {report['triton']}  encoder {args.encoder}  "
             f"T={args.steps}  size {args.size}  reference GFLOP/sample {report['flops_per_sample'] / 1e9:.2f}",
             f"reference timed at PyTorch's settings ({report['reference_precision']}); fused-fp32 is IEEE fp32",
             f"checks: {json.dumps(report['checks'])}",
             f"{'provider':<18}{'B':>6}{'ms':>10}{'samples/s':>12}{'TFLOP/s':>9}{'%bf16pk':>9}{'speedup':>9}"
             f"{'mJ/sample':>11}{'peak MiB':>10}{'rsvd MiB':>10}"]
    order = {p: i for i, p in enumerate(PROVIDERS + (COMPILED,))}
    rows = sorted(report["results"], key=lambda r: (r["batch"], order.get(r["provider"], len(order))))
    lines += [row_text(r) for r in rows]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def row_text(r: dict) -> str:
    if "ms_median" not in r:
        return f"{r['provider']:<18}{r['batch']:>6}  {r.get('error') or r.get('skipped')}"
    frac = f"{100 * r['frac_bf16_peak']:.2f}" if r.get("frac_bf16_peak") is not None else "-"
    energy = f"{1e3 * r['energy_per_sample_j']:.3f}" if "energy_per_sample_j" in r else "-"
    memory = r.get("peak_memory_mb", r.get("peak_rss_mb"))
    reserved = f"{r['peak_reserved_mb']:.0f}" if "peak_reserved_mb" in r else "-"
    return (f"{r['provider']:<18}{r['batch']:>6}{r['ms_median']:>10.2f}{r['samples_per_s']:>12.1f}"
            f"{r['tflops']:>9.2f}{frac:>9}{r.get('speedup_vs_reference', float('nan')):>9.2f}"
            f"{energy:>11}{memory:>10.0f}{reserved:>10}")


if __name__ == "__main__":
    main()
