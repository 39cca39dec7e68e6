"""Checkpoints as safetensors with a metadata header (architecture + kwargs): loading never runs code."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "advface-engine/1"


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``model`` (built by ``build_model``) to ``path`` atomically (temporary file + rename)."""
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError("model has no .arch: build it with advface_engine.models.build_model")
    metadata = {"format": FORMAT, "arch": arch, "kwargs": json.dumps(model.arch_kwargs),
                "extra": json.dumps(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left behind when the write or the rename failed


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's header: {"arch", "kwargs", "extra"}."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except OSError:
        raise
    except Exception as err:  # safetensors raises its own error type for a file that is not one
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an advface-engine checkpoint (no '{FORMAT}' header)")
    try:
        return {"arch": meta["arch"], "kwargs": json.loads(meta["kwargs"]),
                "extra": json.loads(meta.get("extra", "{}"))}
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: damaged advface-engine checkpoint header ({type(err).__name__}: {err})") from err


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the module recorded in ``path`` and load its weights, in eval mode."""
    from . import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta = read_metadata(path)
    try:
        model = build_model(meta["arch"], **meta["kwargs"])
        model.load_state_dict(load_file(str(path)))
    except (TypeError, RuntimeError) as err:  # arguments the arch does not take, weights that do not fit
        first = " ".join(str(err).strip().splitlines()[:3])[:500]
        raise ValueError(f"{path}: its weights do not fit its header ({meta['arch']} {meta['kwargs']}): {first}") \
            from err
    model.checkpoint_extra = meta["extra"]
    return model.to(device).eval()


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A user's state dict from .safetensors, or .pth/.pt through ``torch.load(weights_only=True)``."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:  # torch's weights-only unpickler met something else
        raise ValueError(f"{path}: not a readable weights file: it holds objects other than tensors, "
                         "refused because loading them could run code") from err
    except Exception as err:  # not a checkpoint at all
        raise ValueError(f"{path}: not a readable weights file ({type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state.get("state_dict", state)


def model_checksum(model: str | os.PathLike | nn.Module) -> str:
    """sha256 of a module's architecture (name and arguments) and state dict, or of a file's bytes; a
    module with no weights that wraps a file (an ONNX encoder) is that file's checksum. Give the loaded
    module where the identity of the *weights* matters: the same model saved twice gives different
    safetensors bytes (the header's key order varies) but the same module checksum."""
    if isinstance(model, nn.Module) and getattr(model, "source_sha256", None) and not list(model.state_dict()):
        return model.source_sha256  # the file's checksum: the same whether the job got the path or the module
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
