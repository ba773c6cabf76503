"""Which NVIDIA GPUs this machine has, through NVML (the ``nvidia-ml-py`` bindings).

Nothing here ever raises because NVML is missing: without the Python bindings,
without the driver's library, or without a GPU, :func:`inventory` returns an
empty list and :func:`nvml_status` says why. ``pynvml`` is imported lazily,
NVML is initialised once, on first use, under a lock, and shut down at
interpreter exit (or by :func:`shutdown`).

Indices are NVML's, which enumerate every GPU of the machine in PCI order. They
are not CUDA device ordinals: ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER``
renumber CUDA's devices but not NVML's. Map a CUDA device to its NVML entry
with :func:`by_pci_bus_id` and the bus id CUDA reports for it.

Example:
    >>> from gpusaver.cuda import nvml
    >>> for gpu in nvml.inventory():
    ...     print(gpu.index, gpu.name, gpu.memory_free)
    >>> nvml.pin_current_thread_near(0)  # True if the thread now runs near GPU 0
"""

from __future__ import annotations

import atexit
import os
import re
import threading
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Callable, Iterable, TypeVar

__all__ = [
    "GpuInfo",
    "inventory",
    "by_pci_bus_id",
    "free_memory",
    "cpu_affinity",
    "pin_current_thread_near",
    "nvml_status",
    "cpu_ids_from_mask",
    "normalize_pci_bus_id",
    "shutdown",
]

#: Bits per word of NVML's CPU-affinity bitmask (the bindings pass 64-bit words).
MASK_WORD_BITS = 64
_MIN_MASK_CPUS = 1024  # extra words cost nothing and cover sparse CPU ids

_T = TypeVar("_T")


@dataclass
class GpuInfo:
    """One GPU as NVML describes it.

    Attributes:
        index: NVML's index of the device (not necessarily its CUDA ordinal).
        name: the product name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        uuid: the device's UUID, ``"GPU-..."``.
        pci_bus_id: the PCI bus id as NVML writes it, ``"00000000:3B:00.0"``.
        memory_total: total device memory in bytes (None when NVML cannot say).
        memory_free: free device memory in bytes when probed (None when unknown).
        cpu_affinity: the ids of the CPUs nearest the device (empty when unknown).
    """

    index: int
    name: str
    uuid: str
    pci_bus_id: str
    memory_total: int | None
    memory_free: int | None
    cpu_affinity: list[int] = field(default_factory=list)


class _State:
    """NVML's process-wide state; every field is guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.lib: ModuleType | None = None  # the pynvml module, once initialised
        self.status = "NVML not probed yet"
        self.gpus: list[GpuInfo] | None = None
        self.atexit_registered = False


_state = _State()


def _text(value: Any) -> str:
    """NVML strings arrive as ``str`` or ``bytes`` depending on the bindings' version."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _error_text(e: BaseException) -> str:
    return str(e) or type(e).__name__


def cpu_ids_from_mask(words: Iterable[int], bits_per_word: int = MASK_WORD_BITS) -> list[int]:
    """Decodes NVML's CPU-affinity bitmask into CPU ids.

    Bit ``b`` of word ``w`` set means CPU ``w * bits_per_word + b`` is near the device.

    Args:
        words: the mask's words, lowest CPUs first.
        bits_per_word: the width of one word.

    Returns:
        The CPU ids, ascending.
    """
    cpus: list[int] = []
    for w, word in enumerate(words):
        word = int(word) & ((1 << bits_per_word) - 1)
        base = w * bits_per_word
        while word:
            low = word & -word
            cpus.append(base + low.bit_length() - 1)
            word ^= low
    return cpus


_BUS_ID_RE = re.compile(r"^(?:([0-9a-fA-F]+):)?([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-7])$")


def normalize_pci_bus_id(bus_id: str | bytes) -> str:
    """Canonical ``"dddd:bb:dd.f"`` (lower-case, 4-digit domain) form of a PCI bus id.

    NVML writes an 8-digit domain (``"00000000:3B:00.0"``), CUDA a 4-digit one
    (``"0000:3b:00.0"``); both normalise to the same string. A string that is not
    a bus id is returned stripped and lower-cased.
    """
    text = _text(bus_id).strip()
    m = _BUS_ID_RE.match(text)
    if m is None:
        return text.lower()
    domain, bus, device, function = m.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{function}"


def _shutdown_locked() -> None:
    lib = _state.lib
    _state.lib = None
    _state.gpus = None
    _state.status = "NVML shut down"
    if lib is not None:
        try:
            lib.nvmlShutdown()
        except Exception:  # noqa: BLE001 - nothing useful to do at shutdown
            pass


def shutdown() -> None:
    """Shuts NVML down (if this module initialised it); the next query re-initialises it."""
    with _state.lock:
        _shutdown_locked()


def _library() -> ModuleType | None:
    """The initialised ``pynvml`` module, or None (with ``_state.status`` saying why)."""
    with _state.lock:
        if _state.lib is not None:
            return _state.lib
        try:
            import pynvml
        except ImportError as e:
            _state.status = f"NVML not available: the nvidia-ml-py bindings (pynvml) cannot be imported ({e})"
            return None
        try:
            pynvml.nvmlInit()
        except Exception as e:  # noqa: BLE001 - NVMLError, OSError ...: NVML unusable
            _state.status = f"NVML not available: nvmlInit failed ({_error_text(e)}); no NVIDIA driver on this machine?"
            return None
        _state.lib = pynvml
        if not _state.atexit_registered:
            atexit.register(shutdown)
            _state.atexit_registered = True
        return pynvml


def _try(fn: Callable[[], _T], default: _T) -> _T:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - one unsupported query must not hide the device
        return default


def _cpu_set_words() -> int:
    """Mask words to ask NVML for: enough for every CPU id here (ids can exceed the count)."""
    highest = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        highest = max([highest, *(cpu + 1 for cpu in os.sched_getaffinity(0))])
    return -(-max(highest, _MIN_MASK_CPUS) // MASK_WORD_BITS)


def _probe_device(lib: ModuleType, index: int) -> GpuInfo:
    handle = lib.nvmlDeviceGetHandleByIndex(index)
    memory = _try(lambda: lib.nvmlDeviceGetMemoryInfo(handle), None)
    words = _try(lambda: lib.nvmlDeviceGetCpuAffinity(handle, _cpu_set_words()), None)
    return GpuInfo(
        index=index,
        name=_try(lambda: _text(lib.nvmlDeviceGetName(handle)), ""),
        uuid=_try(lambda: _text(lib.nvmlDeviceGetUUID(handle)), ""),
        pci_bus_id=_try(lambda: _text(lib.nvmlDeviceGetPciInfo(handle).busId), ""),
        memory_total=int(memory.total) if memory is not None else None,
        memory_free=int(memory.free) if memory is not None else None,
        cpu_affinity=cpu_ids_from_mask(words) if words is not None else [],
    )


def _probe(lib: ModuleType) -> tuple[list[GpuInfo], str]:
    try:
        count = int(lib.nvmlDeviceGetCount())
    except Exception as e:  # noqa: BLE001
        return [], f"NVML not available: nvmlDeviceGetCount failed ({_error_text(e)})"
    gpus: list[GpuInfo] = []
    skipped: list[str] = []
    for index in range(count):
        try:
            gpus.append(_probe_device(lib, index))
        except Exception as e:  # noqa: BLE001 - e.g. a GPU lost or in a bad state
            skipped.append(f"GPU {index}: {_error_text(e)}")
    driver = _try(lambda: _text(lib.nvmlSystemGetDriverVersion()), "")
    status = f"NVML available: {len(gpus)} NVIDIA GPU{'s' if len(gpus) != 1 else ''}"
    if driver:
        status += f" (driver {driver})"
    if not gpus:
        status = "no NVIDIA GPU: " + status
    if skipped:
        status += "; skipped " + "; ".join(skipped)
    return gpus, status


def inventory(refresh: bool = False) -> list[GpuInfo]:
    """The machine's NVIDIA GPUs; an empty list when NVML or a GPU is not there.

    The first call probes NVML and caches the result (``memory_free`` is a snapshot
    of that moment; use :func:`free_memory` for a live value). Never raises.

    Args:
        refresh: probe again (retrying NVML's initialisation if it failed before).

    Returns:
        One :class:`GpuInfo` per device, by NVML index; copies, safe to modify.
    """
    with _state.lock:
        if _state.gpus is None or refresh:
            lib = _library()
            if lib is None:
                _state.gpus = []
            else:
                _state.gpus, _state.status = _probe(lib)
        return [replace(g, cpu_affinity=list(g.cpu_affinity)) for g in _state.gpus]


def _find(index: int) -> GpuInfo | None:
    for gpu in inventory():
        if gpu.index == index:
            return gpu
    return None


def by_pci_bus_id(bus_id: str | bytes) -> GpuInfo | None:
    """The GPU at PCI bus id ``bus_id`` (NVML's or CUDA's spelling), or None."""
    want = normalize_pci_bus_id(bus_id)
    for gpu in inventory():
        if normalize_pci_bus_id(gpu.pci_bus_id) == want:
            return gpu
    return None


def free_memory(index: int) -> int | None:
    """Free memory of GPU ``index`` in bytes, queried now; None when unknown."""
    if _find(index) is None:
        return None
    with _state.lock:
        lib = _state.lib
        if lib is None:
            return None
        try:
            return int(lib.nvmlDeviceGetMemoryInfo(lib.nvmlDeviceGetHandleByIndex(index)).free)
        except Exception:  # noqa: BLE001
            return None


def cpu_affinity(index: int) -> list[int] | None:
    """The CPUs nearest GPU ``index``; None when NVML cannot say."""
    gpu = _find(index)
    if gpu is None or not gpu.cpu_affinity:
        return None
    return list(gpu.cpu_affinity)


def pin_current_thread_near(index: int) -> bool:
    """Restricts the calling thread to the CPUs nearest GPU ``index``.

    Only CPUs this process may already use are kept (a container's cpuset stays
    respected). Quietly does nothing when NVML does not know the affinity, the
    platform cannot set it, or no allowed CPU is near the device.

    Returns:
        True if the thread's affinity was set.
    """
    cpus = cpu_affinity(index)
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        allowed = os.sched_getaffinity(0)
        target = allowed.intersection(cpus)
        if not target:
            return False
        os.sched_setaffinity(0, target)  # pid 0: the calling thread on Linux
    except OSError:
        return False
    return True


def nvml_status() -> str:
    """Why NVML is or is not usable here, in one line (probes NVML if not done yet)."""
    inventory()
    with _state.lock:
        return _state.status
