"""TensorFlow's V2 checkpoint ("tensor bundle") format, read and written byte-compatibly.

This layer encodes bytes: tables, entries, the header, slices, strings and crc32c; it
knows NumPy only through a dtype map, and leaves moving bytes to and from files to
:mod:`gpusaver.storage`. The messages are TensorFlow's, in ``protos/`` (``tensor_bundle.proto``
and the files it imports); the layout of tables and blocks is described in ``table.py``.
"""

from gpusaver.format.entry import BundleEntry, BundleHeader
from gpusaver.format.merge import merge_bundles
from gpusaver.format.naming import data_filename, index_filename
from gpusaver.format.reader import BundleReader
from gpusaver.format.writer import BundleWriter

__all__ = [
    "BundleEntry",
    "BundleHeader",
    "BundleReader",
    "BundleWriter",
    "data_filename",
    "index_filename",
    "merge_bundles",
]
