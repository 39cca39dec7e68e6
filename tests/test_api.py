"""A backend other tools can import: NumPy in and out, typed errors, backends as plugins, one input policy,
and the "Using it from another tool" code of docs/api.md, run as written."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_models

import advface_engine as afe
from advface_engine import backends
from advface_engine.errors import (
    AdvFaceError,
    BadFeaturesError,
    FeatureNormWarning,
    IncompatibleCheckpointError,
    ModelMismatchError,
    RefusedFileError,
    UnsupportedModelError,
)

DIM = 16
CONFIG = afe.ProtectConfig(steps=2)


@pytest.fixture(scope="module")
def models():
    return tiny_models(feature_dim=DIM)


def unit_rows(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, dim))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


# -- 1. NumPy in, NumPy out -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f4"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_numpy_in_numpy_out(models, dtype, order):
    """An array comes back as an array of its dtype and shape, holding what the same tensor gives."""
    z = np.asarray(unit_rows(5), dtype=dtype, order=order)
    out = afe.protect(z, *models, CONFIG)
    assert isinstance(out, np.ndarray) and out.dtype == z.dtype and out.shape == z.shape
    expected = afe.protect(torch.from_numpy(np.ascontiguousarray(z, z.dtype.newbyteorder("="))), *models, CONFIG)
    np.testing.assert_array_equal(out, expected.numpy())
    assert np.array_equal(z, np.asarray(unit_rows(5), dtype=dtype))  # the input is left as it was


def test_numpy_through_a_protector_with_stats_and_check_fit(models):
    protector = afe.Protector(*models, CONFIG, backend="reference", return_stats=True)
    z = unit_rows(6).astype(np.float32)
    out, stats = protector(z)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert isinstance(stats.cosine, torch.Tensor) and stats.cosine.shape == (6,)  # stats stay tensors
    torch.testing.assert_close(stats.cosine, protector.stats(z, out).cosine)
    assert protector.check_fit(z).rows == 6
    tensor_out, _ = protector(torch.from_numpy(z))
    assert isinstance(tensor_out, torch.Tensor)  # tensors keep working as before
    np.testing.assert_array_equal(out, tensor_out.numpy())
    assert protector(z[:0])[0].shape == (0, DIM)
    with pytest.raises(BadFeaturesError, match="float16, float32 or float64 array, got int64"):
        protector(np.ones((2, DIM), dtype=np.int64))
    with pytest.raises(TypeError, match="a torch.Tensor or a NumPy array, got list"):
        protector(z.tolist())


# -- 3. typed errors --------------------------------------------------------------------------------

def test_every_error_is_an_advface_error_and_a_value_error():
    for error in (BadFeaturesError, ModelMismatchError, UnsupportedModelError, IncompatibleCheckpointError,
                  RefusedFileError):
        assert issubclass(error, AdvFaceError) and issubclass(error, ValueError)
    assert backends.UnsupportedModelError is UnsupportedModelError  # where it was before
    assert issubclass(FeatureNormWarning, UserWarning)


def test_bad_features_carry_their_rows(models):
    z = unit_rows(30).astype(np.float32)
    z[[3, 7]] = np.nan
    z[[11, 29]] = 0.0
    with pytest.raises(BadFeaturesError, match=r"NaN or Inf in rows \[3, 7\]") as err:
        afe.protect(z, *models, CONFIG)
    assert err.value.rows == [3, 7, 11, 29]
    with pytest.raises(ValueError, match=r"all-zero rows \[11, 29\]"):  # existing ValueError catches still work
        afe.protect(np.where(np.isnan(z), 1.0, z), *models, CONFIG)
    with pytest.raises(BadFeaturesError, match=r"shape \(B, D\)") as err:
        afe.protect(z[0], *models, CONFIG)
    assert err.value.rows == []


def test_model_mismatch(models):
    with pytest.raises(ModelMismatchError, match="does not take features of dim 12"):
        afe.protect(unit_rows(2, dim=12), *models, CONFIG)
    shadow = afe.build_model("dcgan", feature_dim=DIM, size=32, width=4).eval()
    with pytest.raises(ModelMismatchError, match=r"the encoder does not take the shadow decoder's \(3, 32, 32\)"):
        afe.protect(unit_rows(2), shadow, models[1], CONFIG)


def test_unsupported_model():
    pytest.importorskip("triton")
    shadow = torch.nn.Sequential(torch.nn.Linear(DIM, 3 * 16 * 16), torch.nn.Unflatten(1, (3, 16, 16)),
                                 torch.nn.ELU())
    with pytest.raises(UnsupportedModelError, match="ELU"):
        backends.make_backend("fused", shadow, tiny_models(feature_dim=DIM)[1], CONFIG)


def test_incompatible_checkpoints(tmp_path):
    encoder = afe.build_model("mobilefacenet", num_features=DIM, input_size=16, width=4)
    torch.save(encoder.state_dict(), tmp_path / "mobile.pth")
    with pytest.raises(IncompatibleCheckpointError, match="does not hold iresnet18 weights"):
        afe.load_encoder(tmp_path / "mobile.pth", arch="iresnet18")
    afe.save_model(afe.build_model("dcgan", feature_dim=DIM, size=16, width=4), tmp_path / "shadow.safetensors")
    with pytest.raises(IncompatibleCheckpointError, match="holds a 'dcgan' model, not an encoder"):
        afe.load_encoder(tmp_path / "shadow.safetensors")


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_refused_files(tmp_path):
    torch.save({"weight": Payload()}, tmp_path / "code.pth")
    with pytest.raises(RefusedFileError, match="refused because loading them could run code"):
        afe.load_encoder(tmp_path / "code.pth", arch="iresnet18")
    afe.save_model(afe.build_model("dcgan", feature_dim=DIM, size=16, width=4), tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header["__metadata__"]["kwargs"] = json.dumps({"feature_dim": DIM, "size": 16, "width": 8})  # a lying header
    text = json.dumps(header).encode()
    (tmp_path / "lying.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
    with pytest.raises(RefusedFileError, match="its tensors do not fit its header"):
        afe.load_model(tmp_path / "lying.safetensors")
    np.save(tmp_path / "g.npy", unit_rows(10).astype(np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "g.npy").read_bytes()[:-7])
    from advface_engine.gallery import open_gallery

    with pytest.raises(RefusedFileError, match="file is truncated"):
        open_gallery(tmp_path / "cut.npy")


# -- 4. backends as plugins -------------------------------------------------------------------------

class Toy:
    """A backend that returns the features, normalised, and counts its calls."""

    name = "toy"

    def __init__(self, shadow, encoder, config, scale=1.0):
        self.calls, self.scale = 0, scale

    def run(self, z):
        self.calls += 1
        return torch.nn.functional.normalize(z * self.scale, dim=1)


class Replaying(Toy):
    """A toy that answers from its 'graph' once the Protector has run it through ``run`` once."""

    name = "toy-replay"

    def run_replay(self, z):
        self.calls += 100
        return -torch.nn.functional.normalize(z, dim=1)


def test_registered_backend_runs_through_the_protector(models, monkeypatch):
    monkeypatch.setattr(backends, "_REGISTERED", {})
    backends.register("toy", Toy)
    assert backends.available() == ["auto", "reference", "fused", "toy"]
    protector = afe.Protector(*models, CONFIG, backend="toy", backend_options={"scale": 2.0})
    assert protector.backend_name == "toy" and protector.backend.scale == 2.0
    z = unit_rows(4).astype(np.float32)
    np.testing.assert_allclose(protector(z), z, atol=1e-6)
    assert protector.backend.calls == 1
    assert isinstance(protector.backend, backends.Backend) and not isinstance(protector.backend,
                                                                              backends.ReplayingBackend)
    backends.register("toy-replay", Replaying)  # the protocol, not a probe for an attribute, says who replays
    replaying = afe.Protector(*models, CONFIG, backend="toy-replay")
    np.testing.assert_allclose(replaying(z), z, atol=1e-6)  # the first call runs (and checks the models)
    np.testing.assert_allclose(replaying(z), -z, atol=1e-6)  # later ones replay
    assert replaying.backend.calls == 101
    with pytest.raises(ValueError, match="'reference' is a built-in backend"):
        backends.register("reference", Toy)
    backends.register("broken", lambda shadow, encoder, config: object())
    with pytest.raises(TypeError, match=r"backend 'broken': its factory gave a object, which has no `name`"):
        afe.Protector(*models, CONFIG, backend="broken")
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'reference', 'fused', 'broken', 'toy', "):
        afe.Protector(*models, CONFIG, backend="nope")


def test_a_plugin_from_an_installed_distribution(models, tmp_path, monkeypatch):
    """A third party ships a backend without editing this package: a distribution whose metadata names it in
    the ``advface_engine.backends`` entry-point group (here a dummy one, installed on sys.path)."""
    (tmp_path / "toy_plugin.py").write_text(
        "import torch\n\n"
        "class Halves:\n"
        "    name = 'halves'\n\n"
        "    def __init__(self, shadow, encoder, config):\n"
        "        pass\n\n"
        "    def run(self, z):\n"
        "        return z / 2\n")
    info = tmp_path / "toy_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[advface_engine.backends]\nhalves = toy_plugin:Halves\n")
    monkeypatch.setattr(backends, "_REGISTERED", {})
    assert "halves" not in backends.available()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_plugin", raising=False)
    assert backends.available() == ["auto", "reference", "fused", "halves"]
    assert "toy_plugin" not in sys.modules  # listed, not loaded
    z = unit_rows(3).astype(np.float32)
    np.testing.assert_array_equal(afe.protect(z, *models, CONFIG, backend="halves"), z / 2)


# -- 5. one input policy ----------------------------------------------------------------------------

def test_the_api_and_the_gallery_job_agree_on_bad_rows(models, tmp_path):
    pytest.importorskip("safetensors")
    from advface_engine.gallery import protect_gallery

    z = unit_rows(40).astype(np.float32)
    z[3, 5] = np.inf
    z[8] = 0.0
    z[9] = np.nan
    z[12] = 1e-30 * z[12]  # tiny but not zero: it has a direction, both protect it (with a warning)
    z[12, 0] = -0.0
    np.save(tmp_path / "g.npy", z)
    shadow_path, encoder_path = tmp_path / "s.safetensors", tmp_path / "e.safetensors"
    afe.save_model(models[0], shadow_path)
    afe.save_model(models[1], encoder_path)
    with pytest.warns(FeatureNormWarning, match="^1 of 16 feature rows"):
        result = protect_gallery(tmp_path / "g.npy", tmp_path / "out.npy", shadow_path, encoder_path, CONFIG,
                                 batch_size=16, on_bad_rows="skip", progress=False, min_anchor_cosine=None)
    job_rows = json.loads(result.bad_rows_file.read_text())["rows"]
    with pytest.raises(BadFeaturesError) as refused:
        afe.protect(z, *models, CONFIG)
    assert refused.value.rows == job_rows == [3, 8, 9]


def test_rows_far_from_unit_norm_are_named_once_per_protector(models):
    z = unit_rows(10).astype(np.float32)
    z[[2, 5, 6]] *= 3.0
    protector = afe.Protector(*models, CONFIG, backend="reference")
    with pytest.warns(FeatureNormWarning, match=r"^3 of 10 feature rows have a norm far from 1") as said:
        protector(z)
    assert said[0].filename == __file__  # at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        protector(z)  # said once
        afe.protect(z, *models, CONFIG.replace(normalize=False))  # raw features, as asked
        afe.protect(unit_rows(10).astype(np.float16), *models, CONFIG)  # unit rows in float16 rounding


# -- docs/api.md's section, run as written ----------------------------------------------------------

def test_readme_using_it_from_another_tool(models, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from test_onnx_encoders import pooled_encoder

    page = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    section = page.split("\n## Using it from another tool\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(backends, "_REGISTERED", {})
    afe.save_model(models[0], "shadow.safetensors")
    pooled_encoder(tmp_path / "encoder.onnx")
    np.save("gallery.npy", unit_rows(8).astype(np.float32))
    scope: dict = {}
    exec(compile(code, "docs/api.md", "exec"), scope)
    assert capsys.readouterr().out.splitlines() == ["[0, 1]", "['auto', 'reference', 'fused', 'float16-store']"]
    assert scope["stored"].dtype == np.float32
    np.testing.assert_array_equal(scope["stored"], scope["protected"].astype(np.float16).astype(np.float32))
