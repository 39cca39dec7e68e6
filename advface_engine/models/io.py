"""Checkpoints as safetensors with a metadata header (architecture + kwargs): loading never runs code."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import RefusedFileError

FORMAT = "advface-engine/1"


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + rename), with the permissions the umask gives a
    new file (safetensors' own ``save_file`` makes it 0600); nothing is left behind when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``model`` (built by ``build_model``) to ``path`` atomically (``write_file``)."""
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError("model has no .arch: build it with advface_engine.models.build_model")
    metadata = {"format": FORMAT, "arch": arch, "kwargs": json.dumps(model.arch_kwargs),
                "extra": json.dumps(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_file(path, safetensors_bytes(tensors, metadata=metadata))


class NotACheckpoint(RefusedFileError):
    """The file is no advface-engine checkpoint at all (another safetensors file, a .pth, other bytes)."""


def _check_readable(path: str | os.PathLike) -> None:
    """Open ``path`` once: safetensors reports a file it may not read as missing, ``open`` says why."""
    with open(path, "rb"):
        pass


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's header: {"arch", "kwargs", "extra"}, the architecture and its arguments checked
    (``check_arguments``: known names, documented bounds) before anything is built from them."""
    from safetensors import safe_open

    from . import check_arguments

    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except OSError:
        raise
    except Exception as err:  # safetensors raises its own error type for a file that is not one
        raise NotACheckpoint(f"{path}: not a readable safetensors checkpoint ({err})") from err
    if meta.get("format") != FORMAT:
        raise NotACheckpoint(f"{path} is not an advface-engine checkpoint (no '{FORMAT}' header)")
    try:
        arch, kwargs, extra = meta["arch"], json.loads(meta["kwargs"]), json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError, RecursionError) as err:
        raise RefusedFileError(f"{path}: damaged advface-engine checkpoint header ({type(err).__name__}: {err})") \
            from err
    if not isinstance(kwargs, dict) or not isinstance(extra, dict):
        raise RefusedFileError(f"{path}: damaged advface-engine checkpoint header (kwargs and extra must be JSON "
                               "objects)")
    try:
        check_arguments(arch, kwargs)
    except ValueError as err:
        raise RefusedFileError(f"{path}: {err}") from None
    return {"arch": arch, "kwargs": kwargs, "extra": extra}


ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}  # safetensors' dtype names
FLOAT_NAMES = {"F16", "BF16", "F32", "F64"}  # the floating types load_state_dict copies into float32


def check_checkpoint(path: str | os.PathLike) -> dict:
    """``read_metadata``, then the names, shapes and dtypes of the file's tensors (from its header, nothing
    read) compared with the architecture's, built on the meta device (nothing allocated): a header can then
    never make the loader build more than the file holds. A floating tensor may have any floating dtype (a
    model saved in half precision loads in float32). Returns the metadata."""
    from safetensors import safe_open

    from . import build_model

    meta = read_metadata(path)
    arch, kwargs = meta["arch"], meta["kwargs"]
    try:
        with torch.device("meta"):
            skeleton = build_model(arch, **kwargs)
        expected = {k: (list(v.shape), ST_NAMES.get(v.dtype, str(v.dtype))) for k, v in skeleton.state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as err:  # arguments the architecture refuses (a bad size ...)
        raise RefusedFileError(f"{path}: its header's {arch} arguments {kwargs} are not valid: {err}") from err
    with safe_open(str(path), framework="pt") as f:
        found = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    for k, (shape, dtype) in found.items():
        need = expected.get(k)
        if need and (shape != need[0] or (dtype != need[1] and not {dtype, need[1]} <= FLOAT_NAMES)):
            problems.append(f"{k} has shape {shape} {dtype}, the architecture needs {need[0]} {need[1]}")
    if problems:
        listed = "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise RefusedFileError(f"{path}: its tensors do not fit its header ({arch} {kwargs}): {listed}")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the module recorded in ``path`` and load its weights, in eval mode; the header and the
    tensors' shapes are checked first (``check_checkpoint``)."""
    from . import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta = check_checkpoint(path)
    model = build_model(meta["arch"], **meta["kwargs"])
    try:
        model.load_state_dict(load_file(str(path)))
    except (TypeError, RuntimeError) as err:  # weights that do not fit after all
        first = " ".join(str(err).split())[:500]
        raise RefusedFileError(f"{path}: its weights do not fit its header ({meta['arch']} {meta['kwargs']}): "
                               f"{first}") \
            from err
    model.checkpoint_extra = meta["extra"]
    return model.to(device).eval()


def load_weights_only(path: str | os.PathLike, what: str = "weights file"):
    """``torch.load(weights_only=True)`` of an untrusted file; anything it refuses is a one-line
    ``RefusedFileError`` naming the file and why, never torch's advice to load it unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # the weights-only unpickler's refusal, or not a checkpoint at all
        boilerplate = ("weights only load failed", "weights_only", "check the documentation", "please file an issue")
        reason = " ".join(line.strip() for line in str(err).splitlines()
                          if line.strip() and not any(b in line.lower() for b in boilerplate))[:300]
        if isinstance(err, pickle.UnpicklingError) and "global" in reason.lower():
            raise RefusedFileError(f"{path}: not a readable {what}: it holds objects other than tensors, refused "
                                   f"because loading them could run code ({reason})") from err
        raise RefusedFileError(f"{path}: not a readable {what} ({type(err).__name__}"
                               f"{': ' + reason if reason else ''})") from err


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A user's state dict from .safetensors, or .pth/.pt through ``torch.load(weights_only=True)``; the
    ``module.`` prefix that DistributedDataParallel puts on every name is removed."""
    path = str(path)
    if path.endswith(".safetensors"):
        _check_readable(path)
        try:
            state = load_file(path)
        except OSError:
            raise
        except Exception as err:
            raise RefusedFileError(f"{path}: not a readable weights file ({type(err).__name__}: {str(err)[:200]})") \
                from err
    else:
        state = load_weights_only(path)
        if not isinstance(state, dict):
            raise RefusedFileError(f"{path}: holds a {type(state).__name__}, not a state dict")
        state = state.get("state_dict", state)
    ddp = isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state)
    if ddp:  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def model_checksum(model: str | os.PathLike | nn.Module) -> str:
    """sha256 of a module's architecture (name and arguments) and state dict, or of a file's bytes; an ONNX
    encoder is its file's checksum, joined with its preprocessing when that is not the default
    (``OnnxEncoder.identity``). Give the loaded module where the identity of the *weights* matters: the
    same model saved twice gives different safetensors bytes (the header's key order varies) but the
    same module checksum."""
    from .onnx_encoder import OnnxEncoder

    if isinstance(model, OnnxEncoder):
        return model.identity()  # with the default preprocessing, the same whether the job got the path or it
    if isinstance(model, nn.Module):
        digest = hashlib.sha256()
        digest.update(str(getattr(model, "arch", type(model).__name__)).encode())
        digest.update(json.dumps(getattr(model, "arch_kwargs", None), sort_keys=True, default=str).encode())
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()
    return file_sha256(model)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks (the file may be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
