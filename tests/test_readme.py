"""Every Python snippet in the README runs as pasted, in an empty directory, in a fresh interpreter; its
command lines run as written after set-up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_a_readme_snippet_runs_as_pasted_in_an_empty_directory(tmp_path: Path, index: int) -> None:
    code = SNIPPETS[index]
    if "model.state_dict()" in code or "import torch" in code:
        pytest.importorskip("torch")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"snippet {index}:\n{code}\n{done.stderr[-3000:]}"


# ------------------------------------------------------------ the shell lines
# The README's shell lines run as written, from a directory laid out as the repository root after
# set-up (``.venv`` is the environment running these tests, ``examples`` the repository's), in a
# shell that has not activated ``.venv``: a line that needs activation, or names a missing
# command, fails here.
BASH = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _lines(marker: str) -> list[str]:
    """The command lines of the README's bash blocks that mention ``marker``, comments left out."""
    found = [line for block in BASH if marker in block for line in block.splitlines()]
    return [line for line in found if line.strip() and not line.lstrip().startswith("#")]


CLI_LINES = _lines("-m gpusaver")
DDP_LINES = _lines("examples/train_ddp.py")


def _repository_like(directory: Path) -> None:
    (directory / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    (directory / "examples").symlink_to(ROOT / "examples", target_is_directory=True)


def _not_activated() -> dict[str, str]:
    """The environment of a fresh shell: no virtual environment on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venvs = {os.path.realpath(os.path.join(p, "bin")) for p in (sys.prefix, str(ROOT / ".venv"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and os.path.realpath(p) not in venvs
    )
    return env


def _shell(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_has_its_command_lines() -> None:
    assert len(CLI_LINES) >= 7 and len(DDP_LINES) == 2, (CLI_LINES, DDP_LINES)


def test_the_readme_command_lines_run_as_written_after_set_up(tmp_path: Path) -> None:
    """inspect, verify, info, convert both ways and diff, on the tour's checkpoints."""
    _repository_like(tmp_path)
    tour = next(s for s in SNIPPETS if 'saver.save("ckpts/model", global_step=100)' in s)
    then = (  # a second checkpoint for the diff line: the tour's, one bias changed
        "\nstate = gs.load('ckpts/model-100')\nstate['dense/b'][0] = 1\ngs.save(state, 'ckpts/model-200')\n"
    )
    done = subprocess.run([sys.executable, "-c", tour + then], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    env = _not_activated()
    for line in CLI_LINES:
        done = _shell(line, tmp_path, env)
        expected = 1 if " diff " in line else 0  # the two checkpoints differ
        assert done.returncode == expected, f"{line}\nexit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, f"{line}\n{done.stderr[-3000:]}"
        if " inspect " in line:
            assert "dense/w" in done.stdout
        if " diff " in line and "--json" in line:
            result = json.loads(done.stdout)
            assert not result["identical"] and [v["name"] for v in result["bytes"]] == ["dense/b"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "ckpts" / "imported.index").is_file()


@pytest.mark.slow
def test_the_readme_torchrun_lines_run_as_written_after_set_up(tmp_path: Path) -> None:
    """The two torchrun lines: the job dies at step 23, the second run resumes from step 20. Only the scratch
    directory (/tmp/ddp) and the rendezvous port (PET_MASTER_PORT, which torchrun reads) are this test's own."""
    pytest.importorskip("torch.distributed")
    import socket

    _repository_like(tmp_path)
    ckpt_dir = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_not_activated(), PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    crash, resume = (line.replace("/tmp/ddp", str(ckpt_dir)) for line in DDP_LINES)
    done = _shell(crash, tmp_path, env)
    assert done.returncode != 0 and "SIGKILL" in done.stderr, f"{crash}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    done = _shell(resume, tmp_path, env)
    assert done.returncode == 0, f"{resume}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    assert f"resumed from step 20 ({ckpt_dir / 'model-20'})" in done.stdout
    assert "weights digest" in done.stdout
