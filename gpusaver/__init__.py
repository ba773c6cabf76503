"""gpusaver: a GPU-aware, device-sharded checkpoint saver in TensorFlow's V2 format.

One line each, as safetensors' ``save_file``/``load_file``, for a dict of NumPy,
CuPy, torch or JAX arrays::

    gs.save(model.state_dict(), "ckpt/model")
    gs.load("ckpt/model", like=model.state_dict())     # in place

The Saver follows ``tf.compat.v1.train.Saver``, made eager::

    import numpy as np, gpusaver as gs

    w = np.zeros((1024, 1024), np.float32)
    saver = gs.Saver({"dense/w": w}, max_to_keep=5)
    path = saver.save("ckpts/model", global_step=100)   # "ckpts/model-100"
    saver.restore(gs.latest_checkpoint("ckpts"))         # in place
    gs.load_checkpoint("ckpts").get_tensor("dense/w")    # verified against its crc32c
"""

from gpusaver._version import __version__
from gpusaver.api import LoadResult, load, load_into, save
from gpusaver.checkpoint_management import (
    checkpoint_exists,
    generate_checkpoint_state_proto,
    get_checkpoint_mtimes,
    get_checkpoint_state,
    latest_checkpoint,
    remove_checkpoint,
    update_checkpoint_state,
)
from gpusaver.checkpoint_manager import CheckpointManager
from gpusaver.checkpoint_reader import CheckpointReader, list_variables, load_checkpoint
from gpusaver.devices import DeviceSpec, canonical_device
from gpusaver.errors import (
    BackendUnavailableError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CheckpointWriteError,
    CoordinatorError,
    ChecksumError,
    CorruptCheckpointError,
    DTypeMismatchError,
    GpuSaverError,
    InsufficientDeviceMemoryError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    InvalidCheckpointPathError,
    SaveTimeoutError,
    SaverBusyError,
    ShapeMismatchError,
    StepAlreadyExistsError,
    StatePathConflictError,
    TensorNotFoundError,
    UnsupportedDTypeError,
    UnsupportedSchemeError,
    UnsupportedVersionError,
)
from gpusaver.pipeline.background import SaveHandle
from gpusaver.saver import PhaseCallbackWarning, RestoreResult, Saver
from gpusaver.variables import Variable

__all__ = [
    "__version__",
    "save",
    "load",
    "load_into",
    "LoadResult",
    "Saver",
    "CheckpointManager",
    "RestoreResult",
    "SaveHandle",
    "Variable",
    "CheckpointReader",
    "DeviceSpec",
    "canonical_device",
    "load_checkpoint",
    "list_variables",
    "latest_checkpoint",
    "get_checkpoint_state",
    "update_checkpoint_state",
    "generate_checkpoint_state_proto",
    "checkpoint_exists",
    "get_checkpoint_mtimes",
    "remove_checkpoint",
    "GpuSaverError",
    "CorruptCheckpointError",
    "ChecksumError",
    "UnsupportedVersionError",
    "UnsupportedDTypeError",
    "TensorNotFoundError",
    "CheckpointNotFoundError",
    "CoordinatorError",
    "SaveTimeoutError",
    "SaverBusyError",
    "StepAlreadyExistsError",
    "UnsupportedSchemeError",
    "PhaseCallbackWarning",
    "InvalidCheckpointPathError",
    "StatePathConflictError",
    "ShapeMismatchError",
    "DTypeMismatchError",
    "CheckpointWriteError",
    "CheckpointPermissionError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "BackendUnavailableError",
    "InsufficientDeviceMemoryError",
]
