"""The advface command line end to end at tiny sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import advface_engine as afe
from advface_engine.cli import main

TINY = ["--synthetic-identities", "6", "--per-identity", "3", "--epochs", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    assert main(["train-encoder", "--output", str(d / "enc.safetensors"), "--dim", "16", "--size", "16",
                 "--width", "4", *TINY]) == 0
    assert main(["train-shadow", "--encoder", str(d / "enc.safetensors"), "--output", str(d / "shadow.safetensors"),
                 "--width", "4", "--checkpoint", str(d / "shadow.ckpt"), *TINY]) == 0
    return d


def test_train_commands_write_loadable_models(trained):
    enc, shadow = afe.load_model(trained / "enc.safetensors"), afe.load_model(trained / "shadow.safetensors")
    assert enc.arch == "mobilefacenet" and shadow.arch == "dcgan"
    assert shadow(torch.randn(2, 16)).shape == (2, 3, 16, 16)
    assert (trained / "shadow.ckpt").exists()


def test_training_commands_are_deterministic_for_a_seed(trained, tmp_path):
    """Same flags, seed and thread count, same weights, whatever state torch's generator is in (a new process
    starts it from a random seed): the initial weights must come from --seed too. The thread count is pinned:
    chosen by the load (the default), it changes how training's sums are split, and so their last bits."""
    from safetensors.torch import load_file

    for name, state in (("a", 1), ("b", 2)):
        torch.manual_seed(state)  # as two fresh processes would differ
        assert main(["train-encoder", "--output", str(tmp_path / f"enc-{name}.safetensors"), "--dim", "16",
                     "--size", "16", "--width", "4", "--threads", "1", *TINY]) == 0
        torch.manual_seed(state + 10)
        assert main(["train-shadow", "--encoder", str(trained / "enc.safetensors"), "--output",
                     str(tmp_path / f"shadow-{name}.safetensors"), "--width", "4", "--threads", "1", *TINY]) == 0
    for kind in ("enc", "shadow"):
        a, b = (load_file(tmp_path / f"{kind}-{n}.safetensors") for n in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


def test_train_commands_read_images_from_disk(trained, tmp_path, capsys):
    from PIL import Image

    u8 = (np.random.default_rng(0).random((6, 16, 16, 3)) * 255).astype(np.uint8)
    for i, image in enumerate(u8):
        (tmp_path / "faces" / f"id{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "faces" / f"id{i % 2}" / f"{i}.png")
    np.save(tmp_path / "faces.npy", u8)
    np.save(tmp_path / "labels.npy", np.arange(5) % 2)
    out = str(tmp_path / "enc.safetensors")
    common = ["--dim", "16", "--size", "16", "--width", "4", "--epochs", "1"]
    assert main(["train-encoder", "--output", out, "--images", str(tmp_path / "faces"), *common]) == 0
    assert "on 6 faces" in capsys.readouterr().out
    assert main(["train-shadow", "--encoder", out, "--output", str(tmp_path / "shadow.safetensors"), "--width", "4",
                 "--epochs", "1", "--images-npy", str(tmp_path / "faces.npy")]) == 0
    assert "decoder on 6 faces" in capsys.readouterr().out
    assert main(["train-encoder", "--output", out, "--images-npy", str(tmp_path / "faces.npy"), "--labels-npy",
                 str(tmp_path / "labels.npy"), *common]) == 2
    assert "5 labels for 6 images" in capsys.readouterr().err


def test_protect_command_matches_api(trained, capsys):
    z = torch.nn.functional.normalize(torch.randn(10, 16), dim=1).numpy()
    np.save(trained / "gallery.npy", z)
    out = trained / "protected.npy"
    rc = main(["protect", "--input", str(trained / "gallery.npy"), "--output", str(out),
               "--shadow", str(trained / "shadow.safetensors"), "--encoder", str(trained / "enc.safetensors"),
               "--batch-size", "4", "--steps", "3", "--eps", "0.02", "--alpha", "0.01", "--device", "cpu", "--force"])
    assert rc == 0 and "10 of 10 rows" in capsys.readouterr().out  # protect is protect-gallery
    want = afe.protect(torch.from_numpy(z), afe.load_model(trained / "shadow.safetensors"),
                       afe.load_model(trained / "enc.safetensors"), afe.ProtectConfig(eps=0.02, alpha=0.01, steps=3))
    got = np.load(out)
    assert got.dtype == z.dtype and got.shape == z.shape
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


def test_protect_command_errors(trained, capsys):
    args = ["--shadow", str(trained / "shadow.safetensors"), "--encoder", str(trained / "enc.safetensors")]
    np.save(trained / "bad.npy", np.ones((3, 7), np.float32))
    assert main(["protect", "--input", str(trained / "bad.npy"), "--output", str(trained / "o.npy"), *args]) == 2
    assert "dim 7" in capsys.readouterr().err
    assert main(["protect", "--input", str(trained / "bad.npy"), "--output", str(trained / "bad.npy"), *args]) == 2
    assert "output path is the input path" in capsys.readouterr().err
    assert main(["protect", "--input", str(trained / "bad.npy"), "--output", str(trained / "o.npy"), "--overwrite",
                 *args]) == 2  # the gallery job's options, named in its messages, are all there
    assert "dim 7" in capsys.readouterr().err
    assert not (trained / "o.npy").exists()
    with pytest.raises(SystemExit):
        main(["protect", "--input", "x.npy"])


def test_demo_end_to_end(tmp_path, capsys):
    rc = main(["demo", "--output", str(tmp_path), "--identities", "20", "--gallery-identities", "20",
               "--epochs", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "verification accuracy" in out and "embeddings/s" in out and "synthetic" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data"] == "synthetic"
    assert 0 <= results["verification"]["protected_offline"]["accuracy"] <= 1
    assert results["stats"]["cosine"]["min"] >= results["config"]["min_cosine"] - 1e-6 and "guard held" in out
    fit = results["shadow_fit"]["anchor_cosine"]["median"]  # how well the shadow inverts E, whatever the anchor
    assert f"shadow fit cos(E(S(z)), z): median {fit:.3f}" in out and fit < 1
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:
        assert im.width == 3 * 32 * 3 and im.height > 0


def test_check_kernels_says_when_no_variant_matches(monkeypatch, capsys):
    import advface_engine.kernels.aot as aot

    monkeypatch.setattr(aot, "interpreted", lambda: False)
    monkeypatch.setattr(aot, "unavailable", lambda: None)
    monkeypatch.setattr(aot, "probe_error", lambda arch=90: None)
    assert main(["check-kernels", "--filter", "no such kernel"]) == 2
    assert "no kernel variant matches 'no such kernel'" in capsys.readouterr().err


def test_check_kernels_refuses_the_interpreter_clearly(monkeypatch, capsys):
    """advface check-kernels compiles for real GPUs; under TRITON_INTERPRET it says so and exits 2."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["check-kernels", "--arch", "90"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_check_kernels_tells_a_toolchain_failure_from_a_kernel_fault(monkeypatch, capsys):
    """A trivial kernel that does not compile means the installed Triton cannot be driven here:
    exit 2 (tests skip) rather than 1 (a kernel has a problem)."""
    import advface_engine.kernels.aot as aot

    monkeypatch.setattr(aot, "interpreted", lambda: False)
    monkeypatch.setattr(aot, "unavailable", lambda: None)
    failed = aot.Report("probe", 90, ok=False, error="TypeError: an API changed")
    monkeypatch.setattr(aot, "compile_variant", lambda variant, arch=90: failed)
    assert "API changed" in aot.probe_error()
    assert main(["check-kernels"]) == 2
    assert "trivial kernel does not compile" in capsys.readouterr().err


def test_the_kernels_module_run_alone_points_to_check_kernels(capsys):
    """python -m advface_engine.kernels.aot has no Launches (the kernels do not import the backends that say
    what they launch): it exits 2 naming advface check-kernels instead of checking nothing."""
    import advface_engine.kernels.aot as aot

    assert aot.main(["--arch", "90"]) == 2
    assert "advface check-kernels" in capsys.readouterr().err


def _subparsers():
    """{name: parser} of every advface subcommand (aliases once)."""
    import argparse

    from advface_engine.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: parser for name, parser in sub.choices.items() if name != "protect"}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"advface-engine {afe.__version__}"


def test_every_option_has_help_and_one_spelling_per_concept():
    """Help text on every option; --output for what a command writes, --shadow for a decoder file,
    --shadow-arch for a decoder family, --encoder-arch for an encoder's architecture, --device auto by default."""
    shown = {}
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"advface {name} {action.option_strings[0]} has no help"
                shown.setdefault(name, set()).update(action.option_strings)
            if action.dest == "device" and name != "eval":  # eval: None, its settings' default (auto)
                assert action.default == "auto", name
    for name, options in shown.items():  # old spellings are not shown (check-kernels' --arch: a GPU's, not a model's)
        assert not options & {"--out", "--arch"} or name == "check-kernels", (name, options)
    assert {"--output", "--encoder-arch"} <= shown["train-encoder"]
    assert {"--output", "--encoder", "--encoder-arch", "--shadow-arch"} <= shown["train-shadow"]
    assert {"--output", "--encoder", "--shadow"} <= shown["protect-gallery"]
    assert "--output" in shown["bench-report"] and "--output" in shown["demo"]


def test_every_help_page_renders():
    """argparse formats each help text with %: a literal % in one (a share of the variance) must be %%."""
    for name, parser in _subparsers().items():
        text = parser.format_help()
        assert text.startswith("usage:"), name
    assert "hold 90% of their variance" in " ".join(_subparsers()["protect-gallery"].format_help().split())


@pytest.mark.parametrize("command, old, new, dest, value", [
    ("train-shadow", "--arch", "--shadow-arch", "shadow_arch", "upconv"),
    ("train-encoder", "--arch", "--encoder-arch", "encoder_arch", "iresnet18"),
    ("bench-report", "--out", "--output", "output", "folder"),
])
def test_old_spellings_work_with_a_deprecation_message(command, old, new, dest, value, capsys):
    parser = _subparsers()[command]
    required = {"train-shadow": ["--encoder", "e", "--output", "o"], "train-encoder": ["--output", "o"],
                "bench-report": ["b.json"]}[command]
    assert getattr(parser.parse_args([*required, old, value]), dest) == value
    err = capsys.readouterr().err
    assert f"{old} is deprecated" in err and f"use {new}" in err
    assert getattr(parser.parse_args([*required, new, value]), dest) == value
    assert "deprecated" not in capsys.readouterr().err
    assert new in parser.format_help() and f"{old} " not in parser.format_help()


def test_cli_errors_name_flags_not_python_keywords(trained, tmp_path, capsys):
    np.save(tmp_path / "g.npy", torch.nn.functional.normalize(torch.randn(4, 16), dim=1).numpy())
    args = ["protect", "--input", str(tmp_path / "g.npy"), "--output", str(tmp_path / "o.npy"), "--shadow",
            str(trained / "shadow.safetensors"), "--encoder", str(trained / "enc.safetensors"), "--force"]
    for flags, named in [(["--eps", "-1"], "--eps must be"), (["--objective-weight", "-1"], "--objective-weight must"),
                         (["--steps", "20000"], "--steps must be at most")]:
        assert main([*args, *flags]) == 2
        err = capsys.readouterr().err
        assert named in err and "identity_weight" not in err, err
    torch.save(afe.load_model(trained / "enc.safetensors").state_dict(), tmp_path / "plain.pth")
    assert main(["train-shadow", "--encoder", str(tmp_path / "plain.pth"), "--output", str(tmp_path / "s.safetensors"),
                 *TINY]) == 2
    assert "pass --encoder-arch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-shadow", "--encoder", "e", "--output", "o", "--epochs", "0"])
    assert "argument --epochs: expected a positive integer" in capsys.readouterr().err


def test_train_shadow_refuses_an_encoder_with_nan_features(trained, tmp_path, capsys):
    encoder = afe.load_model(trained / "enc.safetensors")
    with torch.no_grad():
        next(encoder.parameters()).fill_(float("nan"))
    afe.save_model(encoder, tmp_path / "nan.safetensors")
    assert main(["train-shadow", "--encoder", str(tmp_path / "nan.safetensors"), "--output",
                 str(tmp_path / "s.safetensors"), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"--encoder {tmp_path / 'nan.safetensors'}" in err and "18 of 18 training images" in err, err
    assert not (tmp_path / "s.safetensors").exists()


def test_grid_columns_have_titles(tmp_path):
    """A title band above the images, a title over each column (wrapped when longer than the column)."""
    from PIL import Image

    from advface_engine.evaluation.grids import save_grid

    x = torch.zeros(2, 3, 16, 16)  # grey images: the only dark pixels are the titles'
    save_grid(tmp_path / "g.png", [x, x, x], ["original", "from clean feature", "from protected feature"], scale=3)
    with Image.open(tmp_path / "g.png") as im:
        pixels = np.asarray(im.convert("L")).astype(int)
    band = pixels.shape[0] - 2 * 16 * 3
    assert pixels.shape[1] == 3 * 16 * 3 and band > 10
    assert (pixels[band:] == 128).all()  # the images, unchanged under the band
    for k in range(3):
        column = pixels[:band, k * 48:(k + 1) * 48]
        assert (column < 100).sum() > 20, k  # text in every column's title
    save_grid(tmp_path / "one.png", [x, x, x], ["a", "b", "c"], scale=3)
    with Image.open(tmp_path / "one.png") as im:
        assert im.height - 2 * 16 * 3 < band  # one line of title: a lower band
    with pytest.raises(ValueError, match="3 columns, 2 titles"):
        save_grid(tmp_path / "bad.png", [x, x, x], ["a", "b"])
