"""gpusaver: a GPU-aware, device-sharded checkpoint saver (TensorFlow V2 format)."""

from gpusaver._version import __version__

__all__ = ["__version__"]
