"""Progress bars for long work: shown when asked for and stderr is a terminal, never written into logs."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, progress: bool = True, **kwargs) -> tqdm:
    """A tqdm bar; off with ``progress=False``, and off when stderr is not a terminal (tqdm's disable=None)."""
    return tqdm(iterable, disable=None if progress else True, **kwargs)
