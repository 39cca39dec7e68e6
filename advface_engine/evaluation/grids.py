"""Image grids of the demo and the evaluation: faces in rows, one titled column per source."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def save_grid(path: Path, columns: list[torch.Tensor], titles: list[str], scale: int | None = None) -> None:
    """A PNG of image columns side by side, each (N, 3, H, W) in [-1, 1], enlarged ``scale`` times (default:
    to about 96 pixels a face), under a band with each column's title (wrapped at spaces to the column's
    width), so the file explains itself. Written to a temporary file and renamed: never half a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    if len(titles) != len(columns):
        raise ValueError(f"{len(columns)} columns, {len(titles)} titles")
    scale = scale or max(1, 96 // columns[0].shape[-1])
    rows = torch.cat([c.detach().cpu() for c in columns], dim=3)  # (N, 3, H, columns x W)
    grid = rows.permute(0, 2, 3, 1).reshape(-1, rows.shape[3], 3)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    width, font = columns[0].shape[3] * scale, ImageFont.load_default()
    measure = ImageDraw.Draw(image)
    lines = [_wrap(title, width - 4, lambda text: measure.textlength(text, font=font)) for title in titles]
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    band = 4 + line_height * max(len(t) for t in lines)
    out = Image.new("RGB", (image.width, image.height + band), "white")
    out.paste(image, (0, band))
    draw = ImageDraw.Draw(out)
    for k, title in enumerate(lines):
        for i, text in enumerate(title):
            x = k * width + (width - draw.textlength(text, font=font)) / 2
            draw.text((x, 2 + i * line_height), text, fill="black", font=font)
    tmp = path.with_name(path.name + ".tmp.png")
    out.save(tmp)
    os.replace(tmp, path)


def _wrap(text: str, width: float, length) -> list[str]:
    """``text`` in lines no longer than ``width`` by ``length(line)``, broken at spaces (a longer word alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and length(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]
