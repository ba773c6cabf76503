"""Progress shown on the command line: a bar on a terminal, plain lines in a log.

:func:`progress_reporter` returns a ``callback(done_bytes, total_bytes)`` (the
signature every ``progress=`` argument of gpusaver takes) that draws a tqdm bar
when its stream is a terminal and tqdm is installed (``gpusaver[progress]``),
and otherwise writes plain lines such as ``verify: 1.2 GiB of 3.4 GiB (35%)``:
at most one a second or one per 10% of the work, none at all for work that is
over within the first second, so quick commands and pipes stay quiet.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["ProgressReporter", "progress_reporter", "human_bytes"]

#: Seconds before anything is shown: quicker work shows no progress at all.
DEFAULT_DELAY = 1.0
#: Plain lines: at most one per this many seconds ...
DEFAULT_INTERVAL = 1.0
#: ... unless another this fraction of the total has been done.
DEFAULT_STEP = 0.1


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``, ``512`` -> ``"512 B"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class ProgressReporter:
    """A ``callback(done, total)`` that shows progress; :meth:`close` ends the display.

    Use :func:`progress_reporter` to make one. It is also a context manager that
    closes itself.
    """

    def __call__(self, done: int, total: int) -> None:
        """Shows that ``done`` of ``total`` bytes are done."""

    def close(self) -> None:
        """Ends the display (the last line, or the bar's final state)."""

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Lines(ProgressReporter):
    """Plain lines: ``label: done of total (pct%)``."""

    def __init__(self, label: str, stream: TextIO, interval: float, step: float, delay: float) -> None:
        self.label = label
        self.stream = stream
        self.interval = interval
        self.step = step
        self._start = time.monotonic()
        self._delay = delay
        self._last_time = self._start
        self._last_bucket = 0
        self._shown: tuple[int, int] | None = None  # the last line's (done, total)
        self._latest: tuple[int, int] | None = None
        self._closed = False

    def _bucket(self, done: int, total: int) -> int:
        if total <= 0:
            return int(1 / self.step)
        return int(done / total / self.step + 1e-6)

    def _line(self, done: int, total: int) -> None:
        pct = 100 if total <= 0 else min(100, done * 100 // total)
        try:
            print(f"{self.label}: {human_bytes(done)} of {human_bytes(total)} ({pct}%)", file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stream never stops the work
            self._closed = True
        self._shown = (done, total)

    def __call__(self, done: int, total: int) -> None:
        if self._closed:
            return
        self._latest = (done, total)
        now = time.monotonic()
        if now - self._start < self._delay:
            return
        bucket = self._bucket(done, total)
        if (done, total) != self._shown and (bucket > self._last_bucket or now - self._last_time >= self.interval):
            self._line(done, total)
            self._last_time = now
            self._last_bucket = bucket

    def close(self) -> None:
        """Writes the final state, if any line was written and it is not the last one shown."""
        if not self._closed and self._shown is not None and self._latest not in (None, self._shown):
            assert self._latest is not None
            self._line(*self._latest)
        self._closed = True


class _Bar(ProgressReporter):
    """A tqdm bar in bytes, created on the first call (when the total is known)."""

    def __init__(self, label: str, stream: TextIO, tqdm: Any, delay: float) -> None:
        self.label = label
        self.stream = stream
        self._tqdm = tqdm
        self._delay = delay
        self._bar: Any = None
        self._closed = False

    def __call__(self, done: int, total: int) -> None:
        if self._closed:
            return
        if self._bar is None:
            kwargs = dict(total=total, desc=self.label, unit="B", unit_scale=True, unit_divisor=1024,
                          file=self.stream, leave=True, dynamic_ncols=True)
            try:
                self._bar = self._tqdm(delay=self._delay, **kwargs)
            except TypeError:  # a tqdm without ``delay``
                self._bar = self._tqdm(**kwargs)
        bar = self._bar
        if bar.total != total:
            bar.total = total
        if done != bar.n:
            bar.update(done - bar.n)

    def close(self) -> None:
        if self._bar is not None and not self._closed:
            self._bar.close()
        self._closed = True


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _tqdm_class() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def progress_reporter(
    label: str,
    stream: TextIO | None = None,
    *,
    interval: float | None = None,
    step: float | None = None,
    delay: float | None = None,
) -> ProgressReporter:
    """A progress display for work measured in bytes.

    On a terminal (``stream.isatty()``) it is a tqdm bar when tqdm is installed
    (the ``gpusaver[progress]`` extra); otherwise, and whenever ``stream`` is a
    pipe or a file, plain lines ``"{label}: 1.2 GiB of 3.4 GiB (35%)"``.

    Args:
        label: what is being done (``"verify"``), the bar's or each line's start.
        stream: where to write (default ``sys.stderr``, looked up at call time).
        interval: plain lines: at most one per this many seconds (default 1) ...
        step: ... unless another this fraction of the total is done (default 0.1).
        delay: show nothing until this many seconds have passed (default 1), so
            that quick work stays silent.

    Returns:
        A callable ``reporter(done_bytes, total_bytes)``; call ``reporter.close()``
        (or use it as a context manager) when the work is over.
    """
    stream = sys.stderr if stream is None else stream
    delay = DEFAULT_DELAY if delay is None else delay
    if _isatty(stream):
        tqdm = _tqdm_class()
        if tqdm is not None:
            return _Bar(label, stream, tqdm, delay)
    return _Lines(
        label,
        stream,
        DEFAULT_INTERVAL if interval is None else interval,
        DEFAULT_STEP if step is None else step,
        delay,
    )
