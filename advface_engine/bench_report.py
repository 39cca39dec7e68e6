"""``advface bench-report``: the protection benchmarks' pytest-benchmark JSON as a Markdown table,
a PNG plot (throughput vs batch size per backend, and the ratio to the naive baseline) and the
speedup ratios, printed.

    pytest bench --benchmark-only --benchmark-json=bench.json
    advface bench-report bench.json --out bench_report
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

BASELINE = "naive"
BACKEND_ORDER = ("naive", "reference", "compiled", "fused", "fused+graph", "fused-bf16+graph", "fused-bf16-nchw+graph")


@dataclass(frozen=True)
class Result:
    """One benchmark case: a backend protecting a batch of ``batch`` features in ``steps`` steps."""

    mode: str
    batch: int
    steps: int
    backend: str
    ms: float  # per batch
    rounds: int
    extra: dict

    @property
    def case(self) -> tuple[str, int, int]:
        return self.mode, self.batch, self.steps

    @property
    def embeddings_per_s(self) -> float:
        return self.batch / (self.ms * 1e-3)


def _read(path: str | os.PathLike) -> dict:
    """A pytest-benchmark JSON file's content, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark JSON at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is not pytest-benchmark output (no 'benchmarks' list)")
    return data


def _is_protection(bench: dict) -> bool:
    return {"backend", "mode", "batch", "steps"} <= (bench.get("extra_info") or {}).keys()


def other_cases(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """The other suites' cases (e.g. the gallery job's) with the numbers they recorded in extra_info."""
    return [(str(bench.get("name", "?")), {k: v for k, v in (bench.get("extra_info") or {}).items()
                                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for bench in _read(path)["benchmarks"] if not _is_protection(bench)]


def load_results(path: str | os.PathLike, stat: str = "median", required: bool = True) -> tuple[list[Result], dict]:
    """The protection cases of a pytest-benchmark JSON file, and its machine_info.

    ``stat``: "median" (ms per batch as the benchmark recorded it: CUDA events on a GPU) or
    "min" (the best round by the benchmark's timer: steadier on a shared machine). With
    ``required``, a file without protection cases is a ValueError.
    """
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    data = _read(path)
    results = []
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info") or {}
        if not _is_protection(bench):
            continue  # another suite's case (e.g. the gallery job): see other_cases
        stats = bench.get("stats") or {}
        if stat == "median" and "ms_per_batch" in extra:
            ms = float(extra["ms_per_batch"])
        elif stat in stats:
            ms = 1e3 * float(stats[stat])
        else:
            raise ValueError(f"benchmark {bench.get('name')!r} has no {stat} time")
        timer = (bench.get("options") or {}).get("timer")
        events = stat == "median" and extra.get("ms_source", "").startswith("cuda")
        extra = {**extra, "timer": "CUDA events" if events else timer}
        results.append(Result(extra["mode"], int(extra["batch"]), int(extra["steps"]), extra["backend"], ms,
                              int(stats.get("rounds", 0)), extra))
    if not results and required:
        raise ValueError(f"{path} holds no protection benchmarks (run `pytest bench --benchmark-only "
                         f"--benchmark-json={path}`)")
    order = {name: i for i, name in enumerate(BACKEND_ORDER)}
    results.sort(key=lambda r: (r.mode != "online", r.batch, r.steps, order.get(r.backend, len(order)), r.backend))
    return results, data.get("machine_info") or {}


def speedups(results: list[Result], baseline: str = BASELINE) -> dict[tuple, float]:
    """{(mode, batch, steps, backend): baseline time / backend time} for cases that ran the baseline."""
    base = {r.case: r.ms for r in results if r.backend == baseline}
    return {(*r.case, r.backend): base[r.case] / r.ms for r in results if r.case in base}


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def _tflops(r: Result) -> float | None:
    """Achieved TFLOP/s: the protection's FLOPs (flop_counter) over the time per batch."""
    return r.extra["protect_flops"] / (r.ms * 1e-3) / 1e12 if "protect_flops" in r.extra else None


def _peak_mib(r: Result) -> float | None:
    """Peak memory of the case: PyTorch's allocator on a GPU; on a CPU the process's resident set,
    shown only when it was reset for the case (a whole-process peak would carry over from others)."""
    if "peak_memory_mb" in r.extra:
        return r.extra["peak_memory_mb"]
    if r.extra.get("peak_rss_scope") == "since reset":
        return r.extra.get("peak_rss_mb")
    return None


def machine_line(results: list[Result], machine: dict) -> str:
    """The device, the host CPU, on a CPU the torch threads used, and the timer."""
    first = results[0].extra
    device = first.get("device", "?")
    cpu = (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or ""
    line = f"device: {device}" + (f", host CPU: {cpu}" if cpu else "")
    if device == "cpu" and "threads" in first:
        line += f", {first['threads']} torch thread(s)"
    timers = sorted({r.extra["timer"] for r in results if r.extra.get("timer")})
    return line + (f", timer: {' / '.join(timers)}" if timers else "")


def markdown_table(results: list[Result], stat: str = "median") -> str:
    """One row per case and backend; columns with no value in any row are left out."""
    ratio = speedups(results)
    columns = [
        ("mode", lambda r: r.mode), ("B", lambda r: str(r.batch)), ("T", lambda r: str(r.steps)),
        ("backend", lambda r: r.backend),
        (f"ms / batch ({stat})", lambda r: _fmt(r.ms)),
        ("embeddings/s", lambda r: _fmt(r.embeddings_per_s)),
        (f"vs {BASELINE}", lambda r: f"{ratio[(*r.case, r.backend)]:.2f}x" if (*r.case, r.backend) in ratio else None),
        ("TFLOP/s", lambda r: f"{_tflops(r):.3g}" if _tflops(r) is not None else None),
        ("% of peak", lambda r: f"{100 * _tflops(r) / r.extra['peak_tflops']:.2g} ({r.extra.get('precision', '?')})"
         if _tflops(r) is not None and r.extra.get("peak_tflops") else None),
        ("peak memory (MiB)", lambda r: _fmt(_peak_mib(r)) if _peak_mib(r) is not None else None),
        ("power (W)", lambda r: _fmt(r.extra["power_w"]) if "power_w" in r.extra else None),
        ("J / embedding", lambda r: f"{r.extra['energy_per_embedding_j']:.3g}"
         if "energy_per_embedding_j" in r.extra else None),
    ]
    cells = [[get(r) for _, get in columns] for r in results]
    keep = [i for i in range(len(columns)) if any(row[i] is not None for row in cells)]
    lines = ["| " + " | ".join(columns[i][0] for i in keep) + " |",
             "|" + "|".join(" --- " if i < 4 else " ---: " for i in keep) + "|"]
    lines += ["| " + " | ".join(row[i] or "" for i in keep) + " |" for row in cells]
    return "\n".join(lines)


def speedup_lines(results: list[Result]) -> list[str]:
    ratio = speedups(results)
    return [f"{backend} vs {BASELINE}: {mode} B={batch} T={steps}: {value:.2f}x"
            for (mode, batch, steps, backend), value in ratio.items() if backend != BASELINE]


def plot(results: list[Result], path: str | os.PathLike, steps: int | None = None) -> int:
    """Throughput vs batch size per backend, and its ratio to the baseline, at ``steps`` steps
    (default: the steps count measured at the most batch sizes). Returns the steps plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if steps is None:
        counts = {t: len({r.batch for r in results if r.steps == t}) for t in {r.steps for r in results}}
        steps = max(sorted(counts), key=counts.get)
    chosen = [r for r in results if r.steps == steps]
    if not chosen:
        raise ValueError(f"no results at T={steps}; measured: {sorted({r.steps for r in results})}")
    ratio = speedups(chosen)
    compared = any(backend != BASELINE for *_, backend in ratio)  # else no ratio panel (nothing to draw)
    fig, axes = plt.subplots(1, 2 if compared else 1, figsize=(11 if compared else 5.8, 4.2), squeeze=False)
    ax_rate, ax_ratio = axes[0][0], axes[0][1] if compared else None
    backends = [b for b in BACKEND_ORDER if any(r.backend == b for r in chosen)]
    backends += sorted({r.backend for r in chosen} - set(backends))
    for i, backend in enumerate(backends):
        style = dict(marker="o", label=backend, color=f"C{i}")
        rows = sorted((r for r in chosen if r.backend == backend), key=lambda r: r.batch)
        ax_rate.plot([r.batch for r in rows], [r.embeddings_per_s for r in rows], **style)
        pts = [r for r in rows if (*r.case, backend) in ratio]
        if compared and pts and backend != BASELINE:
            ax_ratio.plot([r.batch for r in pts], [ratio[(*r.case, backend)] for r in pts], **style)
    device = chosen[0].extra.get("device", "")
    batches = sorted({r.batch for r in chosen})
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size B")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_rate.set_yscale("log")
    ax_rate.set_ylabel("embeddings / s")
    ax_rate.set_title(f"throughput, T={steps} ({device})")
    if compared:
        ax_ratio.set_ylabel(f"time of {BASELINE} / time of backend")
        ax_ratio.set_title(f"speedup over the {BASELINE} baseline, T={steps}")
        ax_ratio.axhline(1.0, color="gray", lw=0.8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return steps


def write_report(json_path: str | os.PathLike, out: str | os.PathLike, stat: str = "median",
                 steps: int | None = None) -> str:
    """Write OUT/bench_report.md (and OUT/bench_throughput.png when there are protection cases);
    return the report's text. Other suites' cases are listed with their recorded figures."""
    others = other_cases(json_path)
    results, machine = load_results(json_path, stat, required=not others)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = []
    if results:
        text += [f"Protection benchmarks ({machine_line(results, machine)}); time per batch: {stat} over rounds.", "",
                 markdown_table(results, stat), "", "Speedups:", ""]
        text += [f"- {line}" for line in speedup_lines(results)]
        try:
            shown = plot(results, out / "bench_throughput.png", steps)
            text += ["", f"![throughput at T={shown}](bench_throughput.png)"]
        except ImportError:
            text += ["", "(no plot: matplotlib is not installed; pip install 'advface-engine[eval]')"]
    if others:
        text += (["", ""] if text else []) + ["Other cases (figures from their extra_info):", ""]
        text += [f"- {name}: " + (", ".join(f"{k} {_fmt(v)}" for k, v in figures.items()) or "no figures")
                 for name, figures in others]
    report = "\n".join(text) + "\n"
    tmp = out / "bench_report.md.tmp"
    tmp.write_text(report)
    os.replace(tmp, out / "bench_report.md")
    return report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-report", help="benchmark JSON -> Markdown table, throughput plot, speedups")
    p.add_argument("json", help="pytest-benchmark output (pytest bench --benchmark-only --benchmark-json=FILE)")
    p.add_argument("--out", default="bench_report", help="folder for bench_report.md and bench_throughput.png")
    p.add_argument("--stat", choices=("median", "min"), default="median", help="time per batch taken from rounds")
    p.add_argument("--steps", type=int, default=None, help="T shown in the plot (default: the most measured)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(write_report(args.json, args.out, args.stat, args.steps), end="")
    print(f"wrote {Path(args.out) / 'bench_report.md'}")
    return 0
