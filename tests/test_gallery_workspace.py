"""The job folder ``OUTPUT.job/``: only ever the job's own files deleted, and its manifest trusted only for
what can be checked against the input (malformed, forged or fuzzed manifests: the right output or a ValueError)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import test_gallery as tg
from test_gallery import gallery_rows, killed_at_chunk, run

from advface_engine.cli import main
from advface_engine.gallery.job import MARKER

ckpt, one_thread = tg.ckpt, tg.one_thread  # the gallery tests' fixtures: tiny models, one torch thread
ROWS, BATCH, CHUNK, BAD = 40, 8, 16, 21  # three chunks (16, 16, 8 rows); row 21 (chunk 1) has a NaN
CONFIG = tg.CONFIG.replace(steps=1)


def job(src, dst, ckpt, **kw):
    return run(src, dst, ckpt, batch_size=BATCH, chunk_rows=CHUNK, config=CONFIG, on_bad_rows="skip", **kw)


def tree(root):
    """Every file (its bytes), link (its target) and folder under root, links not followed."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


@pytest.fixture
def gallery(tmp_path, ckpt):
    """An input with one bad row, and its clean output (``on_bad_rows="skip"``) and result."""
    rows = gallery_rows(ROWS)
    rows[BAD, 4] = np.nan
    np.save(tmp_path / "in.npy", rows)
    clean = job(tmp_path / "in.npy", tmp_path / "clean.npy", ckpt)
    return tmp_path / "in.npy", tmp_path / "clean.npy", clean


@pytest.fixture
def interrupted(tmp_path, ckpt, gallery):
    """The same job stopped after two of its three chunks: (input, output, job folder, clean output, clean result)."""
    src, clean_path, clean = gallery
    with killed_at_chunk():
        job(src, tmp_path / "out.npy", ckpt)
    work = tmp_path / "out.npy.job"
    assert sorted(json.loads((work / "manifest.json").read_text())["chunks"]) == ["0", "1"]
    return src, tmp_path / "out.npy", work, clean_path, clean


def edit_manifest(work, change):
    data = json.loads((work / "manifest.json").read_text())
    change(data)
    (work / "manifest.json").write_text(json.dumps(data))


# -- 1. the job deletes only what it created


def test_a_job_folder_that_is_a_link_is_refused_and_its_target_kept(tmp_path, ckpt, gallery, capsys):
    src, _, _ = gallery
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (tmp_path / "out.npy.job").symlink_to(photos, target_is_directory=True)
    before = tree(tmp_path)
    args = ["protect-gallery", "--input", str(src), "--output", str(tmp_path / "out.npy"), "--shadow", ckpt["shadow"],
            "--encoder", ckpt["encoder"], "--batch-size", str(BATCH), "--chunk-rows", str(CHUNK), "--steps", "1",
            "--on-bad-rows", "skip", "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out.npy.job'} is a symbolic link" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before  # nothing deleted, nothing written (no output, no lock in the target)


@pytest.mark.parametrize("with_manifest", [False, True], ids=["user-folder", "job-folder"])
def test_a_job_folder_holding_a_user_file_is_refused_and_the_file_kept(tmp_path, ckpt, interrupted, with_manifest):
    """Refused even where the folder holds this job's valid manifest: the job would have to delete the folder.
    With the file moved out, the job's folder resumes; so does an older version's (a manifest, no marker)."""
    src, dst, work, clean_path, _ = interrupted
    if not with_manifest:
        shutil.rmtree(work)
        work.mkdir()
    (work / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(work))} holds notes.txt, which the job did not write"):
        job(src, dst, ckpt)
    assert tree(tmp_path) == before
    (work / "notes.txt").unlink()
    if with_manifest:
        (work / MARKER).unlink()  # as an older version left it
        assert job(src, dst, ckpt).resumed_chunks == 2
        assert dst.read_bytes() == clean_path.read_bytes() and not os.path.lexists(work)


def test_a_job_folder_swapped_for_a_link_between_runs_is_refused(tmp_path, ckpt, interrupted):
    src, dst, work, _, _ = interrupted
    elsewhere = tmp_path / "elsewhere"
    work.rename(elsewhere)
    (elsewhere / "notes.txt").write_text("mine")
    work.symlink_to(elsewhere, target_is_directory=True)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(work))} is a symbolic link"):
        job(src, dst, ckpt)
    assert tree(tmp_path) == before


# -- 2. the manifest trusted only for what can be checked


@pytest.mark.parametrize("field, change", [
    ("chunks.0.sha256", lambda m: m["chunks"]["0"].pop("sha256")),
    ("chunks.0.bad", lambda m: m["chunks"]["0"].update(bad=[999])),
    ("chunks.1.bad", lambda m: m["chunks"]["1"].update(bad=[5, 5])),
    ("chunks.7", lambda m: m["chunks"].update({"7": m["chunks"]["0"]})),
    ("chunks.1.start", lambda m: m["chunks"]["1"].update(start="16")),
    ("chunks.1.stop", lambda m: m["chunks"]["1"].update(stop=33)),
    ("chunks.0.input_sha256", lambda m: m["chunks"]["0"].update(input_sha256=None)),
    ("chunks", lambda m: m.update(chunks=[])),
    ("final", lambda m: m.update(final=7)),
])
def test_a_malformed_manifest_is_refused_naming_the_field(ckpt, interrupted, field, change):
    src, dst, work, _, _ = interrupted
    edit_manifest(work, change)
    with pytest.raises(ValueError, match=rf"{re.escape(str(work / 'manifest.json'))} is malformed "
                                         rf"\({re.escape(field)}: "):
        job(src, dst, ckpt)
    assert not dst.exists()


@pytest.mark.parametrize("chunk, bad", [("0", [0, 1, 2]), ("1", [])],
                         ids=["good-rows-recorded-bad", "bad-row-unrecorded"])
def test_recorded_bad_rows_are_checked_against_the_input(ckpt, interrupted, chunk, bad):
    """Under "skip" a forged list would drop good rows or keep a bad one: the chunk is recomputed instead."""
    src, dst, work, clean_path, clean = interrupted
    edit_manifest(work, lambda m: m["chunks"][chunk].update(bad=bad))
    result = job(src, dst, ckpt)
    assert (result.resumed_chunks, result.bad_rows) == (1, 1)
    assert dst.read_bytes() == clean_path.read_bytes()


@pytest.mark.parametrize("forgery", ["zeroed", "unprotected", "another-chunk"])
def test_a_forged_part_with_its_checksum_updated_is_recomputed(ckpt, interrupted, forgery):
    """Chunk 0's rows in the output written in place replaced, and the manifest given their checksum."""
    src, dst, work, clean_path, _ = interrupted
    stored = np.load(work / "output.npy", mmap_mode="r+")
    data = {"zeroed": np.zeros_like(stored[:CHUNK]), "unprotected": np.load(src)[:CHUNK],
            "another-chunk": np.array(stored[CHUNK:2 * CHUNK])}[forgery]
    stored[:CHUNK] = data
    stored.flush()
    del stored
    edit_manifest(work, lambda m: m["chunks"]["0"].update(sha256=hashlib.sha256(data.tobytes()).hexdigest()))
    assert job(src, dst, ckpt).resumed_chunks == 1
    assert dst.read_bytes() == clean_path.read_bytes()


def test_the_summary_is_computed_from_the_parts_and_the_input_not_the_manifest(ckpt, interrupted):
    src, dst, work, _, clean = interrupted

    def forge(m):
        for rec in m["chunks"].values():
            rec["cosine"] = [float(rec["stop"] - rec["start"]), 1.0, rec["stop"] - rec["start"]]

    edit_manifest(work, forge)
    resumed = job(src, dst, ckpt)
    assert resumed.resumed_chunks == 2 and resumed.cosine == clean.cosine and clean.cosine["min"] < 1


def mutate(manifest: dict, rng: random.Random) -> bytes:
    """A damaged copy of a manifest's bytes: a field deleted, retyped or out of range, a record forged (well
    formed, but lying about its part, its input or its bad rows), or the file truncated or overwritten."""
    data = copy.deepcopy(manifest)
    kind = rng.choice(["delete", "retype", "range", "forge", "forge", "truncate", "garble", "garbage"])
    if kind in ("delete", "retype", "range"):
        slots = []  # (container, key): the chunk records and the final entry more often than the fingerprint

        def walk(node, weight):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in list(items):
                slots.extend([(node, key)] * weight)
                if isinstance(value, (dict, list)):
                    walk(value, 1 if key == "fingerprint" else weight)

        walk(data, 4)
        node, key = rng.choice(slots)
        value = node[key]
        if kind == "delete":
            del node[key]
        elif kind == "retype":
            node[key] = rng.choice([None, True, "16", 1.5, -1, [], {}, [1, 2], "0" * 64, float("nan"), 10**30])
        elif isinstance(value, int) and not isinstance(value, bool):
            node[key] = rng.choice([-1, value - 1, value + 1, value + CHUNK, 999, 2**63, 10**6])
        elif isinstance(value, list):
            node[key] = sorted(rng.sample(range(-2, CHUNK + 3), rng.randint(0, 5)))
        else:
            node[key] = rng.choice(["", "x" * 64, 0, {"rows": 1}])
    elif kind == "forge":
        key = rng.choice(sorted(data["chunks"]))
        record, field = data["chunks"][key], rng.choice(["sha256", "input_sha256", "bad", "bad", "record"])
        if field == "record":
            del data["chunks"][key]
        elif field == "bad":
            record["bad"] = sorted(rng.sample(range(CHUNK), rng.randint(0, 3)))
        else:
            record[field] = hashlib.sha256(rng.randbytes(8)).hexdigest()
    raw = json.dumps(data).encode()
    if kind == "truncate":
        raw = raw[:rng.randrange(len(raw))]
    elif kind == "garble":
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    elif kind == "garbage":
        raw = rng.randbytes(rng.randint(0, 300))
    return raw


def test_fuzzed_manifests_give_the_right_output_or_a_value_error(tmp_path, ckpt, interrupted):
    """Whatever the manifest holds, a resume writes the clean run's bytes or stops with a ValueError, and
    everything outside the job folder is left as it was."""
    src, dst, work, clean_path, _ = interrupted
    pristine = tmp_path / "pristine.job"
    shutil.copytree(work, pristine, symlinks=True)
    manifest = json.loads((work / "manifest.json").read_text())
    outside = {k: v for k, v in tree(tmp_path).items() if not k.startswith(dst.name)}  # output, report, job
    rng, outcomes = random.Random(20240601), {"output": 0, "ValueError": 0}
    for i in range(220):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work, symlinks=True)
        raw = mutate(manifest, rng)
        (work / "manifest.json").write_bytes(raw)
        try:
            job(src, dst, ckpt)
        except ValueError:
            outcomes["ValueError"] += 1
            assert not dst.exists(), (i, raw)
        except Exception as err:
            pytest.fail(f"mutation {i} ({raw[:300]!r}) raised {err!r}")
        else:
            outcomes["output"] += 1
            assert dst.read_bytes() == clean_path.read_bytes(), (i, raw)
            dst.unlink()
        assert {k: v for k, v in tree(tmp_path).items() if not k.startswith(dst.name)} == outside, (i, raw)
    assert min(outcomes.values()) >= 20, outcomes  # both kinds of outcome were exercised


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_the_writer_never_writes_through_a_link(tmp_path, fmt):
    """The output's temporary file lives in the job's folder: a link put in its place is an error, and the
    file it points to is left as it was."""
    import errno

    from advface_engine.gallery.formats import GalleryWriter, open_gallery

    np.save(tmp_path / "in.npy", gallery_rows())
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / f"output.{fmt}").symlink_to(target)
    gallery = open_gallery(tmp_path / "in.npy")
    try:
        with pytest.raises(OSError) as err:
            GalleryWriter(fmt, tmp_path / f"output.{fmt}", gallery, gallery.num_rows)
        assert err.value.errno == errno.ELOOP
    finally:
        gallery.close()
    assert target.read_text() == "keep me"
