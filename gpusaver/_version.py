"""The single source of gpusaver's version."""

__version__ = "0.1.0"
