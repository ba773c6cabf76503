"""File names of a checkpoint: ``<prefix>.index`` and ``<prefix>.data-SSSSS-of-NNNNN``."""

from __future__ import annotations

import glob
import re

__all__ = ["index_filename", "data_filename", "data_file_glob", "DATA_SUFFIX_RE"]

#: Matches the suffix of a data file name; ``%05d`` is a minimum width.
DATA_SUFFIX_RE = re.compile(r"\.data-(\d{5,})-of-(\d{5,})$")


def index_filename(prefix: str) -> str:
    """Returns the index (metadata) file of the checkpoint ``prefix``."""
    return prefix + ".index"


def data_filename(prefix: str, shard_id: int, num_shards: int) -> str:
    """Returns data file ``shard_id`` of ``num_shards`` of the checkpoint ``prefix``."""
    return "%s.data-%05d-of-%05d" % (prefix, shard_id, num_shards)


def data_file_glob(prefix: str) -> str:
    """A glob pattern for every data file of ``prefix`` (special characters escaped)."""
    return glob.escape(prefix) + ".data-?????-of-?????"
