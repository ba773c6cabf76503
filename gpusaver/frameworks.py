"""Arrays of any framework, seen as the NumPy or CuPy arrays gpusaver writes from and reads into.

No copies: a CPU ``torch.Tensor`` is seen through its NumPy view (bfloat16 and
the float8 types through an integer view re-labelled with the ml_dtypes type
TensorFlow's codes map to), a CUDA tensor through CuPy (``cupy.from_dlpack``),
a JAX array through NumPy or DLPack, and any other object through
``__dlpack__``, ``__cuda_array_interface__`` or ``__array_interface__``. The
view shares memory with the original, so a restore writes into it in place.
Python and NumPy scalars become 0-d arrays; like JAX arrays they are
immutable, so they are saved but cannot be restored in place (``gpusaver.load``
brings them back as new values).

torch, JAX and CuPy are imported only when an object of theirs is seen.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from gpusaver.errors import InvalidArgumentError, UnsupportedDTypeError

__all__ = ["Adapted", "adapt", "check_not_deleted", "framework_of", "ordered_with_framework"]


@dataclass(frozen=True)
class Adapted:
    """What gpusaver sees of one value.

    Attributes:
        array: a NumPy or CuPy array sharing memory with the value.
        kind: ``numpy``, ``cupy``, ``torch``, ``jax``, ``scalar`` or ``other``.
        device: ``/gpu:k`` for device memory, else None (the host).
        immutable: why a restore cannot write into it (None when it can).
        dtype: the value's own dtype where ``array`` only stands in for it with a same-size integer
            dtype (a CUDA bfloat16 or float8 tensor: CuPy has no such dtype); None otherwise.
    """

    array: Any
    kind: str
    device: str | None = None
    immutable: str | None = None
    dtype: np.dtype | None = None


def framework_of(value: Any) -> str:
    """The top-level module of a value's type (``torch``, ``jaxlib``, ``numpy``, ...)."""
    return type(value).__module__.split(".")[0]


def _is_torch_tensor(value: Any) -> bool:
    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(value, torch.Tensor)


@functools.lru_cache(maxsize=None)
def _torch_special() -> dict[Any, tuple[Any, np.dtype]]:
    """torch dtypes NumPy lacks -> (same-size integer dtype to view through, ml_dtypes type); made once."""
    import ml_dtypes
    import torch

    table = {
        "bfloat16": (torch.int16, ml_dtypes.bfloat16),
        "float8_e4m3fn": (torch.uint8, ml_dtypes.float8_e4m3fn),
        "float8_e5m2": (torch.uint8, ml_dtypes.float8_e5m2),
        "float8_e4m3fnuz": (torch.uint8, ml_dtypes.float8_e4m3fnuz),
        "float8_e5m2fnuz": (torch.uint8, ml_dtypes.float8_e5m2fnuz),
    }
    return {getattr(torch, k): (i, np.dtype(t)) for k, (i, t) in table.items() if hasattr(torch, k)}


def _from_torch(t: Any, name: str | None) -> Adapted:
    t = t.detach()
    if t.is_conj() or t.is_neg():
        raise UnsupportedDTypeError(
            f"variable {name!r} is a torch tensor with a lazy conjugate or negation bit; "
            "call .resolve_conj() / .resolve_neg() first"
        )
    _check_within_storage(t, name)
    special = _torch_special().get(t.dtype)
    if t.is_cpu:
        try:
            if special is not None:
                arr = t.view(special[0]).numpy().view(special[1])
            else:
                arr = t.numpy()
        except (TypeError, RuntimeError) as e:
            raise UnsupportedDTypeError(f"variable {name!r}: torch dtype {t.dtype} cannot be saved: {e}") from None
        return Adapted(arr, "torch")
    if t.device.type == "cuda":
        cp = _cupy()
        index = t.device.index if t.device.index is not None else 0
        with cp.cuda.Device(index):
            if special is not None:  # CuPy has no bfloat16/float8: its integer view, with the real dtype beside it
                return Adapted(cp.from_dlpack(t.view(special[0])), "torch", f"/gpu:{index}", dtype=special[1])
            arr = cp.from_dlpack(t)
        return Adapted(arr, "torch", f"/gpu:{index}")
    raise UnsupportedDTypeError(f"variable {name!r} is a torch tensor on {t.device}; gpusaver saves CPU and CUDA tensors")


def check_not_deleted(a: Any, name: str | None) -> None:
    """Refuses a JAX array whose buffer was deleted (``a.delete()``, or donated to a jitted function).

    Raises:
        InvalidArgumentError: naming the variable.
    """
    is_deleted = getattr(a, "is_deleted", None)
    if is_deleted is not None and is_deleted():
        raise InvalidArgumentError(
            f"variable {name!r} is a deleted JAX array (deleted, or donated to a jitted function with "
            "donate_argnums): pass the array the function returned"
        )


def _check_within_storage(t: Any, name: str | None) -> None:
    """Refuses a tensor whose sizes and strides reach past its storage (torch leaves one so when a
    ``resize_`` fails part way: the sizes changed, the memory did not). Reading it would read
    memory that is not the tensor's."""
    n = t.numel()
    if n == 0:
        return
    if t.is_contiguous():  # the common case, without a pass over the dimensions
        last = t.storage_offset() + n - 1
    else:
        last = t.storage_offset() + sum((d - 1) * st for d, st in zip(t.shape, t.stride()) if d > 1)
    if (last + 1) * t.element_size() > t.untyped_storage().nbytes() or min(t.stride(), default=0) < 0:
        raise InvalidArgumentError(
            f"variable {name!r} is a torch tensor of shape {list(t.shape)} whose elements reach past its "
            f"storage of {t.untyped_storage().nbytes()} bytes (a resize_ that failed part way?)"
        )


def _from_jax(a: Any, name: str | None) -> Adapted:
    check_not_deleted(a, name)
    why = "JAX arrays are immutable: load them with gpusaver.load(path, like=tree)"
    devices = list(a.devices()) if hasattr(a, "devices") else []
    if devices and all(d.platform == "gpu" for d in devices) and len(devices) == 1:
        cp = _cupy()
        dtype = np.dtype(a.dtype)
        if dtype.kind == "V" or dtype.type.__module__.startswith("ml_dtypes"):
            # bfloat16, float8: CuPy has no such dtype. A same-size integer copy on the device (JAX
            # arrays are immutable: no view to take), with the real dtype beside it.
            import jax

            stand_in = {1: np.uint8, 2: np.int16}.get(dtype.itemsize)
            if stand_in is None or _bits(dtype) < 8 * dtype.itemsize:  # int4, float4: two to a byte, no stand-in
                raise UnsupportedDTypeError(f"variable {name!r}: a JAX GPU array of {dtype} cannot be saved")
            arr = cp.from_dlpack(jax.lax.bitcast_convert_type(a, stand_in))
            return Adapted(arr, "jax", f"/gpu:{arr.device.id}", immutable=why, dtype=dtype)
        arr = cp.from_dlpack(a)
        return Adapted(arr, "jax", f"/gpu:{arr.device.id}", immutable=why)
    arr = np.asarray(a)  # a view of the host buffer where JAX allows it
    return Adapted(arr, "jax", immutable=why)


def _bits(dtype: np.dtype) -> int:
    """The bits of one element of an ml_dtypes type (4 for int4 and float4_e2m1fn, though each takes a byte)."""
    import ml_dtypes

    for info in (ml_dtypes.finfo, ml_dtypes.iinfo):
        try:
            return int(info(dtype).bits)
        except (TypeError, ValueError):
            continue
    return 8 * dtype.itemsize


def _cupy() -> Any:
    from gpusaver import backends

    if backends.gpu_backend() is None:
        raise backends.BackendUnavailableError(
            f"a device array needs a usable GPU and CuPy: {backends.unavailable_reason() or 'GPUSAVER_BACKEND=numpy'}"
        )
    import cupy

    return cupy


def adapt(value: Any, name: str | None = None) -> Adapted:
    """The NumPy or CuPy view of ``value``.

    Raises:
        UnsupportedDTypeError: an object gpusaver cannot see as an array.
        BackendUnavailableError: device memory without a usable GPU.
    """
    if isinstance(value, np.ndarray):
        return Adapted(value, "numpy")
    module = framework_of(value)
    if module == "cupy":
        return Adapted(value, "cupy")
    if module == "torch" and _is_torch_tensor(value):
        return _from_torch(value, name)
    if module in ("jax", "jaxlib"):
        return _from_jax(value, name)
    if isinstance(value, (bool, int, float, complex, np.generic)):
        if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 64:
            raise UnsupportedDTypeError(f"variable {name!r} is the integer {value}, beyond 64 bits")
        arr = np.asarray(value)
        if arr.dtype.kind in "SU":
            arr = arr.astype(object)
        arr.flags.writeable = False
        return Adapted(arr, "scalar", immutable="a scalar is a value, not memory: load it with gpusaver.load")
    if isinstance(value, (str, bytes)):
        arr = np.array(value.encode() if isinstance(value, str) else value, dtype=object)
        arr.flags.writeable = False
        return Adapted(arr, "scalar", immutable="a string is a value, not memory: load it with gpusaver.load")
    if hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__"):
        device_type, device_id = value.__dlpack_device__()
        if int(device_type) in (1, 3):  # kDLCPU, kDLCUDAHost
            return Adapted(np.from_dlpack(value), "other")
        if int(device_type) in (2, 13):  # kDLCUDA, kDLCUDAManaged
            return Adapted(_cupy().from_dlpack(value), "other", f"/gpu:{int(device_id)}")
    if hasattr(value, "__cuda_array_interface__"):
        arr = _cupy().asarray(value)
        return Adapted(arr, "other", f"/gpu:{arr.device.id}")
    if hasattr(value, "__array_interface__"):
        return Adapted(np.asarray(value), "other")
    raise UnsupportedDTypeError(
        f"variable {name!r} is a {type(value).__module__}.{type(value).__qualname__}; gpusaver saves NumPy, "
        "CuPy, torch and JAX arrays, scalars, and objects with __dlpack__, __cuda_array_interface__ or "
        "__array_interface__"
    )


@contextlib.contextmanager
def ordered_with_framework(values: list[Any], *, writes: bool = False) -> Iterator[None]:
    """Orders a save or restore of torch tensors with torch.

    Before: work already queued on each device's current torch stream (which may
    still be writing CUDA tensors) completes. After a restore (``writes``): the
    device has finished the restore's copies before torch queues more work on
    the tensors, and every restored tensor's version counter is bumped, as an
    in-place operation does, so autograd refuses a backward pass through values
    the restore overwrote instead of computing wrong gradients.
    """
    tensors: list[Any] = []
    devices: set[int] = set()
    if "torch" in sys.modules:
        import torch

        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        devices = {t.device.index or 0 for t in tensors if t.device.type == "cuda"}
        for d in devices:
            torch.cuda.current_stream(d).synchronize()
    try:
        yield
    finally:
        if devices:
            cp = _cupy()
            for d in devices:
                cp.cuda.Device(d).synchronize()
        if writes and tensors:
            import torch

            for t in tensors:
                torch.autograd.graph.increment_version(t)
