"""An attacker's (or an unlucky user's) pass over every guarantee the README makes about paths.

Each test is a defect an independent review found, reproduced with the real
thing, not a model of it:

* one checkpoint spelled two ways (relative, absolute, ``./``, ``..``, through a
  symlinked directory, ``file://``): retention never deletes what a save has
  just written, nor a checkpoint it still keeps under another name;
* a process killed after recording a checkpoint saved through a symlink: a
  later save through the real directory keeps it;
* two processes in separate pid namespaces (``unshare --pid``, as containers
  sharing a volume), same host name, saving into one directory: neither
  cleans the other's live save;
* glob characters in real paths (``runs/layers=[1,2]``): every prefix ``save()``
  returns restores, is found by ``latest_checkpoint`` and ``load_checkpoint``,
  and ``remove_checkpoint`` of it never widens to another checkpoint;
* a real ``RLIMIT_FSIZE`` that fails the state-file write (EFBIG): the save
  raises and leaves nothing committed;
* FIFOs, ``/dev/zero`` and directories where checkpoint files belong: a typed
  error at once, never a hang;
* overlapping views of one buffer as two variables: refused, naming both;
* the untyped errors the review saw: each now a ``GpuSaverError`` and the
  built-in a caller would catch;
* a stale or hostile state file naming paths outside its directory: retention
  deletes nothing there.

Subprocesses get generous timeouts as hang guards only; nothing here depends on
how fast the machine is.
"""

from __future__ import annotations

import ast
import errno
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import gpusaver as gs
import relkit
from gpusaver.format import BundleWriter

SPECS = relkit.SPECS["small"]
#: Seconds before a subprocess or thread is declared hung: a guard, never a expectation of speed.
HANG_GUARD = 300.0
ROOT = Path(__file__).resolve().parents[2]


def _saver(step: int, **kwargs: Any) -> tuple[gs.Saver, dict[str, np.ndarray]]:
    arrays = relkit.zeros(SPECS)
    relkit.fill(arrays, SPECS, step)
    return relkit.make_saver(arrays, SPECS, **kwargs), arrays


def _data_files(prefix: str) -> list[str]:
    """The data files of a 4-shard checkpoint ``prefix`` (their names only)."""
    return [f"{os.path.basename(prefix)}.data-{k:05d}-of-00004" for k in range(4)]


def _run_python(code: str, *args: str, timeout: float = HANG_GUARD, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with the test tools importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "reliability"), str(ROOT)])}
    return subprocess.run(
        [*(prefix or []), sys.executable, "-c", textwrap.dedent(code), *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Waits until ``path`` exists; fails at once if ``proc`` exits first."""
    import time

    deadline = time.monotonic() + HANG_GUARD
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {path.name}: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, f"hung waiting for {path.name}"
        time.sleep(0.01)


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on a daemon thread; a hang fails the test instead of hanging the suite."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - returned to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_GUARD)
    assert not t.is_alive(), f"{fn} hung"
    if "error" in out:
        return out["error"]
    return out.get("value")


# ------------------------------------------------------- one checkpoint, many names
SPELLINGS: dict[str, Callable[[Path], str]] = {
    "absolute": lambda d: str(d.resolve() / "ck" / "model"),
    "dot": lambda d: "./ck/model",
    "dotdot": lambda d: "ck/../ck/model",
    "double slash": lambda d: "ck//model",
    "symlinked dir": lambda d: "link/model",
    "file uri": lambda d: "file://" + str(d.resolve() / "ck" / "model"),
}


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ck", target_is_directory=True)
    return tmp_path


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_resaving_one_step_spelled_another_way_keeps_it(in_tmp: Path, spelling: str) -> None:
    saver, arrays = _saver(5, max_to_keep=1)
    first = saver.save("ck/model", 5)
    relkit.fill(arrays, SPECS, 6)  # the second save holds other values: the survivor must be the second
    second = saver.save(SPELLINGS[spelling](in_tmp), 5)
    assert gs.checkpoint_exists(first) and gs.checkpoint_exists(second)
    latest = gs.latest_checkpoint("ck")
    assert latest is not None, "retention deleted the checkpoint it had just written"
    relkit.assert_restores(latest, SPECS, 6)
    relkit.assert_restores(second, SPECS, 6)
    assert sorted(os.listdir("ck")) == sorted(["checkpoint", "model-5.index", *_data_files("model-5")])


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_restart_idiom_with_another_spelling_keeps_the_adopted_checkpoints(in_tmp: Path, spelling: str) -> None:
    saver, arrays = _saver(1, max_to_keep=2)
    saver.save("ck/model", 1)
    saver.save("ck/model", 2)
    # A restarted trainer adopts what the state file lists, reading it through another spelling.
    restarted, arrays = _saver(2, max_to_keep=2)
    directory = os.path.dirname(SPELLINGS[spelling](in_tmp))
    restarted.recover_last_checkpoints(gs.get_checkpoint_state(directory).all_model_checkpoint_paths)
    returned = restarted.save("ck/model", 2)  # the same step again, as after a crash before step 3
    relkit.assert_restores(returned, SPECS, 2)
    relkit.assert_restores(gs.latest_checkpoint("ck"), SPECS, 2)
    relkit.assert_restores("ck/model-1", SPECS, 1)  # max_to_keep=2: steps 1 and 2 are kept
    relkit.fill(arrays, SPECS, 3)
    restarted.save("ck/model", 3)
    assert not gs.checkpoint_exists("ck/model-1")
    relkit.assert_restores("ck/model-2", SPECS, 2)
    relkit.assert_restores(gs.latest_checkpoint(directory), SPECS, 3)


def test_symlinked_save_killed_after_recording_is_kept_by_a_save_through_the_real_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    done = _run_python(
        """
        import sys, relkit
        arrays = relkit.zeros(relkit.SPECS["small"]); relkit.fill(arrays, relkit.SPECS["small"], 2)
        ops = relkit.CrashOps(sys.argv[1], "phase:state:written", "at")
        relkit.make_saver(arrays, relkit.SPECS["small"], fileops=ops).save(sys.argv[2], global_step=2)
        """,
        str(link), str(link / "model"),
    )
    assert done.returncode == relkit.CRASH_EXIT, done.stderr
    assert relkit.debris(str(real))["temp_dirs"], "the crash left no temp dir: the test tests nothing"
    saver, _ = _saver(7)
    saver.save(str(real / "other"), global_step=7)  # cleans the dead save's temp dir
    assert relkit.debris(str(real))["temp_dirs"] == []
    relkit.assert_restores(str(link / "model-2"), SPECS, 2)
    relkit.assert_restores(str(real / "model-2"), SPECS, 2)


# ------------------------------------------------------------------ pid namespaces
def _can_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare --pid refused: {probe.stderr.strip()}"


def test_saves_from_separate_pid_namespaces_never_clean_each_other(tmp_path: Path) -> None:
    why = _can_unshare()
    if why is not None and os.environ.get("CI"):
        pytest.fail(f"CI runs as root and must run this test: {why}")
    if why is not None:
        pytest.skip(why)
    directory = tmp_path / "shared"
    directory.mkdir()
    gate, ready = tmp_path / "gate", tmp_path / "ready"
    # A: its save stops after its shards are written, holding its temp dir, until the gate opens.
    held = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", textwrap.dedent(
            """
            import os, sys, time, relkit
            from gpusaver.storage.fileops import PosixFileOps
            directory, gate, ready = sys.argv[1:4]
            class Hold(PosixFileOps):
                def phase(self, name):
                    if name == "shard:written:0":
                        open(ready, "w").close()
                        while not os.path.exists(gate):
                            time.sleep(0.01)
            arrays = relkit.zeros(relkit.SPECS["small"]); relkit.fill(arrays, relkit.SPECS["small"], 3)
            saver = relkit.make_saver(arrays, relkit.SPECS["small"], fileops=Hold(), max_to_keep=2)
            print(os.getpid(), saver.save(os.path.join(directory, "a"), global_step=3, latest_filename="state_a"))
            """), str(directory), str(gate), str(ready)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "reliability"), str(ROOT)])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(ready, held)
        assert len(relkit.debris(str(directory))["temp_dirs"]) == 1
        # B: another pid namespace with its own /proc (A's pid, 1, is B itself there, with
        # another start time), same host name, same directory.
        for step in (1, 2, 3):
            other = _run_python(
                """
                import os, sys, relkit
                arrays = relkit.zeros(relkit.SPECS["small"]); relkit.fill(arrays, relkit.SPECS["small"], int(sys.argv[2]))
                saver = relkit.make_saver(arrays, relkit.SPECS["small"])
                print(os.getpid(), saver.save(os.path.join(sys.argv[1], "b"), global_step=int(sys.argv[2]),
                                              latest_filename="state_b"))
                """,
                str(directory), str(step), prefix=["unshare", "--pid", "--fork", "--mount-proc"],
            )
            assert other.returncode == 0, other.stderr
            assert other.stdout.split()[0] == "1", "B did not run in a pid namespace of its own"
        assert len(relkit.debris(str(directory))["temp_dirs"]) == 1, "B removed A's live temp dir"
    finally:
        gate.touch()
    out, err = held.communicate(timeout=HANG_GUARD)
    assert held.returncode == 0, err
    assert out.split()[0] == "1"
    relkit.assert_restores(str(directory / "a-3"), SPECS, 3)
    assert gs.latest_checkpoint(str(directory), "state_a") == str(directory / "a-3")
    relkit.assert_restores(gs.latest_checkpoint(str(directory), "state_b"), SPECS, 3)
    assert relkit.debris(str(directory))["temp_dirs"] == []


def test_a_dead_owner_is_cleaned_whatever_its_pid_says(tmp_path: Path) -> None:
    # The liveness of a temp dir is its lock: a save killed mid-way is cleaned by the next
    # save even when its recorded pid is alive (here: this very process's pid).
    directory = tmp_path / "ck"
    directory.mkdir()
    done = _run_python(
        """
        import sys, relkit
        arrays = relkit.zeros(relkit.SPECS["small"]); relkit.fill(arrays, relkit.SPECS["small"], 1)
        ops = relkit.CrashOps(sys.argv[1], "phase:shard:written:0", "at")
        relkit.make_saver(arrays, relkit.SPECS["small"], fileops=ops).save(sys.argv[1] + "/model", global_step=1)
        """,
        str(directory),
    )
    assert done.returncode == relkit.CRASH_EXIT, done.stderr
    [temp] = relkit.debris(str(directory))["temp_dirs"]
    owner = directory / temp / "OWNER"
    host, _pid, _start, *rest = owner.read_text().split()
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        start = f.read().rsplit(b")", 1)[1].split()[19].decode()
    # A live pid with its true start time, as a process in another pid namespace may show.
    owner.write_text(" ".join([host, str(os.getpid()), start, *rest]) + "\n")
    saver, _ = _saver(2)
    saver.save(str(directory / "model"), global_step=2)
    assert relkit.debris(str(directory))["temp_dirs"] == []
    assert not gs.checkpoint_exists(str(directory / "model-1"))


# ------------------------------------------------------------ glob characters
@pytest.mark.parametrize("dirname", ["layers=[1,2]", "a*b", "what?", "[abc]", "x[!y]"])
def test_glob_characters_in_a_real_path_are_literal(tmp_path: Path, dirname: str) -> None:
    runs = tmp_path / "runs"
    real = runs / dirname
    real.mkdir(parents=True)
    decoy = runs / "layers=1"  # what "layers=[1,2]" matches as a pattern
    decoy.mkdir()
    decoy_saver, _ = _saver(9)
    decoy_saver.save(str(decoy / "model"), global_step=5)
    saver, _ = _saver(5, max_to_keep=1)
    prefix = saver.save(str(real / "model"), global_step=5)
    assert gs.latest_checkpoint(str(real)) == prefix
    assert gs.checkpoint_exists(prefix)
    relkit.assert_restores(prefix, SPECS, 5)
    with gs.load_checkpoint(str(real)) as reader:
        assert reader.prefix == prefix
    assert gs.list_variables(str(real))
    assert len(gs.get_checkpoint_mtimes([prefix])) == 1
    saver.save(str(real / "model"), global_step=6)  # retention deletes model-5 literally
    assert not gs.checkpoint_exists(prefix)
    gs.remove_checkpoint(str(real / "model-6"))
    assert not gs.checkpoint_exists(str(real / "model-6"))
    relkit.assert_restores(str(decoy / "model-5"), SPECS, 9)  # never widened to the decoy


def test_remove_checkpoint_with_a_pattern_removes_only_checkpoint_files(tmp_path: Path) -> None:
    saver, _ = _saver(1, max_to_keep=None)
    for step in (1, 2, 13):
        saver.save(str(tmp_path / "model"), global_step=step)
    (tmp_path / "model-1.txt").write_text("notes")
    (tmp_path / "model-2.meta").write_text("meta")
    gs.remove_checkpoint(str(tmp_path / "model-?"))
    assert not gs.checkpoint_exists(str(tmp_path / "model-1"))
    assert not gs.checkpoint_exists(str(tmp_path / "model-2"))
    assert not (tmp_path / "model-2.meta").exists()
    relkit.assert_restores(str(tmp_path / "model-13"), SPECS, 1)
    assert (tmp_path / "model-1.txt").read_text() == "notes"


# ------------------------------------------------------------------ a full disk
def test_efbig_at_the_state_file_leaves_nothing_committed(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    directory.mkdir()
    saver, _ = _saver(1)
    saver.save(str(directory / "model"), global_step=1)
    before = relkit.snapshot(str(directory))
    # Tiny tensors, a long state file: the real file-size limit lets the data and the index
    # through and stops the state file, which lists many long (made-up) paths.
    done = _run_python(
        """
        import os, resource, signal, sys, json
        import numpy as np, gpusaver as gs
        directory = sys.argv[1]
        saver = gs.Saver({"x": np.arange(3, dtype=np.float32)}, max_to_keep=None)
        saver.set_last_checkpoints_with_time([(os.path.join(directory, "p" * 200 + str(i)), 1.0) for i in range(40)])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            saver.save(os.path.join(directory, "model"), global_step=2)
            print(json.dumps(None))
        except Exception as e:
            print(json.dumps([type(e).__name__, isinstance(e, gs.CheckpointWriteError), e.errno, str(e)]))
        """,
        str(directory),
    )
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout)
    assert result is not None, "the save did not fail: the test tests nothing"
    assert result[1] and result[2] == errno.EFBIG, result
    assert not gs.checkpoint_exists(str(directory / "model-2")), "a failed save left a committed checkpoint"
    assert relkit.snapshot(str(directory)) == before
    assert gs.latest_checkpoint(str(directory)) == str(directory / "model-1")


# ------------------------------------------------------------------ special files
def _special(tmp_path: Path, which: str, kind: str) -> str:
    saver, _ = _saver(1)
    prefix = saver.save(str(tmp_path / "model"), global_step=1)
    target = {"index": prefix + ".index", "data": os.path.join(os.path.dirname(prefix), _data_files(prefix)[0]), "state": str(tmp_path / "checkpoint")}[which]
    os.remove(target)
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", target)
    elif kind == "directory":
        os.mkdir(target)
    return prefix


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
@pytest.mark.parametrize("which", ["index", "data"])
def test_special_files_in_a_checkpoint_are_refused_at_once(tmp_path: Path, which: str, kind: str) -> None:
    prefix = _special(tmp_path, which, kind)
    arrays = relkit.zeros(SPECS)

    def load() -> Any:
        with gs.load_checkpoint(prefix) as reader:
            return {name: reader.get_tensor(name) for name in SPECS}

    for attempt in (load, lambda: relkit.make_saver(arrays, SPECS).restore(prefix),
                    lambda: gs.load_checkpoint(str(tmp_path))):
        error = _in_thread(attempt)
        if which == "data" and attempt is not load and not isinstance(error, BaseException):
            continue  # load_checkpoint(dir) opens only the index
        assert isinstance(error, gs.CorruptCheckpointError), f"{kind} {which}: {error!r}"
        assert "regular file" in str(error)
    assert all(not a.any() for a in arrays.values() if a.dtype != object), "a refused restore changed arrays"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_special_state_file_is_no_state_and_a_save_replaces_it(tmp_path: Path, kind: str) -> None:
    _special(tmp_path, "state", kind)
    assert _in_thread(lambda: gs.latest_checkpoint(str(tmp_path))) is None
    assert _in_thread(lambda: gs.get_checkpoint_state(str(tmp_path))) is None
    saver, _ = _saver(2)
    if kind == "directory":  # a directory cannot be replaced by a rename: a typed write error
        error = _in_thread(lambda: saver.save(str(tmp_path / "model"), global_step=2))
        assert isinstance(error, gs.CheckpointWriteError), repr(error)
        assert not gs.checkpoint_exists(str(tmp_path / "model-2"))
        return
    prefix = _in_thread(lambda: saver.save(str(tmp_path / "model"), global_step=2))
    assert gs.latest_checkpoint(str(tmp_path)) == prefix


def test_a_fifo_owner_record_does_not_hang_the_next_save(tmp_path: Path) -> None:
    temp = tmp_path / f"model-1_temp_{'a' * 32}"
    temp.mkdir()
    os.mkfifo(temp / "OWNER")
    saver, _ = _saver(1)
    assert isinstance(_in_thread(lambda: saver.save(str(tmp_path / "model"), global_step=1)), str)


# ---------------------------------------------------------------- overlapping views
def test_overlapping_views_save_and_a_restore_into_them_is_refused_naming_both(tmp_path: Path) -> None:
    base = np.arange(64, dtype=np.float32).reshape(8, 8)
    cases = {
        "slices": {"a": base[:5], "b": base[4:]},
        "transposed": {"a": base, "b": base.T},
        "column in rows": {"a": base[:, 3], "b": base[2:3]},
        "byte view": {"a": base, "b": base.reshape(-1).view(np.uint8)[10:20]},
    }
    for what, var_list in cases.items():
        saver = gs.Saver(var_list)  # a save only reads: views that share memory are saved as they are
        prefix = saver.save(str(tmp_path / what.replace(" ", "_")))
        for k, v in var_list.items():
            assert np.array_equal(gs.load_checkpoint(prefix).get_tensor(k), v), (what, k)
        with pytest.raises(gs.InvalidArgumentError) as info:
            saver.restore(prefix)
        assert isinstance(info.value, ValueError)
        assert "'a'" in str(info.value) and "'b'" in str(info.value), what
        assert np.array_equal(base, np.arange(64, dtype=np.float32).reshape(8, 8)), what
    # Interleaved without sharing a byte, or of separate buffers: fine.
    for var_list in ({"even": base[:, ::2], "odd": base[:, 1::2]}, {"a": base[:4], "b": base[4:]}):
        saver = gs.Saver(var_list)
        saver.restore(saver.save(str(tmp_path / "apart")))


# -------------------------------------------------------------------- typed errors
def test_the_untyped_errors_the_review_found_are_typed(tmp_path: Path) -> None:
    a = np.zeros(3, np.float32)
    cases: dict[str, tuple[Callable[[], Any], type]] = {
        "empty name": (lambda: gs.Saver({"": a}), ValueError),
        "same array twice": (lambda: gs.Saver({"x": a, "y": a}), ValueError),
        "object array of ints": (lambda: gs.Saver({"x": np.array([1, 2], dtype=object)}), TypeError),
        "lone surrogate, Saver": (lambda: gs.Saver({"x\udc80": a}), ValueError),
        "lone surrogate, writer": (lambda: BundleWriter(str(tmp_path / "w")).add("x\udc80", a), ValueError),
        "lone surrogate, add_many": (lambda: BundleWriter(str(tmp_path / "v")).add_many(["x\udc80"], [a]), ValueError),
        "empty name, writer": (lambda: BundleWriter(str(tmp_path / "u")).add("", a), ValueError),
        "bad device": (lambda: gs.Variable(a, "x", device="/tpu:0"), ValueError),
        "var_list type": (lambda: gs.Saver(42), TypeError),
    }
    for what, (call, builtin) in cases.items():
        with pytest.raises(builtin) as info:
            call()
        assert isinstance(info.value, gs.GpuSaverError), f"{what}: untyped {info.value!r}"


def test_every_raise_in_the_package_names_a_gpusaver_error() -> None:
    """A static check: ``raise X(...)`` in gpusaver/ only with X from gpusaver.errors (or a re-raise)."""
    import gpusaver.errors as errors_module

    ours = {name for name in dir(errors_module) if isinstance(getattr(errors_module, name), type)}
    ours |= {"write_error", "os_error", "_Aborted", "Malformed", "_corrupt", "SystemExit"}
    exempt_files = {"reference.py"}  # cuda/reference.py: the host reference tests compare against, not shipped behaviour
    problems = []
    for path in sorted((ROOT / "gpusaver").rglob("*.py")):
        if path.name in exempt_files or "_proto" in path.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if not isinstance(exc, (ast.Name, ast.Attribute)):
                    continue  # raise errors[0] and the like: re-raising a caught error
                name = exc.attr if isinstance(exc, ast.Attribute) else exc.id
                if name[0].isupper() and name not in ours:
                    where = (path.name, name)
                    if where in {("fileops.py", "OSError"), ("entry.py", "IndexError")}:
                        continue  # the seam raises what the OS would (callers wrap it); a caught fast-path exit
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: raise {name}")
    assert not problems, "\n".join(problems)


def test_an_unwritable_directory_is_a_checkpoint_permission_error() -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="gpusaver-perm-"))  # pytest's tmp_path is not for others to enter
    os.chmod(base, 0o755)
    directory = base / "locked"
    directory.mkdir()
    os.chmod(directory, 0o555)
    try:
        code = """
            import os, sys, json
            import numpy as np, gpusaver as gs
            if os.geteuid() == 0:  # root ignores permission bits: drop to nobody, once everything is imported
                os.setgroups([]); os.setgid(65534); os.setuid(65534)
            try:
                gs.Saver({"x": np.zeros(2)}).save(os.path.join(sys.argv[1], "m"), global_step=1)
                print(json.dumps(None))
            except Exception as e:
                print(json.dumps([type(e).__name__, isinstance(e, gs.CheckpointWriteError), isinstance(e, PermissionError), e.errno]))
            """
        done = _run_python(code, str(directory))
        assert done.returncode == 0, done.stderr
        import json

        assert json.loads(done.stdout) == ["CheckpointPermissionError", True, True, errno.EACCES]
        assert os.listdir(directory) == []
    finally:
        os.chmod(directory, 0o755)
        shutil.rmtree(base)


# ------------------------------------------------------- retention stays at home
def test_retention_never_deletes_outside_the_state_files_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home, elsewhere = tmp_path / "ck", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    victim_saver, _ = _saver(3)
    victims = [victim_saver.save(str(elsewhere / "victim"), global_step=s) for s in (1, 2)]
    (elsewhere / "victim-1.meta").write_text("graph")
    before = relkit.snapshot(str(elsewhere))
    # A stale or hostile state file: one absolute path, one ../ path, both outside ck/.
    gs.update_checkpoint_state(
        str(home), victims[1], all_model_checkpoint_paths=[victims[0], "../elsewhere/victim-2"]
    )
    saver, _ = _saver(4, max_to_keep=1)
    saver.recover_last_checkpoints(gs.get_checkpoint_state(str(home)).all_model_checkpoint_paths)
    with caplog.at_level(logging.WARNING, logger="gpusaver"):
        for step in (4, 5, 6, 7, 8):  # one old checkpoint dropped per save, as in TensorFlow
            saver.save(str(home / "model"), global_step=step)
    assert relkit.snapshot(str(elsewhere)) == before
    assert "outside the state file's directory" in caplog.text
    assert gs.latest_checkpoint(str(home)) == str(home / "model-8")
    # Three adopted entries outside, then model-4 and model-5, were dropped: only the latter deleted.
    assert [s for s in range(4, 9) if gs.checkpoint_exists(str(home / f"model-{s}"))] == [6, 7, 8]


# ------------------------------------------------ found by the second attacker's pass
def test_a_save_killed_before_its_commit_never_costs_the_older_checkpoint_of_that_prefix(tmp_path: Path) -> None:
    # gpusaver.save writes no state file: the older "model" is complete but recorded nowhere.
    directory = tmp_path / "ck"
    gs.save({"w": np.full(1 << 20, 1.0)}, directory / "model")
    done = _run_python(
        """
        import os, signal, sys, numpy as np, gpusaver as gs
        die = lambda d, t: d > t // 2 and os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write
        gs.save({"w": np.full(1 << 20, 2.0)}, sys.argv[1] + "/model", progress=die)
        """,
        str(directory),
    )
    assert done.returncode == -9, done.stderr
    assert relkit.debris(str(directory))["temp_dirs"], "the kill left no temp dir: the test tests nothing"
    gs.save({"step": 1}, directory / "trainer_state")  # the restarted job's first save cleans up
    assert relkit.debris(str(directory))["temp_dirs"] == []
    assert gs.load(directory / "model")["w"][0] == 1.0


def test_the_cleaner_never_touches_a_users_files_that_look_like_temporaries(tmp_path: Path) -> None:
    import time
    import uuid

    ck = tmp_path / "ck"
    ck.mkdir()
    user_dir = ck / f"eval_temp_{uuid.uuid4().hex}"
    gs.save({"w": np.arange(3.0)}, user_dir / "best")
    notes = ck / f"notes.tmp{uuid.uuid4().hex}"
    notes.write_text("mine")
    old = time.time() - 3600
    for p in (user_dir, notes):
        os.utime(p, (old, old))
    gs.Saver({"w": np.zeros(2)}).save(str(ck / "model"), global_step=1)
    assert notes.read_text() == "mine"
    assert gs.load(user_dir / "best")["w"].tolist() == [0.0, 1.0, 2.0]


def test_a_variable_overlapping_itself_saves_but_is_never_restored_into(tmp_path: Path) -> None:
    import torch
    from numpy.lib.stride_tricks import as_strided

    prefix = gs.save({"m": np.arange(12.0).reshape(3, 4)}, tmp_path / "ck")
    expanded = torch.zeros(1, 4, dtype=torch.float64).expand(3, 4)
    strided = as_strided(np.zeros(9), (3, 4), (8, 8))
    for dst in (expanded, strided):
        gs.Saver({"m": dst}).save(str(tmp_path / "saved"))  # saving one is fine
        with pytest.raises(gs.InvalidArgumentError, match="overlaps itself"):
            gs.load(prefix, like={"m": dst})
    assert not expanded.any() and not strided.any()


def test_a_progress_callback_that_raises_at_the_end_commits_nothing(tmp_path: Path) -> None:
    s = gs.Saver({"n": np.array([b"short"] * 1000, dtype=object), "w": np.arange(10.0)}, max_to_keep=1)
    first = s.save(str(tmp_path / "m"), global_step=1)

    def cb(done: int, total: int) -> None:
        if done == total:
            raise RuntimeError("the progress bar crashed at 100%")

    with pytest.raises(RuntimeError, match="100%"):
        s.save(str(tmp_path / "m"), global_step=2, progress=cb)
    assert gs.latest_checkpoint(str(tmp_path)) == first and gs.checkpoint_exists(first)
    assert not gs.checkpoint_exists(str(tmp_path / "m-2"))
    assert relkit.debris(str(tmp_path))["temp_dirs"] == []


def test_load_like_checks_every_leaf_before_changing_any(tmp_path: Path) -> None:
    prefix = gs.save({"w": np.arange(3.0), "step": 7, "s": "text"}, tmp_path / "m")
    for like, error in (
        ({"missing": 1.5}, gs.TensorNotFoundError),
        ({"s": 1.0}, gs.DTypeMismatchError),
        ({"step": "x"}, gs.DTypeMismatchError),
        ({"step": np.zeros(2)}, gs.ShapeMismatchError),
    ):
        w = np.zeros(3)
        with pytest.raises(error):
            gs.load(prefix, like={"w": w, **like}, cast=True)
        assert not w.any(), f"{like}: an array changed before the error"


def _safetensors_file(path: Path, header: bytes, data: bytes = b"") -> None:
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize(
    "header",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": {"dtype": "F32", "shape": [' + b",".join([b"1"] * 300) + b'], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": "F32", "shape": [0, 9223372036854775808], "data_offsets": [0, 0]}}',
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}',
    ],
    ids=["deep-json", "rank-300", "dim-2**63", "overlapping"],
)
def test_hostile_safetensors_headers_are_typed_errors(tmp_path: Path, header: bytes) -> None:
    from gpusaver import convert

    src = tmp_path / "evil.safetensors"
    _safetensors_file(src, header, bytes(16))
    with pytest.raises(gs.CorruptCheckpointError):
        convert.from_safetensors(str(src), str(tmp_path / "out" / "model"))
    assert not (tmp_path / "out" / "model.index").exists()


def test_a_null_byte_in_a_safetensors_index_is_a_typed_error(tmp_path: Path) -> None:
    import json

    from gpusaver import convert

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x\u0000.safetensors"}}))
    with pytest.raises(gs.CorruptCheckpointError):
        convert.from_safetensors(str(tmp_path), str(tmp_path / "out"))


def test_more_untyped_errors_the_second_pass_found(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(gs.InvalidArgumentError):
        gs.save({"a": np.ones(3)}, tmp_path / "afile" / "model")
    assert gs.load(gs.save({"a": 2**70}, tmp_path / "big"))["a"] == 2**70  # a Python int of any size: in the tree
    prefix = gs.save({"a": np.ones(3)}, tmp_path / "loop")
    os.remove(prefix + ".index")
    os.symlink(prefix + ".index", prefix + ".index")
    for call in (lambda: gs.load(prefix), lambda: gs.Saver({"a": np.zeros(3)}).restore(prefix)):
        with pytest.raises(gs.CorruptCheckpointError, match="symlink loop"):
            call()
    assert gs.get_checkpoint_mtimes([prefix]) == []


def test_a_child_forked_during_a_save_does_not_keep_a_dead_saves_lock(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    directory.mkdir()
    done = _run_python(
        """
        import os, signal, subprocess, sys, time, numpy as np, gpusaver as gs
        def fork_then_die(d, t):
            if d > t // 2:
                child = os.fork()
                if child == 0:  # a worker forked mid-save outlives its parent
                    os.closerange(0, 3)  # (so that nobody waits for its pipes)
                    time.sleep(300); os._exit(0)
                with open(sys.argv[2], "w") as f:
                    f.write(str(child))
                os.kill(os.getpid(), signal.SIGKILL)
        gs.save({"w": np.full(1 << 20, 2.0)}, sys.argv[1] + "/model", progress=fork_then_die)
        """,
        str(directory), str(tmp_path / "child.pid"),
    )
    assert done.returncode == -9, done.stderr
    child = int((tmp_path / "child.pid").read_text())
    try:
        os.kill(child, 0)  # alive: it holds a copy of the dead save's lock descriptor, unless closed at fork
        assert relkit.debris(str(directory))["temp_dirs"]
        gs.save({"x": 1}, directory / "other")  # the child lives on: the dead save's dir still goes
        assert relkit.debris(str(directory))["temp_dirs"] == []
    finally:
        import signal

        os.kill(child, signal.SIGKILL)


def test_the_package_never_calls_numpy_functions_that_import_more_numpy_lazily() -> None:
    """A static check: np.unique (and the set routines built on it) import numpy.ma on their first call,
    which a process that has since lost access to its install (dropped privileges) cannot do: a save or
    restore then fails half way. Twice already a fresh clone in a 0700 directory caught one."""
    lazy = {"unique", "isin", "in1d", "setdiff1d", "intersect1d", "union1d", "setxor1d"}
    problems = []
    for path in sorted((ROOT / "gpusaver").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in lazy and isinstance(node.value, ast.Name) \
                    and node.value.id in ("np", "numpy"):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: np.{node.attr}")
    assert not problems, "\n".join(problems)
