"""Untrusted files, as a hostile or careless user gives them: model checkpoints, training checkpoints,
verification .bin files, image folders and gallery files. Each gives one clear error naming the file (a
ValueError, or an OSError for the file system's own refusals) or a correct result; none runs code, and
none makes the reader allocate much more than the file's size.

Readers that could allocate a lot run in a subprocess (``_worker``) that measures its peak memory
against a baseline taken after imports and a warm-up, under an address-space limit, so a regression
fails the test instead of exhausting a shared machine.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import advface_engine as afe
from advface_engine.cli import main
from advface_engine.data import ImageFolder, synthetic_faces
from advface_engine.evaluation.benchmark import settings_for
from advface_engine.evaluation.datasets import read_bin
from advface_engine.gallery.formats import open_gallery
from advface_engine.models import load_encoder
from advface_engine.models.io import FORMAT
from advface_engine.train import train_decoder

MAX_EXTRA_MB = 256  # extra peak memory allowed to read a file under 1 MB
TINY = {"dcgan": dict(feature_dim=8, size=16, width=4), "nbnet": dict(feature_dim=8, size=16, width=2),
        "upconv": dict(feature_dim=8, size=16, width=4, mode="bilinear"),
        "mobilefacenet": dict(num_features=8, input_size=16, width=4)}


# ---------------------------------------------------------------- helpers


def _safetensors(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def _header_only_checkpoint(arch: str, kwargs: dict) -> bytes:
    """A tiny safetensors file whose header names an architecture and its arguments, with one small tensor."""
    meta = {"format": FORMAT, "arch": arch, "kwargs": json.dumps(kwargs), "extra": "{}"}
    return _safetensors({"__metadata__": meta, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                        bytes(4))


def _png(width: int, height: int) -> bytes:
    """A black 1-bit greyscale PNG compressed row by row: a few KB that decode to width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, z = bytes(1 + (width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _small_png(side: int = 24, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _in_subprocess(tmp_path: Path, files: list[tuple[str, Path]], warmup: list[tuple[str, Path]],
                   timeout: int = 120) -> list[dict]:
    """Read each (kind, path) in one subprocess (``_worker``); each result holds the outcome and the peak
    memory growth in MB over the baseline measured after imports and the warm-up."""
    spec, out = tmp_path / "worker-spec.json", tmp_path / "worker-out.json"
    spec.write_text(json.dumps({"warmup": [[k, str(p)] for k, p in warmup], "files": [[k, str(p)] for k, p in files],
                                "out": str(out)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(spec)], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _bad(results: list[dict]) -> list[str]:
    """Outcomes that are neither a correct result nor a ValueError naming the file, or that cost too much memory."""
    bad = []
    for r in results:
        name = Path(r["path"]).name
        clear = r["type"] == "ok" or (r["type"] == "ValueError" and name in r["message"])
        if not clear or r["growth_mb"] > MAX_EXTRA_MB:
            bad.append(f"{name} ({r['kind']}): {r['type']}: {r['message'][:300]} [+{r['growth_mb']:.0f} MB]")
    return bad


# ---------------------------------------------------------------- 2. model checkpoints


def test_architecture_arguments_are_bounded_and_checked_against_the_weights_before_building(tmp_path):
    """A tiny header naming huge arguments is refused with the file, the argument and its bound; one inside
    the bounds whose tensors do not fit the architecture is refused before the model is built."""
    cases = {
        "wide.safetensors": (("mobilefacenet", {"width": 3000}), r"width=3000.*512"),
        "features.safetensors": (("dcgan", {"feature_dim": 60000}), r"feature_dim=60000.*8192"),
        "huge.safetensors": (("dcgan", {"size": 2 ** 40}), r"size=1099511627776.*1024"),
        "deep.safetensors": (("nbnet", {"n_layers": 10 ** 6}), r"n_layers=1000000.*32"),
        "act.safetensors": (("upconv", {"act": "os.system"}), r"act='os.system'"),
        "float.safetensors": (("dcgan", {"width": 4.5}), r"width=4.5"),
        "unknown-arg.safetensors": (("dcgan", {"layers": 3}), r"layers"),
        "in-bounds.safetensors": (("dcgan", {"feature_dim": 8192, "size": 1024, "width": 512}),
                                  r"tensors do not fit its header"),
    }
    for name, (header, _) in cases.items():
        (tmp_path / name).write_bytes(_header_only_checkpoint(*header))
    good = tmp_path / "good.safetensors"
    afe.save_model(afe.build_model("dcgan", **TINY["dcgan"]), good)
    results = _in_subprocess(tmp_path, [("model", tmp_path / n) for n in cases], [("model", good)])
    for r in results:
        name = Path(r["path"]).name
        pattern = cases[name][1]
        assert r["type"] == "ValueError" and name in r["message"] and re.search(pattern, r["message"]), r
        assert r["growth_mb"] < 64, r


def test_checkpoint_tensors_must_match_the_architecture(tmp_path):
    """Missing, extra or misshapen tensors are named; a half-precision save still loads (as float32)."""
    model = afe.build_model("dcgan", **TINY["dcgan"])
    afe.save_model(model.half(), tmp_path / "half.safetensors")
    loaded = afe.load_model(tmp_path / "half.safetensors")
    assert next(loaded.parameters()).dtype == torch.float32
    afe.save_model(afe.build_model("dcgan", **TINY["dcgan"]), tmp_path / "m.safetensors")
    header, data = _split_safetensors((tmp_path / "m.safetensors").read_bytes())
    lying = copy.deepcopy(header)
    lying["__metadata__"]["kwargs"] = json.dumps({**TINY["dcgan"], "width": 8})
    (tmp_path / "lying.safetensors").write_bytes(_safetensors(lying, data))
    with pytest.raises(ValueError, match=r"lying.safetensors: its tensors do not fit its header \(dcgan.*shape"):
        afe.load_model(tmp_path / "lying.safetensors")
    int_weights = copy.deepcopy(header)
    int_weights["0.weight"]["dtype"] = "I32"
    (tmp_path / "int.safetensors").write_bytes(_safetensors(int_weights, data))
    with pytest.raises(ValueError, match=r"int.safetensors: its tensors do not fit its header \(dcgan.*0.weight.*I32"):
        afe.load_model(tmp_path / "int.safetensors")


# ---------------------------------------------------------------- 3. images in .bin files and folders


def test_image_bombs_are_refused_from_the_header_and_images_are_resized_as_decoded(tmp_path):
    """A 12000x12000 PNG of a few KB, once or referenced four times, is refused before decoding, in a
    .bin and in an image folder; a large allowed image is resized to the asked size as it is decoded."""
    bomb, small = _png(12_000, 12_000), _small_png()
    assert len(bomb) < 200_000
    (tmp_path / "bomb.bin").write_bytes(pickle.dumps(([bomb, small], [True]), protocol=4))
    (tmp_path / "bomb4.bin").write_bytes(pickle.dumps(([bomb, bomb, bomb, bomb], [True, False]), protocol=4))
    folder = tmp_path / "faces"
    (folder / "alice").mkdir(parents=True)
    (folder / "alice" / "a.png").write_bytes(small)
    (folder / "alice" / "bomb.png").write_bytes(bomb)
    big = tmp_path / "big.bin"  # 3000 x 3000: allowed, resized to 16 x 16 as decoded
    big.write_bytes(pickle.dumps(([_png(3000, 3000), small], [False]), protocol=4))
    good = tmp_path / "good.bin"
    good.write_bytes(pickle.dumps(([small, small], [True]), protocol=4))
    files = [("bin", tmp_path / "bomb.bin"), ("bin", tmp_path / "bomb4.bin"), ("folder", folder), ("bin", big)]
    results = _in_subprocess(tmp_path, files, [("bin", good)])
    for r in results[:3]:
        assert r["type"] == "ValueError" and "12000x12000" in r["message"] and "pixels" in r["message"], r
        assert r["growth_mb"] < 64, r
    assert "bomb.png" in results[2]["message"] and "bomb.bin" in results[0]["message"]
    assert results[3]["type"] == "ok" and results[3]["growth_mb"] < 64, results[3]


# ---------------------------------------------------------------- 5. training checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny encoder, images, and the training checkpoint of one decoder epoch."""
    folder = tmp_path_factory.mktemp("train")
    encoder = afe.build_model("mobilefacenet", **TINY["mobilefacenet"]).eval()
    afe.save_model(encoder, folder / "encoder.safetensors")
    images, _ = synthetic_faces(2, 2, 16)
    torch.manual_seed(0)
    train_decoder(afe.build_model("dcgan", **TINY["dcgan"]), encoder, images, epochs=1, batch_size=4,
                  checkpoint=folder / "good.ckpt", progress=False)
    return {"folder": folder, "encoder": encoder, "images": images}


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _damaged_states(trained) -> dict:
    good = torch.load(trained["folder"] / "good.ckpt", weights_only=True)
    modules = good["modules"]["decoder"]
    return {
        "no-optimizer": ({k: v for k, v in good.items() if k != "optimizer"}, "missing.*optimizer"),
        "other-modules": ({**good, "modules": {"encoder": modules}}, r"modules \['encoder'\].*\['decoder'\]"),
        "epoch-text": ({**good, "epoch": "1"}, "epoch"),
        "epoch-past-end": ({**good, "epoch": 7, "history": [0.5] * 7}, "epoch 7"),
        "history": ({**good, "history": [0.5, 0.4]}, "history"),
        "shapes": ({**good, "modules": {"decoder": {k: v[:1] if v.dim() else v for k, v in modules.items()}}},
                   "decoder"),
        "optimizer": ({**good, "optimizer": {"state": {}, "param_groups": "x"}}, "optimizer"),
        "schedule": ({**good, "schedule": {"T_max": "x"}}, "schedule"),
        "not-a-dict": ([1, 2, 3], "list"),
    }


def test_damaged_training_checkpoints_are_one_clear_error(trained, tmp_path):
    for name, (state, message) in _damaged_states(trained).items():
        path = tmp_path / f"{name}.ckpt"
        torch.save(state, path)
        with pytest.raises(ValueError, match=message) as err:
            train_decoder(afe.build_model("dcgan", **TINY["dcgan"]), trained["encoder"], trained["images"], epochs=1,
                          batch_size=4, checkpoint=path, progress=False)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
    (tmp_path / "garbage.ckpt").write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="garbage.ckpt: not a readable training checkpoint"):
        train_decoder(afe.build_model("dcgan", **TINY["dcgan"]), trained["encoder"], trained["images"], epochs=1,
                      batch_size=4, checkpoint=tmp_path / "garbage.ckpt", progress=False)


def test_training_checkpoint_with_code_is_refused_in_one_line(trained, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"modules": {}, "epoch": _Payload(marker)}, tmp_path / "evil.ckpt")
    args = ["train-shadow", "--encoder", str(trained["folder"] / "encoder.safetensors"), "--output",
            str(tmp_path / "out.safetensors"), "--shadow-arch", "dcgan", "--width", "4", "--synthetic-identities", "2",
            "--per-identity", "2", "--epochs", "1", "--batch-size", "4", "--checkpoint", str(tmp_path / "evil.ckpt")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evil.ckpt" in err and "could run code" in err, err
    assert "weights_only" not in err and not marker.exists()


# ---------------------------------------------------------------- 8. unclear errors


def test_unknown_architecture_is_named_with_the_file(tmp_path):
    (tmp_path / "sys.safetensors").write_bytes(_header_only_checkpoint("os.system", {}))
    for load in (afe.load_model, load_encoder):
        with pytest.raises(ValueError, match=r"sys.safetensors.*unknown architecture 'os.system'"):
            load(tmp_path / "sys.safetensors")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_unreadable_file_says_permission_denied(tmp_path):
    afe.save_model(afe.build_model("dcgan", **TINY["dcgan"]), tmp_path / "m.safetensors")
    np.save(tmp_path / "g.npy", np.ones((2, 4), np.float32))
    (tmp_path / "m.safetensors").chmod(0)
    (tmp_path / "g.npy").chmod(0)
    for load in (afe.load_model, load_encoder, lambda p: load_encoder(p, arch="dcgan"), open_gallery):
        path = tmp_path / ("g.npy" if load is open_gallery else "m.safetensors")
        with pytest.raises(PermissionError, match="Permission denied"):
            load(path)


@pytest.mark.parametrize("entries, data_len, message", [
    ({"embeddings": {"dtype": "F32", "shape": "abc", "data_offsets": [0, 64]}}, 64,
     r"corrupt safetensors header \(tensor 'embeddings': shape 'abc'"),
    ({"embeddings": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]},
      "ids": {"dtype": "I64", "shape": [2], "data_offsets": [48, 64]}}, 64, "overlap"),
    ({"embeddings": {"dtype": "F32", "shape": [2, 8], "data_offsets": [16, 80]},
      "ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, 64, "outside|truncated"),
    ({"embeddings": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]},
      "ids": {"dtype": "I64", "shape": [2], "data_offsets": [72, 88]}}, 88, "gap|overlap"),
], ids=["shape-text", "ids-overlap-rows", "out-of-file", "gap"])
def test_malformed_gallery_safetensors_are_named(tmp_path, entries, data_len, message):
    path = tmp_path / "g.safetensors"
    path.write_bytes(_safetensors(entries, bytes(data_len)))
    with pytest.raises(ValueError, match=message) as err:
        open_gallery(path)
    assert str(path) in str(err.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, before our refusal
def test_eval_checks_every_input_file_before_training(tmp_path, capsys):
    """A pickle payload, a wrong structure or an image bomb in --bin, and a shadow checkpoint whose weights
    do not fit, are refused by settings_for (before any training), naming the file."""
    marker = tmp_path / "pwned"
    small = _small_png(16)
    bins = {
        "evil.bin": (pickle.dumps(([_Payload(marker)], [])), r"evil.bin.*refused.*system"),
        "ints.bin": (pickle.dumps(([small, small], [1])), r"ints.bin.*booleans, found int"),
        "bomb.bin": (pickle.dumps(([_png(12_000, 12_000), small], [True])), r"bomb.bin.*image 0.*12000x12000"),
        "junk.bin": (_png(20, 20), r"junk.bin.*not a valid verification .bin"),
    }
    for name, (data, message) in bins.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message):
            settings_for("tiny", bin=str(tmp_path / name))
    assert not marker.exists()
    (tmp_path / "ok.bin").write_bytes(pickle.dumps(([small, small], [True])))
    assert settings_for("tiny", bin=str(tmp_path / "ok.bin")).bin
    shadow = afe.build_model("dcgan", feature_dim=64, size=32, width=4)
    afe.save_model(shadow, tmp_path / "shadow.safetensors")
    header, data = _split_safetensors((tmp_path / "shadow.safetensors").read_bytes())
    header["__metadata__"]["kwargs"] = json.dumps({"feature_dim": 64, "size": 32, "width": 8})
    (tmp_path / "lying.safetensors").write_bytes(_safetensors(header, data))
    with pytest.raises(ValueError, match=r"lying.safetensors: its tensors do not fit its header"):
        settings_for("tiny", shadow_checkpoint=str(tmp_path / "lying.safetensors"))
    assert main(["eval", "--scale", "tiny", "--bin", str(tmp_path / "evil.bin"), "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evil.bin" in err, err


# ---------------------------------------------------------------- fuzz: model headers and galleries

WEIRD = [0, -1, 1, 2, 3, 7, 16, 2 ** 31, 2 ** 40, 2 ** 63, -2 ** 63, 10 ** 30, 1.5, -0.5, "", "x", "12", "os.system",
         None, True, False, [], [1, 2], {}, {"a": 1}, "relu", "nearest", 512, 1024, 8192, 3000, 50, 24, 120]
ARG_NAMES = ["feature_dim", "num_features", "size", "input_size", "width", "growth", "n_layers", "act", "head",
             "mode", "dropout", "layers", "depth", "__class__"]
SHAPES = [[], [0], [1], [-1], [2 ** 40], [2 ** 31, 2 ** 31], [2 ** 62, 4], "abc", "12", [1.5], ["1"], None, [[1]],
          [2, 8], [8, 2], [6, 4], [4, 6], [6], [6, 4, 1], [3, 0], [10 ** 30]]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X", "", 3, None, ["F32"]]
OFFSETS = [[0, 0], [0, 4], [0, 2 ** 40], [-1, 4], [5, 1], "0,4", [0], [0, 4, 8], None, [1.0, 5.0], [2 ** 64, 2 ** 64]]


def _mutate_bytes(rng: random.Random, raw: bytes, flips: int) -> bytes:
    raw = bytearray(raw)
    for _ in range(flips):
        if raw:
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    return bytes(raw)


MODEL_OPS = {"set-arg": 40, "drop-arg": 8, "metadata": 12, "entry": 12, "rename": 6, "drop": 6, "length": 4,
             "flip": 6, "resize-data": 6}
GALLERY_OPS = {"metadata": 8, "entry": 36, "rename": 10, "drop": 8, "length": 5, "flip": 8, "resize-data": 8,
               "swap": 9, "half": 8}


def _mutate_safetensors(rng: random.Random, blob: bytes, model: bool) -> bytes:
    """A mutated safetensors file: header fields, metadata (for a model: its architecture and arguments),
    the length prefix, raw header bytes and the data length; for a gallery also valid variations (the
    tensors' data in the other order, embeddings as float16) whose rows must read back correctly."""
    header, data = _split_safetensors(blob)
    header = copy.deepcopy(header)
    meta = header.setdefault("__metadata__", {})
    kwargs = json.loads(meta["kwargs"]) if model else None
    ops = MODEL_OPS if model else GALLERY_OPS
    length, flips = None, 0
    for op in rng.choices(list(ops), list(ops.values()), k=rng.randint(1, 2)):
        names = [k for k in header if k != "__metadata__"]
        if op == "set-arg" and kwargs is not None:
            kwargs[rng.choice(ARG_NAMES + list(kwargs))] = rng.choice(WEIRD)
        elif op == "drop-arg" and kwargs:
            del kwargs[rng.choice(list(kwargs))]
        elif op == "metadata":
            key = rng.choice(["format", "arch", "kwargs", "extra", "other"])
            meta[key] = rng.choice(["", "{", "[]", "null", "1", '"x"', '{"a": {}}', "advface-engine/2", "os.system",
                                    "iresnet18", "dcgan", "nbnet", "upconv", "mobilefacenet", 3, None])
            if key == "kwargs":
                kwargs = None
        elif op == "entry" and names:
            entry = header[rng.choice(names)]
            field = rng.choice(["dtype", "shape", "data_offsets"])
            if isinstance(entry, dict):
                entry[field] = rng.choice({"dtype": DTYPES, "shape": SHAPES, "data_offsets": OFFSETS}[field])
        elif op == "rename" and names:
            name = rng.choice(names)
            header[rng.choice([name + "x", "ids", "embeddings", "__metadata__"])] = header.pop(name)
        elif op == "drop" and names:
            del header[rng.choice(names)]
        elif op == "length":
            length = rng.choice([0, 1, 7, 2 ** 32, 2 ** 63])
        elif op == "flip":
            flips += rng.randint(1, 3)
        elif op == "resize-data":
            data = data[:rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + bytes(rng.randrange(1, 64))
        elif op == "swap" and {"embeddings", "ids"} <= set(header):
            rows, ids = (header[k]["data_offsets"] for k in ("embeddings", "ids"))
            if rows[0] == 0 and ids[0] == rows[1] and ids[1] == len(data):
                data = data[ids[0]:] + data[:ids[0]]
                header["ids"]["data_offsets"] = [0, ids[1] - ids[0]]
                header["embeddings"]["data_offsets"] = [ids[1] - ids[0], len(data)]
        elif op == "half" and isinstance(header.get("embeddings"), dict) and header["embeddings"].get("dtype") == "F32":
            shape = header["embeddings"]["shape"]
            header["embeddings"].update(dtype="F16", shape=[shape[0], shape[1] * 2])
    if kwargs is not None and isinstance(header.get("__metadata__"), dict):
        header["__metadata__"]["kwargs"] = json.dumps(kwargs)
    raw = _mutate_bytes(rng, json.dumps(header).encode(), flips)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _weird(rng: random.Random, usual, weird: list, p: float = 0.3):
    return rng.choice(weird) if rng.random() < p else usual


def _mutate_npy(rng: random.Random, rows: np.ndarray) -> bytes:
    """A .npy file with a mutated header (dtype, order, shape, version, length, bytes) or data length."""
    descr = _weird(rng, rng.choice(["<f4", "<f8", "<f2"]), [">f4", "|O", "<i4", "|b1", "V16", "<c8",
                                                             "[('a', '<f4')]", "x", "<U4", "<M8[s]", 3])
    itemsize = np.dtype(descr).itemsize if descr in ("<f4", "<f8", "<f2") else 4
    usual = (len(rows), rows.nbytes // itemsize // len(rows))  # the same bytes as rows of another float dtype
    shape = _weird(rng, usual, [(4, 6), (2 ** 40, 4), (6, 2 ** 40), (-1, 4), (6,), (6, 4, 1), (), (0, 4), (6, 0),
                                (2 ** 62, 2 ** 62), ("a",), (10 ** 30, 1), None])
    order = _weird(rng, False, [True, 1, "x", None])
    text = "{" + f"'descr': {descr!r}, 'fortran_order': {order!r}, 'shape': {shape!r}, " + "}"
    if rng.random() < 0.15:
        text = _mutate_bytes(rng, text.encode(), rng.randint(1, 3)).decode("latin-1")
    head = text.encode("latin-1")
    version = _weird(rng, rng.choice([b"\x01\x00", b"\x02\x00"]), [b"\x03\x00", b"\x09\x09"], p=0.1)
    head += b" " * (-(len(head) + (10 if version == b"\x01\x00" else 12) + 1) % 64) + b"\n"
    pack = "<H" if version == b"\x01\x00" else "<I"
    size = struct.pack(pack, len(head) if rng.random() < 0.9 else rng.randrange(2 ** (8 * struct.calcsize(pack))))
    data = rows.tobytes()
    if rng.random() < 0.15:
        data = data[:rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + bytes(rng.randrange(1, 64))
    blob = b"\x93NUMPY" + version + size + head + data
    return _mutate_bytes(rng, blob, rng.randint(1, 3)) if rng.random() < 0.05 else blob


def _mutate_parquet(rng: random.Random, blob: bytes) -> bytes:
    """A Parquet file with bytes changed in its data or its footer (the metadata), cut short, a wrong footer
    length, or a run of zeros."""
    op = rng.choices(range(5), [35, 30, 10, 10, 15])[0]
    raw = bytearray(blob)
    if op == 0:  # bytes anywhere
        return _mutate_bytes(rng, blob, rng.randint(1, 6))
    if op == 1:  # bytes in the footer
        footer = struct.unpack("<I", blob[-8:-4])[0] + 8
        for _ in range(rng.randint(1, 3)):
            raw[len(raw) - 1 - rng.randrange(min(footer, len(raw)))] = rng.randrange(256)
        return bytes(raw)
    if op == 2:
        return blob[:rng.randrange(len(blob))]
    if op == 3:
        return blob[:-8] + struct.pack("<I", rng.choice([0, 1, 2 ** 31, 2 ** 32 - 1, len(blob)])) + blob[-4:]
    start = rng.randrange(len(blob))
    return blob[:start] + bytes(rng.randrange(1, 32)) + blob[start + 32:]


def _parquet_bases(rows: np.ndarray) -> list[bytes]:
    """Small Parquet galleries: fixed-size and variable lists, compressed and not, ids and a text column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = rows.shape
    bases = []
    for fixed, compression in ((True, "snappy"), (False, "none"), (True, "zstd")):
        values = pa.array(rows.ravel())
        embedding = pa.FixedSizeListArray.from_arrays(values, dim) if fixed else \
            pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), values)
        buffer = io.BytesIO()
        pq.write_table(pa.table({"id": np.arange(n), "embedding": embedding, "name": [f"p{i}" for i in range(n)]}),
                       buffer, row_group_size=n // 3, compression=compression)
        bases.append(buffer.getvalue())
    return bases


def test_fuzzed_model_headers_and_galleries_fail_clearly_within_memory(tmp_path):
    """At least 200 mutated model checkpoints and 200 mutated galleries: each gives a correct result or a
    ValueError naming the file, within MAX_EXTRA_MB of extra memory."""
    rng = random.Random(20240607)
    base = tmp_path / "base"
    base.mkdir()
    models = []
    for arch, kwargs in TINY.items():
        torch.manual_seed(0)
        afe.save_model(afe.build_model(arch, **kwargs), base / f"{arch}.safetensors")
        models.append((base / f"{arch}.safetensors").read_bytes())
    rows = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    from safetensors.numpy import save as save_numpy

    gallery_st = save_numpy({"embeddings": rows, "ids": np.arange(6, dtype=np.int64)}, metadata={"note": "x"})
    np.save(base / "base.npy", rows)
    (base / "base.safetensors").write_bytes(gallery_st)
    warmup = [("model", base / f"{arch}.safetensors") for arch in TINY]
    warmup += [("gallery", base / "base.npy"), ("gallery", base / "base.safetensors")]
    files = []
    for i in range(220):
        path = tmp_path / f"model{i}.safetensors"
        path.write_bytes(_mutate_safetensors(rng, rng.choice(models), model=True))
        files.append(("model", path))
    for i in range(100):
        path = tmp_path / f"gallery{i}.npy"
        path.write_bytes(_mutate_npy(rng, rows))
        files.append(("gallery", path))
    for i in range(100):
        path = tmp_path / f"gallery{i}.safetensors"
        path.write_bytes(_mutate_safetensors(rng, gallery_st, model=False))
        files.append(("gallery", path))
    try:
        import pyarrow  # noqa: F401
        parquet = True
    except ImportError:
        parquet = False
    if parquet:
        bases = _parquet_bases(np.random.default_rng(1).standard_normal((60, 8)).astype(np.float32))
        for k, blob in enumerate(bases):
            (base / f"base{k}.parquet").write_bytes(blob)
            warmup.append(("gallery", base / f"base{k}.parquet"))
        for i in range(100):
            path = tmp_path / f"gallery{i}.parquet"
            path.write_bytes(_mutate_parquet(rng, rng.choice(bases)))
            files.append(("gallery", path))
    assert all(p.stat().st_size < 1 << 20 for _, p in files)
    results = _in_subprocess(tmp_path, files, warmup)
    assert sum(r["kind"] == "model" for r in results) >= 200 and sum(r["kind"] == "gallery" for r in results) >= 200
    bad = _bad(results)
    assert not bad, f"{len(bad)} unclear outcomes:\n" + "\n".join(bad[:int(os.environ.get("SHOW", 30))])
    if not parquet:
        pytest.skip("pyarrow is not installed: Parquet galleries were not fuzzed")


# ---------------------------------------------------------------- the subprocess reader


def _read(kind: str, path: str) -> str:
    """Read one file as ``kind``; "ok" for a correct result, else a description of what is wrong with it."""
    if kind == "model":
        from safetensors.torch import load_file

        model = afe.load_model(path)
        expected = load_file(path)
        got = model.state_dict()
        if sorted(got) != sorted(expected) or any(not torch.equal(got[k], expected[k].to(got[k].dtype))
                                                  for k in got):
            return "wrong: the loaded weights are not the file's"
        return "ok"
    if kind == "gallery":
        gallery = open_gallery(path)
        try:
            chunk = gallery.read(0, gallery.num_rows)
        finally:
            gallery.close()
        if chunk.rows.shape != (gallery.num_rows, gallery.dim) or (chunk.ids is not None
                                                                   and len(chunk.ids) != gallery.num_rows):
            return f"wrong: rows {chunk.rows.shape}, ids {None if chunk.ids is None else len(chunk.ids)}"
        if path.endswith(".npy") and not np.array_equal(np.load(path), chunk.rows, equal_nan=True):
            return "wrong: rows differ from numpy's reading"
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            try:
                data = load_file(path)
            except Exception as err:
                return f"wrong: accepted a file that safetensors refuses ({err})"
            key = gallery.info["embedding_key"]
            if not np.array_equal(data[key], chunk.rows, equal_nan=True) or (
                    chunk.ids is not None and not np.array_equal(data[gallery.info["id_key"]], chunk.ids)):
                return "wrong: rows or ids differ from safetensors' reading"
        return "ok"
    if kind == "bin":
        data = read_bin(path, size=16)
        return "ok" if tuple(data.images.shape[1:]) == (3, 16, 16) else f"wrong: images {tuple(data.images.shape)}"
    folder = ImageFolder(path, 16)
    images = folder.batch(range(len(folder)))
    return "ok" if tuple(images.shape[1:]) == (3, 16, 16) else f"wrong: images {tuple(images.shape)}"


def _memory_refused(err: BaseException) -> bool:
    """Whether an allocation was refused somewhere in ``err``'s chain (the address-space limit was hit)."""
    while err is not None:
        if isinstance(err, MemoryError) or "can't allocate memory" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _worker(spec_path: str) -> None:
    """Read the spec's files one by one; write each outcome with the peak memory growth since the baseline."""
    import resource
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    for kind, path in spec["warmup"]:  # lazy initialisation of the libraries is no file's cost
        assert _read(kind, path) == "ok", (kind, path)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))  # a runaway reader fails fast
    results = []
    for kind, path in spec["files"]:
        try:
            kind_of, message = "ok", _read(kind, path)
            if message != "ok":
                kind_of = "WrongResult"
        except Exception as err:
            kind_of = "ValueError" if isinstance(err, ValueError) else type(err).__name__  # subclasses too
            message = f"{type(err).__name__}: {' '.join(str(err).split())}"
            if _memory_refused(err):
                kind_of = f"MemoryRefused({kind_of})"
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
        results.append({"kind": kind, "path": path, "type": kind_of, "message": message, "growth_mb": growth})
    Path(spec["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1])
