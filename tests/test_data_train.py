"""Synthetic faces, image loading and resumable training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import advface_engine as afe
from advface_engine.data import images_from_array, load_image_folder, render, synthetic_faces
from advface_engine.errors import BadFeaturesError
from advface_engine.train import train_decoder, train_encoder


def test_synthetic_faces_deterministic_and_labelled():
    a, la = synthetic_faces(3, 4, 32, seed=5)
    b, lb = synthetic_faces(3, 4, 32, seed=5)
    assert a.shape == (12, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and torch.equal(la, lb) and la.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    c, _ = synthetic_faces(3, 4, 32, seed=6)
    assert not torch.equal(a, c)
    # a face does not depend on which batch it was rendered in (noise aside, which is per call)
    one = render([1], [2], 32, seed=5)
    assert (one - a[6:7]).abs().mean() < 0.05


def test_synthetic_identity_dominates_nuisance():
    x, y = synthetic_faces(20, 6, 32, seed=0)
    flat = x.flatten(1)
    d = torch.cdist(flat, flat)
    same = y[:, None] == y[None]
    off = ~torch.eye(len(y), dtype=torch.bool)
    assert d[same & off].mean() < d[~same].mean()


def test_images_from_array_and_folder(tmp_path):
    from PIL import Image

    u8 = (np.random.default_rng(0).random((2, 20, 20, 3)) * 255).astype(np.uint8)
    x = images_from_array(u8, size=16)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="4-D"):
        images_from_array(u8[0])
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        images_from_array(np.full((1, 3, 4, 4), 5.0))
    for person in ("alice", "bob"):
        (tmp_path / person).mkdir()
        for k in range(2):
            Image.fromarray(u8[k]).save(tmp_path / person / f"{k}.png")
    images, labels, names = load_image_folder(tmp_path, size=16)
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1] and names == ["alice", "bob"]
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "alice")


def _tiny():
    torch.manual_seed(0)
    enc = afe.build_model("mobilefacenet", num_features=16, input_size=16, width=4)
    dec = afe.build_model("dcgan", feature_dim=16, size=16, width=4)
    x, y = synthetic_faces(8, 4, 16)
    return enc, dec, x, y


def test_training_lowers_losses():
    enc, dec, x, y = _tiny()
    enc_hist = train_encoder(enc, x, y, epochs=3, batch_size=16, progress=False)
    dec_hist = train_decoder(dec, enc, x, epochs=4, batch_size=16, progress=False)
    assert enc_hist[-1] < enc_hist[0]
    assert dec_hist[-1] < dec_hist[0]
    assert not dec.training and not enc.training


def test_identity_term_brings_the_anchor_closer_and_leaves_the_encoder_alone():
    """identity_weight > 0: E(S(z)) nearer z than with Eq. 1 alone; E neither trained nor left frozen."""
    enc, dec, x, _ = _tiny()  # a random encoder: its features are spread (a tiny trained one collapses)
    enc.train()  # the caller's mode and flags must come back as they were
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    plain = afe.build_model("dcgan", feature_dim=16, size=16, width=4)
    plain.load_state_dict(dec.state_dict())
    train_decoder(plain, enc, x, epochs=4, batch_size=16, progress=False)
    hist = train_decoder(dec, enc, x, epochs=4, batch_size=16, progress=False, identity_weight=1.0)
    assert enc.training and all(p.requires_grad for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert hist[-1] < hist[0]
    with torch.no_grad():
        z = F.normalize(enc.eval()(x), dim=1)
        cos = {name: F.cosine_similarity(F.normalize(enc(d(z)), dim=1), z).mean().item()
               for name, d in (("plain", plain), ("identity", dec))}
    assert cos["identity"] > cos["plain"], cos
    with pytest.raises(ValueError, match="identity_weight"):
        train_decoder(dec, enc, x, epochs=1, identity_weight=-1.0, progress=False)


def test_training_resume_equals_uninterrupted(tmp_path):
    enc, dec, x, _ = _tiny()
    enc.eval()
    full = afe.build_model("dcgan", feature_dim=16, size=16, width=4)
    full.load_state_dict(dec.state_dict())
    train_decoder(full, enc, x, epochs=3, batch_size=8, seed=3, progress=False)

    class Crash(Exception):
        pass

    calls = {"n": 0}

    def crash_in_third_epoch(module, inputs):
        calls["n"] += 1
        if calls["n"] > 2 * 4 + 1:  # 4 batches per epoch: dies inside epoch 3
            raise Crash

    hook = dec.register_forward_pre_hook(crash_in_third_epoch)
    with pytest.raises(Crash):
        train_decoder(dec, enc, x, epochs=3, batch_size=8, seed=3, checkpoint=tmp_path / "ck.pt", progress=False)
    hook.remove()
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["epoch"] == 2
    resumed = afe.build_model("dcgan", feature_dim=16, size=16, width=4)
    hist = train_decoder(resumed, enc, x, epochs=3, batch_size=8, seed=3, checkpoint=tmp_path / "ck.pt",
                         output=tmp_path / "dec.safetensors", progress=False)
    assert len(hist) == 3
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert afe.load_model(tmp_path / "dec.safetensors").checkpoint_extra["epochs"] == 3


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    """Resuming under other settings would mix two runs: refused, naming what differs."""
    enc, dec, x, _ = _tiny()
    enc.eval()
    ck = tmp_path / "ck.pt"
    train_decoder(dec, enc, x, epochs=1, batch_size=8, seed=3, checkpoint=ck, progress=False)
    other_encoder = _tiny()[0].eval()
    with torch.no_grad():
        next(other_encoder.parameters()).add_(0.1)
    for kwargs, name in [({"lr": 1e-2}, "lr"), ({"seed": 4}, "seed"), ({"epochs": 2}, "epochs"),
                         ({"images": x.flip(-1)}, "data"), ({"encoder": other_encoder}, "encoder")]:
        args = {"encoder": enc, "images": x, "epochs": 1, "batch_size": 8, "seed": 3} | kwargs
        decoder = afe.build_model("dcgan", feature_dim=16, size=16, width=4)
        with pytest.raises(ValueError, match=rf"another training run \({name} differ"):
            train_decoder(decoder, args.pop("encoder"), args.pop("images"), checkpoint=ck, progress=False, **args)
    assert train_decoder(dec, enc, x, epochs=1, batch_size=8, seed=3, checkpoint=ck, progress=False)  # same: fine


def test_training_refuses_features_that_are_not_finite_or_have_no_direction():
    enc, dec, x, _ = _tiny()
    with torch.no_grad():
        next(enc.parameters()).fill_(float("inf"))
    with pytest.raises(BadFeaturesError, match=r"the encoder \(mobilefacenet\) gives 32 of 32 training images"):
        train_decoder(dec, enc, x, epochs=1, progress=False)
    dead = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 16))
    with torch.no_grad():
        dead[1].weight.zero_()
        dead[1].bias.zero_()
        dead[1].bias[0] = 1e-20  # not quite zero: still no direction worth normalising
    with pytest.raises(BadFeaturesError, match=r"\(Sequential\) gives 32 of 32 .* a norm below 1e-12") as err:
        train_decoder(dec, dead, x, epochs=1, progress=False)
    assert err.value.rows == list(range(32))
    with torch.no_grad():
        dead[1].bias[0] = 1.0
    assert train_decoder(dec, dead, x, epochs=1, progress=False)  # short features: fine once they have a norm


def test_a_rerun_with_a_checkpoint_reads_cached_features(tmp_path, monkeypatch):
    """The features are computed once per checkpoint (for its data and encoder): the rerun, resumed or finished,
    does not encode the images again; another encoder does."""
    from advface_engine import train

    enc, dec, x, _ = _tiny()
    enc.eval()
    ck = tmp_path / "ck.pt"
    first = train_decoder(dec, enc, x, epochs=2, batch_size=8, checkpoint=ck, progress=False)
    assert (tmp_path / "ck.pt.features").is_file()
    monkeypatch.setattr(train, "encode", lambda *a, **k: pytest.fail("encoded the images again"))
    again = afe.build_model("dcgan", feature_dim=16, size=16, width=4)
    assert train_decoder(again, enc, x, epochs=2, batch_size=8, checkpoint=ck, progress=False) == first
    other = _tiny()[0].eval()
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    with pytest.raises(pytest.fail.Exception, match="encoded the images again"):
        train_decoder(again, other, x, epochs=2, batch_size=8, checkpoint=ck, progress=False)


def test_training_rejects_bad_arguments():
    enc, dec, x, y = _tiny()
    with pytest.raises(ValueError):
        train_decoder(dec, enc, x[:0], epochs=1, progress=False)
    with pytest.raises(ValueError):
        train_decoder(dec, enc, x, epochs=0, progress=False)


def _faces_on_disk(tmp_path, identities=3, per_identity=4, size=20):
    """A folder of PNG faces (one sub-folder per identity) and the same faces as an (N, H, W, 3) .npy."""
    from PIL import Image

    x, labels = synthetic_faces(identities, per_identity, size, seed=2)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (image, label) in enumerate(zip(u8, labels.tolist(), strict=True)):
        (tmp_path / "faces" / f"id{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "faces" / f"id{label}" / f"{i:03d}.png")
    np.save(tmp_path / "faces.npy", u8)
    return tmp_path / "faces", tmp_path / "faces.npy", labels


def test_training_from_disk_equals_training_in_memory(tmp_path):
    """An image folder or .npy read batch by batch trains exactly as the same images held in memory."""
    from advface_engine.data import ImageFolder, NpyImages

    folder, npy, labels = _faces_on_disk(tmp_path)
    lazy_sets = {"folder": ImageFolder(folder, 16), "npy": NpyImages(npy, 16)}
    in_memory = {"folder": load_image_folder(folder, 16)[0], "npy": images_from_array(np.load(npy), 16)}
    assert torch.equal(lazy_sets["folder"].labels, labels)
    for kind, lazy in lazy_sets.items():
        weights = []
        for images in (lazy, in_memory[kind]):
            torch.manual_seed(0)
            enc = afe.build_model("mobilefacenet", num_features=16, input_size=16, width=4)
            dec = afe.build_model("dcgan", feature_dim=16, size=16, width=4)
            train_encoder(enc, images, labels, epochs=1, batch_size=5, progress=False)
            train_decoder(dec, enc, images, epochs=1, batch_size=5, progress=False)
            weights.append([t.clone() for t in list(enc.state_dict().values()) + list(dec.state_dict().values())])
        assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True)), kind


def test_image_sets_on_disk_say_what_is_wrong_and_fingerprint_their_files(tmp_path):
    from advface_engine.data import ImageFolder, NpyImages

    folder, npy, _ = _faces_on_disk(tmp_path)
    faces = ImageFolder(folder, 16)
    before = faces.fingerprint()
    (folder / "id0" / "broken.png").write_bytes(b"not a png")
    grown = ImageFolder(folder, 16)
    assert grown.fingerprint() != before and len(grown) == len(faces) + 1
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        grown.batch(range(len(grown)))
    np.save(tmp_path / "flat.npy", np.zeros((4, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="4-D"):
        NpyImages(tmp_path / "flat.npy")
    assert NpyImages(npy, 16).fingerprint() != NpyImages(npy, 8).fingerprint()


def test_batches_on_disk_are_read_ahead_in_the_background(tmp_path, monkeypatch):
    import threading

    from advface_engine.data import ImageFolder

    folder, _, labels = _faces_on_disk(tmp_path)
    readers = []
    read = ImageFolder.batch
    monkeypatch.setattr(ImageFolder, "batch", lambda self, idx: readers.append(threading.current_thread().name)
                        or read(self, idx))
    torch.manual_seed(0)
    dec = afe.build_model("dcgan", feature_dim=16, size=16, width=4)
    enc = afe.build_model("mobilefacenet", num_features=16, input_size=16, width=4).eval()
    train_decoder(dec, enc, ImageFolder(folder, 16), epochs=2, batch_size=3, progress=False)
    training = readers[1:]  # after the one batch of the encode pass
    assert len(training) == 2 * 4  # 12 faces in batches of 3, two epochs
    assert sum(name.startswith("advface-prefetch") for name in training) == 2 * 3  # all but each epoch's first
