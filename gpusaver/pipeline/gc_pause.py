"""Pausing Python's cyclic garbage collector around allocation-heavy work.

A save or restore of 100,000 tensors allocates a few hundred thousand small
objects (views, entries, keys), none of them cyclic; the collector would
traverse the growing containers again and again, tripling the time. It is
paused for the duration and restored afterwards (reentrant across threads).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

__all__ = ["paused"]

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Disables the cyclic collector inside the block, if it was enabled."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
