"""The benchmark report (advface_engine/speed/report.py) on a small synthetic pytest-benchmark JSON,
and the naive baseline of bench/ against the reference backend."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_models

import advface_engine as afe
from advface_engine.cli import main
from advface_engine.speed.report import load_results, markdown_table, speedups, write_report

ROOT = Path(__file__).resolve().parents[1]


def case(backend, batch, steps, median_s, min_s, mode="online", **extra):
    """One pytest-benchmark entry as bench/harness.py writes it."""
    info = {"backend": backend, "mode": mode, "batch": batch, "steps": steps, "device": "cpu", "threads": 1,
            "ms_per_batch": 1e3 * median_s, "protect_flops": 2e9 * batch, **extra}
    return {"group": f"{mode} B={batch} T={steps}", "name": f"test[{backend}-B{batch}-T{steps}]",
            "params": {"backend": backend}, "extra_info": info,
            "stats": {"min": min_s, "median": median_s, "mean": median_s, "rounds": 5},
            "options": {"timer": "time.process_time"}}


@pytest.fixture
def bench_json(tmp_path):
    benchmarks = [
        case("naive", 1, 10, 0.020, 0.018), case("reference", 1, 10, 0.016, 0.012),
        case("naive", 64, 10, 0.400, 0.360), case("reference", 64, 10, 0.250, 0.240),
        case("compiled", 64, 10, 0.200, 0.180),
        case("reference", 256, 10, 1.0, 0.9, mode="offline"),  # no baseline measured for this case
        {"name": "test_gallery_throughput[job-demo]", "extra_info": {"rows_per_s": 1.0}, "stats": {"median": 1.0}},
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "benchmarks": benchmarks}))
    return path


def test_ratios_to_the_naive_baseline(bench_json):
    results, machine = load_results(bench_json)
    assert len(results) == 6 and machine["cpu"]["brand_raw"] == "Test CPU"
    ratio = speedups(results)
    assert ratio[("online", 64, 10, "reference")] == pytest.approx(0.400 / 0.250)
    assert ratio[("online", 64, 10, "compiled")] == pytest.approx(2.0)
    assert ratio[("online", 1, 10, "naive")] == pytest.approx(1.0)
    assert ("offline", 256, 10, "reference") not in ratio
    best, _ = load_results(bench_json, stat="min")
    assert speedups(best)[("online", 1, 10, "reference")] == pytest.approx(0.018 / 0.012)


def test_table_has_a_row_per_case_and_only_measured_columns(bench_json):
    results, _ = load_results(bench_json)
    table = markdown_table(results).splitlines()
    assert len(table) == 2 + 6
    assert table[0].startswith("| mode | B | T | backend |") and "J / embedding" not in table[0]
    row = next(line for line in table if "| 64 | 10 | reference |" in line)
    assert "1.60x" in row and "| 250 |" in row and "| 256 |" in row  # ms per batch, embeddings/s
    assert "| offline | 256 | 10 | reference |" in table[-1] and table[-1].count("|  |") == 1  # no ratio there
    energetic = [r for r in results if r.backend == "naive"]
    energetic[0].extra["energy_per_embedding_j"] = 0.125
    assert "J / embedding" in markdown_table(results) and "0.125" in markdown_table(results)


def test_report_files_and_cli(bench_json, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["bench-report", str(bench_json), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reference vs naive: online B=64 T=10: 1.60x" in printed
    assert "compiled vs naive: online B=64 T=10: 2.00x" in printed
    assert "Test CPU" in printed and "1 torch thread" in printed and "timer: time.process_time" in printed
    assert (out / "bench_report.md").read_text() == printed.rsplit("wrote ", 1)[0]
    png = (out / "bench_throughput_T10.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(out.glob("*.tmp"))
    report = write_report(bench_json, out, stat="min", steps=10)
    assert "reference vs naive: online B=1 T=10: 1.50x" in report
    assert "- test_gallery_throughput[job-demo]: rows_per_s 1" in report  # other suites' cases are listed


def test_several_runs_side_by_side_with_ratios_and_a_plot_per_sweep(bench_json, tmp_path, capsys, monkeypatch):
    """Two saved runs: each case's time in both, the second's ratio to the first per row, one plot per
    batch-size sweep (T=10 and T=20 here, T=50 measured at one batch size only) with plain-number axes."""
    after = tmp_path / "after.json"
    after.write_text(json.dumps({"benchmarks": [
        case("naive", 1, 10, 0.020, 0.018), case("reference", 1, 10, 0.008, 0.008),
        case("reference", 64, 10, 0.125, 0.12), case("fused", 64, 10, 0.05, 0.05),
        case("reference", 8, 20, 0.1, 0.1), case("reference", 64, 20, 0.5, 0.5), case("reference", 8, 50, 1, 1)]}))
    out = tmp_path / "compare"
    assert main(["bench-report", str(bench_json), str(after), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert table[0] == ("| mode | B | T | backend | ms / batch, bench (median) | ms / batch, after (median) | "
                        "after vs bench |")
    assert "| online | 64 | 10 | reference | 250 | 125 | 2.00x |" in table  # the same case, twice as fast
    assert "| online | 1 | 10 | reference | 16.0 | 8 | 2.00x |" in table
    assert "| online | 64 | 10 | fused |  | 50.0 |  |" in table  # measured in one run only: no ratio
    assert "| online | 64 | 10 | compiled | 200 |  |  |" in table
    assert sorted(p.name for p in out.glob("*.png")) == ["bench_throughput_T10.png", "bench_throughput_T20.png"]
    assert "![throughput at T=20](bench_throughput_T20.png)" in printed
    assert "Other cases in bench" in printed  # each file's other suites, named by file

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from advface_engine.speed import report as bench_report

    figures = []
    with monkeypatch.context() as m:
        m.setattr(plt, "close", figures.append)  # keep the figure to look at its axes
        bench_report.plot([("bench", load_results(bench_json)[0]), ("after", load_results(after)[0])],
                          tmp_path / "t10.png", 10)
    rate, ratio = figures[0].axes
    assert rate.get_xlabel().startswith("batch size") and rate.get_ylabel().startswith("embeddings / s")
    assert [t.get_text() for t in rate.get_xticklabels()] == ["1", "64", "256"]
    labels = [t.get_text() for t in rate.get_yticklabels()]
    assert labels and all("$" not in text for text in labels)  # plain numbers, not 10^k
    assert ratio.get_ylabel() == "time in bench / time in run"
    assert {line.get_label() for line in ratio.get_lines() if not line.get_label().startswith("_")} == \
        {"naive, after", "reference, after"}
    plt.close(figures[0])


def test_the_old_out_flag_still_works_and_says_it_is_deprecated(bench_json, tmp_path, capsys):
    assert main(["bench-report", str(bench_json), "--out", str(tmp_path / "old")]) == 0
    assert "--out is deprecated" in capsys.readouterr().err and (tmp_path / "old" / "bench_report.md").exists()
    assert main(["bench-report", str(bench_json), "--output", str(tmp_path / "new")]) == 0
    assert "deprecated" not in capsys.readouterr().err


def test_report_of_other_suites_alone_and_without_a_baseline(tmp_path, recwarn):
    gallery = tmp_path / "gallery.json"
    gallery.write_text(json.dumps({"benchmarks": [
        {"name": "test_gallery_peak_rss[100000]", "extra_info": {"peak_rss_mib": 612.5, "rows_per_s": 15000.0},
         "stats": {"median": 6.0}}]}))
    report = write_report(gallery, tmp_path / "g")
    assert "test_gallery_peak_rss[100000]: peak_rss_mib 612, rows_per_s 15,000" in report
    assert not list((tmp_path / "g").glob("*.png"))
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps({"benchmarks": [case("reference", 1, 10, 0.01, 0.01),
                                                case("reference", 8, 10, 0.02, 0.02)]}))
    write_report(alone, tmp_path / "a")  # no naive case: one panel, and no empty-legend warning
    assert (tmp_path / "a" / "bench_throughput_T10.png").stat().st_size > 5_000
    assert not [w for w in recwarn if "artists" in str(w.message)]


def test_cpu_peak_memory_is_shown_only_when_it_is_per_case(bench_json):
    results, _ = load_results(bench_json)
    results[0].extra.update(peak_rss_mb=300.0, peak_rss_scope="process")
    assert "peak memory" not in markdown_table(results)
    results[0].extra.update(peak_rss_scope="since reset")
    assert "peak memory (MiB)" in markdown_table(results) and "| 300 |" in markdown_table(results)


def test_bad_inputs_say_what_is_wrong(tmp_path, bench_json):
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_results(bad)
    bad.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="benchmarks"):
        load_results(bad)
    bad.write_text(json.dumps({"benchmarks": [{"name": "other", "extra_info": {}, "stats": {}}]}))
    with pytest.raises(ValueError, match="no protection benchmarks"):
        load_results(bad)
    with pytest.raises(ValueError, match="stat"):
        load_results(bench_json, stat="mean")
    with pytest.raises(ValueError, match="T=20"):
        write_report(bench_json, tmp_path / "r", steps=20)
    bad.write_text(json.dumps({"benchmarks": []}))
    assert main(["bench-report", str(bad)]) == 2


def _naive_module():
    spec = importlib.util.spec_from_file_location("pgd_naive", ROOT / "bench" / "pgd_naive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_naive_baseline_computes_the_reference_protection():
    """The baseline is slower, not different: same result as the reference backend (float64)."""
    NaivePGD = _naive_module().NaivePGD
    S, E = tiny_models(dtype=torch.float64)
    z = F.normalize(torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), dim=1)
    cfg = afe.ProtectConfig(eps=0.05, alpha=0.02, steps=4, anchor="shadow", random_start=False)
    want = afe.protect(z, S, E, cfg)
    S.requires_grad_(False)
    seen = []
    S.register_forward_pre_hook(lambda module, args: seen.append(all(p.requires_grad for p in module.parameters())))
    got = NaivePGD(S, E, cfg)(z)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, F.normalize(E(S(z)), dim=1))
    assert seen[:5] == [True] * 5  # weight gradients on during the attack, as the libraries leave them
    assert not any(p.requires_grad for p in S.parameters())  # and the shared models restored after
    with pytest.raises(ValueError, match="L-inf"):
        NaivePGD(S, E, cfg.replace(norm="l2"))
