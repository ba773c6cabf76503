"""Shared tools of the reliability tests: deterministic checkpoints, fault-injecting
file operations, directory snapshots and a fork server for real crashes.

Everything here is deterministic: the values a save writes are a function of
``(spec, step, salt)``, so any process can recompute what a given step saved and
compare a restore bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import numpy as np

import gpusaver as gs
from gpusaver.storage.fileops import PosixFileOps

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "crashworker.py")
#: Exit status of a worker that crashed itself at its target event.
CRASH_EXIT = 86
#: Exit status of a worker whose target event never happened.
NOT_REACHED_EXIT = 87
#: Seconds after which a wait for a worker gives up. Only a hang guard: no test
#: relies on anything finishing within it, so a slow or busy machine never hits it.
HANG_GUARD = 300.0

# --------------------------------------------------------------------- values
#: name -> (device, dtype, shape). Four virtual devices, so sharded saves write four shards.
Spec = Mapping[str, tuple[str, str, tuple[int, ...]]]

SMALL: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "d0/w": ("/cpu:0", "<f4", (10,)),
    "d0/n": ("/cpu:0", "<i8", (3,)),
    "d1/x": ("/cpu:1", "<f8", (4,)),
    "d1/h": ("/cpu:1", "<f2", (2, 3)),
    "d2/e": ("/cpu:2", "|u1", (17,)),
    "d2/s": ("/cpu:2", "|O", (3,)),
    "d3/i": ("/cpu:3", "<i4", ()),
    "d3/b": ("/cpu:3", "|b1", (5,)),
}

LARGE: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "d0/w": ("/cpu:0", "<f4", (64, 1024)),
    "d0/n": ("/cpu:0", "<i8", (33,)),
    "d1/x": ("/cpu:1", "<f8", (16384,)),
    "d1/h": ("/cpu:1", "<f2", (7, 3)),
    "d2/e": ("/cpu:2", "|u1", (196608,)),
    "d3/i": ("/cpu:3", "<i4", (5, 11, 2)),
    "d3/b": ("/cpu:3", "|b1", (5,)),
}

SPECS = {"small": SMALL, "large": LARGE}


def _base(name: str, nbytes: int) -> np.ndarray:
    seed = sum((i + 1) * b for i, b in enumerate(name.encode()))
    return np.random.default_rng(seed).integers(1, 256, size=nbytes, dtype=np.uint8)


def value(name: str, spec: tuple[str, str, tuple[int, ...]], step: int, salt: int = 0) -> np.ndarray:
    """The value variable ``name`` holds at ``step`` (bit patterns include NaNs: compared as bytes)."""
    _, dtype, shape = spec
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if dt.kind == "O":
        flat = np.array([f"{name}:{step}:{salt}:{i}".encode() * (i + 1) for i in range(count)], dtype=object)
        return flat.reshape(shape)
    raw = _base(name, count * dt.itemsize) + np.uint8((step * 7 + salt * 131 + 1) % 256)
    if dt.kind == "b":
        raw &= 1
    return raw.view(dt).reshape(shape).copy()


def values(specs: Spec, step: int, salt: int = 0) -> dict[str, np.ndarray]:
    return {name: value(name, spec, step, salt) for name, spec in specs.items()}


def fill(arrays: Mapping[str, np.ndarray], specs: Spec, step: int, salt: int = 0) -> None:
    """Writes step ``step``'s values into ``arrays`` in place."""
    for name, arr in arrays.items():
        arr[...] = value(name, specs[name], step, salt)


def zeros(specs: Spec) -> dict[str, np.ndarray]:
    out = {}
    for name, (_, dtype, shape) in specs.items():
        dt = np.dtype(dtype)
        if dt.kind == "O":
            out[name] = np.array([b""] * int(np.prod(shape, dtype=np.int64)), dtype=object).reshape(shape)
        else:
            out[name] = np.zeros(shape, dt)
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical (dtype, shape and bytes; element-wise for string tensors)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "O":
        return a.reshape(-1).tolist() == b.reshape(-1).tolist()
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def make_saver(arrays: Mapping[str, np.ndarray], specs: Spec, **kwargs: Any) -> gs.Saver:
    """A sharded Saver over ``arrays``, each on its spec's virtual device."""
    kwargs.setdefault("sharded", True)
    return gs.Saver([gs.Variable(arrays[n], n, specs[n][0]) for n in sorted(arrays)], **kwargs)


def restore_mismatches(prefix: str, specs: Spec, step: int, salt: int = 0) -> list[str]:
    """Restores ``prefix`` into fresh arrays; returns the names that differ from ``step``'s values."""
    arrays = zeros(specs)
    make_saver(arrays, specs).restore(prefix)
    want = values(specs, step, salt)
    return [n for n in sorted(specs) if not same(arrays[n], want[n])]


def assert_restores(prefix: str | None, specs: Spec, step: int, salt: int = 0) -> None:
    assert prefix is not None, f"expected a checkpoint of step {step}, found none"
    bad = restore_mismatches(prefix, specs, step, salt)
    assert not bad, f"{prefix} restored values differing from step {step} in {bad}"


def step_of(prefix: str | None) -> int:
    """``7`` for ``.../model-7``; -1 for None."""
    return -1 if prefix is None else int(prefix.rsplit("-", 1)[1])


# ------------------------------------------------------------------ disk state
def snapshot(root: str) -> dict[str, Any]:
    """Every entry under ``root``: relative path -> (mode, bytes) for files, mode for directories."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            out[os.path.relpath(p, root) + "/"] = os.stat(p).st_mode
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (os.stat(p).st_mode, fh.read())
    return out


_DATA_RE = re.compile(r"^(?P<prefix>.+)\.data-\d{5}-of-\d{5}$")
TEMP_DIR_RE = re.compile(r"_temp_[0-9a-f]{32}$")
TEMP_FILE_RE = re.compile(r"(\.tempstate[0-9a-f]+|\.tmp[0-9a-f]{32})$")


def debris(directory: str) -> dict[str, list[str]]:
    """What a crashed or failed save may leave behind in ``directory``.

    Returns:
        ``temp_dirs`` (``*_temp_<uuid>``), ``temp_files`` (``*.tempstate*``,
        ``*.tmp<uuid>``) and ``orphan_data`` (data files whose index is missing).
    """
    names = sorted(os.listdir(directory))
    present = set(names)
    out: dict[str, list[str]] = {"temp_dirs": [], "temp_files": [], "orphan_data": []}
    for n in names:
        if TEMP_DIR_RE.search(n) and os.path.isdir(os.path.join(directory, n)):
            out["temp_dirs"].append(n)
        elif TEMP_FILE_RE.search(n):
            out["temp_files"].append(n)
        else:
            m = _DATA_RE.match(n)
            if m and m.group("prefix") + ".index" not in present:
                out["orphan_data"].append(n)
    return out


def owned_temp_dirs(directory: str) -> list[str]:
    """Temp directories that hold an ``OWNER`` file (their owner is known, so a dead one is stale at once)."""
    return [n for n in debris(directory)["temp_dirs"] if os.path.exists(os.path.join(directory, n, "OWNER"))]


def age_everything(directory: str, seconds: float = 7200.0) -> None:
    """Makes every entry under ``directory`` look ``seconds`` old (stale by any age rule)."""
    past = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(directory):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (past, past), follow_symlinks=False)
    os.utime(directory, (past, past))


def read_log(path: str) -> list[int]:
    """The steps a worker logged (complete lines only)."""
    return [int(x) for x in _complete_lines(path)]


def read_times(path: str) -> list[float]:
    """The seconds from a worker's start to the return of each of its saves (``job_loop``'s ``times``)."""
    return [float(x) for x in _complete_lines(path)]


def _complete_lines(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        return []
    return [x for x in text.split("\n")[:-1] if x]


# ----------------------------------------------------------- synchronisation
def exited(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")


def wait_until(condition: Callable[[], bool], pid: int | None = None, what: str = "the condition",
               timeout: float = HANG_GUARD) -> bool:
    """Polls ``condition`` until it holds: True. False as soon as worker ``pid`` has ended without it.

    Polling replaces a fixed sleep: the wait is as long as the event takes, on any
    machine. ``timeout`` is only a hang guard (:data:`HANG_GUARD`); reaching it fails.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if pid is not None and exited(pid):
            return condition()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within the {timeout:.0f} s hang guard")
        time.sleep(0.002)


# ------------------------------------------------------------------ file ops
_NORMALISE = [
    (re.compile(r"_temp_[0-9a-f]{32}"), "_temp_*"),
    (re.compile(r"\.tempstate[0-9a-f]+"), ".tempstate*"),
    (re.compile(r"\.tmp[0-9a-f]{32}"), ".tmp*"),
]


def normalise(text: str, root: str) -> str:
    """A path or phase name without the test's root directory or random ids."""
    text = text.replace(root.rstrip(os.sep) + os.sep, "").replace(root, ".")
    for pattern, repl in _NORMALISE:
        text = pattern.sub(repl, text)
    return text


class EventOps(PosixFileOps):
    """POSIX file operations that name every step of a save as an *event*.

    An operation's event is ``"<op>:<path>#<n>"`` (the path normalised by
    :func:`normalise`, ``n`` counting that operation on that path), seen
    ``"before"`` and ``"after"`` it runs; a phase's is ``"phase:<name>"``, seen
    ``"at"``. The names do not depend on how the shard threads interleave, so a
    crash can target the same event in another process.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.trace: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._fd_paths: dict[int, str] = {}
        self._counts: Counter[str] = Counter()

    def hook(self, event: str, when: str) -> None:
        """Called at every event; subclasses fail or crash here."""

    def _name(self, op: str, *paths: str) -> str:
        key = f"{op}:" + " -> ".join(normalise(os.path.abspath(p), self.root) for p in paths)
        with self._lock:
            self._counts[key] += 1
            return f"{key}#{self._counts[key]}"

    def _see(self, event: str, when: str) -> None:
        with self._lock:
            self.trace.append((event, when))
        self.hook(event, when)

    def _around(self, event: str, fn: Callable[..., Any], *args: Any) -> Any:
        self._see(event, "before")
        result = fn(*args)
        self._see(event, "after")
        return result

    def phase(self, name: str) -> None:
        self._see(f"phase:{normalise(name, self.root)}", "at")

    def create(self, path: str) -> int:
        event = self._name("create", path)
        fd = self._around(event, super().create, path)
        with self._lock:
            self._fd_paths[fd] = path
        return fd

    def _fd_event(self, op: str, fd: int) -> str:
        with self._lock:
            path = self._fd_paths.get(fd, f"fd{fd}")
        return self._name(op, path)

    def write(self, fd: int, buffers: Any) -> None:
        self._around(self._fd_event("write", fd), super().write, fd, buffers)

    def pwrite(self, fd: int, buffers: Any, offset: int) -> None:
        self._around(self._fd_event("write", fd), super().pwrite, fd, buffers, offset)

    def fsync(self, fd: int) -> None:
        self._around(self._fd_event("fsync", fd), super().fsync, fd)

    def close(self, fd: int) -> None:
        event = self._fd_event("close", fd)
        self._around(event, super().close, fd)

    def rename(self, src: str, dst: str) -> None:
        event = self._name("rename", src, dst)
        self._around(event, super().rename, src, dst)

    def remove(self, path: str) -> None:
        self._around(self._name("remove", path), super().remove, path)

    def mkdir(self, path: str) -> None:
        self._around(self._name("mkdir", path), super().mkdir, path)

    def rmdir(self, path: str) -> None:
        self._around(self._name("rmdir", path), super().rmdir, path)

    def rmtree(self, path: str) -> None:
        self._around(self._name("rmtree", path), super().rmtree, path)

    def fsync_dir(self, path: str) -> None:
        self._around(self._name("fsync_dir", path or "."), super().fsync_dir, path)


class CrashOps(EventOps):
    """Ends the process with ``os._exit(CRASH_EXIT)``: no clean-up runs, as in a crash.

    Args:
        root: the checkpoint directory (event names are relative to it).
        event, when: crash at this event (see :class:`EventOps`).
        rmtree_unlinks: instead, crash inside the first ``rmtree`` once it has
            removed this many entries (a clean-up cut short).
    """

    def __init__(
        self, root: str, event: str | None = None, when: str | None = None, rmtree_unlinks: int | None = None
    ) -> None:
        super().__init__(root)
        self.target = (event, when)
        self.rmtree_unlinks = rmtree_unlinks

    def hook(self, event: str, when: str) -> None:
        if (event, when) == self.target:
            os._exit(CRASH_EXIT)

    def rmtree(self, path: str) -> None:
        if self.rmtree_unlinks is None:
            return super().rmtree(path)
        limit, removed = self.rmtree_unlinks, [0]
        real = {name: getattr(os, name) for name in ("unlink", "remove", "rmdir")}

        def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                result = fn(*args, **kwargs)
                removed[0] += 1
                if removed[0] >= limit:
                    os._exit(CRASH_EXIT)
                return result

            return call

        for name, fn in real.items():
            setattr(os, name, counting(fn))
        try:
            return super().rmtree(path)
        finally:
            for name, fn in real.items():
                setattr(os, name, fn)


class FailOps(EventOps):
    """Raises ``OSError(err)`` instead of running the ``k``-th call (1-based) of operation ``op``.

    ``op`` is an operation name (``write``, ``fsync``, ``rename``, ...) or
    ``phase:<name>`` to fail when a save reaches that phase.
    """

    def __init__(self, root: str, op: str, k: int, err: int = errno.ENOSPC) -> None:
        super().__init__(root)
        self.op, self.k, self.err = op, k, err
        self.calls: Counter[str] = Counter()
        self.failed_event: str | None = None

    def hook(self, event: str, when: str) -> None:
        if when == "after":
            return
        op = event if event.startswith("phase:") else event.split(":", 1)[0]
        with self._lock:
            self.calls[op] += 1
            hit = op == self.op and self.calls[op] == self.k and self.failed_event is None
            if hit:
                self.failed_event = event
        if hit:
            raise OSError(self.err, os.strerror(self.err))


def count_ops(trace: Iterable[tuple[str, str]]) -> Counter[str]:
    """How many times each operation ran in a trace."""
    return Counter(e.split(":", 1)[0] for e, w in trace if w == "before")


# ----------------------------------------------------------------- jobs
def _latest_step(directory: str) -> int:
    return step_of(gs.latest_checkpoint(directory))


def job_loop(job: Mapping[str, Any]) -> int:
    """Saves steps in a loop (kill -9 test). Logs each step, fsynced, after ``save()`` returns.

    Resumes after the newest of the last logged step and the latest checkpoint,
    adopting the checkpoints the state file lists (as a restarted trainer does).
    With ``times``, also appends to that file, as each save returns and before its
    step is logged, the seconds since the job started (read by :func:`read_times`).
    """
    started = time.monotonic()
    directory, specs = job["dir"], SPECS[job["scale"]]
    arrays = zeros(specs)
    saver = make_saver(arrays, specs, max_to_keep=job.get("max_to_keep", 3), durable=job.get("durable", True))
    state = gs.get_checkpoint_state(directory)
    if state is not None:
        saver.recover_last_checkpoints(list(state.all_model_checkpoint_paths))
    logged = read_log(job["log"])
    step = max(logged[-1] if logged else -1, _latest_step(directory)) + 1
    fd = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    times = os.open(job["times"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if "times" in job else None
    saves = 0
    while job.get("max_saves") is None or saves < job["max_saves"]:
        fill(arrays, specs, step)
        saver.save(os.path.join(directory, "model"), global_step=step)
        if times is not None:  # before the log line, so a logged step always has its time
            os.write(times, f"{time.monotonic() - started:.6f}\n".encode())  # a SIGKILL keeps the page cache
        os.write(fd, f"{step}\n".encode())
        os.fsync(fd)
        saves += 1
        step += 1
    os.close(fd)
    if times is not None:
        os.close(times)
    return 0


def job_crash(job: Mapping[str, Any]) -> int:
    """One save of ``step`` that crashes itself at ``event`` (crash-at-every-phase test)."""
    directory, specs = job["dir"], SPECS[job["scale"]]
    arrays = zeros(specs)
    ops = CrashOps(directory, job.get("event"), job.get("when"), job.get("rmtree_unlinks"))
    saver = make_saver(arrays, specs, max_to_keep=job["max_to_keep"], save_relative_paths=True, fileops=ops)
    state = gs.get_checkpoint_state(directory)
    if state is not None:
        saver.recover_last_checkpoints(list(state.all_model_checkpoint_paths))
    fill(arrays, specs, job["step"], job.get("salt", 0))
    saver.save(os.path.join(directory, "model"), global_step=job["step"])
    return NOT_REACHED_EXIT


class _HoldOps(PosixFileOps):
    """Sleeps ``pause`` at each shard phase, so temp directories live longer while others clean up
    (more overlap, never relied on); while ``armed``, holds the save at ``shard:written:0``
    (its temp directory live) after creating ``ready``, until ``gate`` exists.
    """

    def __init__(self, pause: float = 0.0, gate: str | None = None, ready: str | None = None) -> None:
        self.pause, self.gate, self.ready = pause, gate, ready
        self.armed = False

    def phase(self, name: str) -> None:
        if self.armed and name == "shard:written:0":
            assert self.gate is not None and self.ready is not None
            self.armed = False
            with open(self.ready, "w"):
                pass
            parent = os.getppid()
            # No time limit: the test opens the gate in a ``finally``. The guards only
            # keep a worker whose test died from polling for ever.
            deadline = time.monotonic() + HANG_GUARD
            while not os.path.exists(self.gate) and os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.005)
        if self.pause and (name.startswith("shard:written") or name == "merge:start"):
            time.sleep(self.pause)


def job_concurrent(job: Mapping[str, Any]) -> int:
    """Saves ``steps`` checkpoints of prefix ``name`` with its own state file and salt.

    With ``gate`` and ``ready``, the save of step ``hold_step`` (default 0) holds at
    ``shard:written:0`` (see :class:`_HoldOps`); ``pause`` sleeps at each shard phase.
    """
    directory, specs, name, salt = job["dir"], SPECS[job["scale"]], job["name"], job["salt"]
    arrays = zeros(specs)
    ops = _HoldOps(job.get("pause", 0.0), job.get("gate"), job.get("ready"))
    saver = make_saver(arrays, specs, max_to_keep=job.get("max_to_keep", 2), fileops=ops)
    for step in range(job["steps"]):
        fill(arrays, specs, step, salt)
        ops.armed = "gate" in job and step == job.get("hold_step", 0)
        saver.save(os.path.join(directory, name), global_step=step, latest_filename=f"state_{name}")
    return 0


class _CountingOps(PosixFileOps):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def phase(self, name: str) -> None:
        self.calls.append(name)


def job_as_user(job: Mapping[str, Any]) -> int:
    """As user ``uid``: save into an unwritable directory, restore from and save into a read-only one.

    Writes what happened, as JSON, to the file ``result``.
    """
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    out: dict[str, Any] = {"uid": os.geteuid()}
    ops = _CountingOps()
    saver = gs.Saver({"w": np.arange(4, dtype=np.float32)}, fileops=ops)
    try:
        saver.save(os.path.join(job["unwritable"], "model"), global_step=1)
        out["save"] = None
    except Exception as e:  # noqa: BLE001 - reported
        out["save"] = [type(e).__name__, isinstance(e, PermissionError), getattr(e, "errno", None), str(e)]
    out["calls"] = ops.calls
    w = np.zeros(4, np.float32)
    try:
        gs.Saver({"w": w}).restore(gs.latest_checkpoint(job["readonly"]))
        out["restore"] = w.tolist()
    except Exception as e:  # noqa: BLE001 - reported
        out["restore"] = repr(e)
    try:
        gs.Saver({"w": np.ones(4, np.float32)}).save(os.path.join(job["readonly"], "model"), global_step=2)
        out["save_ro"] = None
    except Exception as e:  # noqa: BLE001 - reported
        out["save_ro"] = [type(e).__name__, isinstance(e, PermissionError)]
    with open(job["result"], "w") as f:
        json.dump(out, f)
    return 0


JOBS = {"loop": job_loop, "crash": job_crash, "concurrent": job_concurrent, "as_user": job_as_user}


def run_job(job: Mapping[str, Any]) -> int:
    return JOBS[job["kind"]](job)


# ---------------------------------------------------------------- fork server
class ForkServer:
    """A process that imported gpusaver once and forks one worker per job.

    Forking a warm process costs a few milliseconds where starting Python and
    importing NumPy costs hundreds, so a test can kill hundreds of savers. The
    workers are real processes: :meth:`kill` sends them SIGKILL.
    """

    def __init__(self, log_path: str) -> None:
        env = dict(os.environ, GPUSAVER_BACKEND="numpy", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=HERE,
        )
        assert self._request({"op": "ping"}) == {"ok": True}

    def _request(self, msg: Mapping[str, Any]) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died; its log:\n{self.log()}")
        return json.loads(line)

    def spawn(self, job: Mapping[str, Any]) -> int:
        """Forks a worker running ``job``; returns its pid."""
        return int(self._request({"op": "spawn", "job": dict(job)})["pid"])

    def wait(self, pid: int, timeout: float = HANG_GUARD) -> int:
        """Reaps worker ``pid``: its exit code, or minus the signal that ended it.

        A worker still running after ``timeout`` seconds (a hang guard, see
        :data:`HANG_GUARD`) is killed and ``TimeoutError`` raised, so a hung save
        cannot hang the tests, and is never mistaken for a save that ended.
        """
        fired = threading.Event()

        def guard() -> None:
            fired.set()
            _kill_quietly(pid)

        timer = threading.Timer(timeout, guard)
        timer.start()
        try:
            code = int(self._request({"op": "wait", "pid": pid})["code"])
        finally:
            timer.cancel()
        if fired.is_set():
            raise TimeoutError(f"worker {pid} still ran after the {timeout:.0f} s hang guard; killed:\n{self.log()}")
        return code

    def run(self, job: Mapping[str, Any], timeout: float = HANG_GUARD) -> int:
        return self.wait(self.spawn(job), timeout)

    @staticmethod
    def kill(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-6000:]

    def close(self) -> None:
        try:
            self._request({"op": "exit"})
        except (OSError, RuntimeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------- crc32c
def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """crc32c (Castagnoli), written here independently of the package under test."""
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF
