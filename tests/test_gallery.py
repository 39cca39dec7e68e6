"""Gallery re-protection jobs: formats, resume after kill -9, bad input, Ray equals local."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import tiny_models

import advface_engine as afe
from advface_engine.cli import main
from advface_engine.gallery import formats, open_gallery, protect_gallery
from advface_engine.gallery import job as job_module
from advface_engine.gallery import store as store_module
from advface_engine.models import save_model

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
faiss = pytest.importorskip("faiss")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

DIM, ROWS, BATCH, CHUNK = 16, 150, 32, 64
CONFIG = afe.ProtectConfig(steps=2, random_start=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a loaded shared CPU, two OpenMP threads make these tiny models ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Checkpoint paths of a tiny (shadow, encoder) pair, and the modules themselves."""
    folder = tmp_path_factory.mktemp("models")
    shadow, encoder = tiny_models(feature_dim=DIM)
    save_model(shadow, folder / "shadow.safetensors")
    save_model(encoder, folder / "encoder.safetensors")
    return {"shadow": str(folder / "shadow.safetensors"), "encoder": str(folder / "encoder.safetensors"),
            "modules": (shadow, encoder)}


def gallery_rows(n=ROWS, dim=DIM, seed=0, dtype=np.float32):
    z = np.random.default_rng(seed).standard_normal((n, dim))
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(dtype)


def reference(rows, ckpt, batch=BATCH, chunk=CHUNK, config=CONFIG):
    """The engine on in-memory batches laid out like the job's (chunks cut into batches)."""
    protector = afe.Protector(*ckpt["modules"], config=config, backend="reference")
    out = [protector(torch.from_numpy(rows[c:c + chunk][b:b + batch]))
           for c in range(0, len(rows), chunk) for b in range(0, min(chunk, len(rows) - c), batch)]
    return torch.cat(out).numpy()


def write(fmt, path, rows, ids=None):
    """Write a gallery with the format's own library (``fmt``: npy, safetensors, parquet, faiss_ip, faiss_idmap)."""
    if fmt == "npy":
        np.save(path, rows)
    elif fmt == "safetensors":
        safetensors_numpy.save_file({"embeddings": rows, **({"ids": ids} if ids is not None else {})}, str(path))
    elif fmt == "parquet":
        columns = {"id": pa.array(ids), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), DIM),
                   "name": pa.array([f"person-{i}" for i in ids])}
        pq.write_table(pa.table(columns), path, row_group_size=50)
    elif fmt == "faiss_ip":
        index = faiss.IndexFlatIP(rows.shape[1])
        index.add(rows)
        faiss.write_index(index, str(path))
    else:
        index = faiss.IndexIDMap2(faiss.IndexFlatL2(rows.shape[1]))
        index.add_with_ids(rows, ids)
        faiss.write_index(index, str(path))


def read(fmt, path):
    """(rows, ids, index or table) read back with the format's own library."""
    if fmt == "npy":
        return np.load(path), None, None
    if fmt == "safetensors":
        data = safetensors_numpy.load_file(str(path))
        return data["embeddings"], data.get("ids"), None
    if fmt == "parquet":
        table = pq.read_table(path)
        embedding = table.column("embedding").to_numpy(zero_copy_only=False)
        rows = np.stack(embedding) if len(embedding) else np.zeros((0, DIM), np.float32)
        return rows, table.column("id").to_numpy() if "id" in table.column_names else None, table
    index = faiss.read_index(str(path))
    ids = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else None
    flat = faiss.downcast_index(index.index) if ids is not None else index
    return flat.reconstruct_n(0, flat.ntotal), ids, index


SUFFIX = {"npy": ".npy", "safetensors": ".safetensors", "parquet": ".parquet", "faiss_ip": ".faiss",
          "faiss_idmap": ".index"}


def run(src, dst, ckpt, **kw):
    """The job on the CPU (what these tests compare with is the CPU reference; the GPU has its own test),
    forced past the preflight: these untrained models do not fit any gallery (tests/test_guard.py has it)."""
    kw = {"batch_size": BATCH, "chunk_rows": CHUNK, "progress": False, "device": "cpu", "force": True, **kw}
    return protect_gallery(src, dst, ckpt["shadow"], ckpt["encoder"], kw.pop("config", CONFIG), **kw)


def provenance_of(fmt, path):
    """The job's record in an output: the safetensors header's metadata, the Parquet schema's, else the sidecar."""
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return json.loads(f.metadata()[formats.PROVENANCE_KEY])
    if fmt == "parquet":
        return json.loads(pq.read_schema(path).metadata[formats.PROVENANCE_KEY.encode()])
    return json.loads(path.with_name(path.name + ".provenance.json").read_text())


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_outputs_carry_the_config_model_checksums_and_engine_version(tmp_path, ckpt, fmt):
    rows, ids = gallery_rows(), np.arange(ROWS, dtype=np.int64)
    src, dst = tmp_path / f"in{SUFFIX[fmt]}", tmp_path / f"out{SUFFIX[fmt]}"
    write(fmt, src, rows, ids)
    run(src, dst, ckpt, on_bad_rows="copy")
    made = provenance_of(fmt, dst)
    assert made["config"] == CONFIG.to_dict() and made["on_bad_rows"] == "copy"
    assert made["shadow"] == job_module.model_checksum(ckpt["modules"][0])
    assert made["encoder"] == job_module.model_checksum(ckpt["modules"][1])
    assert made["versions"] == {"advface_engine": afe.__version__, "torch": torch.__version__}
    assert made["input"]["rows"] == ROWS and made["layout"] == {"chunk_rows": CHUNK, "batch_size": BATCH}
    assert "engine" not in made  # local or Ray, device, backend: the outputs of both are the same bytes
    sidecar = dst.with_name(dst.name + ".provenance.json")
    assert sidecar.exists() == (fmt in ("npy", "faiss_ip", "faiss_idmap"))
    if fmt == "safetensors":  # the input's own metadata is kept beside the record
        safetensors_numpy.save_file({"embeddings": rows}, str(src), metadata={"source": "enrolment"})
        run(src, dst, ckpt, overwrite=True)
        from safetensors import safe_open

        with safe_open(str(dst), framework="np") as f:
            assert f.metadata()["source"] == "enrolment" and formats.PROVENANCE_KEY in f.metadata()


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_round_trip_keeps_format_ids_order_and_dtype(tmp_path, ckpt, fmt):
    rows, ids = gallery_rows(), np.arange(ROWS, dtype=np.int64)[::-1] * 7 + 3
    src, dst = tmp_path / f"in{SUFFIX[fmt]}", tmp_path / f"out{SUFFIX[fmt]}"
    write(fmt, src, rows, ids)
    result = run(src, dst, ckpt)
    assert (result.rows, result.rows_written, result.chunks, result.bad_rows) == (ROWS, ROWS, 3, 0)
    out, out_ids, native = read(fmt, dst)
    assert out.dtype == rows.dtype and out.shape == rows.shape
    np.testing.assert_array_equal(out, reference(rows, ckpt))
    assert not np.allclose(out, rows)
    if fmt in ("safetensors", "parquet", "faiss_idmap"):
        np.testing.assert_array_equal(out_ids, ids)
    if fmt == "parquet":
        assert native.schema == pq.read_schema(src)
        assert native.column("name").to_pylist() == [f"person-{i}" for i in ids]
    if fmt.startswith("faiss"):  # the same index type, byte for byte as FAISS itself writes it
        original = faiss.read_index(str(src))
        assert type(native) is type(original) and native.metric_type == original.metric_type
        assert faiss.serialize_index(native).tobytes() == dst.read_bytes()
    if fmt == "npy":
        np.save(tmp_path / "same.npy", out)
        assert (tmp_path / "same.npy").read_bytes() == dst.read_bytes()
    assert not (tmp_path / f"out{SUFFIX[fmt]}.job").exists()


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_readers_give_any_row_range(tmp_path, fmt):
    rows, ids = gallery_rows(), np.arange(ROWS, dtype=np.int64) + 100
    write(fmt, tmp_path / f"g{SUFFIX[fmt]}", rows, ids)
    gallery = open_gallery(tmp_path / f"g{SUFFIX[fmt]}")
    assert (gallery.num_rows, gallery.dim, gallery.dtype) == (ROWS, DIM, np.float32)
    for start, stop in [(120, 150), (0, 10), (10, 70), (49, 51), (70, 120)]:
        chunk = gallery.read(start, stop)
        np.testing.assert_array_equal(chunk.rows, rows[start:stop])
        if gallery.ids_dtype is not None:
            np.testing.assert_array_equal(chunk.ids, ids[start:stop])
    gallery.close()


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_dtype_is_kept(tmp_path, ckpt, dtype):
    rows = gallery_rows(dtype=dtype)
    np.save(tmp_path / "in.npy", rows)
    run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt)
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, reference(rows, ckpt))


def test_format_conversion_keeps_ids(tmp_path, ckpt):
    rows, ids = gallery_rows(), np.arange(ROWS, dtype=np.int64) * 3
    np.save(tmp_path / "in.npy", rows)
    run(tmp_path / "in.npy", tmp_path / "out.parquet", ckpt)  # format from the output's suffix
    out, out_ids, table = read("parquet", tmp_path / "out.parquet")
    np.testing.assert_array_equal(out, reference(rows, ckpt))
    assert out_ids is None and table.column_names == ["embedding"]
    table = pa.table({"id": pa.array(ids), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), DIM)})
    pq.write_table(table, tmp_path / "in.parquet")
    run(tmp_path / "in.parquet", tmp_path / "out.st", ckpt, format="safetensors")
    out, out_ids, _ = read("safetensors", tmp_path / "out.st")
    np.testing.assert_array_equal(out_ids, ids)
    np.testing.assert_array_equal(out, reference(rows, ckpt))
    with pytest.raises(ValueError, match="ids, which .npy output cannot keep"):
        run(tmp_path / "in.parquet", tmp_path / "out2.npy", ckpt)


def test_rows_do_not_depend_on_batch_size_or_chunking(tmp_path, ckpt):
    rows = gallery_rows()
    np.save(tmp_path / "in.npy", rows)
    outs = []
    for i, (batch, chunk) in enumerate([(32, 64), (50, 100), (150, 150), (7, 21)]):
        run(tmp_path / "in.npy", tmp_path / f"out{i}.npy", ckpt, batch_size=batch, chunk_rows=chunk)
        outs.append(np.load(tmp_path / f"out{i}.npy"))
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=0, atol=1e-5)


def test_job_holds_cudnn_to_deterministic_algorithms_and_restores(tmp_path, ckpt, monkeypatch):
    """A resumed chunk must reproduce its first run bit for bit, on a GPU too."""
    np.save(tmp_path / "in.npy", gallery_rows())
    seen, protect = [], job_module.ChunkJob.protect

    def spy(self, *args, **kwargs):
        seen.append((torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
        return protect(self, *args, **kwargs)

    monkeypatch.setattr(job_module.ChunkJob, "protect", spy)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt)
    assert seen and set(seen) == {(True, False)}
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)


def with_bad_rows(tmp_path, bad=(3, 70, 149)):
    rows, ids = gallery_rows(), np.arange(ROWS, dtype=np.int64) + 1000
    rows[bad[0], 2], rows[bad[1], 0], rows[bad[2], 5] = np.nan, np.inf, -np.inf
    write("safetensors", tmp_path / "in.safetensors", rows, ids)
    return tmp_path / "in.safetensors", rows, ids, list(bad)


class Killed(Exception):
    pass


@contextlib.contextmanager
def killed_at_chunk(at=2):
    """Within: a job stops (as if killed) when it reaches chunk ``at``; the chunks before it are recorded."""
    compute = job_module.ChunkJob.compute

    def stop(self, k, *args, **kw):
        if k == at:
            raise Killed
        return compute(self, k, *args, **kw)

    with pytest.MonkeyPatch.context() as m, pytest.raises(Killed):
        m.setattr(job_module.ChunkJob, "compute", stop)
        yield


def test_bad_rows_fail_names_all_of_them_before_any_work(tmp_path, ckpt):
    """An operator fixes the data in one go: every bad row of the gallery (not only the first bad chunk's)
    is named and listed, before any chunk is computed; the fixed data then runs and the list goes."""
    src, rows, ids, bad = with_bad_rows(tmp_path)  # one in each chunk
    dst, side = tmp_path / "out.safetensors", tmp_path / "out.safetensors.bad-rows.json"
    with pytest.raises(ValueError, match=rf"rows \[3, 70, 149\] have NaN or Inf values or are all zero "
                                         rf"\(--on-bad-rows fail; all listed in {re.escape(str(side))}\)"):
        run(src, dst, ckpt)
    assert json.loads(side.read_text()) == {"policy": "fail", "rows": bad, "ids": ids[bad].tolist()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", side.name]  # no job folder
    many = gallery_rows()
    many[::10, 0] = np.nan
    np.save(tmp_path / "many.npy", many)
    with pytest.raises(ValueError, match=r"rows \[0, 10, .*, 90\] and 5 more have NaN"):
        run(tmp_path / "many.npy", tmp_path / "many-out.npy", ckpt)
    assert json.loads((tmp_path / "many-out.npy.bad-rows.json").read_text()) == {
        "policy": "fail", "rows": list(range(0, ROWS, 10))}
    write("safetensors", src, np.nan_to_num(rows, posinf=0.0, neginf=0.0), ids)
    assert run(src, dst, ckpt).bad_rows == 0 and not side.exists()


def test_bad_rows_skip_and_copy_are_recorded(tmp_path, ckpt):
    src, rows, ids, bad = with_bad_rows(tmp_path)
    good = np.setdiff1d(np.arange(ROWS), bad)
    copied = run(src, tmp_path / "copy.safetensors", ckpt, on_bad_rows="copy")
    out, out_ids, _ = read("safetensors", tmp_path / "copy.safetensors")
    np.testing.assert_array_equal(out[bad], rows[bad])  # unchanged, NaN and Inf included
    np.testing.assert_array_equal(out_ids, ids)
    assert copied.bad_rows == 3 and json.loads(copied.bad_rows_file.read_text()) == {
        "policy": "copy", "rows": bad, "ids": ids[bad].tolist()}
    skipped = run(src, tmp_path / "skip.safetensors", ckpt, on_bad_rows="skip")
    kept, kept_ids, _ = read("safetensors", tmp_path / "skip.safetensors")
    assert skipped.rows_written == ROWS - 3
    np.testing.assert_array_equal(kept_ids, ids[good])
    np.testing.assert_array_equal(kept, out[good])
    assert json.loads(skipped.bad_rows_file.read_text())["rows"] == bad
    assert np.isfinite(kept).all() and not np.allclose(kept, rows[good])


def test_all_zero_rows_are_bad_rows(tmp_path, ckpt):
    """A zero row has no direction: protected, all such placeholders would become one unit vector and
    match each other. They are bad rows: kept unchanged under copy, named under fail."""
    rows = gallery_rows()
    rows[[4, 90]] = 0.0
    rows[120] = -0.0
    rows[7] = 0.0
    rows[7, 3] = 1e-30  # not all zero: protected
    np.save(tmp_path / "in.npy", rows)
    with pytest.raises(ValueError, match=r"rows \[4, 90, 120\] have NaN or Inf values or are all zero"):
        run(tmp_path / "in.npy", tmp_path / "fail.npy", ckpt)
    copied = run(tmp_path / "in.npy", tmp_path / "copy.npy", ckpt, on_bad_rows="copy")
    out = np.load(tmp_path / "copy.npy")
    assert copied.bad_rows == 3 and not out[[4, 90, 120]].any()
    assert np.linalg.norm(out[7]) == pytest.approx(1.0, abs=1e-5)  # protected (and unit norm)
    good = np.setdiff1d(np.arange(ROWS), [4, 90, 120])
    filled = rows.copy()
    filled[[4, 90, 120]] = rows[0]  # the API refuses zero rows (as fail does): any row in their place
    np.testing.assert_array_equal(out[good], reference(filled, ckpt)[good])


def test_cosine_summary_needs_no_float64_copy_of_a_chunk():
    """The summary is float64 a block of rows at a time: whole-chunk copies (two inputs and their
    product, 6x the chunk's bytes) made it the job's largest allocation."""
    rng = np.random.default_rng(0)
    z, protected = (rng.standard_normal((65536, 64)).astype(np.float32) for _ in range(2))
    tracemalloc.start()
    try:
        cosines = job_module.Cosines()
        cosines.add(z, protected)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < z.nbytes, peak  # whole-chunk float64 copies took several times z.nbytes
    a, b = z.astype(np.float64), protected.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    summary = cosines.summary()
    assert (cosines.total, summary["min"], summary["max"], cosines.count) == \
        (float(cos.sum()), float(cos.min()), float(cos.max()), 65536)  # the same figures, bit for bit
    for name, p in (("p05", 5), ("median", 50), ("p95", 95)):  # from the histogram: within a bin
        assert summary[name] == pytest.approx(np.percentile(cos, p), abs=2 / job_module.COSINE_BINS)


def test_interrupted_job_resumes_with_another_policy(tmp_path, ckpt):
    src, *_ = with_bad_rows(tmp_path, bad=(140, 141, 149))  # all in the last chunk
    with killed_at_chunk():
        run(src, tmp_path / "out.safetensors", ckpt, on_bad_rows="copy")
    assert len(json.loads((tmp_path / "out.safetensors.job" / "manifest.json").read_text())["chunks"]) == 2
    resumed = run(src, tmp_path / "out.safetensors", ckpt, on_bad_rows="skip")
    fresh = run(src, tmp_path / "fresh.safetensors", ckpt, on_bad_rows="skip")
    assert (resumed.resumed_chunks, fresh.resumed_chunks) == (2, 0)
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "fresh.safetensors").read_bytes()


@pytest.mark.parametrize("change", ["config", "input", "model", "layout"])
def test_manifest_of_another_job_is_refused(tmp_path, ckpt, change):
    src, rows, ids, _ = with_bad_rows(tmp_path, bad=(140, 141, 149))
    dst = tmp_path / "out.safetensors"
    with killed_at_chunk():
        run(src, dst, ckpt, on_bad_rows="copy")
    kw, expected = {}, {"config": "config.eps", "input": "input.sample_sha256", "model": "shadow",
                        "layout": "layout.batch_size"}[change]
    if change == "config":
        kw["config"] = CONFIG.replace(eps=0.03)
    elif change == "input":
        rows[5] = -rows[5]
        write("safetensors", src, rows, ids)
    elif change == "model":
        other = dict(ckpt, shadow=str(tmp_path / "other.safetensors"))
        save_model(tiny_models(feature_dim=DIM, seed=7)[0], other["shadow"])
        ckpt = other
    else:
        kw["batch_size"] = 16
    with pytest.raises(ValueError, match=rf"belongs to a different job \({expected}"):
        run(src, dst, ckpt, on_bad_rows="copy", **kw)
    assert not dst.exists()


def test_the_same_weights_saved_again_resume_the_job(tmp_path, ckpt):
    """Models are identified by architecture and weights, not file bytes (re-saving reorders the header)."""
    src, *_ = with_bad_rows(tmp_path, bad=(140, 141, 149))
    dst = tmp_path / "out.safetensors"
    with killed_at_chunk():
        run(src, dst, ckpt, on_bad_rows="copy")
    copy = dict(ckpt, shadow=str(tmp_path / "moved" / "shadow.safetensors"))
    save_model(afe.load_model(ckpt["shadow"]), copy["shadow"])
    assert run(src, dst, copy, on_bad_rows="copy").resumed_chunks == 2


def test_model_checksum_covers_architecture_arguments():
    shadow = tiny_models(feature_dim=DIM)[0]
    other = afe.build_model(shadow.arch, **{**shadow.arch_kwargs, "head": "sigmoid"})
    other.load_state_dict(shadow.state_dict())  # same weights, another output activation
    assert job_module.model_checksum(other) != job_module.model_checksum(shadow)
    twin = afe.build_model(shadow.arch, **shadow.arch_kwargs)
    twin.load_state_dict(shadow.state_dict())
    assert job_module.model_checksum(twin) == job_module.model_checksum(shadow)


def test_input_changed_between_samples_is_caught_at_assembly(tmp_path, ckpt, monkeypatch):
    # a fingerprint blind to the change below, as a sampled one is to a change between its samples
    monkeypatch.setattr(formats.Gallery, "fingerprint", lambda self: {"rows": self.num_rows})
    src, rows, ids, _ = with_bad_rows(tmp_path, bad=(140, 141, 149))
    with killed_at_chunk():
        run(src, tmp_path / "out.safetensors", ckpt, on_bad_rows="copy")
    rows[5] = -rows[5]
    write("safetensors", src, rows, ids)
    with pytest.raises(ValueError, match=r"rows 0..63 changed after they were protected"):
        run(src, tmp_path / "out.safetensors", ckpt, on_bad_rows="copy")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "parquet"], ids=["in-place", "parts"])
def test_corrupt_part_is_recomputed(tmp_path, ckpt, fmt):
    """A damaged byte in a finished chunk's stored rows (the output written in place, or a part file) is
    found on resume, and that chunk computed again."""
    src, *_ = with_bad_rows(tmp_path, bad=(140, 141, 149))
    dst = tmp_path / f"out.{fmt}"
    with killed_at_chunk():
        run(src, dst, ckpt, on_bad_rows="copy")
    work = tmp_path / f"out.{fmt}.job"
    if fmt == "parquet":
        where, at = work / "parts" / "000001.bin", 0
    else:
        where, stored = work / "output.safetensors", open_gallery(work / "output.safetensors")
        at = stored.rows_offset + CHUNK * DIM * 4  # chunk 1's first byte
        stored.close()
    data = bytearray(where.read_bytes())
    data[at] ^= 0xFF
    where.write_bytes(bytes(data))
    resumed = run(src, dst, ckpt, on_bad_rows="copy")
    run(src, tmp_path / f"fresh.{fmt}", ckpt, on_bad_rows="copy")
    assert resumed.resumed_chunks == 1
    assert dst.read_bytes() == (tmp_path / f"fresh.{fmt}").read_bytes()


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "parquet", "faiss_idmap"])
def test_a_chunk_of_bad_rows_only_is_skipped_whole(tmp_path, ckpt, fmt):
    clean, ids = gallery_rows(), np.arange(ROWS, dtype=np.int64)
    rows = clean.copy()
    rows[CHUNK:2 * CHUNK, 1] = np.nan  # every row of the second chunk
    src, dst = tmp_path / f"in{SUFFIX[fmt]}", tmp_path / f"out{SUFFIX[fmt]}"
    write(fmt, src, rows, ids)
    result = run(src, dst, ckpt, on_bad_rows="skip")
    keep = np.r_[0:CHUNK, 2 * CHUNK:ROWS]
    out, out_ids, _ = read(fmt, dst)
    assert result.rows_written == len(keep) == len(out)
    np.testing.assert_array_equal(out, reference(clean, ckpt)[keep])
    if out_ids is not None:
        np.testing.assert_array_equal(out_ids, ids[keep])


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "parquet", "faiss_idmap"])
def test_an_empty_gallery_gives_an_empty_output(tmp_path, ckpt, fmt):
    """Operators protecting shards meet empty ones: same format, zero rows, nothing else."""
    src, dst = tmp_path / f"in{SUFFIX[fmt]}", tmp_path / f"out{SUFFIX[fmt]}"
    write(fmt, src, np.zeros((0, DIM), np.float32), np.zeros(0, np.int64))
    result = run(src, dst, ckpt)
    out, out_ids, _ = read(fmt, dst)
    assert result.rows_written == 0 and out.shape == (0, DIM)
    assert out_ids is None or len(out_ids) == 0
    assert not (tmp_path / f"out{SUFFIX[fmt]}.job").exists()


def test_an_empty_gallery_needs_no_auto_basis(tmp_path, ckpt):
    """keep_out="auto" on an empty shard: no rows to make a basis of and none to protect; an empty output."""
    np.save(tmp_path / "in.npy", np.zeros((0, DIM), np.float32))
    result = run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt, keep_out="auto")
    assert result.rows_written == 0 and np.load(tmp_path / "out.npy").shape == (0, DIM)
    assert not (tmp_path / "out.npy.job").exists()


def test_too_few_rows_for_an_auto_basis_are_refused_before_any_work(tmp_path, ckpt):
    np.save(tmp_path / "in.npy", gallery_rows(3))
    with pytest.raises(ValueError, match=r"keep_out auto:4: 4 principal directions need more than 4 feature rows, "
                                         r"got 3; give a basis made of other rows \(advface basis\)"):
        run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt, keep_out="auto:4")
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.npy.job").exists()


NS = pa.timestamp("ns", tz="UTC")


@pytest.mark.parametrize("ids, want", [
    (pa.array([b"a", b"b", b"c", b"d"]), "61"),
    (pa.array([None, 7, 8, 9], pa.int64()), None),
    (pa.array([float("inf"), 1.5, 2.5, 3.5]), "inf"),
    (pa.array([1577836801000000000, None, 3, 4], NS), "2020-01-01 00:00:01+00:00"),  # pandas' default unit
    (pa.array([1577836801000000000, 2, 3, 4], NS), "2020-01-01 00:00:01+00:00"),  # the same with no null
], ids=["bytes", "null", "inf", "timestamp-ns-null", "timestamp-ns"])
def test_bad_rows_report_holds_any_id_as_json(tmp_path, ckpt, ids, want):
    rows = gallery_rows(4)
    rows[0, 0] = np.nan
    pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(rows.ravel()), DIM)}), tmp_path / "in.parquet")
    result = run(tmp_path / "in.parquet", tmp_path / "out.parquet", ckpt, on_bad_rows="copy")
    report = json.loads(result.bad_rows_file.read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert report["rows"] == [0] and report["ids"] == [want]
    assert pq.read_table(tmp_path / "out.parquet").column("id").equals(pa.chunked_array([ids]))  # ids kept


def test_copy_keeps_a_parquet_row_exactly_as_read(tmp_path, ckpt):
    """A null inside an embedding makes the row bad; under "copy" it is written as it was (null, not NaN)."""
    values = [list(map(float, row)) for row in gallery_rows(4)]
    values[2][5] = None
    column = pa.array(values, pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": np.arange(4), "embedding": column}), tmp_path / "in.parquet")
    result = run(tmp_path / "in.parquet", tmp_path / "out.parquet", ckpt, on_bad_rows="copy")
    out = pq.read_table(tmp_path / "out.parquet").column("embedding")
    assert result.bad_rows == 1 and out[2].as_py() == values[2] and out[2].values.null_count == 1
    assert out[0].as_py() != values[0]  # the others are protected


def test_conversions_that_would_change_ids_are_refused(tmp_path, ckpt):
    rows = gallery_rows(4)
    big = np.array([0, 1, 2, 2**63 + 5], dtype=np.uint64)
    write("safetensors", tmp_path / "big.safetensors", rows, big)
    with pytest.raises(ValueError, match=r"id 9223372036854775813 \(row 3\) does not fit FAISS's int64"):
        run(tmp_path / "big.safetensors", tmp_path / "out.faiss", ckpt)
    run(tmp_path / "big.safetensors", tmp_path / "out.parquet", ckpt)  # Parquet keeps uint64
    assert pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == big.tolist()
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), DIM)
    pq.write_table(pa.table({"id": pa.array([5, None, 7, 8], pa.int64()), "embedding": embedding}),
                   tmp_path / "null.parquet")
    for out in ("out.safetensors", "out2.faiss"):
        with pytest.raises(ValueError, match="row 1 has no id"):
            run(tmp_path / "null.parquet", tmp_path / out, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors", "null.parquet", "out.parquet"]


def test_a_different_onnx_encoder_is_a_different_job(tmp_path, ckpt):
    """An ONNX encoder has no parameters: its file identifies it (a resumed job must not mix two models)."""
    pytest.importorskip("onnxruntime")
    from advface_engine.models import load_encoder

    encoders = [onnx_encoder(tmp_path / f"enc{seed}.onnx", seed) for seed in (0, 1)]
    assert job_module.model_checksum(load_encoder(encoders[0])) != job_module.model_checksum(load_encoder(encoders[1]))
    assert job_module.model_checksum(load_encoder(encoders[0])) == job_module.model_checksum(encoders[0])
    src, *_ = with_bad_rows(tmp_path, bad=(140, 141, 149))
    dst = tmp_path / "out.safetensors"
    with killed_at_chunk():
        protect_gallery(src, dst, ckpt["shadow"], encoders[0], CONFIG, batch_size=BATCH, chunk_rows=CHUNK,
                        on_bad_rows="copy", progress=False, force=True)
    for encoder in (encoders[1], load_encoder(encoders[1])):  # a path or the loaded module
        with pytest.raises(ValueError, match=r"belongs to a different job \(encoder"):
            protect_gallery(src, dst, ckpt["shadow"], encoder, CONFIG, batch_size=BATCH, chunk_rows=CHUNK,
                            on_bad_rows="copy", progress=False, force=True)
    resumed = protect_gallery(src, dst, ckpt["shadow"], encoders[0], CONFIG, batch_size=BATCH, chunk_rows=CHUNK,
                              on_bad_rows="copy", progress=False, force=True)
    assert resumed.resumed_chunks == 2


def onnx_encoder(path, seed):
    """A small ONNX encoder for the tiny shadow's images: average pool, then a (3, DIM) projection."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((3, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["z"])],
        "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, "H", "W"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", DIM])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_summary_cosine_covers_the_protected_rows_and_survives_a_resume(tmp_path, ckpt):
    """cos(z, protected z) over the protected rows (bad rows, kept unchanged, left out): an operator's
    check that the job did what it should (with these untrained models it is near 0, as it would be
    for an encoder that is not the gallery's); a resumed job reports it from its manifest."""
    src, rows, _, bad = with_bad_rows(tmp_path, bad=(140, 141, 149))  # all in the last chunk
    with killed_at_chunk():
        run(src, tmp_path / "out.safetensors", ckpt, on_bad_rows="copy")  # two chunks done, then stopped
    resumed = run(src, tmp_path / "out.safetensors", ckpt, on_bad_rows="copy")
    assert resumed.resumed_chunks == 2
    out, _, _ = read("safetensors", tmp_path / "out.safetensors")
    good = np.setdiff1d(np.arange(ROWS), bad)
    a, b = rows[good].astype(np.float64), out[good].astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert resumed.cosine["mean"] == pytest.approx(cos.mean(), rel=1e-9)
    assert resumed.cosine["min"] == pytest.approx(cos.min(), rel=1e-9)


def test_interrupted_assembly_and_cleanup_finish_on_rerun(tmp_path, ckpt, monkeypatch):
    np.save(tmp_path / "in.npy", gallery_rows())
    run(tmp_path / "in.npy", tmp_path / "fresh.npy", ckpt)

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed while writing the output: nothing under the final name
        m.setattr(job_module.GalleryWriter, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt)
    assert not (tmp_path / "out.npy").exists()
    with monkeypatch.context() as m:  # killed after the rename, before the job folder is removed
        m.setattr(job_module, "_remove_job", killed)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt)
    assert (tmp_path / "out.npy.job").exists()
    result = run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt)
    assert result.resumed_chunks == 3 and not (tmp_path / "out.npy.job").exists()
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "fresh.npy").read_bytes()
    made = (tmp_path / "out.npy.provenance.json").read_bytes()  # the provenance too: nothing differs between runs
    assert made == (tmp_path / "fresh.npy.provenance.json").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt)


def test_finished_output_is_not_taken_for_another_policy(tmp_path, ckpt, monkeypatch):
    """An interrupted cleanup is finished by a rerun of the same command only: under another bad-rows
    policy the output (made with the first) is not this job's, and replacing it needs --overwrite."""
    src, *_ = with_bad_rows(tmp_path, bad=(3, 70, 149))
    dst = tmp_path / "out.safetensors"
    with monkeypatch.context() as m:
        m.setattr(job_module, "_remove_job", lambda work: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            run(src, dst, ckpt, on_bad_rows="copy")
    with pytest.raises(FileExistsError, match="already exists"):
        run(src, dst, ckpt, on_bad_rows="skip")
    assert run(src, dst, ckpt, on_bad_rows="skip", overwrite=True).rows_written == ROWS - 3


def test_resume_after_sigkill_is_byte_identical(tmp_path, ckpt):
    rows = gallery_rows(n=960)
    np.save(tmp_path / "in.npy", rows)
    args = ["--input", str(tmp_path / "in.npy"), "--shadow", ckpt["shadow"], "--encoder", ckpt["encoder"],
            "--batch-size", "16", "--chunk-rows", "32", "--steps", "4", "--random-start", "--no-progress", "--force"]
    cmd = [sys.executable, "-m", "advface_engine.cli", "protect-gallery", *args, "--output", str(tmp_path / "out.npy")]
    manifest = tmp_path / "out.npy.job" / "manifest.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        done, deadline = 0, time.monotonic() + 120
        while done < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
            try:
                done = len(json.loads(manifest.read_text())["chunks"])
            except (OSError, ValueError):
                pass
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert 3 <= done < 30, "the job was not killed mid-way"
    assert not (tmp_path / "out.npy").exists()
    assert main(["protect-gallery", *args, "--output", str(tmp_path / "out.npy")]) == 0
    assert main(["protect-gallery", *args, "--output", str(tmp_path / "fresh.npy")]) == 0
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "fresh.npy").read_bytes()
    made = (tmp_path / "out.npy.provenance.json").read_bytes()  # the provenance too: nothing differs between runs
    assert made == (tmp_path / "fresh.npy.provenance.json").read_bytes() and b'"steps": 4' in made


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


@pytest.mark.parametrize("case, error", [
    ("wrong_dim", "cannot protect the gallery's 24-d rows"),
    ("truncated_npy", "not a readable .npy|truncated"),
    ("corrupt_npy", "not a .npy file"),
    ("truncated_safetensors", "truncated"),
    ("corrupt_safetensors", "not a safetensors file|corrupt"),
    ("truncated_faiss", "truncated"),
    ("corrupt_parquet", "not a readable Parquet"),
    ("int_dtype", "unsupported dtype int32"),
    ("same_path", "the output path is the input path"),
    ("unknown_suffix", "unknown gallery format"),
])
def test_bad_input_is_a_clear_error_with_no_output(tmp_path, ckpt, case, error):
    rows = gallery_rows()
    fmt = case.split("_")[1] if case.split("_")[0] in ("truncated", "corrupt") else "npy"
    src = tmp_path / f"in{SUFFIX.get(fmt, '.faiss')}"
    dst = src if case == "same_path" else tmp_path / f"out{src.suffix}"
    write("faiss_ip" if fmt == "faiss" else fmt, src, rows, np.arange(ROWS))
    if case == "wrong_dim":
        np.save(src, gallery_rows(dim=24))
    elif case == "int_dtype":
        np.save(src, np.ones((ROWS, DIM), np.int32))
    elif case.startswith("truncated"):
        _truncate(src, -100)
    elif case.startswith("corrupt"):
        src.write_bytes(os.urandom(500))
    elif case == "unknown_suffix":
        src = src.rename(tmp_path / "in.bin")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=error):
        run(src, dst, ckpt)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no job folder


@pytest.mark.parametrize("header", [
    {"embeddings": {"dtype": "F32", "shape": [-2, -8], "data_offsets": [0, 64]}},
    {"embeddings": {"dtype": "F32", "shape": [2, 8], "data_offsets": ["0", "64"]}},
    {"embeddings": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]}, "__metadata__": {"n": 1}},
], ids=["negative-shape", "text-offsets", "metadata-not-text"])
def test_malformed_safetensors_headers_are_named(tmp_path, ckpt, header):
    raw = json.dumps(header).encode()
    (tmp_path / "in.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(64))
    with pytest.raises(ValueError, match=r"in.safetensors: corrupt safetensors header"):
        run(tmp_path / "in.safetensors", tmp_path / "out.safetensors", ckpt)


def test_ragged_parquet_rows_stop_the_job_with_no_output(tmp_path, ckpt):
    values = [list(row) for row in gallery_rows()]
    values[100] = values[100][:-1]
    pq.write_table(pa.table({"id": np.arange(ROWS), "embedding": pa.array(values, pa.list_(pa.float32()))}),
                   tmp_path / "in.parquet")
    with pytest.raises(ValueError, match=f"row 100 has {DIM - 1} values, expected {DIM}"):
        run(tmp_path / "in.parquet", tmp_path / "out.parquet", ckpt)
    assert not (tmp_path / "out.parquet").exists()


def test_existing_output_needs_overwrite(tmp_path, ckpt):
    np.save(tmp_path / "in.npy", gallery_rows())
    (tmp_path / "out.npy").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt)
    run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt, overwrite=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), reference(gallery_rows(), ckpt))


@pytest.mark.parametrize("fmt", ["npy", "parquet"], ids=["in-place", "parts"])
def test_a_full_disk_names_where_and_the_rerun_resumes(tmp_path, ckpt, monkeypatch, fmt):
    import errno

    np.save(tmp_path / "in.npy", gallery_rows())
    # what ChunkJob.save writes with: the output in place, or a part file
    owner, name = (job_module.GalleryWriter, "write_at") if fmt == "npy" else (store_module, "write_part")
    real, calls = getattr(owner, name), []

    def full_after_two(*args):
        calls.append(args)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    dst = tmp_path / f"out.{fmt}"
    with monkeypatch.context() as m:
        m.setattr(owner, name, full_after_two)
        with pytest.raises(OSError, match=rf"No space left on device \(writing .*out.{fmt}.job or .*out.{fmt}; "
                                          "finished"):
            run(tmp_path / "in.npy", dst, ckpt)
    assert run(tmp_path / "in.npy", dst, ckpt).resumed_chunks == 2
    np.testing.assert_array_equal(read(fmt, dst)[0], reference(gallery_rows(), ckpt))


def test_second_process_on_the_same_output_is_refused(tmp_path, ckpt):
    import fcntl

    np.save(tmp_path / "in.npy", gallery_rows())
    (tmp_path / "out.npy.job").mkdir()
    with open(tmp_path / "out.npy.job" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another job is running"):
            run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt)
    run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt)
    assert not (tmp_path / "out.npy.job").exists()


def test_cli_reports_errors(tmp_path, ckpt, capsys):
    np.save(tmp_path / "in.npy", gallery_rows())
    args = ["protect-gallery", "--input", str(tmp_path / "in.npy"), "--shadow", ckpt["shadow"],
            "--encoder", ckpt["encoder"], "--no-progress", "--force"]
    assert main([*args, "--output", str(tmp_path / "in.npy")]) == 2
    assert "the output path is the input path" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    for extra, error in [(["--output", str(tmp_path / "folder"), "--overwrite"], "is a directory"),
                         (["--output", str(tmp_path / "o.npy"), "--format", "parquet"], "names npy, not parquet"),
                         (["--output", str(tmp_path / "o.npy"), "--workers", "2"], "need --engine ray"),
                         (["--output", str(tmp_path / "o.npy"), "--ray-address", "auto"], "need --engine ray"),
                         (["--output", str(tmp_path / "o.npy"), "--encoder", str(tmp_path / "in.npy"),
                           "--encoder-arch", "mobilefacenet"], "not a readable weights file"),
                         (["--output", str(tmp_path / "o.npy"), "--encoder", str(tmp_path / "junk.onnx")],
                          "not an ONNX model"),
                         (["--output", str(tmp_path / "o.npy"), "--encoder", ckpt["shadow"],
                           "--encoder-arch", "mobilefacenet"], "does not hold mobilefacenet weights"),
                         (["--output", str(tmp_path / "in.npy" / "o.npy")], "error"),  # a file as a folder
                         (["--output", str(tmp_path / "o.npy"), "--shadow", str(tmp_path / "junk.safetensors")],
                          "not a readable safetensors checkpoint")]:
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert error in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for flag in ("--workers", "--batch-size", "--chunk-rows"):  # a usage error naming the flag, before any work
        with pytest.raises(SystemExit):
            main([*args, "--output", str(tmp_path / "o.npy"), "--engine", "ray", flag, "0"])
        assert f"argument {flag}: expected a positive integer, got '0'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in.npy", "junk.onnx", "junk.safetensors"]
    assert main([*args, "--output", str(tmp_path / "out.npy"), "--steps", "1"]) == 0
    assert "150 of 150 rows" in capsys.readouterr().out


def test_cli_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path, ckpt, capsys, monkeypatch):
    np.save(tmp_path / "in.npy", gallery_rows())
    args = ["protect", "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.npy"), "--shadow",
            ckpt["shadow"], "--encoder", ckpt["encoder"], "--batch-size", str(BATCH), "--chunk-rows", str(CHUNK),
            "--device", "cpu", "--no-progress", "--force"]
    compute = job_module.ChunkJob.compute

    def ctrl_c(self, k, *a, **kw):
        if k == 2:
            raise KeyboardInterrupt
        return compute(self, k, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(job_module.ChunkJob, "compute", ctrl_c)
        try:
            assert main(args) == 130
        except KeyboardInterrupt:  # not left to stop the test session
            pytest.fail("Ctrl-C escaped the command as a traceback")
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert main(args) == 0 and "(2 resumed)" in capsys.readouterr().out

    def interrupt(rows):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # while the input is checked, before the job folder exists: nothing kept
        m.setattr(job_module, "bad_rows_of", interrupt)
        assert main([*args[:4], str(tmp_path / "other.npy"), *args[5:]]) == 130
    assert capsys.readouterr().err.strip() == "advface protect: interrupted"


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_equals_local(tmp_path, ckpt, local_ray, monkeypatch):
    rows, ids = gallery_rows(), np.arange(ROWS, dtype=np.int64) * 5
    rows[77, 3] = np.nan
    write("parquet", tmp_path / "in.parquet", rows, ids)
    local = run(tmp_path / "in.parquet", tmp_path / "local.parquet", ckpt, on_bad_rows="skip")
    monkeypatch.setattr(job_module, "run_local", None)  # the Ray run must not fall back to this process
    remote = run(tmp_path / "in.parquet", tmp_path / "ray.parquet", ckpt, on_bad_rows="skip", engine="ray")
    assert remote.rows_written == local.rows_written == ROWS - 1
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()


def test_triton_version_joins_the_fingerprint_where_fused_kernels_may_run():
    triton = pytest.importorskip("triton")
    assert job_module._kernel_versions({"backend": "fused", "device": "NVIDIA H100 80GB HBM3"}) == \
        {"triton": triton.__version__}
    assert job_module._kernel_versions({"backend": "auto", "device": "gpu"}) == {"triton": triton.__version__}
    assert job_module._kernel_versions({"backend": "reference", "device": "NVIDIA H100 80GB HBM3"}) == {}
    assert job_module._kernel_versions({"backend": "auto", "device": "cpu"}) == {}


def test_gallery_job_takes_the_decoder_dtype(tmp_path, capsys):
    """--decoder-dtype bf16 (backend_options): the job equals the Protector with that option, differs from fp32,
    and records the option in its provenance; an option no backend takes is refused before anything is written."""
    rows = gallery_rows(40, seed=4)
    np.save(tmp_path / "gallery.npy", rows)
    shadow, encoder = tiny_models(feature_dim=DIM)
    for name, module in (("s", shadow), ("e", encoder)):
        afe.save_model(module, tmp_path / f"{name}.safetensors")
    args = ["protect", "--input", str(tmp_path / "gallery.npy"), "--shadow", str(tmp_path / "s.safetensors"),
            "--encoder", str(tmp_path / "e.safetensors"), "--device", "cpu", "--no-progress", "--steps", "3", "--force"]
    assert main([*args, "--output", str(tmp_path / "bf16.npy"), "--decoder-dtype", "bf16"]) == 0
    assert main([*args, "--output", str(tmp_path / "fp32.npy")]) == 0
    cfg = afe.ProtectConfig(steps=3)
    want = afe.Protector(shadow, encoder, cfg, backend_options={"dtype": "bf16"})(torch.from_numpy(rows)).numpy()
    got = np.load(tmp_path / "bf16.npy")
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, np.load(tmp_path / "fp32.npy"))
    made = json.loads((tmp_path / "bf16.npy.provenance.json").read_text())
    assert made["backend_options"] == {"dtype": "bf16"}
    assert json.loads((tmp_path / "fp32.npy.provenance.json").read_text())["backend_options"] is None
    capsys.readouterr()
    with pytest.raises(ValueError, match="only the option dtype"):
        protect_gallery(tmp_path / "gallery.npy", tmp_path / "x.npy", shadow, encoder, backend="reference",
                        backend_options={"graphs": False}, device="cpu", progress=False, force=True)
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.npy.job").exists()


def test_keep_out_basis_file_protects_as_the_protector_and_joins_the_fingerprint(tmp_path, ckpt, capsys):
    from advface_engine.principal import basis_checksum, load_basis, variance_share

    rows = gallery_rows()
    rows[9] = 0  # a bad row: left out of the basis
    np.save(tmp_path / "in.npy", rows)
    assert main(["basis", "--input", str(tmp_path / "in.npy"), "-o", str(tmp_path / "b.safetensors"), "-k", "4",
                 "--chunk-rows", "40", "--no-progress"]) == 0
    said = re.search(rf"the top 4 principal directions of {ROWS - 1} rows of dim {DIM}, holding ([\d.]+)% of their "
                     "variance", capsys.readouterr().out)
    basis = load_basis(tmp_path / "b.safetensors")
    assert float(said.group(1)) == pytest.approx(100 * variance_share(basis, np.delete(rows, 9, axis=0)), abs=0.06)
    torch.testing.assert_close(basis, afe.principal_directions(np.delete(rows, 9, axis=0), 4), rtol=0, atol=1e-5)
    assert main(["protect-gallery", "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.npy"),
                 "--shadow", ckpt["shadow"], "--encoder", ckpt["encoder"],
                 "--keep-out", str(tmp_path / "b.safetensors"), "--steps", "2", "--batch-size", str(BATCH),
                 "--chunk-rows", str(CHUNK), "--device", "cpu", "--on-bad-rows", "copy", "--force",
                 "--no-progress"]) == 0
    share = re.search(r"keep_out basis: its 4 directions hold ([\d.]+)% of the preflight rows' variance",
                      capsys.readouterr().out)
    assert share and 25 < float(share.group(1)) < 100  # 4 of 16 random directions' top ones: above a quarter
    protector = afe.Protector(*ckpt["modules"], config=CONFIG, backend="reference", keep_out=basis)
    good = np.ones(ROWS, dtype=bool)
    good[9] = False
    want = np.concatenate([protector(torch.from_numpy(rows[c:c + CHUNK][b:b + BATCH][good[c:c + CHUNK][b:b + BATCH]]))
                           .numpy() for c in range(0, ROWS, CHUNK) for b in range(0, min(CHUNK, ROWS - c), BATCH)])
    got = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(got[good], want)
    assert not np.allclose(got[good], reference(rows[good], ckpt), atol=1e-4)  # the basis changed the rows
    assert provenance_of("npy", tmp_path / "out.npy")["keep_out"] == basis_checksum(basis)
    run(tmp_path / "in.npy", tmp_path / "plain.npy", ckpt, on_bad_rows="copy")
    assert "keep_out" not in provenance_of("npy", tmp_path / "plain.npy")  # a job without one: as it always was


def test_a_job_resumed_with_another_basis_is_refused(tmp_path, ckpt):
    from advface_engine.principal import save_basis

    src, *_ = with_bad_rows(tmp_path, bad=(140, 141, 149))
    dst = tmp_path / "out.safetensors"
    clean = np.delete(gallery_rows(), [140, 141, 149], axis=0)
    save_basis(tmp_path / "a.safetensors", afe.principal_directions(clean, 4))
    save_basis(tmp_path / "b.safetensors", afe.principal_directions(clean, 5))
    with killed_at_chunk():
        run(src, dst, ckpt, on_bad_rows="copy", keep_out=tmp_path / "a.safetensors")
    for other in (tmp_path / "b.safetensors", None):
        with pytest.raises(ValueError, match=r"belongs to a different job \(keep_out"):
            run(src, dst, ckpt, on_bad_rows="copy", keep_out=other)
    assert run(src, dst, ckpt, on_bad_rows="copy", keep_out=tmp_path / "a.safetensors").resumed_chunks == 2


@pytest.mark.parametrize("keep, k_flag", [("auto:4", ["-k", "4"]), ("auto", [])], ids=["auto:4", "auto"])
def test_keep_out_auto_makes_the_basis_advface_basis_makes_and_keeps_it_for_a_resume(tmp_path, ckpt, capsys,
                                                                                       monkeypatch, keep, k_flag):
    """--keep-out auto:4 protects as --keep-out with `advface basis -k 4`'s file, byte for byte, and "auto" as
    `advface basis` with its default k (the fewest directions that hold AUTO_SHARE of the variance); the basis
    is kept in the job folder once the manifest is written, a resume reads it instead of making it again, and
    the finished job leaves no folder."""
    from advface_engine.principal import basis_checksum, load_basis

    src, *_ = with_bad_rows(tmp_path, bad=(140, 141, 149))
    assert main(["basis", "--input", str(src), "-o", str(tmp_path / "b.safetensors"), *k_flag, "--no-progress"]) == 0
    basis = load_basis(tmp_path / "b.safetensors")
    k = basis.shape[0]
    assert (k == 4) if k_flag else (1 < k < DIM)
    common = ["--shadow", ckpt["shadow"], "--encoder", ckpt["encoder"], "--steps", "2", "--batch-size", str(BATCH),
              "--chunk-rows", str(CHUNK), "--device", "cpu", "--on-bad-rows", "copy", "--force", "--no-progress"]
    for name, keep_out in (("file", str(tmp_path / "b.safetensors")), ("auto", keep)):
        assert main(["protect-gallery", "--input", str(src), "--output", str(tmp_path / f"{name}.safetensors"),
                     "--keep-out", keep_out, *common]) == 0
    assert f"keep_out basis: its {k} directions hold" in capsys.readouterr().out
    assert (tmp_path / "auto.safetensors").read_bytes() == (tmp_path / "file.safetensors").read_bytes()
    assert not (tmp_path / "auto.safetensors.job").exists()
    assert provenance_of("safetensors", tmp_path / "auto.safetensors")["keep_out"] == basis_checksum(basis)

    dst = tmp_path / "resumed.safetensors"
    with killed_at_chunk():
        run(src, dst, ckpt, on_bad_rows="copy", keep_out=keep)
    torch.testing.assert_close(load_basis(tmp_path / "resumed.safetensors.job" / "basis.safetensors"), basis,
                               rtol=0, atol=0)
    made, moments = [], job_module.gallery_moments
    monkeypatch.setattr(job_module, "gallery_moments", lambda *a, **kw: made.append(a) or moments(*a, **kw))
    with pytest.raises(ValueError, match=r"belongs to a different job \(keep_out"):
        run(src, dst, ckpt, on_bad_rows="copy", keep_out=f"auto:{k + 1}")  # another k: another basis, made anew
    assert len(made) == 1
    assert run(src, dst, ckpt, on_bad_rows="copy", keep_out=keep).resumed_chunks == 2
    assert len(made) == 1  # the kept basis was read, not made again
    assert dst.read_bytes() == (tmp_path / "file.safetensors").read_bytes()
    assert not (tmp_path / "resumed.safetensors.job").exists()


@pytest.mark.parametrize("keep_out, error", [("auto:0", "'auto' or 'auto:K'"), ("auto:x", "'auto' or 'auto:K'"),
                                             ("auto:16", "K must be below 16")])
def test_a_bad_auto_keep_out_is_refused_before_any_work(tmp_path, ckpt, keep_out, error):
    np.save(tmp_path / "in.npy", gallery_rows())
    with pytest.raises(ValueError, match=error):
        run(tmp_path / "in.npy", tmp_path / "out.npy", ckpt, keep_out=keep_out)
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.npy.job").exists()


@pytest.mark.parametrize("basis, error", [
    (torch.eye(8)[:2], "is a basis of 8-dim features and .* holds 16-dim rows"),
    (torch.ones(2, DIM), "orthonormal"), ("missing.safetensors", "no basis file at"),
    ("not-a-basis", "holds no tensor 'basis'")])
def test_a_bad_basis_is_refused_before_any_work(tmp_path, ckpt, basis, error):
    from safetensors.torch import save_file

    src = tmp_path / "in.npy"
    np.save(src, gallery_rows())
    if basis == "not-a-basis":
        save_file({"weights": torch.eye(2)}, str(tmp_path / "w.safetensors"))
        basis = tmp_path / "w.safetensors"
    elif isinstance(basis, str):
        basis = tmp_path / basis
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        run(src, tmp_path / "out.npy", ckpt, keep_out=basis)
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.npy.job").exists()


@pytest.mark.ray
def test_ray_equals_local_with_a_basis(tmp_path, ckpt, local_ray, monkeypatch):
    from advface_engine.principal import save_basis

    rows = gallery_rows()
    np.save(tmp_path / "in.npy", rows)
    save_basis(tmp_path / "b.safetensors", afe.principal_directions(rows, 4))
    local = run(tmp_path / "in.npy", tmp_path / "local.npy", ckpt, keep_out=tmp_path / "b.safetensors")
    monkeypatch.setattr(job_module, "run_local", None)  # the Ray run must not fall back to this process
    remote = run(tmp_path / "in.npy", tmp_path / "ray.npy", ckpt, engine="ray", keep_out=tmp_path / "b.safetensors")
    assert remote.rows_written == local.rows_written == ROWS
    np.testing.assert_array_equal(np.load(tmp_path / "ray.npy"), np.load(tmp_path / "local.npy"))
