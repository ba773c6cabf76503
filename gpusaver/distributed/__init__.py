"""Several processes saving one checkpoint: the coordinator layer.

A :class:`Coordinator` moves bytes between the ranks of a job (all-gather, broadcast,
barrier); it knows nothing of files or arrays. :func:`resolve_coordinator` turns a
Saver's ``coordinator=`` argument into one: ``None`` (one process), ``"torch"``
(:class:`TorchCoordinator`), ``"mpi"`` (:class:`MPICoordinator`) or any object that
implements the protocol. The helpers in :mod:`~gpusaver.distributed.agreement` build what a
save needs on top: every rank's outcome agreed (:func:`agree`), the committing rank's
result shared (:func:`broadcast_result`), one temporary id (:func:`shared_token`), the
same arguments everywhere (:func:`check_same`).

torch and mpi4py are imported only when a coordinator of theirs is made.
"""

from __future__ import annotations

from gpusaver.distributed.agreement import agree, broadcast_result, check_same, shared_token
from gpusaver.distributed.mpi_coordinator import MPICoordinator
from gpusaver.distributed.protocol import Coordinator, SingleProcessCoordinator, check_coordinator
from gpusaver.distributed.resolve import resolve_coordinator
from gpusaver.distributed.torch_coordinator import TorchCoordinator

__all__ = [
    "Coordinator",
    "SingleProcessCoordinator",
    "TorchCoordinator",
    "MPICoordinator",
    "resolve_coordinator",
    "check_coordinator",
    "agree",
    "broadcast_result",
    "shared_token",
    "check_same",
]
