"""The package's layout: names keep working from the modules they lived in before the rooms were split,
and the import graph has no loop (module-level imports), no import back up into a package's own
``__init__`` from the backends and the gallery job, and none from the kernels into the rest of the package."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "advface_engine.kernels"  # the top-level kernels/ folder, installed as this package

# old module -> (its new module, names importable from both)
MOVED = {
    "advface_engine.backends.decoder": ("advface_engine.backends.modules", [
        "as_input_of", "autocast_copy", "channels_last", "compute_dtypes", "first_float", "fold_batchnorm",
        "fold_encoder_batchnorm", "own_parameters", "own_tensors", "storages", "submodules", "weights_key"]),
    "advface_engine.backends": ("advface_engine.backends.options", [
        "FUSED_DTYPES", "FUSED_OPTIONS", "check_fused_options"]),
    "advface_engine.telemetry": ("advface_engine.speed.telemetry", ["PEAK_TFLOPS", "conv_tf32"]),
    "advface_engine.bench_report": ("advface_engine.speed.report", [
        "load_results", "markdown_table", "speedups", "write_report", "plot", "run", "register"]),
    "advface_engine.gallery.job": ("advface_engine.gallery.store", [
        "MARKER", "CREATED_BY", "JOB_FILES", "PART", "POLICIES", "Manifest", "read_part", "sha256_of",
        "write_atomic", "write_part"]),
}
# every public name of gallery/job.py before its split
GALLERY_JOB = ["CHUNK_BYTES", "COSINE_BINS", "CREATED_BY", "ENGINES", "JOB_FILES", "MARKER", "PART", "POLICIES",
               "SIDECAR_FORMATS", "STATS_ROWS", "VERSIONS", "ChunkJob", "Cosines", "GalleryResult", "JobSpec",
               "Loaded", "Manifest", "Prefetch", "assemble", "deterministic_cudnn", "protect_gallery", "provenance",
               "read_part", "run_local", "sha256_of", "write_atomic", "write_part"]
# every public name of gallery/formats.py before it became a package (one module per format), and its module now
GALLERY_FORMATS = {
    "advface_engine.gallery.formats": ["FORMATS", "SUFFIXES", "GalleryWriter", "check_convertible", "format_of",
                                       "open_gallery"],
    "advface_engine.gallery.formats.base": ["FLOAT_DTYPES", "PROVENANCE_KEY", "Chunk", "Gallery", "RawGallery",
                                            "open_nofollow"],
    "advface_engine.gallery.formats.npy": ["NPY_LENGTH", "NPY_MAX_HEADER", "open_npy"],
    "advface_engine.gallery.formats.safetensors": ["ST_DTYPES", "open_safetensors"],
    "advface_engine.gallery.formats.parquet": ["ParquetGallery"],
    "advface_engine.gallery.formats.faiss": ["FAISS_DUMMY", "FAISS_FLAT", "FAISS_HEADER", "FAISS_IDMAP", "open_faiss"],
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_names_are_the_same_objects_at_their_old_place(old):
    new, names = MOVED[old]
    before, after = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(before, name) is getattr(after, name), name


def test_gallery_job_keeps_every_public_name():
    job = importlib.import_module("advface_engine.gallery.job")
    assert [name for name in GALLERY_JOB if not hasattr(job, name)] == []


def test_gallery_formats_keeps_every_public_name_with_each_format_in_its_module():
    formats = importlib.import_module("advface_engine.gallery.formats")
    for module, names in GALLERY_FORMATS.items():
        home = importlib.import_module(module)
        assert [name for name in names if getattr(formats, name, None) is not getattr(home, name)] == [], module
    for fmt in formats.FORMATS:  # each format's reader and writer side by side
        module = importlib.import_module(f"advface_engine.gallery.formats.{fmt}")
        assert hasattr(module, "layout" if fmt in formats.RAW_FORMATS else "ParquetSink"), fmt


def test_fused_keeps_its_graph_and_encoder_names():
    pytest.importorskip("triton")
    from advface_engine.backends import encoder, fused, graphs

    assert fused.CompiledEncoder is encoder.CompiledEncoder and fused.EagerGraph is graphs.EagerGraph
    assert fused.graph_size is graphs.graph_size


def _module_imports(path: Path, name: str, package: bool) -> tuple[set[str], list[tuple[int, str]]]:
    """(the package's modules imported at module level, (line, module) of those imported inside functions
    and classes), relative imports resolved, absolute ones of advface_engine included; those for type
    checkers only are left out."""
    base = name.split(".") if package else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in tree.body if isinstance(block, ast.If)
                   and ast.unparse(block.test) == "TYPE_CHECKING" for node in ast.walk(block)}
    top, inner = set(), []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):  # import advface_engine.x: each module named
            wheres = sorted(alias.name for alias in node.names if alias.name.split(".")[0] == "advface_engine")
            found = set(wheres)
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "advface_engine"):
            where = node.module if not node.level else ".".join(
                base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            wheres, found = [where], {f"{where}.{alias.name}" for alias in node.names} | {where}
        else:
            continue
        if node in tree.body:
            top |= found
        else:
            inner += [(node.lineno, where) for where in wheres]
    return top, inner


def _modules() -> dict[str, tuple[Path, bool]]:
    """{module name: (path, package?)} of advface_engine, its kernels (the top-level kernels/ folder) included."""
    found = {}
    for folder, package_name in ((ROOT / "advface_engine", "advface_engine"), (ROOT / "kernels", KERNELS)):
        for path in folder.rglob("*.py"):
            parts = package_name.split(".") + list(path.relative_to(folder).with_suffix("").parts)
            package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def test_no_import_loop_and_no_lazy_import_back_up():
    modules = _modules()
    graph = {}
    for name, (path, package) in modules.items():
        top, inner = _module_imports(path, name, package)
        graph[name] = {other for other in top if other in modules and other != name}
        if name.startswith(("advface_engine.backends", "advface_engine.gallery")):
            room = ".".join(name.split(".")[:2])
            # make_backend's import of the fused backend stays lazy: Triton is optional
            allowed = {("advface_engine.backends", "advface_engine.backends.fused")}
            lazy = [(line, other) for line, other in inner if other.startswith(room) and (name, other) not in allowed]
            assert lazy == [], f"{name} imports {lazy} inside a function"
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            assert state.get(other) != 1, " -> ".join(path + [other])
            if other not in state:
                visit(other, path + [other])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_kernels_import_nothing_else_of_the_package():
    """The kernels stand alone: what they need of the fused backend comes from their callers (the ahead-of-time
    check takes a Launches from ``advface check-kernels``), so no module of kernels/ imports another subpackage
    of advface_engine, at module level or inside a function, relatively (``..``) or not."""
    modules = _modules()
    assert KERNELS in modules and f"{KERNELS}.aot" in modules
    for name, (path, package) in modules.items():
        if name == KERNELS or name.startswith(f"{KERNELS}."):
            top, inner = _module_imports(path, name, package)
            outside = sorted(other for other in top | {other for _, other in inner}
                             if other != KERNELS and not other.startswith(f"{KERNELS}."))
            assert outside == [], f"{name} imports {outside}"


def test_every_package_is_installed():
    """pyproject's explicit package list names every folder of the package (a wheel built from it would
    silently lack one it leaves out), and the kernels folder under its installed name."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "advface_engine").rglob("__init__.py")}
    assert found | {KERNELS} == listed
