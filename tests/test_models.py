"""Model architectures, checkpoints and encoder loading."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import advface_engine as afe
from advface_engine.models import DECODERS, load_encoder
from advface_engine.models.io import read_metadata

# The published arcface_torch IResNet: blocks per stage, and the keys of one IBasicBlock.
PUBLISHED_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3]}
BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def published_keys(depth: int) -> set[str]:
    keys = {"conv1.weight", "prelu.weight", "fc.weight", "fc.bias"}
    keys |= {f"{bn}.{k}" for bn in ("bn1", "bn2", "features") for k in BN}
    for stage, blocks in enumerate(PUBLISHED_LAYERS[depth], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            keys |= {p + "conv1.weight", p + "conv2.weight", p + "prelu.weight"}
            keys |= {f"{p}{bn}.{k}" for bn in ("bn1", "bn2", "bn3") for k in BN}
            if b == 0:
                keys |= {p + "downsample.0.weight"} | {f"{p}downsample.1.{k}" for k in BN}
    return keys


@pytest.mark.parametrize("depth", [18, 34, 50, 100])
def test_iresnet_state_dict_matches_arcface_layout(depth):
    model = afe.build_model(f"iresnet{depth}")
    state = model.state_dict()
    assert set(state) == published_keys(depth)
    assert state["conv1.weight"].shape == (64, 3, 3, 3)
    assert state["fc.weight"].shape == (512, 512 * 7 * 7)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["layer1.0.prelu.weight"].shape == (64,)
    assert not model.features.weight.requires_grad


def test_iresnet_forward_and_user_backbone_pth(tmp_path):
    model = afe.build_model("iresnet18").eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert model(x).shape == (2, 512)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")  # how arcface_torch ships weights
    loaded = load_encoder(tmp_path / "backbone.pth", arch="iresnet18")
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="arch"):
        load_encoder(tmp_path / "backbone.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_encoder_strips_the_ddp_module_prefix(tmp_path, suffix):
    """Weights saved from a DistributedDataParallel wrapper name every tensor ``module.<name>``."""
    from safetensors.torch import save_file

    model = afe.build_model("mobilefacenet", num_features=8, input_size=16, width=4).eval()
    state = {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"ddp{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))
    loaded = load_encoder(path, arch="mobilefacenet", num_features=8, input_size=16, width=4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_save_model_honours_the_umask(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        afe.save_model(afe.build_model("dcgan", feature_dim=8, size=8, width=1), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o666 & ~umask
    assert afe.load_model(tmp_path / "m.safetensors").arch == "dcgan" and os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("family", sorted(DECODERS))
@pytest.mark.parametrize("size", [16, 32, 56])
def test_decoder_shapes_and_range(family, size):
    dec = afe.build_model(family, feature_dim=24, size=size, width=4).eval()
    y = dec(torch.randn(3, 24))
    assert y.shape == (3, 3, size, size)
    assert y.min() >= -1 and y.max() <= 1
    assert isinstance(next(iter(dec.children())), torch.nn.Linear)


def test_decoder_options_and_bad_sizes():
    assert afe.build_model("dcgan", feature_dim=8, size=112, width=2)(torch.randn(1, 8)).shape[-1] == 112
    for act in ("relu", "leaky_relu", "prelu"):
        afe.build_model("upconv", feature_dim=8, size=16, width=2, act=act, mode="bilinear")(torch.randn(1, 8))
    with pytest.raises(ValueError, match="size"):
        afe.build_model("dcgan", feature_dim=8, size=50)
    with pytest.raises(ValueError, match="unknown architecture"):
        afe.build_model("vae")


@pytest.mark.parametrize("arch,kwargs", [("nbnet", dict(feature_dim=8, size=16, width=4)),
                                         ("mobilefacenet", dict(num_features=8, input_size=16, width=4))])
def test_safetensors_round_trip(tmp_path, arch, kwargs):
    model = afe.build_model(arch, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "m.safetensors"
    afe.save_model(model, path, extra={"note": "x"})
    meta = read_metadata(path)
    assert meta["arch"] == arch and meta["kwargs"] == kwargs and meta["extra"] == {"note": "x"}
    loaded = afe.load_model(path)
    x = torch.randn(2, 8) if arch == "nbnet" else torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert not (tmp_path / "m.safetensors.tmp").exists()


def test_load_model_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an advface-engine checkpoint"):
        afe.load_model(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        afe.load_model(tmp_path / "missing.safetensors")


def test_pth_loading_refuses_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("open(r'%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="objects other than tensors, refused") as refused:
        load_encoder(tmp_path / "evil.pth", arch="iresnet18")
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)  # torch's weights-only unpickler said no
    assert not (tmp_path / "pwned").exists()


def test_onnx_encoder(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["z"])],
        "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 16, 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 5])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "enc.onnx")
    enc = load_encoder(tmp_path / "enc.onnx")
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(enc(x), x.mean(dim=(2, 3)) @ torch.from_numpy(w), rtol=1e-5, atol=1e-5)
    # the algorithm only runs the encoder forward: an ONNX encoder protects features
    shadow = afe.build_model("dcgan", feature_dim=5, size=16, width=4).eval()
    z = torch.nn.functional.normalize(torch.randn(3, 5), dim=1)
    out = afe.protect(z, shadow, enc, afe.ProtectConfig(steps=2))
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_loading_errors_are_one_clear_line(tmp_path):
    from safetensors.torch import save_file

    encoder = afe.build_model("mobilefacenet", num_features=8, input_size=16, width=4).eval()
    shadow = afe.build_model("dcgan", feature_dim=8, size=16, width=4).eval()
    afe.save_model(encoder, tmp_path / "encoder.weights")  # no .safetensors suffix: the header tells
    assert isinstance(load_encoder(tmp_path / "encoder.weights"), type(encoder))
    with pytest.raises(ValueError, match="own architecture arguments"):
        load_encoder(tmp_path / "encoder.weights", num_features=999)
    afe.save_model(shadow, tmp_path / "shadow.safetensors")
    with pytest.raises(ValueError, match="'dcgan' model, not an encoder"):
        load_encoder(tmp_path / "shadow.safetensors")
    torch.save(encoder.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match=r"pass --encoder-arch \(arch=\)"):  # the CLI's flag, and the keyword
        load_encoder(tmp_path / "plain.pth")
    tensors = {k: v.contiguous() for k, v in shadow.state_dict().items()}
    save_file(tensors, str(tmp_path / "lying.safetensors"),
              metadata={"format": "advface-engine/1", "arch": "dcgan", "kwargs": '{"feature_dim": 9}'})
    with pytest.raises(ValueError, match="do not fit its header"):
        afe.load_model(tmp_path / "lying.safetensors")
    save_file(tensors, str(tmp_path / "no-arch.safetensors"), metadata={"format": "advface-engine/1"})
    with pytest.raises(ValueError, match="damaged"):
        afe.load_model(tmp_path / "no-arch.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError):
        afe.save_model(shadow, tmp_path / "folder")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
