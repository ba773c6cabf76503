"""A :class:`~gpusaver.distributed.Coordinator` over ``torch.distributed`` (imported lazily).

By default the coordinator makes its own gloo process group over the ranks of the given
group, with ``coordinator_timeout`` as the group's timeout:

* the bytes stay on the host even when the training job's group is NCCL, and NCCL's
  watchdog (which ends the process on a timeout) never sees gpusaver's collectives;
* a collective that waits for a rank that hangs raises after the timeout, and gloo's own
  operation ends then too, so the process can exit (gloo keeps an unfinished operation,
  and the interpreter's exit with it, until the group's timeout);
* gpusaver's collectives never interleave with the training job's own on its group.

When a peer process dies, gloo's connections to it close and the collectives of the
survivors raise at once (not after the timeout). ``own_group=False`` uses the given
group itself; with NCCL the bytes then travel as CUDA tensors on the current device,
and NCCL's own watchdog may end the process before the timeout here.
"""

from __future__ import annotations

import datetime
import inspect
from typing import Any

import numpy as np

from gpusaver.distributed._engine import EngineCoordinator, resolve_timeout
from gpusaver.errors import BackendUnavailableError, CoordinatorError, InvalidArgumentError

__all__ = ["TorchCoordinator"]


def _import_dist() -> tuple[Any, Any]:
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        raise BackendUnavailableError(
            f"coordinator='torch' needs PyTorch (pip install 'gpusaver[torch]'): {e}") from None
    if not dist.is_available():
        raise BackendUnavailableError("coordinator='torch': this PyTorch build has no torch.distributed")
    return torch, dist


def _device(torch: Any, dist: Any, group: Any) -> Any:
    """Where ``group``'s collectives take tensors: the host, or the current CUDA device for NCCL."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TorchCoordinator(EngineCoordinator):
    """``torch.distributed`` as gpusaver's coordinator.

    Making one is collective: every rank of ``group`` makes it (as every rank builds its
    Saver), since it creates a process group.

    Args:
        group: the process group whose ranks save together (default: the whole world).
            ``rank`` and ``size`` are this process's rank in it and its size.
        own_group: make a gloo group with ``timeout`` over the same ranks (default), or
            use ``group`` itself (its own timeout then applies too).
        timeout: seconds each step of a collective waits for the other ranks (default:
            ``config.get("coordinator_timeout")`` now).

    Raises:
        BackendUnavailableError: PyTorch or torch.distributed is missing.
        CoordinatorError: torch.distributed is not initialised (call
            ``torch.distributed.init_process_group`` first; torchrun sets its environment).
        InvalidArgumentError: this process is not a member of ``group``.
    """

    def __init__(self, group: Any = None, *, own_group: bool = True, timeout: float | None = None) -> None:
        torch, dist = _import_dist()
        if not dist.is_initialized():
            raise CoordinatorError(
                "coordinator='torch' needs an initialised torch.distributed: call "
                "torch.distributed.init_process_group() first (under torchrun, with no arguments)")
        seconds = resolve_timeout(timeout)
        base = group if group is not None else dist.group.WORLD
        rank = dist.get_rank(base)
        if rank < 0:
            raise InvalidArgumentError("coordinator='torch': this process is not a member of the given group")
        size = dist.get_world_size(base)
        self._torch = torch
        self._dist = dist
        if own_group and dist.is_gloo_available():
            members = dist.get_process_group_ranks(base)
            self._pg = self._new_group(members, seconds)
            if dist.get_rank(self._pg) != rank:  # pragma: no cover - the order of the members is kept
                raise CoordinatorError(f"coordinator='torch': rank {rank} became {dist.get_rank(self._pg)}")
            self._device = torch.device("cpu")
            engine = f"torch.distributed (gloo, rank {dist.get_rank()} of the world)"
        else:
            self._pg = base
            self._device = _device(torch, dist, base)
            engine = f"torch.distributed ({dist.get_backend(base)}, rank {dist.get_rank()} of the world)"
        self._roots = [dist.get_global_rank(self._pg, k) for k in range(size)]
        super().__init__(rank, size, engine, seconds)

    def _new_group(self, members: list[int], seconds: float) -> Any:
        kwargs: dict[str, Any] = {
            "ranks": members,
            "timeout": datetime.timedelta(seconds=seconds),
            "backend": "gloo",
            "use_local_synchronization": True,  # only the members make it (group= may be a subgroup)
        }
        if "sort_ranks" in inspect.signature(self._dist.new_group).parameters:
            kwargs["sort_ranks"] = False  # keep the given group's order of ranks (newer torch)
        return self._dist.new_group(**kwargs)

    # -- primitives ------------------------------------------------------------------------------

    def _wait(self, work: Any) -> None:
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                raise self._timed_out(str(e).strip()) from e
            raise

    def _engine_error(self, error: Exception) -> bool:
        return isinstance(error, RuntimeError)  # torch.distributed.DistError and gloo's errors

    def _to_device(self, array: np.ndarray) -> Any:
        return self._torch.from_numpy(array).to(self._device)

    @staticmethod
    def _host(tensor: Any) -> np.ndarray:
        return tensor.cpu().numpy()

    def _gather_ints(self, values: np.ndarray) -> np.ndarray:
        mine = self._to_device(values)
        out = [self._torch.empty_like(mine) for _ in range(self._size)]
        self._wait(self._dist.all_gather(out, mine, group=self._pg, async_op=True))
        return np.stack([self._host(t) for t in out])

    def _gather_payload(self, data: memoryview, lengths: list[int]) -> list[bytes]:
        # all_gather wants equal sizes: each rank's bytes padded to the longest
        top = max(lengths)
        padded = np.empty(top, dtype=np.uint8)
        padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        mine = self._to_device(padded)
        out = [self._torch.empty_like(mine) for _ in range(self._size)]
        self._wait(self._dist.all_gather(out, mine, group=self._pg, async_op=True))
        return [self._host(t[:n]).tobytes() for t, n in zip(out, lengths)]

    def _broadcast_ints(self, values: np.ndarray, root: int) -> np.ndarray:
        tensor = self._to_device(values)
        self._wait(self._dist.broadcast(tensor, src=self._roots[root], group=self._pg, async_op=True))
        return self._host(tensor)

    def _broadcast_payload(self, data: memoryview | None, length: int, root: int) -> bytes:
        if data is not None:
            tensor = self._to_device(np.frombuffer(data, dtype=np.uint8).copy())
        else:
            tensor = self._torch.empty(length, dtype=self._torch.uint8, device=self._device)
        self._wait(self._dist.broadcast(tensor, src=self._roots[root], group=self._pg, async_op=True))
        return self._host(tensor).tobytes()
