"""The ``gpusaver`` command line: inspect, verify, exit statuses, damage reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpusaver import cli
from gpusaver.cli import main
from gpusaver.format import BundleReader, BundleWriter, crc, merge_bundles

REPO = Path(__file__).resolve().parents[2]


def write_single(prefix: Path) -> Path:
    """One shard: numeric, string and a partitioned tensor of two slices."""
    w = BundleWriter(str(prefix))
    w.add("dense/w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add("dense/b", np.array([1, 2, 3], dtype=np.int64))
    w.add("vocab", np.array([b"alpha", b"", b"gamma"], dtype=object))
    w.add_slice("emb", [10, 4], "0,5:-", np.full((5, 4), 1.5, np.float32))
    w.add_slice("emb", [10, 4], "5,5:-", np.full((5, 4), 2.5, np.float32))
    w.finish()
    return prefix


def write_two_shards(directory: Path) -> Path:
    """Two shards merged into ``directory/model-7``, named by a state file."""
    directory.mkdir()
    w = BundleWriter(str(directory / "tmp0" / "part0"))
    w.add("layer0/kernel", np.ones((4, 4), np.float32))
    w.add_slice("table", [6, 2], "0,3:-", np.zeros((3, 2), np.float64))
    w.finish()
    w = BundleWriter(str(directory / "tmp1" / "part1"))
    w.add("layer1/kernel", np.full((2, 8), 3, np.int32))
    w.add_slice("table", [6, 2], "3,3:-", np.ones((3, 2), np.float64))
    w.finish()
    prefix = directory / "model-7"
    merge_bundles([str(directory / "tmp0" / "part0"), str(directory / "tmp1" / "part1")], str(prefix))
    (directory / "checkpoint").write_text(
        'model_checkpoint_path: "model-7"\nall_model_checkpoint_paths: "model-7"\n'
    )
    return prefix


@pytest.fixture
def single(tmp_path: Path) -> Path:
    return write_single(tmp_path / "ckpt" / "model")


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return write_two_shards(tmp_path / "run")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def data_file(prefix: Path, shard: int = 0, num_shards: int = 1) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


# ----------------------------------------------------------------- inspect
def test_inspect_lists_every_variable(single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "inspect", str(single))
    assert rc == 0 and err == ""
    assert f"checkpoint  {single}" in out
    assert "data files  1" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("dense", "vocab", "emb"))}
    assert lines["dense/w"] == ["dense/w", "DT_FLOAT", "float32", "[3,4]", "0", "0", "48"]
    assert lines["dense/b"][1:3] == ["DT_INT64", "int64"]
    assert lines["vocab"][1:3] == ["DT_STRING", "object"]
    emb = lines["emb"]
    assert emb[1:4] == ["DT_FLOAT", "float32", "[10,4]"]
    assert emb[-3:] == ["-", "160", "2"]  # no single offset, 160 bytes, 2 slices
    assert "4 variables" in out.splitlines()[-1]


def test_inspect_json(single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "inspect", "--json", str(single))
    assert rc == 0
    info = json.loads(out)
    assert info["prefix"] == str(single)
    assert info["num_shards"] == 1
    assert info["shards"][0]["size"] == os.path.getsize(data_file(single))
    variables = {v["name"]: v for v in info["variables"]}
    assert sorted(variables) == ["dense/b", "dense/w", "emb", "vocab"]
    w = variables["dense/w"]
    assert (w["dtype"], w["numpy_dtype"], w["shape"], w["shard"], w["size"]) == ("DT_FLOAT", "float32", [3, 4], 0, 48)
    with BundleReader(str(single)) as reader:
        assert w["crc32c"] == f"0x{crc.unmask(reader.entry('dense/w').crc32c):08x}"
    emb = variables["emb"]
    assert emb["offset"] is None and [s["spec"] for s in emb["slices"]] == ["0,5:-", "5,5:-"]
    assert [s["shape"] for s in emb["slices"]] == [[5, 4], [5, 4]]
    assert info["totals"] == {"variables": 4, "bytes": sum(v["size"] for v in info["variables"])}


def test_inspect_two_shards_through_directory(sharded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "inspect", "--json", str(sharded.parent))
    assert rc == 0
    info = json.loads(out)
    assert info["prefix"] == str(sharded)
    assert info["num_shards"] == 2 and all(s["size"] for s in info["shards"])
    variables = {v["name"]: v for v in info["variables"]}
    assert variables["layer0/kernel"]["shard"] == 0 and variables["layer1/kernel"]["shard"] == 1
    assert sorted(s["shard"] for s in variables["table"]["slices"]) == [0, 1]
    rc, out, _ = run(capsys, "inspect", str(sharded.parent))
    assert rc == 0 and "data files  2" in out
    assert [line.split()[4] for line in out.splitlines() if line.startswith("table")] == ["0,1"]


@pytest.mark.parametrize("suffix", [".index", ".data-00000-of-00001"])
def test_inspect_accepts_a_file_of_the_checkpoint(single: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "inspect", str(single) + suffix)
    assert rc == 0 and f"checkpoint  {single}\n" in out


def test_inspect_as_a_subprocess(single: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpusaver", "inspect", "--json", str(single)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert {v["name"] for v in json.loads(proc.stdout)["variables"]} == {"dense/b", "dense/w", "emb", "vocab"}


def test_corrupt_index_as_a_subprocess_prints_no_traceback(single: Path) -> None:
    flip_bit(Path(f"{single}.index"), 5)
    for command in ("inspect", "verify"):
        proc = subprocess.run(
            [sys.executable, "-m", "gpusaver", command, str(single)],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        assert f"gpusaver {command}: error:" in proc.stderr and ".index" in proc.stderr


# ------------------------------------------------------------------ verify
def test_verify_clean(single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "verify", str(single))
    assert rc == 0 and err == ""
    assert out.startswith(f"OK {single}: 5 tensors of 4 variables in 1 data file;")
    assert f"{os.path.getsize(data_file(single))} bytes" in out


def test_verify_two_shards(sharded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "verify", str(sharded.parent))
    assert rc == 0 and "4 tensors of 3 variables in 2 data files" in out


def test_flipped_bit_in_data_names_the_tensor(single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with BundleReader(str(single)) as reader:
        entry = reader.entry("dense/w")
    path = data_file(single)
    flip_bit(path, entry.offset + 5, 3)
    damaged = path.read_bytes()[entry.offset : entry.offset + entry.size]
    rc, out, _ = run(capsys, "verify", str(single))
    assert rc == 1
    [line] = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert line.startswith("DAMAGED tensor 'dense/w': crc32c mismatch in ")
    assert str(path) in line
    assert f"expected 0x{crc.unmask(entry.crc32c):08x}" in line
    assert f"actual 0x{crc.value(damaged):08x}" in line
    assert out.splitlines()[-1].startswith(f"FAILED {single}: 1 damaged;")


def test_flipped_bit_in_a_slice_and_a_string(single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with BundleReader(str(single)) as reader:
        emb = reader.entry("emb")
        from gpusaver.format.slices import encode_slice_key

        second = reader.entry(encode_slice_key("emb", emb.slices[1]))
        vocab = reader.entry("vocab")
    flip_bit(data_file(single), second.offset + second.size - 1, 7)
    flip_bit(data_file(single), vocab.offset + vocab.size - 2)  # inside "gamma"
    rc, out, _ = run(capsys, "verify", str(single))
    assert rc == 1
    damaged = sorted(line for line in out.splitlines() if line.startswith("DAMAGED"))
    assert len(damaged) == 2
    assert damaged[0].startswith("DAMAGED tensor 'emb' slice 5,5:-: crc32c mismatch")
    assert damaged[1].startswith("DAMAGED tensor 'vocab': crc32c mismatch")


def test_large_tensor_is_read_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_CHUNK", 64)
    prefix = tmp_path / "big"
    with BundleWriter(str(prefix)) as w:
        w.add("x", np.arange(1000, dtype=np.float64))
    assert run(capsys, "verify", str(prefix))[0] == 0
    flip_bit(data_file(prefix), 7000)  # in the 110th chunk
    rc, out, _ = run(capsys, "verify", str(prefix))
    assert rc == 1 and "DAMAGED tensor 'x': crc32c mismatch" in out


def test_flipped_bit_in_index(single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_bit(Path(f"{single}.index"), 20)  # inside the first data block
    rc, out, err = run(capsys, "verify", str(single))
    assert rc == 1 and out == ""
    assert err.startswith("gpusaver verify: error: checksum mismatch in ")
    assert f"{single}.index" in err


def test_no_bit_flip_or_truncation_of_the_index_escapes(single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = Path(f"{single}.index")
    original = index.read_bytes()
    damaged_variants = [original[:n] for n in range(0, len(original), 7)]
    damaged_variants += [
        original[:i] + bytes([original[i] ^ (1 << (i % 8))]) + original[i + 1 :] for i in range(len(original))
    ]
    caught = 0
    for data in damaged_variants:
        index.write_bytes(data)
        rc_verify, _, _ = run(capsys, "verify", str(single))
        rc_inspect, _, _ = run(capsys, "inspect", str(single))
        assert rc_verify in (0, 1) and rc_inspect in (0, 1)
        caught += rc_verify
    assert caught > len(damaged_variants) * 3 // 4  # only unchecked footer padding may pass


def test_truncated_data_file(single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = data_file(single)
    path.write_bytes(path.read_bytes()[:-10])
    rc, out, _ = run(capsys, "verify", str(single))
    assert rc == 1 and "is truncated" in out
    assert run(capsys, "inspect", str(single))[0] == 0  # inspect reads no data


def test_missing_data_file(sharded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_file(sharded, 1, 2).unlink()
    rc, out, _ = run(capsys, "verify", str(sharded))
    assert rc == 1
    assert f"DAMAGED data file {data_file(sharded, 1, 2)}: missing (2 tensors unreadable)" in out
    rc, out, _ = run(capsys, "inspect", str(sharded))
    assert rc == 0 and "MISSING" in out


def test_slices_that_do_not_cover_the_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "partial"
    with BundleWriter(str(prefix)) as w:
        w.add_slice("half", [10, 4], "0,5:-", np.ones((5, 4), np.float32))
    rc, out, _ = run(capsys, "verify", str(prefix))
    assert rc == 1 and "DAMAGED tensor 'half': its 1 slices do not tile shape [10, 4]" in out


# ------------------------------------------------------------- usage errors
def test_missing_checkpoint_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("inspect", "verify"):
        rc, out, err = run(capsys, command, str(tmp_path / "nothing"))
        assert rc == 2 and out == ""
        assert err.startswith(f"gpusaver {command}: error: no checkpoint at ")
    rc, _, err = run(capsys, "verify", str(tmp_path))  # a directory without a state file
    assert rc == 2 and "no checkpoint in directory" in err


def test_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys)[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "verify")[0] == 2
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.startswith("gpusaver ")
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "inspect" in out and "verify" in out and "info" in out


def test_garbage_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "junk"
    Path(f"{prefix}.index").write_bytes(b"not a table at all" * 5)
    for command in ("inspect", "verify"):
        rc, out, err = run(capsys, command, str(prefix))
        assert rc == 1 and out == "" and "not a valid checkpoint index" in err


@pytest.mark.tf
def test_checkpoint_written_by_tensorflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tensorflow as tf
    prefix = tmp_path / "tf" / "model"
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=["w", "part", "part", "words"],
        shape_and_slices=["", "10 4 0,5:-", "10 4 5,5:-", ""],
        tensors=[tf.ones((3, 3)), tf.zeros((5, 4)), tf.ones((5, 4)), tf.constant([b"x", b"yy"])],
    )
    rc, out, _ = run(capsys, "verify", str(prefix))
    assert rc == 0 and "4 tensors of 3 variables" in out
    rc, out, _ = run(capsys, "inspect", "--json", str(prefix))
    part = {v["name"]: v for v in json.loads(out)["variables"]}["part"]
    assert part["shape"] == [10, 4] and len(part["slices"]) == 2


# ----------------------------------------------------------------- progress
def lines_of(label: str, steps: int, **kwargs: float) -> list[str]:
    """What the plain-line reporter writes for ``steps`` even steps to 1.5625 GiB."""
    import io

    from gpusaver.cli.progress_bar import progress_reporter

    stream = io.StringIO()
    total = 100 << 24
    with progress_reporter(label, stream, **kwargs) as report:
        for k in range(steps + 1):
            report(total * k // steps, total)
    return stream.getvalue().splitlines()


def test_progress_lines_in_a_pipe() -> None:
    import re

    lines = lines_of("verify", 100, delay=0, interval=1e9)  # lines by the 10% step only
    assert len(lines) == 10
    assert lines[0] == "verify: 160.0 MiB of 1.6 GiB (10%)"
    assert lines[-1] == "verify: 1.6 GiB of 1.6 GiB (100%)"
    assert all(re.fullmatch(r"verify: [\d.]+ [KMG]iB of 1\.6 GiB \(\d*0%\)", line) for line in lines)
    assert lines_of("convert", 100, delay=1e9) == []  # work over before the delay shows nothing
    # by time alone (interval 0): a line for every call, the 0% one included, none repeated at close
    assert len(lines_of("verify", 5, delay=0, interval=0, step=2.0)) == 6
    # the state reached after the last line is written when the reporter closes
    import io

    from gpusaver.cli.progress_bar import progress_reporter

    stream = io.StringIO()
    report = progress_reporter("x", stream, delay=0, interval=1e9, step=0.5)
    for done in (10, 60, 70):
        report(done, 100)
    assert stream.getvalue() == "x: 60 B of 100 B (60%)\n"
    report.close()
    report(80, 100)  # after close: ignored
    assert stream.getvalue() == "x: 60 B of 100 B (60%)\nx: 70 B of 100 B (70%)\n"


def _pty_output() -> str:
    """What the reporter writes on a terminal (a pseudo-terminal here)."""
    import pty
    import select

    from gpusaver.cli.progress_bar import progress_reporter

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    stream = os.fdopen(slave, "w")
    try:
        report = progress_reporter("convert", stream, delay=0)
        for k in range(11):
            report(k * 1024 * 1024, 10 * 1024 * 1024)
        report.close()
        stream.flush()
    finally:
        stream.close()
    chunks = []
    while select.select([master], [], [], 0.5)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_on_a_terminal() -> None:
    pytest.importorskip("tqdm")
    out = _pty_output()
    assert "convert" in out and "100%" in out
    assert "\r" in out  # tqdm redraws its line
    assert "10.0M/10.0M" in out  # bytes, 1024-based


def test_progress_on_a_terminal_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed
    out = _pty_output()
    assert out.replace("\r\n", "\n").splitlines()[-1] == "convert: 10.0 MiB of 10.0 MiB (100%)"


def test_verify_shows_progress_on_stderr(single: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from gpusaver.cli import progress_bar as _progress

    monkeypatch.setattr(_progress, "DEFAULT_DELAY", 0.0)
    rc, out, err = run(capsys, "verify", str(single))
    assert rc == 0 and out.startswith("OK ")
    size = sum(v["size"] for v in json.loads(run(capsys, "inspect", "--json", str(single))[1])["variables"])
    assert err.splitlines()[-1] == f"verify: {size} B of {size} B (100%)"
    rc, out, err = run(capsys, "verify", "--no-progress", str(single))
    assert rc == 0 and err == ""
