"""``advface bench-report``: pytest-benchmark JSON files as a Markdown table, a PNG plot per batch-size
sweep and the speedup ratios, printed.

One file: every protection case with its ratio to the naive baseline, and a plot per step count T of
throughput against batch size (with the ratio to the baseline beside it). Several files (saved runs,
e.g. before and after a change): the cases side by side, each later run's ratio to the first, and a
plot per T of every run.

    pytest bench --benchmark-only --benchmark-json=bench.json
    advface bench-report bench.json --output bench_report
    advface bench-report before.json after.json --output compare
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

BASELINE = "naive"
BACKEND_ORDER = ("naive", "reference", "reference-bf16", "compiled", "fused", "fused+graph", "fused-bf16+graph",
                 "fused-bf16-nchw+graph")


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


def compare_runs(runs: list[tuple[str, list[Result]]]) -> dict[tuple, float]:
    """{(label, mode, batch, steps, backend): time in the first run / time in this run} for every later run's
    case that the first run measured too (above 1: faster than the first)."""
    first = {(*r.case, r.backend): r.ms for r in runs[0][1]}
    return {(label, *r.case, r.backend): first[(*r.case, r.backend)] / r.ms
            for label, results in runs[1:] for r in results if (*r.case, r.backend) in first}


def compare_table(runs: list[tuple[str, list[Result]]], stat: str = "median") -> str:
    """One row per case and backend measured in any run: each run's time per batch, then each later run's
    ratio to the first (``compare_runs``); empty cells where a run did not measure the case."""
    ratio, first = compare_runs(runs), runs[0][0]
    times = {(label, *r.case, r.backend): r.ms for label, results in runs for r in results}
    rows = sorted({key[1:] for key in times}, key=lambda k: (k[0] != "online", k[1], k[2], _backend_rank(k[3])))
    header = ["mode", "B", "T", "backend", *(f"ms / batch, {label} ({stat})" for label, _ in runs),
              *(f"{label} vs {first}" for label, _ in runs[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " if i < 4 else " ---: " for i in
                                                             range(len(header))) + "|"]
    for mode, batch, steps, backend in rows:
        key = (mode, batch, steps, backend)
        cells = [mode, str(batch), str(steps), backend]
        cells += [_fmt(times[(label, *key)]) if (label, *key) in times else "" for label, _ in runs]
        cells += [f"{ratio[(label, *key)]:.2f}x" if (label, *key) in ratio else "" for label, _ in runs[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _backend_rank(backend: str) -> tuple[int, str]:
    return (BACKEND_ORDER.index(backend) if backend in BACKEND_ORDER else len(BACKEND_ORDER), backend)


def sweeps(results: list[Result], steps: int | None = None) -> list[int]:
    """The step counts to plot, one batch-size sweep each: ``steps`` when given (a ValueError when it was not
    measured), else every T measured at two batch sizes or more (else every T)."""
    measured = sorted({r.steps for r in results})
    if steps is not None:
        if steps not in measured:
            raise ValueError(f"no results at T={steps}; measured: {measured}")
        return [steps]
    swept = [t for t in measured if len({r.batch for r in results if r.steps == t}) > 1]
    return swept or measured


def plot(runs: list[tuple[str, list[Result]]], path: str | os.PathLike, steps: int) -> None:
    """Throughput against batch size at ``steps`` steps, a line per backend (and per run: one line style
    each), beside its ratio: to the naive baseline for one run, to the first run for several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    chosen = [(label, [r for r in results if r.steps == steps]) for label, results in runs]
    if len(runs) == 1:
        ratio = {(chosen[0][0], *key): v for key, v in speedups(chosen[0][1]).items() if key[-1] != BASELINE}
        ratio_label, ratio_title = f"time of {BASELINE} / time of backend", f"speedup over the {BASELINE} baseline"
    else:
        ratio = compare_runs(chosen)
        ratio_label = f"time in {runs[0][0]} / time in run"
        ratio_title = f"speedup over {runs[0][0]}"
    compared = bool(ratio)  # else no ratio panel (nothing to draw)
    fig, axes = plt.subplots(1, 2 if compared else 1, figsize=(12 if compared else 6.4, 4.8), squeeze=False)
    ax_rate, ax_ratio = axes[0][0], axes[0][1] if compared else None
    every = [r for _, results in chosen for r in results]
    backends = sorted({r.backend for r in every}, key=_backend_rank)
    styles = ["-", "--", ":", "-."]
    for j, (label, results) in enumerate(chosen):
        for i, backend in enumerate(backends):
            rows = sorted((r for r in results if r.backend == backend), key=lambda r: r.batch)
            if not rows:
                continue
            name = backend if len(runs) == 1 else f"{backend}, {label}"
            style = dict(marker="o", label=name, color=f"C{i}", linestyle=styles[j % len(styles)])
            ax_rate.plot([r.batch for r in rows], [r.embeddings_per_s for r in rows], **style)
            pts = [r for r in rows if (label, *r.case, backend) in ratio]
            if compared and pts:
                ax_ratio.plot([r.batch for r in pts], [ratio[(label, *r.case, backend)] for r in pts], **style)
    devices = {r.extra.get("device", "") for r in every}
    device = devices.pop() if len(devices) == 1 else ""  # runs on several devices: named in the report
    batches = sorted({r.batch for r in every})
    plain = FuncFormatter(lambda value, _: _fmt(value))
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch size B (features per call)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    ax_rate.set_yscale("log")
    ax_rate.yaxis.set_major_formatter(plain)  # 1,000 rather than 10^3
    ax_rate.yaxis.set_minor_formatter(FuncFormatter(_minor_label) if _decades(every) < 2 else NullFormatter())
    ax_rate.set_ylabel("embeddings / s (log scale)")
    ax_rate.set_title(f"throughput, T={steps}" + (f" ({device})" if device else ""))
    if compared:
        ax_ratio.set_ylabel(ratio_label)
        ax_ratio.set_title(f"{ratio_title}, T={steps}")
        ax_ratio.axhline(1.0, color="gray", lw=0.8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _minor_label(value: float, _=None) -> str:
    """A minor tick's label on a log axis: 2 and 5 times a power of ten only, so they do not crowd."""
    return _fmt(value) if value > 0 and round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""


def _decades(results: list[Result]) -> float:
    """How many powers of ten the throughputs span (few: label some minor ticks too)."""
    rates = [r.embeddings_per_s for r in results]
    return math.log10(max(rates) / min(rates)) if rates else 0.0


def _plots(runs: list[tuple[str, list[Result]]], out: Path, steps: int | None) -> list[str]:
    """One plot per batch-size sweep (``sweeps``), as Markdown image lines."""
    every = [r for _, results in runs for r in results]
    lines = []
    for t in sweeps(every, steps):
        try:
            plot(runs, out / f"bench_throughput_T{t}.png", t)
        except ImportError:
            return ["(no plot: matplotlib is not installed; pip install 'advface-engine[eval]')"]
        lines.append(f"![throughput at T={t}](bench_throughput_T{t}.png)")
    return lines


def _labels(paths: list[Path]) -> list[str]:
    """A short name per file: its stem, or its path where stems repeat."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def write_report(json_paths: str | os.PathLike | list, out: str | os.PathLike, stat: str = "median",
                 steps: int | None = None) -> str:
    """Write OUT/bench_report.md and OUT/bench_throughput_T<steps>.png (one per batch-size sweep, when there
    are protection cases); return the report's text. One file: the cases, their ratios to the naive baseline
    and other suites' cases with their recorded figures. Several: the cases side by side (``compare_table``)."""
    paths = [Path(p) for p in (json_paths if isinstance(json_paths, (list, tuple)) else [json_paths])]
    if not paths:
        raise ValueError("no benchmark JSON file given")
    labels = _labels(paths)
    others = {label: other_cases(path) for label, path in zip(labels, paths)}
    loaded = {label: load_results(path, stat, required=not others[label]) for label, path in zip(labels, paths)}
    runs = [(label, loaded[label][0]) for label in labels if loaded[label][0]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = []
    if len(paths) == 1 and runs:
        results, machine = loaded[labels[0]]
        text += [f"Protection benchmarks ({machine_line(results, machine)}); time per batch: {stat} over rounds.", "",
                 markdown_table(results, stat), "", "Speedups:", ""]
        text += [f"- {line}" for line in speedup_lines(results)]
        text += ["", *_plots(runs, out, steps)]
    elif runs:
        text += [f"Protection benchmarks of {len(runs)} runs side by side; time per batch: {stat} over rounds.", ""]
        text += [f"- {label} ({path}): {machine_line(*loaded[label])}" for label, path in zip(labels, paths)
                 if loaded[label][0]]
        text += ["", compare_table(runs, stat), "",
                 f"Ratios: time in {runs[0][0]} / time in the run (above 1: faster than {runs[0][0]}).", ""]
        text += _plots(runs, out, steps)
    for label in labels:
        if others[label]:
            where = "" if len(paths) == 1 else f" in {label}"
            text += (["", ""] if text else []) + [f"Other cases{where} (figures from their extra_info):", ""]
            text += [f"- {name}: " + (", ".join(f"{k} {_fmt(v)}" for k, v in figures.items()) or "no figures")
                     for name, figures in others[label]]
    report = "\n".join(text) + "\n"
    tmp = out / "bench_report.md.tmp"
    tmp.write_text(report)
    os.replace(tmp, out / "bench_report.md")
    return report


def register(sub: argparse._SubParsersAction) -> None:
    from ..config_args import add_renamed

    p = sub.add_parser("bench-report", help="benchmark JSON -> Markdown table, throughput plots, speedups; several "
                                            "files: compared side by side")
    p.add_argument("json", nargs="+", help="pytest-benchmark output (pytest bench --benchmark-only "
                                           "--benchmark-json=FILE); several: compared with the first")
    add_renamed(p, "--output", "--out", default="bench_report", metavar="DIR",
                help="folder for bench_report.md and the plots (default bench_report)")
    p.add_argument("--stat", choices=("median", "min"), default="median", help="time per batch taken from rounds")
    p.add_argument("--steps", type=int, default=None,
                   help="plot only this step count T (default: one plot per T measured at several batch sizes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(write_report(args.json, args.output, args.stat, args.steps), end="")
    print(f"wrote {Path(args.output) / 'bench_report.md'}")
    return 0
