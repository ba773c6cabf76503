"""Saves that finish in the background: :class:`SaveHandle`, and waiting for them at interpreter exit.

A background save runs on a thread of its own that is not a daemon, so the
interpreter waits for it at exit (``threading`` joins such threads before
``atexit`` handlers run); the handler registered here then reports, on
stderr, any failure nobody collected.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import weakref
from typing import Any, Callable, Iterator

from gpusaver.errors import SaveTimeoutError

__all__ = ["SaveHandle", "serving", "served"]

_handles: "weakref.WeakSet[SaveHandle]" = weakref.WeakSet()
_handles_lock = threading.Lock()


_serving = threading.local()


@contextlib.contextmanager
def serving(owner: Any, handle: "SaveHandle | None" = None) -> Iterator[None]:
    """Marks the calling thread, while a user's callback (``progress``, ``on_phase``) runs, as working
    for ``owner`` (a Saver) and its save ``handle``: a call of that Saver, or a wait for that
    handle, from inside the callback would wait for ever, and is refused instead."""
    previous = getattr(_serving, "now", None)
    _serving.now = (owner, handle)
    try:
        yield
    finally:
        _serving.now = previous


def served() -> "tuple[Any, SaveHandle | None] | None":
    """``(owner, handle)`` of the callback running on this thread, or None."""
    return getattr(_serving, "now", None)


class SaveHandle:
    """The pending result of :meth:`gpusaver.Saver.save_async`.

    Attributes:
        prefix: the checkpoint prefix the save writes (as :meth:`~gpusaver.Saver.save` returns it).
        blocked_seconds: how long ``save_async`` blocked (capturing the snapshot).
    """

    def __init__(self, prefix: str | None) -> None:
        self.prefix = prefix
        self.blocked_seconds = 0.0
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._collected = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._callbacks: list[Callable[["SaveHandle"], None]] = []
        with _handles_lock:
            _handles.add(self)

    @classmethod
    def finished(cls, prefix: str | None) -> "SaveHandle":
        handle = cls(prefix)
        handle._done.set()
        return handle

    def _abandon(self, error: BaseException) -> None:
        """The save never started writing (its capture failed, and the caller got ``error``): done."""
        self._error = error
        self._collected = True
        self._done.set()

    def _start(self, target: Callable[[], Any]) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as e:  # noqa: BLE001 - kept for result() and the Saver's next call
                self._error = e
            finally:
                self._done.set()

        self._pid = os.getpid()
        self._thread = threading.Thread(target=run, name="gpusaver-save-async", daemon=False)
        self._thread.start()

    def _refuse_from_own_callback(self) -> None:
        now = served()
        if now is not None and now[1] is self:
            from gpusaver.errors import SaverBusyError

            raise SaverBusyError(
                "a callback of this asynchronous save waited for the save itself, which would wait for ever"
            )

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the save to finish; returns :meth:`done` (False after ``timeout`` seconds).

        Raises:
            SaverBusyError: called from a callback of this very save (it would wait for ever).
        """
        self._refuse_from_own_callback()
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> str | None:
        """The checkpoint prefix once the save is committed (the state file written, retention applied).

        Raises:
            SaveTimeoutError: not finished within ``timeout`` seconds (a TimeoutError; the save goes on).
            the save's own error (e.g. :class:`~gpusaver.errors.CheckpointWriteError`) if it failed;
                nothing was committed. Raised here, it is not raised again by the Saver's next call.
        """
        self._refuse_from_own_callback()
        if not self._done.wait(timeout):
            raise SaveTimeoutError(f"the save of {self.prefix!r} has not finished within {timeout} s")
        if self._error is not None:
            self._collected = True
            raise self._error
        return self.prefix

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's error (None if it succeeded), once finished; it counts as collected."""
        self._refuse_from_own_callback()
        if not self._done.wait(timeout):
            raise SaveTimeoutError(f"the save of {self.prefix!r} has not finished within {timeout} s")
        if self._error is not None:
            self._collected = True
        return self._error

    def _uncollected(self) -> BaseException | None:
        """The error nobody has seen yet (and marks it seen), for the Saver's next call."""
        self._done.wait()
        if self._error is not None and not self._collected:
            self._collected = True
            return self._error
        return None

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._error is not None else "done")
        return f"SaveHandle({self.prefix!r}, {state})"


def _forget_in_child() -> None:
    """A forked child has none of its parent's background threads: their saves are not its own."""
    global _handles_lock
    _handles_lock = threading.Lock()  # the parent may have held it while forking
    _handles.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _report_uncollected() -> None:
    with _handles_lock:
        handles = [h for h in _handles if h._pid == os.getpid()]
    for handle in handles:
        handle.wait()
        if handle._error is not None and not handle._collected:
            print(
                f"gpusaver: the asynchronous save of {handle.prefix!r} failed and nobody collected the error "
                f"(nothing was committed): {type(handle._error).__name__}: {handle._error}",
                file=sys.stderr,
            )
