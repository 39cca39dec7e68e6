"""Progress in logs: plain lines at most every INTERVAL seconds when stderr is not a terminal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_models
from tqdm import tqdm

from advface_engine import progress
from advface_engine.progress import LogProgress, format_rate, progress_bar


class Clock:
    """A clock the test moves."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress, "clock", fake)
    return fake


def test_a_line_at_most_every_interval_with_counts_rate_and_eta(clock, capsys):
    bar = progress_bar(total=10_000, desc="protect-gallery", unit="row", unit_scale=True)
    assert isinstance(bar, LogProgress)  # capsys: stderr is not a terminal
    bar.update(1000)
    clock.now += 9.9
    bar.update(1000)
    assert capsys.readouterr().err == ""  # not yet 10 s
    clock.now += 0.1
    bar.update(2000)
    assert capsys.readouterr().err == "protect-gallery: 4000/10000 (40%), 400 row/s, ETA 00:15, elapsed 00:10\n"
    clock.now += 5
    bar.set_postfix(epoch=2, loss="0.1234")
    bar.update(1000)
    assert capsys.readouterr().err == ""  # 5 s after the last line
    clock.now += 20
    bar.update(5000)
    bar.close()
    assert capsys.readouterr().err == \
        "protect-gallery: 10000/10000 (100%), 286 row/s, elapsed 00:35, epoch=2, loss=0.1234\n"  # once, not at close


def test_a_short_job_stays_silent_and_a_slow_one_is_not_0_per_second(clock, capsys):
    with progress_bar(total=3, desc="tiny") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    items = []
    for item in progress_bar(range(3), desc="slow", unit="chunk", initial=0):
        clock.now += 12
        items.append(item)
    assert items == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "slow: 1/3 (33%), 0.0833 chunk/s, ETA 00:24, elapsed 00:12"
    assert lines[-1].startswith("slow: 3/3 (100%), 0.0833 chunk/s")
    with progress_bar(total=4, desc="end") as bar:  # work done after the last line: a last line at the end
        clock.now += 10
        bar.update(1)
        clock.now += 1
        bar.update(3)
    assert capsys.readouterr().err.splitlines() == ["end: 1/4 (25%), 0.1 it/s, ETA 00:30, elapsed 00:10",
                                                    "end: 4/4 (100%), 0.364 it/s, elapsed 00:11"]
    assert format_rate(3, 10, "row") == "0.3 row/s" and format_rate(123_456, 1, "row") == "123,456 row/s"
    assert format_rate(0, 10, "row") == "" and format_rate(5, 0, "row") == ""  # nothing to divide: no rate


def test_a_resumed_count_is_not_taken_for_speed_and_no_total_means_no_eta(clock, capsys):
    bar = progress_bar(total=100, initial=90, desc="resumed")
    clock.now += 10
    bar.update(5)
    assert capsys.readouterr().err == "resumed: 95/100 (95%), 0.5 it/s, ETA 00:10, elapsed 00:10\n"
    bar = progress_bar(desc="open-ended")
    clock.now += 10
    bar.update(7)
    assert capsys.readouterr().err == "open-ended: 7, 0.7 it/s, elapsed 00:10\n"


def test_terminal_gets_tqdm_and_no_progress_gets_nothing(monkeypatch, capsys):
    silent = progress_bar(range(2), progress=False)
    assert isinstance(silent, tqdm) and silent.disable and list(silent) == [0, 1]
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert isinstance(progress_bar(total=1), tqdm)


def test_gallery_job_and_training_print_progress_lines_in_a_log(tmp_path, monkeypatch, capsys):
    """Every update is a line when INTERVAL is 0: the job's, and training's, long loops go through it."""
    from advface_engine.data import synthetic_faces
    from advface_engine.gallery import protect_gallery
    from advface_engine.models import save_model
    from advface_engine.train import train_decoder

    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    shadow, encoder = tiny_models()
    save_model(shadow, tmp_path / "s.safetensors")
    save_model(encoder, tmp_path / "e.safetensors")
    z = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    np.save(tmp_path / "in.npy", z / np.linalg.norm(z, axis=1, keepdims=True))
    protect_gallery(tmp_path / "in.npy", tmp_path / "out.npy", tmp_path / "s.safetensors", tmp_path / "e.safetensors",
                    batch_size=32, chunk_rows=64, device="cpu", force=True)
    err = capsys.readouterr().err
    assert "protect-gallery: 32/100 (32%)" in err and "protect-gallery: 100/100 (100%)" in err, err
    assert "row/s" in err and "check rows: 100/100 (100%)" in err
    x, _ = synthetic_faces(4, 2, 16)
    train_decoder(shadow.train(), encoder, x, epochs=2, batch_size=4)
    assert "train decoder: 2/4 (50%)" in capsys.readouterr().err
    assert torch.isfinite(next(shadow.parameters())).all()


def test_training_commands_take_no_progress(tmp_path, monkeypatch, capsys):
    """train-encoder and train-shadow print progress lines in a log, and none with --no-progress."""
    from advface_engine.cli import main

    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    data = ["--synthetic-identities", "4", "--per-identity", "2", "--epochs", "1", "--batch-size", "4",
            "--device", "cpu"]
    encoder = str(tmp_path / "e.safetensors")
    commands = (["train-encoder", "--output", encoder, "--dim", "16", "--size", "16", "--width", "4", *data],
                ["train-shadow", "--encoder", encoder, "--output", str(tmp_path / "s.safetensors"), "--width", "4",
                 *data])
    for command, name in zip(commands, ("train encoder", "train decoder"), strict=True):
        assert main(command) == 0
        assert f"{name}: " in capsys.readouterr().err
        assert main([*command, "--no-progress"]) == 0
        assert f"{name}: " not in capsys.readouterr().err
