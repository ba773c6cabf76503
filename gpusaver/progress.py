"""Progress of long operations: bytes done out of bytes in all, reported through a callback.

``Saver.save``, ``Saver.restore``, ``gpusaver.save``, ``gpusaver.load`` and the
conversions take ``progress=callback``; the callback receives
``(done_bytes, total_bytes)`` from whichever thread moved the bytes, at most
about every 1% of the total (and always once at the end, with ``done == total``).
"""

from __future__ import annotations

import threading
from typing import Callable

__all__ = ["Progress", "ProgressCallback"]

#: ``callback(done_bytes, total_bytes)``.
ProgressCallback = Callable[[int, int], None]


class Progress:
    """A thread-safe byte counter that calls ``callback`` as it advances.

    Args:
        callback: called with ``(done, total)``.
        total: the bytes the operation moves (its data files' bytes).
    """

    def __init__(self, callback: ProgressCallback, total: int) -> None:
        self._callback = callback
        self.total = max(0, int(total))
        self.done = 0
        self._step = max(1, self.total // 100)
        self._next = 0
        self._finished = False
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        """Counts ``n`` more bytes done (calls back when another 1% is reached, or all)."""
        with self._lock:
            self.done = min(self.total, self.done + n)
            if self._finished or (self.done < self._next and self.done < self.total):
                return
            self._next = self.done + self._step
            self._finished = self.done == self.total
            self._callback(self.done, self.total)

    def finish(self) -> None:
        """Reports completion (``done == total``), unless it was reported already."""
        with self._lock:
            if self._finished:
                return
            self.done = self.total
            self._finished = True
            self._callback(self.total, self.total)
