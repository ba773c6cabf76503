"""A hypothesis state machine over the Saver's checkpoint management.

One directory ``ck`` (with a symlink ``link`` to it) under a temporary root
whose name may hold a space or glob characters (``[1]``); the test ``chdir``s
into the root for each example and back afterwards. Rules, in any order:

* ``save``: new values, then ``save(<ck spelled some way>/model, global_step)``.
  The directory is spelled relative (``ck``), absolute, ``./ck``, ``ck/../ck``,
  through the symlink (relative or absolute), or as ``file://`` + absolute path.
  Steps repeat, and ``resave`` saves a step saved before, so one checkpoint is
  saved again under another spelling.
* ``restart``: a new Saver (``max_to_keep`` 1..3 or None, sharded or not) that
  adopts ``get_checkpoint_state(<ck spelled some way>).all_model_checkpoint_paths``
  with ``recover_last_checkpoints``.
* ``set_last``: ``set_last_checkpoints`` with existing checkpoints, spelled any way.
* ``restore_latest`` / ``restore_returned`` / ``restore_any``: restore in place
  from ``latest_checkpoint(<ck spelled some way>)``, from a prefix ``save``
  returned, or from a checkpoint spelled any way.

The model follows ``tf.compat.v1.train.Saver`` with one change the spec asks
for: checkpoints are compared by identity (the resolved path, ``file://``
stripped), never by string. So: with ``max_to_keep`` set, a save removes every
entry of the same checkpoint from the kept list, appends it, and when the list
is longer than ``max_to_keep`` drops its oldest entry and deletes that
checkpoint (unless it is still in the list); with ``max_to_keep`` None nothing
is recorded or deleted and the state file lists the adopted ones plus the
newest (unless the last one listed is the newest already).
``recover_last_checkpoints`` adopts the listed checkpoints that exist, dated by
their files. ``set_last_checkpoints`` dates its entries at +inf, as
TensorFlow does, so retention drops them from the list but never deletes their
files. Checkpoints no saver lists are never deleted.

Six machines draw from narrower or wider sets of roots and spellings, so that
each kind of defect shows in a machine of its own (``MACHINES``); each runs on
both host paths.

Checked right after each save: the returned prefix is ``<save_path>-<step>``,
exists, and restores bit-exactly to the values just saved (retention never
deletes the checkpoint just written). Checked after every step:

* the checkpoints on disk are exactly the model's (so their number is what
  TensorFlow's Saver would keep), and each reads back bit-exactly the values of
  its newest save;
* ``saver.last_checkpoints`` names the model's kept list (by identity);
* the state file, read through ``get_checkpoint_state``, names the newest save
  as ``model_checkpoint_path`` and the model's list as
  ``all_model_checkpoint_paths``, each path as read back resolving to that
  checkpoint. A restart adopts what the state file lists, so a path that
  resolves elsewhere (a cwd-relative spelling stored verbatim in the state file
  of an absolute directory, a ``file://`` URI joined to the directory as if it
  were relative) or a second entry for one checkpoint changes what the next
  Saver keeps and deletes. TensorFlow 2.21 writes such state files too (it
  compares strings); the spec asks for identities, so this test does not;
* ``latest_checkpoint`` names the newest save;
* no ``_temp_`` directory and no ``.tempstate`` or ``.tmp`` file is left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import gpusaver as gs

pytestmark = pytest.mark.usefixtures("host_path")

ROOT_NAMES = ["plain", "with space", "run[1]", "a*b?"]
SPELLINGS = ["rel", "abs", "dot", "dotdot", "link", "abslink", "file"]
MAX_TO_KEEP = st.sampled_from([1, 2, 3, None])
STEPS = st.integers(0, 5)

SETTINGS = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _values(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    strings = np.empty(3, dtype=object)
    strings[:] = [rng.bytes(int(n)) for n in rng.integers(0, 9, 3)]
    return {
        "dense/w": rng.standard_normal((3, 4)).astype(np.float32),
        "dense/b": rng.integers(-(2**40), 2**40, 5),
        "step": np.array(seed, np.int32),
        "names": strings,
    }


def _same(actual: np.ndarray, expected: np.ndarray) -> bool:
    actual = np.asarray(actual)
    if expected.dtype == object:
        return actual.shape == expected.shape and actual.tolist() == expected.tolist()
    return actual.dtype == expected.dtype and actual.shape == expected.shape and actual.tobytes() == expected.tobytes()


def machine(name: str, roots: list[str], spellings: list[str]) -> type[RuleBasedStateMachine]:
    """The state machine over checkpoint roots named ``roots`` and directory spellings ``spellings``."""
    spelled = st.sampled_from(spellings)

    class SaverMachine(RuleBasedStateMachine):
        """Saves, restarts and restores against a model of TensorFlow's Saver, by identity."""

        def __init__(self) -> None:
            super().__init__()
            self.old_cwd = os.getcwd()
            self.base: str | None = None

        # ----------------------------------------------------------------- set-up
        @initialize(
            root_name=st.sampled_from(roots),
            n_devices=st.integers(1, 3),
            max_to_keep=MAX_TO_KEEP,
            sharded=st.booleans(),
            durable=st.booleans(),
        )
        def setup(self, root_name: str, n_devices: int, max_to_keep: int | None, sharded: bool, durable: bool) -> None:
            self.base = tempfile.mkdtemp(prefix="gpusaver-sm-")
            self.root = os.path.join(os.path.realpath(self.base), root_name)
            os.mkdir(self.root)
            os.mkdir(os.path.join(self.root, "ck"))
            os.symlink("ck", os.path.join(self.root, "link"))
            os.chdir(self.root)
            self.arrays = _values(0)
            self.devices = {name: f"/cpu:{i % n_devices}" for i, name in enumerate(self.arrays)}
            self.counter = 0
            # The model: step -> values of its newest save, for the checkpoints on disk.
            self.disk: dict[int, dict[str, np.ndarray]] = {}
            # The saver's kept list, oldest first: (step, pinned). TensorFlow dates the entries of
            # set_last_checkpoints at +inf, so retention drops them from the list but keeps their files.
            self.kept: list[tuple[int, bool]] = []
            self.state: list[int] | None = None  # the state file's all_model_checkpoint_paths
            self.latest: int | None = None
            self.returned: list[tuple[str, int]] = []
            self._new_saver(max_to_keep, sharded, durable)

        def teardown(self) -> None:
            os.chdir(self.old_cwd)
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)

        def _new_saver(self, max_to_keep: int | None, sharded: bool, durable: bool) -> None:
            self.max_to_keep = max_to_keep
            self.saver = gs.Saver(
                [gs.Variable(arr, name=name, device=self.devices[name]) for name, arr in self.arrays.items()],
                max_to_keep=max_to_keep,
                sharded=sharded,
                durable=durable,
            )

        # ---------------------------------------------------------------- helpers
        @property
        def kept_steps(self) -> list[int]:
            return [s for s, _ in self.kept]

        def spell(self, kind: str) -> str:
            """The checkpoint directory, spelled one way."""
            absolute = os.path.join(self.root, "ck")
            return {
                "rel": "ck",
                "abs": absolute,
                "dot": "./ck",
                "dotdot": "ck/../ck",
                "link": "link",
                "abslink": os.path.join(self.root, "link"),
                "file": "file://" + absolute,
            }[kind]

        def identity(self, path: str) -> str:
            path = os.fspath(path)
            if path.startswith("file://"):
                path = path[len("file://") :]
            return os.path.realpath(os.path.join(self.root, path))

        def step_identity(self, step: int) -> str:
            return os.path.realpath(os.path.join(self.root, "ck", f"model-{step}"))

        def step_of(self, path: str) -> int | str:
            """The step of the model's checkpoint that ``path`` names (the path itself if none)."""
            ident = self.identity(path)
            for step in range(0, 6):
                if ident == self.step_identity(step):
                    return step
            return path

        def scramble(self) -> None:
            for arr in self.arrays.values():
                if arr.dtype == object:
                    arr[...] = b"?"
                else:
                    flipped = np.invert(np.require(arr, requirements="C").reshape(-1).view(np.uint8))
                    arr[...] = flipped.view(arr.dtype).reshape(arr.shape)

        def check_restored(self, expected: dict[str, np.ndarray], what: str) -> None:
            for name, arr in self.arrays.items():
                assert self.saver.variables[name] is arr
                assert _same(arr, expected[name]), f"{what}: {name!r} did not restore bit-exactly"

        def check_reads(self, prefix: str, expected: dict[str, np.ndarray], what: str) -> None:
            reader = gs.load_checkpoint(prefix)
            for name, value in expected.items():
                assert _same(reader.get_tensor(name), value), f"{what}: {name!r} reads back wrong"

        # ------------------------------------------------------------------ rules
        @rule(step=STEPS, spelling=spelled)
        def save(self, step: int, spelling: str) -> None:
            self._save(step, spelling)

        @precondition(lambda self: self.returned)
        @rule(data=st.data(), spelling=spelled)
        def resave(self, data: Any, spelling: str) -> None:
            """Saves a step saved before, maybe under another spelling of the same checkpoint."""
            self._save(data.draw(st.sampled_from(self.returned))[1], spelling)

        def _save(self, step: int, spelling: str) -> None:
            self.counter += 1
            for name, value in _values(self.counter).items():
                self.arrays[name][...] = value
            snapshot = {name: arr.copy() for name, arr in self.arrays.items()}
            save_path = self.spell(spelling) + "/model"
            prefix = self.saver.save(save_path, global_step=step)
            assert prefix == f"{save_path}-{step}"
            self.returned.append((prefix, step))
            # The model (TensorFlow's Saver, comparing identities).
            self.disk[step] = snapshot
            self.latest = step
            if self.max_to_keep:
                self.kept = [k for k in self.kept if k[0] != step] + [(step, False)]
                if len(self.kept) > self.max_to_keep:
                    dropped, pinned = self.kept.pop(0)
                    if not pinned and dropped not in self.kept_steps:
                        self.disk.pop(dropped, None)
                self.state = list(self.kept_steps)
            else:
                kept = self.kept_steps
                self.state = kept + ([step] if not kept or kept[-1] != step else [])
            # The checkpoint just written survives retention and holds what was saved.
            assert gs.checkpoint_exists(prefix), f"save() returned {prefix!r}, which does not exist"
            self.check_reads(prefix, snapshot, f"the checkpoint {prefix!r} save() returned")
            self.scramble()
            self.saver.restore(prefix)
            self.check_restored(snapshot, f"restore({prefix!r}) right after saving it")

        @rule(max_to_keep=MAX_TO_KEEP, sharded=st.booleans(), durable=st.booleans(), spelling=spelled)
        def restart(self, max_to_keep: int | None, sharded: bool, durable: bool, spelling: str) -> None:
            state = gs.get_checkpoint_state(self.spell(spelling))
            assert (state is None) == (self.state is None), f"get_checkpoint_state({self.spell(spelling)!r}) is {state}"
            self._new_saver(max_to_keep, sharded, durable)
            if state is not None:
                self.saver.recover_last_checkpoints(list(state.all_model_checkpoint_paths))
            self.kept = [(s, False) for s in (self.state or []) if s in self.disk]

        @precondition(lambda self: self.disk)
        @rule(data=st.data())
        def set_last(self, data: Any) -> None:
            steps = data.draw(st.permutations(sorted(self.disk)))
            steps = steps[: data.draw(st.integers(0, len(steps)))]
            paths = [self.spell(data.draw(spelled)) + f"/model-{s}" for s in steps]
            self.saver.set_last_checkpoints(paths)
            self.kept = [(s, True) for s in steps]

        @precondition(lambda self: self.latest is not None)
        @rule(spelling=spelled)
        def restore_latest(self, spelling: str) -> None:
            assert self.latest is not None
            prefix = gs.latest_checkpoint(self.spell(spelling))
            assert prefix is not None, f"latest_checkpoint({self.spell(spelling)!r}) is None"
            assert self.step_of(prefix) == self.latest, f"latest_checkpoint is {prefix!r}, not step {self.latest}"
            self.scramble()
            self.saver.restore(prefix)
            self.check_restored(self.disk[self.latest], f"restore(latest_checkpoint({self.spell(spelling)!r}))")

        @precondition(lambda self: self.returned)
        @rule(data=st.data())
        def restore_returned(self, data: Any) -> None:
            prefix, step = data.draw(st.sampled_from(self.returned))
            if step in self.disk:
                self.scramble()
                self.saver.restore(prefix)
                self.check_restored(self.disk[step], f"restore({prefix!r})")
            else:
                with pytest.raises(ValueError):
                    self.saver.restore(prefix)

        @precondition(lambda self: self.disk)
        @rule(data=st.data(), spelling=spelled)
        def restore_any(self, data: Any, spelling: str) -> None:
            step = data.draw(st.sampled_from(sorted(self.disk)))
            prefix = self.spell(spelling) + f"/model-{step}"
            self.scramble()
            self.saver.restore(prefix)
            self.check_restored(self.disk[step], f"restore({prefix!r})")

        # ------------------------------------------------------------- invariants
        @invariant()
        def checkpoints_on_disk(self) -> None:
            if self.base is None:
                return
            ck = os.path.join(self.root, "ck")
            names = os.listdir(ck)
            on_disk = sorted(int(n[len("model-") : -len(".index")]) for n in names if n.endswith(".index"))
            assert on_disk == sorted(self.disk), f"checkpoints on disk {on_disk}, expected {sorted(self.disk)}"
            for step, values in self.disk.items():
                self.check_reads(os.path.join(ck, f"model-{step}"), values, f"checkpoint model-{step}")
            debris = [
                os.path.join(d, n)
                for d, dirs, files in os.walk(self.root)
                for n in dirs + files
                if "_temp_" in n or ".tempstate" in n or ".tmp" in n
            ]
            assert not debris, f"temporary files left: {debris}"
            stray = [n for n in names if n != "checkpoint" and not n.startswith("model-")]
            assert not stray, f"unexpected files in the checkpoint directory: {stray}"

        @invariant()
        def kept_list(self) -> None:
            if self.base is None:
                return
            got = [self.step_of(p) for p in self.saver.last_checkpoints]
            assert got == self.kept_steps, (
                f"last_checkpoints {self.saver.last_checkpoints} name {got}, expected {self.kept_steps}"
            )

        @invariant()
        def state_file(self) -> None:
            if self.base is None or self.state is None:
                return
            state = gs.get_checkpoint_state("ck")
            assert state is not None
            assert self.step_of(state.model_checkpoint_path) == self.latest, (
                f"the state file names {state.model_checkpoint_path!r} as newest, not step {self.latest}"
            )
            listed = [self.step_of(p) for p in state.all_model_checkpoint_paths]
            assert listed == self.state, (
                f"the state file lists {list(state.all_model_checkpoint_paths)}, i.e. {listed}; "
                f"expected steps {self.state}"
            )
            latest = gs.latest_checkpoint("ck")
            assert latest is not None and self.step_of(latest) == self.latest, f"latest_checkpoint('ck') is {latest!r}"



    SaverMachine.__name__ = SaverMachine.__qualname__ = name
    return SaverMachine


#: Which roots and spellings each machine draws from: narrow ones isolate one kind of defect.
MACHINES = {
    # One spelling, a plain root: TensorFlow's retention semantics alone.
    "one_spelling": (["plain"], ["rel"]),
    # Relative spellings only: the state file stores them relative to the directory.
    "relative_spellings": (["plain"], ["rel", "dot", "dotdot", "link"]),
    # Absolute spellings only, direct or through the symlink.
    "absolute_spellings": (["plain"], ["abs", "abslink"]),
    # file:// URIs beside the plain absolute path.
    "file_uri": (["plain"], ["abs", "file"]),
    # A root whose name holds glob characters and a space, spelled absolutely.
    "glob_characters": (["run[1]", "with space", "a*b?"], ["abs", "rel"]),
    # Everything at once.
    "everything": (ROOT_NAMES, SPELLINGS),
}


@pytest.mark.parametrize("kind", list(MACHINES))
def test_saver_state_machine(kind: str) -> None:
    roots, spellings = MACHINES[kind]
    examples = 30 if kind == "everything" else 20
    run_state_machine_as_test(machine(kind, roots, spellings), settings=settings(SETTINGS, max_examples=examples))
