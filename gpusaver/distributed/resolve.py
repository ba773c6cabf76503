"""``resolve_coordinator``: what a Saver's ``coordinator=`` argument means."""

from __future__ import annotations

from typing import Any

from gpusaver.distributed.protocol import Coordinator, SingleProcessCoordinator, check_coordinator
from gpusaver.errors import InvalidArgumentError

__all__ = ["resolve_coordinator"]


def resolve_coordinator(coordinator: Any = None, *, group: Any = None, comm: Any = None) -> Coordinator:
    """The :class:`Coordinator` that ``coordinator`` names.

    Args:
        coordinator: ``None`` (one process: rank 0 of 1); ``"torch"``: the initialised
            ``torch.distributed`` process group (``group=`` picks another than the world);
            ``"mpi"``: mpi4py (``comm=``, ``MPI.COMM_WORLD`` by default); or any object
            implementing :class:`Coordinator`, returned as it is.
        group: a ``torch.distributed`` process group, with ``"torch"`` only.
        comm: an mpi4py communicator, with ``"mpi"`` only.

    ``"torch"`` and ``"mpi"`` are collective: every rank resolves them together.

    Raises:
        InvalidArgumentError: an unknown name, or ``group``/``comm`` with the wrong engine.
        InvalidArgumentTypeError: an object that does not implement :class:`Coordinator`
            (the message names what is missing).
        BackendUnavailableError: the engine's package is not installed.
        CoordinatorError: the engine is not initialised, or did not answer in time.
    """
    if group is not None and coordinator != "torch":
        raise InvalidArgumentError(f"group= goes with coordinator='torch', not with coordinator={coordinator!r}")
    if comm is not None and coordinator != "mpi":
        raise InvalidArgumentError(f"comm= goes with coordinator='mpi', not with coordinator={coordinator!r}")
    if coordinator is None:
        return SingleProcessCoordinator()
    if isinstance(coordinator, str):
        if coordinator == "torch":
            from gpusaver.distributed.torch_coordinator import TorchCoordinator

            return TorchCoordinator(group)
        if coordinator == "mpi":
            from gpusaver.distributed.mpi_coordinator import MPICoordinator

            return MPICoordinator(comm)
        raise InvalidArgumentError(
            f"unknown coordinator {coordinator!r}: None, 'torch', 'mpi', or an object implementing "
            "gpusaver.distributed.Coordinator (rank, size, all_gather_bytes, broadcast_bytes, barrier)"
        )
    return check_coordinator(coordinator)
