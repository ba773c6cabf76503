"""TensorFlow's V2 checkpoint ("tensor bundle") format, read and written byte-compatibly.

This layer knows bytes on disk and crc32c; it knows NumPy only through a dtype
map. See ``shared/docs/tf_bundle_format.md`` for the format itself.
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
