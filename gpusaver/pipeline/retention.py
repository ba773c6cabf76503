"""Which checkpoints a Saver keeps, and the recording of a save in the state file.

TensorFlow's rules: the newest ``max_to_keep`` checkpoints are kept, plus one
every ``keep_checkpoint_every_n_hours``; each save drops at most one old
checkpoint; checkpoints given by ``set_last_checkpoints`` are stamped +inf and
never deleted. What gpusaver adds, so that retention can never delete what it
should keep:

* checkpoints are compared by identity (:func:`gpusaver.storage.paths.checkpoint_identity`),
  so one checkpoint spelled two ways is one checkpoint;
* the checkpoint a save has just committed is never deleted;
* only checkpoints in the state file's own directory are deleted; others are
  logged and kept;
* a dropped checkpoint gets a tombstone (a locked temp directory) before the
  state file stops listing it, so a crash in between is finished by a later
  save, and the deletion itself takes the prefix literally (never a glob).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from gpusaver import checkpoint_management as cm
from gpusaver.storage import paths
from gpusaver.errors import CheckpointWriteError, write_error
from gpusaver.storage.fileops import FileOps
from gpusaver.pipeline.tempdirs import TempDir, make_temp_dir

__all__ = ["Retention"]

logger = logging.getLogger(__name__)


class Retention:
    """A Saver's list of kept checkpoints and its deletion rule.

    Args:
        max_to_keep: how many recent checkpoints to keep; 0 keeps all (and records nothing).
        keep_hours: additionally keep one checkpoint per this many hours.
    """

    def __init__(self, max_to_keep: int, keep_hours: float) -> None:
        self.max_to_keep = max_to_keep
        self.keep_hours = keep_hours
        self.kept: list[tuple[str, float]] = []  # (prefix as spelled, timestamp), oldest first
        self._dropped: list[tuple[str, float]] = []
        self._next_keep_time = time.time() + keep_hours * 3600

    @property
    def prefixes(self) -> list[str]:
        return [p for p, _ in self.kept]

    def _snapshot(self) -> tuple[list[tuple[str, float]], list[tuple[str, float]], float]:
        return list(self.kept), list(self._dropped), self._next_keep_time

    def _restore(self, snapshot: tuple[list[tuple[str, float]], list[tuple[str, float]], float]) -> None:
        self.kept, self._dropped, self._next_keep_time = snapshot

    def _add(self, prefix: str) -> None:
        if not self.max_to_keep:
            return
        mine = paths.checkpoint_identity(prefix)  # saved again, however spelled: moves to the end
        self.kept = [p for p in self.kept if paths.checkpoint_identity(p[0]) != mine]
        self.kept.append((prefix, time.time()))
        if len(self.kept) > self.max_to_keep:
            self._dropped.append(self.kept.pop(0))

    def _select(self, saved: str, directory: str) -> list[str]:
        """The checkpoints to delete now: dropped ones, but never the one just saved,
        one still kept under another spelling, or one outside ``directory``."""
        keep = {paths.checkpoint_identity(p) for p, _ in self.kept}
        keep.add(paths.checkpoint_identity(saved))
        home = paths.directory_identity(directory)
        doomed = []
        while self._dropped:
            path, stamp = self._dropped.pop(0)
            if stamp > self._next_keep_time:
                self._next_keep_time += self.keep_hours * 3600
                continue
            if paths.checkpoint_identity(path) in keep:
                continue
            if paths.directory_identity(os.path.dirname(paths.local_path(path))) != home:
                logger.warning(
                    "retention keeps checkpoint %s: it is outside the state file's directory %s", path, directory or "."
                )
                continue
            doomed.append(path)
        return doomed

    def record(
        self,
        prefix: str,
        write_state: Callable[[list[str]], None],
        *,
        directory: str,
        state_file: str,
        ops: FileOps,
    ) -> list[tuple[str, TempDir]]:
        """Adds the committed checkpoint ``prefix`` and writes the state file listing what is kept.

        The checkpoints to delete get their tombstones before the state file
        changes; they are returned, for :meth:`delete` once the state file is
        written. On any failure nothing changes: the kept list is as before and
        the tombstones are gone.

        Args:
            write_state: writes the state file, given the kept prefixes.
            directory: the state file's directory (local path).
            state_file: its name (noted in the tombstones).

        Raises:
            CheckpointWriteError: the state file could not be written.
        """
        before = self._snapshot()
        doomed: list[tuple[str, TempDir]] = []
        self._add(prefix)
        try:
            for path in self._select(prefix, directory):
                doomed.append((path, make_temp_dir(paths.local_path(path), ops, deleting=True, state_file=state_file)))
            kept = self.prefixes
            # TensorFlow appends the new path unless it is the last one listed; "is" means identity here,
            # so the same checkpoint under another spelling is not listed twice in a row.
            if kept and kept[-1] != prefix and paths.same_checkpoint(kept[-1], prefix):
                kept = kept[:-1] + [prefix]
            write_state(kept)
        except BaseException as e:
            for _, tombstone in doomed:  # nothing was dropped: no deletion to finish
                tombstone.remove(ops)
            self._restore(before)
            if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
                raise write_error(e.errno, f"recording checkpoint {prefix!r} failed: {e}", prefix) from e
            raise
        return doomed

    @staticmethod
    def delete(path: str, tombstone: TempDir, meta_graph_suffix: str | None, ops: FileOps) -> None:
        """Deletes a dropped checkpoint (literally: index, data files, meta file unless ``meta_graph_suffix``
        is None), then its tombstone.

        A failure is logged, not raised (the new checkpoint is committed and
        recorded, and TensorFlow carries on too); the tombstone then stays,
        unlocked, and the next save in that directory finishes the deletion.
        """
        try:
            cm.remove_checkpoint_literally(paths.local_path(path), meta_graph_suffix=meta_graph_suffix, fileops=ops)
        except OSError as e:
            logger.warning("could not delete old checkpoint %s (the next save finishes it): %s", path, e)
            tombstone.release()
            return
        except BaseException:
            tombstone.release()
            raise
        tombstone.remove(ops)
        ops.phase(f"retention:removed:{path}")
