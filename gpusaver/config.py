"""gpusaver's settings: every ``GPUSAVER_*`` environment variable and every tunable size, in one place.

Each setting has a getter, a documented default, an environment variable that
overrides the default when the process starts, and :func:`set`, which changes
it for the process or, used as a context manager, for a block::

    from gpusaver import config

    config.get("segment_bytes")                 # 1048576
    with config.set(segment_bytes=64 << 10, writer_threads=1):
        saver.save(...)                         # with the overrides
    config.set(backend="numpy")                 # from now on

No other module reads ``os.environ``; modules read a setting when an
operation starts (a save, a restore), so a change applies from the next one.

=========================  ==========================  ===============  ==========================================
setting                    environment variable        default          what it is
=========================  ==========================  ===============  ==========================================
``backend``                ``GPUSAVER_BACKEND``        ``auto``         ``auto``, ``cupy`` or ``numpy``: where device arrays go
``native``                 ``GPUSAVER_NATIVE``         ``True``         use the C extension for the host path's loops
``kernel_sync``            ``GPUSAVER_KERNEL_SYNC``    ``False``        synchronise and check after every kernel launch
``writer_threads``         ``GPUSAVER_WRITER_THREADS`` ``0``            writer threads per bundle (0: one per CPU, at most 4)
``reader_threads``         ``GPUSAVER_READER_THREADS`` ``0``            reader threads of a big restore (0: one per CPU, at most 4)
``segment_bytes``          ``GPUSAVER_SEGMENT_BYTES``  ``1 MiB``        large tensors are checksummed and written (and read) this much at a time
``small_bytes``            ``GPUSAVER_SMALL_BYTES``    ``1 MiB``        without the C extension, tensors below this are batched
``batch_bytes``            ``GPUSAVER_BATCH_BYTES``    ``4 MiB``        a batch of small tensors is written at this size ...
``batch_count``            ``GPUSAVER_BATCH_COUNT``    ``1024``         ... or this many tensors
``pack_limit``             ``GPUSAVER_PACK_LIMIT``     ``64 KiB``       with the C extension, tensors below this are packed (and unpacked)
``pack_bytes``             ``GPUSAVER_PACK_BYTES``     ``4 MiB``        packing staging buffers (and restore chunks) are about this big
``read_chunk_bytes``       ``GPUSAVER_READ_CHUNK``     ``16 MiB``       a large tensor is read this much per call (then checksummed): big requests from a cold page cache
``parallel_read_bytes``    ``GPUSAVER_PARALLEL_READ``  ``64 MiB``       large tensors are read on several threads from this total up
``parallel_chunked_bytes`` ``GPUSAVER_PARALLEL_CHUNKED`` ``8 MiB``      small tensors are read on several threads from this total up
``gap_bytes``              ``GPUSAVER_GAP_BYTES``      ``64 KiB``       restore chunks read across gaps up to this size
``host_chunk_bytes``       ``GPUSAVER_HOST_CHUNK``     ``16 MiB``       a non-contiguous host array is staged this much at a time
``slot_bytes``             ``GPUSAVER_SLOT_BYTES``     ``32 MiB``       each pinned host buffer (and the device staging slab)
``slots``                  ``GPUSAVER_SLOTS``          ``4``            pinned host buffers per GPU
``device_small_bytes``     ``GPUSAVER_DEVICE_SMALL``   ``1 MiB``        device tensors below this are packed on the GPU
``snapshot_bytes``         ``GPUSAVER_SNAPSHOT_BYTES`` ``0``            ``save_async``'s snapshot pool per Saver (0: a quarter of available memory)
``snapshot_slab_bytes``    ``GPUSAVER_SNAPSHOT_SLAB``  ``32 MiB``       the snapshot pool is allocated, filled and reused this much at a time
``coordinator_timeout``    ``GPUSAVER_COORDINATOR_TIMEOUT`` ``300``     seconds a rank waits for the others before it raises
=========================  ==========================  ===============  ==========================================

Sizes accept plain integers in the environment (``GPUSAVER_SEGMENT_BYTES=262144``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from gpusaver.errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["get", "set", "settings", "reset", "Setting"]


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise InvalidArgumentError(f"{text!r} is not a yes/no value (1/0, true/false, yes/no, on/off)")


def _backend(text: str) -> str:
    value = text.strip().lower() or "auto"
    if value not in ("auto", "cupy", "numpy"):
        raise InvalidArgumentError(f"{text!r} is not one of auto, cupy, numpy")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(str(text).strip(), 0)
        if value < minimum:
            raise InvalidArgumentError(f"{value} is below the minimum {minimum}")
        return value

    return parse


@dataclass(frozen=True)
class Setting:
    """One setting: its environment variable, default, parser and meaning."""

    name: str
    env: str
    default: Any
    parse: Callable[[str], Any]
    doc: str


_SETTINGS = {
    s.name: s
    for s in [
        Setting("backend", "GPUSAVER_BACKEND", "auto", _backend, "where device arrays go: auto, cupy or numpy"),
        Setting("native", "GPUSAVER_NATIVE", True, _flag, "use the C extension for the host path's loops"),
        Setting("kernel_sync", "GPUSAVER_KERNEL_SYNC", False, _flag, "synchronise and check after every kernel"),
        Setting("writer_threads", "GPUSAVER_WRITER_THREADS", 0, _count(0), "writer threads (0: per CPU, <= 4)"),
        Setting("reader_threads", "GPUSAVER_READER_THREADS", 0, _count(0), "reader threads (0: per CPU, <= 4)"),
        Setting("segment_bytes", "GPUSAVER_SEGMENT_BYTES", 1 << 20, _count(1), "checksum-and-write unit"),
        Setting("small_bytes", "GPUSAVER_SMALL_BYTES", 1 << 20, _count(1), "batched below this (no C extension)"),
        Setting("batch_bytes", "GPUSAVER_BATCH_BYTES", 4 << 20, _count(1), "a batch of small tensors, in bytes"),
        Setting("batch_count", "GPUSAVER_BATCH_COUNT", 1024, _count(1), "a batch of small tensors, in tensors"),
        Setting("pack_limit", "GPUSAVER_PACK_LIMIT", 64 << 10, _count(1), "packed below this (C extension)"),
        Setting("pack_bytes", "GPUSAVER_PACK_BYTES", 4 << 20, _count(1), "packing buffers and restore chunks"),
        Setting("read_chunk_bytes", "GPUSAVER_READ_CHUNK", 16 << 20, _count(1), "one read call of a large tensor"),
        Setting("parallel_read_bytes", "GPUSAVER_PARALLEL_READ", 64 << 20, _count(1), "threaded big reads from"),
        Setting("parallel_chunked_bytes", "GPUSAVER_PARALLEL_CHUNKED", 8 << 20, _count(1), "threaded chunked reads"),
        Setting("gap_bytes", "GPUSAVER_GAP_BYTES", 64 << 10, _count(0), "restore chunks read across gaps this big"),
        Setting("host_chunk_bytes", "GPUSAVER_HOST_CHUNK", 16 << 20, _count(1), "non-contiguous host staging"),
        Setting("slot_bytes", "GPUSAVER_SLOT_BYTES", 32 << 20, _count(1), "pinned buffer and device slab size"),
        Setting("slots", "GPUSAVER_SLOTS", 4, _count(2), "pinned host buffers per GPU"),
        Setting("device_small_bytes", "GPUSAVER_DEVICE_SMALL", 1 << 20, _count(1), "packed on the GPU below this"),
        Setting("snapshot_bytes", "GPUSAVER_SNAPSHOT_BYTES", 0, _count(0), "save_async's snapshot pool (0: 1/4 of available memory)"),
        Setting("snapshot_slab_bytes", "GPUSAVER_SNAPSHOT_SLAB", 32 << 20, _count(4096), "save_async's snapshot unit"),
        Setting("coordinator_timeout", "GPUSAVER_COORDINATOR_TIMEOUT", 300, _count(1), "seconds a rank waits for the others"),
    ]
}

_lock = threading.Lock()
_values: dict[str, Any] = {}


def _initial(setting: Setting) -> Any:
    text = os.environ.get(setting.env)
    if text is None:
        return setting.default
    try:
        return setting.parse(text)
    except ValueError as e:
        raise InvalidArgumentError(f"{setting.env}={text!r}: {e}") from None


def _lookup(name: str) -> Setting:
    try:
        return _SETTINGS[name]
    except KeyError:
        raise InvalidArgumentError(f"no gpusaver setting {name!r}; the settings are {', '.join(_SETTINGS)}") from None


def get(name: str) -> Any:
    """The current value of setting ``name`` (its environment variable's, or its default, unless :func:`set`).

    Raises:
        InvalidArgumentError: no such setting, or its environment variable does not parse.
    """
    try:
        return _values[name]
    except KeyError:
        pass
    setting = _lookup(name)
    with _lock:
        if name not in _values:
            _values[name] = _initial(setting)
        return _values[name]


def _check(setting: Setting, value: Any) -> Any:
    if isinstance(setting.default, bool):
        if not isinstance(value, bool):
            raise InvalidArgumentTypeError(f"setting {setting.name!r} is True or False, not {value!r}")
        return value
    if isinstance(setting.default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentTypeError(f"setting {setting.name!r} is an int, not {value!r}")
    try:
        return setting.parse(str(value))
    except ValueError as e:
        raise InvalidArgumentError(f"setting {setting.name!r}: {e}") from None


class _Overrides:
    """Applied at once; as a context manager, undone on exit."""

    def __init__(self, previous: dict[str, Any]) -> None:
        self._previous = previous

    def __enter__(self) -> "_Overrides":
        return self

    def __exit__(self, *exc: Any) -> None:
        with _lock:
            for name, value in self._previous.items():
                if value is _UNSET:
                    _values.pop(name, None)
                else:
                    _values[name] = value


_UNSET = object()


def set(**values: Any) -> _Overrides:  # noqa: A001 - the name KvikIO's defaults use
    """Sets settings now; used as a context manager, restores them on exit.

    Raises:
        InvalidArgumentError, InvalidArgumentTypeError: an unknown setting or a bad value
            (nothing is changed then).
    """
    checked = {name: _check(_lookup(name), value) for name, value in values.items()}
    with _lock:
        previous = {name: _values.get(name, _UNSET) for name in checked}
        _values.update(checked)
    return _Overrides(previous)


def reset() -> None:
    """Forgets every :func:`set`: settings are read again from the environment when next asked for."""
    with _lock:
        _values.clear()


def settings() -> dict[str, Setting]:
    """Every setting, by name."""
    return dict(_SETTINGS)

