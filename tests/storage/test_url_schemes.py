"""A path that is a URL of a scheme gpusaver does not serve is refused, by every entry point.

``gs.save(tree, "s3://bkt/run1/ckpt")`` once succeeded and wrote to a local folder ``./s3:/bkt/...``:
a user believed the checkpoint safe in S3 and lost it with the node. Every function that takes a
path (save, load, the Saver's save, save_async and restore, the TensorFlow helpers, the readers,
merge, convert) and every CLI command raises UnsupportedSchemeError naming the scheme, and
nothing is created anywhere (no ``s3:`` directory in the working directory). ``file://`` URLs and
local paths that merely contain a colon keep working.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import gpusaver as gs
from gpusaver.convert import convert
from gpusaver.errors import UnsupportedSchemeError
from gpusaver.format import merge_bundles

URLS = ["s3://bkt/run1/ckpt-100", "gs://bucket/x", "az://c/x", "hdfs://namenode/x", "memory://x", "HTTPS://h/x",
        "file://otherhost/x"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gs.save({"a": np.ones(3)}, str(tmp_path / "local" / "ck"))
    return tmp_path


def _calls(url: str, tmp_path) -> dict:
    local = str(tmp_path / "local" / "ck")
    saver = gs.Saver({"a": np.ones(3)})
    return {
        "save": lambda: gs.save({"a": np.ones(3)}, url),
        "load": lambda: gs.load(url),
        "load like": lambda: gs.load(url, like={"a": np.zeros(3)}),
        "Saver.save": lambda: saver.save(url),
        "Saver.save_async": lambda: saver.save_async(url),
        "Saver(filename=)": lambda: gs.Saver({"a": np.ones(3)}, filename=url).save(),
        "Saver.restore": lambda: saver.restore(url),
        "latest_checkpoint": lambda: gs.latest_checkpoint(url),
        "get_checkpoint_state": lambda: gs.get_checkpoint_state(url),
        "update_checkpoint_state": lambda: gs.update_checkpoint_state(url, url + "/m"),
        "checkpoint_exists": lambda: gs.checkpoint_exists(url),
        "get_checkpoint_mtimes": lambda: gs.get_checkpoint_mtimes([url]),
        "remove_checkpoint": lambda: gs.remove_checkpoint(url),
        "CheckpointReader": lambda: gs.CheckpointReader(url),
        "load_checkpoint": lambda: gs.load_checkpoint(url),
        "list_variables": lambda: gs.list_variables(url),
        "merge_bundles to": lambda: merge_bundles([local], url),
        "merge_bundles from": lambda: merge_bundles([url], str(tmp_path / "merged")),
        "convert from": lambda: convert(url, str(tmp_path / "out.safetensors")),
        "convert to": lambda: convert(local, url + ".safetensors"),
    }


@pytest.mark.parametrize("url", URLS)
def test_every_function_refuses_the_url_and_creates_nothing(in_tmp, url) -> None:
    scheme = url.split("://")[0]
    before = sorted(os.listdir(in_tmp))
    for what, call in _calls(url, in_tmp).items():
        with pytest.raises(UnsupportedSchemeError) as e:
            call()
        assert e.value.scheme.lower() == scheme.lower(), what
        assert scheme in str(e.value), what
        assert sorted(os.listdir(in_tmp)) == before, what
    assert not any(":" in name for name in os.listdir(in_tmp))


@pytest.mark.parametrize("command", [["inspect", "{url}"], ["verify", "{url}"], ["diff", "{url}", "{local}"],
                                     ["diff", "{local}", "{url}"], ["convert", "{url}", "out.safetensors"],
                                     ["convert", "{local}", "{url}"]])
def test_every_cli_command_refuses_the_url_in_one_line(in_tmp, command) -> None:
    url = "s3://bkt/run1/ckpt"
    args = [a.format(url=url, local=str(in_tmp / "local" / "ck")) for a in command]
    before = sorted(os.listdir(in_tmp))
    run = subprocess.run([sys.executable, "-m", "gpusaver", *args], capture_output=True, text=True, cwd=in_tmp)
    assert run.returncode in (1, 2), (run.returncode, run.stdout, run.stderr)  # the CLI's error statuses
    assert "s3://" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert sorted(os.listdir(in_tmp)) == before


def test_file_urls_and_local_paths_with_colons_still_work(in_tmp) -> None:
    uri = "file://" + str(in_tmp / "u" / "ck")
    gs.save({"a": np.arange(3)}, uri)
    assert (gs.load(uri)["a"] == np.arange(3)).all()
    assert (gs.load("file://localhost" + str(in_tmp / "u" / "ck"))["a"] == np.arange(3)).all()
    gs.save({"a": np.arange(2)}, "run:1/ck")  # a local directory named "run:1"
    assert (gs.load("run:1/ck")["a"] == np.arange(2)).all()
    gs.save({"a": np.arange(2)}, "C:/drive-like/ck")  # one letter and a colon: a local directory "C:"
    assert os.path.isdir(in_tmp / "C:" / "drive-like")
    with pytest.raises(UnsupportedSchemeError):  # "s3:/x" is a URL that lost a slash (pathlib folds "//")
        gs.save({"a": np.arange(2)}, "s3:/single-slash/ck")


def test_a_url_pathlib_folded_into_a_path_is_refused(in_tmp) -> None:
    """Path("s3://bucket/ck") is Path("s3:/bucket/ck"): it once made ./s3:/bucket/ck.*"""
    import pathlib

    for url in ("s3://bucket/ck", "gs://b/x"):
        with pytest.raises(UnsupportedSchemeError):
            gs.save({"a": np.ones(2)}, pathlib.Path(url))
        with pytest.raises(UnsupportedSchemeError):
            convert(str(in_tmp / "local" / "ck"), pathlib.Path(url + ".safetensors"))
    assert not any(name.startswith(("s3", "gs")) for name in os.listdir(in_tmp))


def test_file_scheme_in_capitals_is_the_file_scheme(in_tmp) -> None:
    gs.save({"a": np.arange(2)}, "FILE://" + str(in_tmp / "caps" / "ck"))
    assert (gs.load(str(in_tmp / "caps" / "ck"))["a"] == np.arange(2)).all()
