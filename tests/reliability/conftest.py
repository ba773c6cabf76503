"""Fixtures of the reliability tests: a fork server for real crashes."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import relkit  # noqa: E402


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[relkit.ForkServer]:
    """One warm process (gpusaver imported) that forks a worker per job."""
    server = relkit.ForkServer(str(tmp_path_factory.mktemp("forkserver") / "stderr.log"))
    try:
        yield server
    finally:
        server.close()
