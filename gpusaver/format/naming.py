"""File names of a checkpoint: ``<prefix>.index`` and ``<prefix>.data-SSSSS-of-NNNNN``."""

from __future__ import annotations

import os
import re

__all__ = ["index_filename", "data_filename", "data_files", "DATA_SUFFIX_RE"]

#: Matches the suffix of a data file name; ``%05d`` is a minimum width.
DATA_SUFFIX_RE = re.compile(r"\.data-(\d{5,})-of-(\d{5,})$")


def index_filename(prefix: str) -> str:
    """Returns the index (metadata) file of the checkpoint ``prefix``."""
    return prefix + ".index"


def data_filename(prefix: str, shard_id: int, num_shards: int) -> str:
    """Returns data file ``shard_id`` of ``num_shards`` of the checkpoint ``prefix``."""
    return "%s.data-%05d-of-%05d" % (prefix, shard_id, num_shards)


_FIVE_BY_FIVE = re.compile(r"\.data-[^/]{5}-of-[^/]{5}")


def data_files(prefix: str) -> list[str]:
    """Every file ``<prefix>.data-?????-of-?????`` that exists, sorted (the prefix taken literally).

    The directory is listed rather than globbed: a glob pattern made of each
    checkpoint's own name would be compiled and cached anew by every save.
    """
    directory, base = os.path.split(prefix)
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    start = len(base)
    return sorted(
        os.path.join(directory, name)
        for name in names
        if name.startswith(base) and _FIVE_BY_FIVE.fullmatch(name, start) is not None
    )
