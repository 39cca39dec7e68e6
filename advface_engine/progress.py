"""Progress of long work: a bar on a terminal, plain lines in a log, nothing with ``progress=False``.

Every long loop (training, gallery jobs, the evaluation) goes through ``progress_bar``, so an unattended
run (stderr redirected to a file) says how far it is: one line at most every ``INTERVAL`` seconds.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

INTERVAL = 10.0  # seconds between two lines in a log
clock = time.monotonic  # a name to patch in tests


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """A tqdm bar on a terminal; ``LogProgress`` when stderr is not one; a silent bar with ``progress=False``.

    Takes tqdm's arguments (``total``, ``initial``, ``desc``, ``unit`` ...) and gives what the callers use of a
    bar: iteration, ``update``, ``set_postfix``, ``close`` and ``with``.
    """
    if not progress:
        return tqdm(iterable, disable=True, **kwargs)
    if not sys.stderr.isatty():
        return LogProgress(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


def format_rate(count: float, seconds: float, unit: str) -> str:
    """"312 row/s": whole numbers from 100 up, three significant digits below (a slow or tiny job is not
    "0 row/s"); "" when there is nothing to divide (no work done, or no time measured)."""
    if count <= 0 or seconds <= 0:
        return ""
    rate = count / seconds
    return f"{rate:,.0f} {unit}/s" if rate >= 100 else f"{rate:.3g} {unit}/s"


class LogProgress:
    """Progress as plain lines on stderr: ``desc: done/total (percent), rate, ETA`` and the postfix, at most
    every INTERVAL seconds; a last line at ``close`` when any was written and the count moved since (a short
    job stays silent).
    Counts are whole numbers (no "1.02k")."""

    def __init__(self, iterable=None, total=None, initial=0, desc=None, unit="it", **_):
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.initial = total, int(initial), int(initial)
        self.postfix = ""
        self.start = self.last = clock()
        self.lines, self.last_n = 0, self.n
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if clock() - self.last >= INTERVAL:
            self._write()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed and self.lines and self.n != self.last_n:
            self._write()
        self.closed = True

    def line(self) -> str:
        """The progress as one line."""
        now = clock()
        done, elapsed = self.n - self.initial, now - self.start
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"]
        rate = format_rate(done, elapsed, self.unit)
        if rate:
            parts.append(rate)
            if self.total and self.n < self.total:
                parts.append(f"ETA {tqdm.format_interval((self.total - self.n) * elapsed / done)}")
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def _write(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
        self.last, self.lines, self.last_n = clock(), self.lines + 1, self.n
