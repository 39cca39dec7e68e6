"""The output written in place (npy, safetensors, FAISS on the local engine): each chunk's rows go straight into
the output's temporary file, so an uninterrupted job ends with an fsync and a rename, no second pass; a crash
anywhere resumes to the same bytes, and a damaged temporary output is found and recomputed, never trusted."""

from __future__ import annotations

import contextlib
import json
import os
import tracemalloc

import numpy as np
import pytest
import test_gallery as tg
import torch
from test_gallery import CHUNK, DIM, ROWS, Killed, gallery_rows, killed_at_chunk, read, reference, run, write
from torch import nn

from advface_engine.gallery import job as job_module
from advface_engine.gallery import open_gallery
from advface_engine.gallery import store as store_module

ckpt, one_thread = tg.ckpt, tg.one_thread  # the gallery tests' fixtures: tiny models, one torch thread
BAD = [3, 70, 149]  # one bad row in each of the three chunks
FORMATS = {"npy": "npy", "safetensors": "safetensors", "faiss_idmap": "index"}  # writer format -> suffix


def gallery_file(tmp_path, fmt, bad=True):
    """An input of ROWS rows (ids where the format holds them; a NaN in BAD rows) and its rows."""
    rows, ids = gallery_rows(), np.arange(ROWS, dtype=np.int64) * 3 + 1
    if bad:
        rows[BAD, 2] = np.nan
    src = tmp_path / f"in.{FORMATS[fmt]}"
    write(fmt, src, rows, ids)
    return src, rows


@contextlib.contextmanager
def counting(owner, name):
    """Within: calls to ``owner.name`` are counted (``calls[0]``), and made as usual."""
    real, calls = getattr(owner, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(owner, name, counted)
        yield calls


@pytest.mark.parametrize("policy", ["copy", "skip"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_in_place_gives_the_bytes_assembled_from_parts_with_no_second_pass(tmp_path, ckpt, fmt, policy):
    """The same bytes as the job that assembles its output from part files (what every format did before, and
    Parquet and Ray still do), and the Protector's rows; without a skipped row, nothing is written twice and
    nothing stored is read back: no part file, no append, no stored row read."""
    src, rows = gallery_file(tmp_path, fmt)
    dst, parts = tmp_path / f"out.{FORMATS[fmt]}", tmp_path / f"parts.{FORMATS[fmt]}"
    with counting(store_module, "write_part") as part_writes, \
            counting(job_module.GalleryWriter, "write") as appends, \
            counting(store_module.OutputInPlace, "load") as reads:
        result = run(src, dst, ckpt, on_bad_rows=policy)
    assert part_writes[0] == 0
    assert (appends[0], reads[0]) == ((0, 0) if policy == "copy" else (3, 3))  # skip: written again, compacted
    with pytest.MonkeyPatch.context() as m:
        m.setattr(job_module, "RAW_FORMATS", ())  # every chunk to a part file, the output assembled from them
        from_parts = run(src, parts, ckpt, on_bad_rows=policy)
    assert dst.read_bytes() == parts.read_bytes()
    figures = [json.dumps([r.rows_written, r.bad_rows, r.cosine, r.stats]) for r in (result, from_parts)]
    assert figures[0] == figures[1]  # as JSON text: NaN figures (l1_gain of untrained models) compare equal
    out, out_ids, _ = read("faiss" if fmt == "faiss_idmap" else fmt, dst)
    good = np.setdiff1d(np.arange(ROWS), BAD)
    clean = rows.copy()
    clean[BAD] = rows[0]  # any good row in the bad rows' place: the batches' other rows do not depend on it
    kept = good if policy == "skip" else np.arange(ROWS)
    np.testing.assert_array_equal(out[np.isin(kept, good)], reference(clean, ckpt)[good])
    if out_ids is not None:
        np.testing.assert_array_equal(out_ids, (np.arange(ROWS) * 3 + 1)[kept])
    assert not (tmp_path / f"out.{FORMATS[fmt]}.job").exists()


def test_a_chunk_is_on_disk_before_the_manifest_records_it(tmp_path, ckpt, monkeypatch):
    """Nothing recorded is lost to a crash, a power cut included: each chunk's rows are written, then
    fdatasynced, then recorded (a resume would recompute a recorded chunk the disk lost, but not for free)."""
    src, _ = gallery_file(tmp_path, "npy")
    events, write_at, sync, add = [], job_module.GalleryWriter.write_at, job_module.GalleryWriter.sync, \
        job_module.Manifest.add
    monkeypatch.setattr(job_module.GalleryWriter, "write_at",
                        lambda self, start, *a: (events.append(("write", start // CHUNK)), write_at(self, start, *a)))
    monkeypatch.setattr(job_module.GalleryWriter, "sync", lambda self: (events.append(("sync",)), sync(self)))
    monkeypatch.setattr(job_module.Manifest, "add", lambda self, k, rec: (events.append(("record", k)),
                                                                         add(self, k, rec)))
    run(src, tmp_path / "out.npy", ckpt, on_bad_rows="copy")
    assert events == [event for k in range(3) for event in (("write", k), ("sync",), ("record", k))]


def _kill_at(where, k=1):
    """A context in which the job is killed at ``where`` (for chunk k where that is a chunk's step)."""
    if where == "after-chunks":
        return killed_at_chunk(k)
    owner, name = {
        "mid-write": (job_module.GalleryWriter, "write_at"),  # half of chunk k's rows written
        "before-record": (job_module.Manifest, "add"),  # chunk k written and synced, not recorded
        "during-assembly": (job_module.GalleryWriter, "finish"),
        "before-rename": (job_module, "_stat"),  # the final manifest not yet written, then the rename
        "before-cleanup": (job_module, "_remove_job"),
    }[where]
    real = getattr(owner, name)

    def killed(*args):
        if where == "mid-write" and args[1] == k * CHUNK:
            real(args[0], args[1], args[2][:len(args[2]) // 2], args[3][:len(args[3]) // 2] if len(args) > 3
                 and args[3] is not None else None)
        elif where == "before-record" and args[1] != k:
            return real(*args)
        elif where == "mid-write":
            return real(*args)
        raise Killed

    @contextlib.contextmanager
    def context():
        with pytest.MonkeyPatch.context() as m, pytest.raises(Killed):
            m.setattr(owner, name, killed)
            yield

    return context()


@pytest.mark.parametrize("where, resumed", [
    ("after-chunks", 1), ("mid-write", 1), ("before-record", 1), ("during-assembly", 3), ("before-rename", 3),
    ("before-cleanup", 3)])
@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_a_crash_anywhere_resumes_to_the_same_bytes(tmp_path, ckpt, fmt, where, resumed):
    src, _ = gallery_file(tmp_path, fmt)
    dst = tmp_path / f"out.{fmt}"
    fresh = run(src, tmp_path / f"fresh.{fmt}", ckpt, on_bad_rows="copy")
    with _kill_at(where):
        run(src, dst, ckpt, on_bad_rows="copy")
    assert dst.exists() == (where == "before-cleanup")
    result = run(src, dst, ckpt, on_bad_rows="copy")
    assert result.resumed_chunks == resumed
    assert dst.read_bytes() == (tmp_path / f"fresh.{fmt}").read_bytes()
    if where != "before-cleanup":  # a finished job's rerun only removes its folder, and reports no figures
        assert json.dumps([result.cosine, result.stats]) == json.dumps([fresh.cosine, fresh.stats])
    assert not (tmp_path / f"out.{fmt}.job").exists()


def _damage(path, how):
    """Damage the temporary output ``path`` (two chunks of three written) as ``how`` says."""
    stored = open_gallery(path)  # its layout: where the rows and ids lie
    rows_at, ids_at, row_bytes = stored.rows_offset, stored.ids_offset, DIM * 4
    stored.close()
    data = bytearray(path.read_bytes())
    if how == "deleted":
        path.unlink()
        return
    if how == "truncated-in-chunk-1":
        data = data[:rows_at + (CHUNK + 5) * row_bytes]
    elif how == "truncated-in-header":
        data = data[:rows_at // 2]
    elif how == "grown":
        data += b"\x01" * 100
    else:
        at = {"header": rows_at // 2, "chunk-0-row": rows_at + 7 * row_bytes + 1,
              "chunk-1-id": (ids_at or 0) + (CHUNK + 2) * 8}[how]
        data[at] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt, how, resumed", [
    ("npy", "truncated-in-chunk-1", 1), ("safetensors", "truncated-in-chunk-1", 0),  # ids lie after every row
    ("npy", "truncated-in-header", 0), ("npy", "deleted", 0), ("npy", "chunk-0-row", 1),
    ("safetensors", "chunk-1-id", 1), ("safetensors", "header", 2), ("npy", "grown", 2)])
def test_a_damaged_temporary_output_is_found_and_recomputed(tmp_path, ckpt, fmt, how, resumed):
    """Rows (or ids) the temporary output lost or changed are found by the resume's checks and those chunks
    computed again; its header and size are written again; the output is the uninterrupted job's, rows and
    ids byte for byte."""
    src, _ = gallery_file(tmp_path, fmt)
    dst = tmp_path / f"out.{fmt}"
    run(src, tmp_path / f"fresh.{fmt}", ckpt, on_bad_rows="copy")
    with killed_at_chunk(2):
        run(src, dst, ckpt, on_bad_rows="copy")
    _damage(tmp_path / f"out.{fmt}.job" / f"output.{fmt}", how)
    assert run(src, dst, ckpt, on_bad_rows="copy").resumed_chunks == resumed
    assert dst.read_bytes() == (tmp_path / f"fresh.{fmt}").read_bytes()


def test_the_input_changed_during_the_job_is_caught_at_assembly(tmp_path, ckpt, monkeypatch):
    """Chunks computed in this run are not read again at assembly, unless the input file changed since the
    job read them: then every chunk's input rows are checked against their recorded checksum."""
    src, rows = gallery_file(tmp_path, "npy", bad=False)
    compute = job_module.ChunkJob.compute

    def change_after_first(self, k, *args, **kwargs):
        out = compute(self, k, *args, **kwargs)
        if k == 0:  # chunk 0 read and protected; then its rows change on disk
            changed = rows.copy()
            changed[5] = -changed[5]
            np.save(src, changed)
        return out

    monkeypatch.setattr(job_module.ChunkJob, "compute", change_after_first)
    with pytest.raises(ValueError, match=r"rows 0..63 changed after they were protected"):
        run(src, tmp_path / "out.npy", ckpt)
    assert not (tmp_path / "out.npy").exists()


class _Linear(nn.Module):
    """A linear 'decoder' (z to a 3x8x8 image) or 'encoder' (back): the job's buffers at a real row width,
    without a network's cost."""

    def __init__(self, dim: int, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.layer = nn.Linear(dim, 192) if decoder else nn.Linear(192, dim)

    def forward(self, x):
        return torch.tanh(self.layer(x)).view(-1, 3, 8, 8) if self.decoder else self.layer(x.flatten(1))


def test_peak_memory_does_not_grow_with_the_rows(tmp_path):
    """The job's NumPy buffers (traced by tracemalloc) at 8 and at 32 chunks of 256-d rows: the same peak, about
    a few chunks, where holding every chunk would add 6 MiB."""
    dim, chunk = 256, 256
    torch.manual_seed(0)
    shadow, encoder = _Linear(dim, True).eval(), _Linear(dim, False).eval()
    peaks = []
    for n in (8 * chunk, 32 * chunk):
        z = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)
        np.save(tmp_path / f"in{n}.npy", z / np.linalg.norm(z, axis=1, keepdims=True))
        del z
        tracemalloc.start()
        try:
            job_module.protect_gallery(tmp_path / f"in{n}.npy", tmp_path / f"out{n}.npy", shadow, encoder,
                                       tg.CONFIG.replace(steps=1), batch_size=128, chunk_rows=chunk, device="cpu",
                                       progress=False, force=True)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        os.unlink(tmp_path / f"in{n}.npy")
    chunk_bytes = chunk * dim * 4
    assert peaks[1] < peaks[0] + 4 * chunk_bytes, (peaks, chunk_bytes)
