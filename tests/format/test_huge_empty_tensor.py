"""Valid tensors that NumPy cannot hold: no elements along a huge dimension (``[0, 2**61]`` float32, whose
NumPy array would need more than 2**63 bytes of strides), or more than NumPy's 64 dimensions.

TensorFlow writes such tensors (its own Saver does, below). gpusaver lists, verifies, compares and
converts them both ways; it loads the ones NumPy can make (``[0, 2**61]`` int8) and refuses the others
with an UnsupportedDTypeError naming the tensor, from every entry point; the command line never prints
a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import gpusaver as gs
from gpusaver import convert
from gpusaver.format import BundleReader, BundleWriter, crc
from gpusaver.format.entry import encode_entry, encode_header
from gpusaver.format.table import encode_table
from gpusaver.format.tensors import encode_strings

ROOT = Path(__file__).resolve().parents[2]
HUGE = 1 << 61
DEEP = (1,) * 65


def _ok(w: BundleWriter) -> None:
    w.add("ok", np.arange(4, dtype=np.float32))


def _float32(prefix: str) -> None:
    w = BundleWriter(prefix)
    _ok(w)
    w.add_raw("t", np.float32, (0, HUGE), ())
    w.finish()


def _int8(prefix: str) -> None:
    w = BundleWriter(prefix)
    _ok(w)
    w.add_raw("t", np.int8, (0, HUGE), ())
    w.finish()


def _partitioned(prefix: str) -> None:
    w = BundleWriter(prefix)
    _ok(w)
    half = HUGE // 2
    for spec in (f"-:0,{half}", f"-:{half},{half}"):  # each slice, [0, 2**60] float32, NumPy can make
        w.add_slice("t", [0, HUGE], spec, np.empty((0, half), np.float32))
    w.finish()


def _deep(prefix: str) -> None:
    w = BundleWriter(prefix)
    _ok(w)
    w.add_raw("t", np.float32, DEEP, [(np.array([7.5], np.float32), None)])
    w.finish()


def _strings(prefix: str) -> None:
    """A string tensor of shape [0, 2**61], crafted: its object array cannot be made to write it."""
    ok = np.arange(4, dtype=np.float32).tobytes()
    data, checksum = encode_strings(np.empty(0, object))
    entries = {
        b"ok": encode_entry(1, (4,), 0, 0, len(ok), crc.mask(crc.value(ok))),
        b"t": encode_entry(7, (0, HUGE), 0, len(ok), len(data), crc.mask(checksum)),
    }
    Path(prefix + ".index").write_bytes(encode_table([(b"", encode_header(1))] + sorted(entries.items())))
    Path(prefix + ".data-00000-of-00001").write_bytes(ok + data)


CASES: dict[str, tuple[Callable[[str], None], str, tuple[int, ...]]] = {
    "float32 [0, 2**61]": (_float32, "DT_FLOAT", (0, HUGE)),
    "int8 [0, 2**61]": (_int8, "DT_INT8", (0, HUGE)),
    "partitioned float32 [0, 2**61]": (_partitioned, "DT_FLOAT", (0, HUGE)),
    "string [0, 2**61]": (_strings, "DT_STRING", (0, HUGE)),
    "float32 of 65 dimensions": (_deep, "DT_FLOAT", DEEP),
}
LOADS = {"int8 [0, 2**61]"}  # NumPy can make this one
SAFETENSORS = {"float32 [0, 2**61]", "int8 [0, 2**61]", "partitioned float32 [0, 2**61]", "float32 of 65 dimensions"}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(case name, checkpoint prefix) of a checkpoint holding ``ok`` and the case's tensor ``t``."""
    prefix = str(tmp_path / "ckpt" / "model")
    os.makedirs(os.path.dirname(prefix))
    CASES[request.param][0](prefix)
    return request.param, prefix


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpusaver", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _check_refusal(error: BaseException, shape: tuple[int, ...]) -> None:
    assert isinstance(error, gs.UnsupportedDTypeError) and isinstance(error, ValueError), repr(error)
    message = str(error)
    assert "'t'" in message and str(list(shape)) in message and "NumPy" in message, message


def test_load_reads_what_numpy_can_hold_and_refuses_the_rest_by_name(case: tuple[str, str]) -> None:
    name, prefix = case
    _, _, shape = CASES[name]
    if name in LOADS:
        state = gs.load(prefix)
        assert state["t"].shape == shape and state["t"].dtype == np.int8
        np.testing.assert_array_equal(state["ok"], np.arange(4, dtype=np.float32))
        return
    with pytest.raises(gs.GpuSaverError) as info:
        gs.load(prefix)
    _check_refusal(info.value, shape)


def test_every_reader_refuses_by_name_and_still_reads_the_rest(case: tuple[str, str]) -> None:
    name, prefix = case
    _, _, shape = CASES[name]
    with gs.load_checkpoint(prefix) as reader, gs.CheckpointReader(prefix) as direct, BundleReader(prefix) as bundle:
        assert reader.get_variable_to_shape_map()["t"] == list(shape)
        assert gs.list_variables(prefix) == [("ok", [4]), ("t", list(shape))]
        for read in (reader.get_tensor, direct.get_tensor, bundle.get_tensor):
            np.testing.assert_array_equal(read("ok"), np.arange(4, dtype=np.float32))
            if name in LOADS:
                assert read("t").shape == shape
                continue
            with pytest.raises(gs.GpuSaverError) as info:
                read("t")
            _check_refusal(info.value, shape)


def test_the_cli_lists_verifies_and_compares_it(case: tuple[str, str]) -> None:
    name, prefix = case
    _, dtype, shape = CASES[name]
    done = _cli("inspect", prefix, "--json")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    listed = {v["name"]: v for v in json.loads(done.stdout)["variables"]}
    assert listed["t"]["dtype"] == dtype and listed["t"]["shape"] == list(shape)
    done = _cli("inspect", prefix)
    assert done.returncode == 0 and "[" + ",".join(map(str, shape)) + "]" in done.stdout, done.stderr
    done = _cli("verify", prefix, "--no-progress")
    assert done.returncode == 0 and done.stdout.startswith("OK "), done.stdout + done.stderr
    done = _cli("diff", prefix, prefix)
    assert done.returncode == 0 and "IDENTICAL: 2 variables" in done.stdout, done.stdout + done.stderr


def test_diff_compares_it_stored_whole_and_in_slices(tmp_path: Path) -> None:
    """Different layouts are compared by value: a tensor without values equals itself in any layout."""
    whole, parted = str(tmp_path / "whole"), str(tmp_path / "parted")
    _float32(whole)
    _partitioned(parted)
    done = _cli("diff", whole, parted)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "IDENTICAL: 2 variables" in done.stdout


def test_convert_carries_it_to_safetensors_and_back(case: tuple[str, str], tmp_path: Path) -> None:
    name, prefix = case
    _, dtype, shape = CASES[name]
    out, back = tmp_path / "out.safetensors", tmp_path / "back" / "model"
    done = _cli("convert", prefix, str(out), "--no-progress")
    if name not in SAFETENSORS:  # strings: safetensors has no dtype for them, refused as ever, in one line
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1 and "'t'" in done.stderr and "DT_STRING" in done.stderr
        assert not out.exists()
        return
    assert done.returncode == 0 and done.stderr == "", done.stderr
    header_len = int.from_bytes(out.read_bytes()[:8], "little")
    header = json.loads(out.read_bytes()[8 : 8 + header_len])
    assert header["t"]["shape"] == list(shape)
    done = _cli("convert", str(out), str(back), "--no-progress")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    with BundleReader(str(back)) as reader:
        entry = reader.entry("t")
        assert entry.shape == shape and not entry.slices
        np.testing.assert_array_equal(reader.get_tensor("ok"), np.arange(4, dtype=np.float32))
        if name == "float32 of 65 dimensions":  # its one value came through
            fd, offset, size, _ = reader.data_location("t", entry)
            assert os.pread(fd, size, offset) == np.array([7.5], np.float32).tobytes()
    assert _cli("verify", str(back), "--no-progress").returncode == 0
    # and in Python
    again = tmp_path / "again"
    convert.to_safetensors(prefix, again)
    result = convert.from_safetensors(again, tmp_path / "again-ckpt" / "model")
    assert "t" in result.tensors


def test_tensorflow_writes_such_a_tensor_and_gpusaver_reads_its_checkpoint_the_same_way(tf, tmp_path: Path) -> None:
    """The oracle: TensorFlow's own Saver writes a [0, 2**61] float32 variable (and cannot read it into
    NumPy either); gpusaver lists and verifies that checkpoint, and refuses the tensor by name."""
    variable = tf.Variable(tf.zeros([0, HUGE], tf.float32))
    prefix = tf.train.Checkpoint(v=variable).write(str(tmp_path / "tf" / "model"))
    key = "v/.ATTRIBUTES/VARIABLE_VALUE"
    assert tf.train.load_checkpoint(prefix).get_variable_to_shape_map()[key] == [0, HUGE]
    assert dict(gs.list_variables(prefix))[key] == [0, HUGE]
    done = _cli("verify", prefix, "--no-progress")
    assert done.returncode == 0 and done.stdout.startswith("OK "), done.stdout + done.stderr
    with pytest.raises(gs.UnsupportedDTypeError, match=r"'v/\.ATTRIBUTES/VARIABLE_VALUE'.*\[0, 2305843009213693952\]"):
        gs.load_checkpoint(prefix).get_tensor(key)
