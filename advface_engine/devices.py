"""The ``--device`` value of the commands ("auto", "cpu", "cuda", "cuda:N") as a torch device."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when available, else the CPU; an unknown name or an absent GPU is a ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return resolved
