"""Every Python snippet in the README runs as pasted, in an empty directory, in a fresh interpreter."""

from __future__ import annotations

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
