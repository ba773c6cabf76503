"""save_async with GPU arrays, on the fake CuPy (``tests/fakecupy.py``).

* host snapshot (the default) and device snapshot: every GPU array is overwritten the instant
  save_async returns, and the checkpoint holds the old values; the files are byte for byte those
  of a synchronous save, with one and two GPUs, sharded or not, pool smaller than the state;
* a device snapshot that does not fit in free device memory falls back to the host snapshot;
* every pinned buffer is back in its ring and no stream has work left afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpusaver as gs
from gpusaver import config
from test_save_async import _files
from gpu_fake import (  # noqa: F401 - the fixture
    assert_ring_idle,
    fake,
    fill,
    gpu_variables,
    same,
)


@pytest.mark.parametrize("snapshot", ["host", "device"])
@pytest.mark.parametrize("n_gpus,sharded", [(1, False), (2, False), (2, True)])
def test_changed_after_return_keeps_old_values_and_files_match_a_sync_save(
    fake, tmp_path, snapshot, n_gpus, sharded, monkeypatch
) -> None:
    variables = gpu_variables(fake, n_gpus)
    copies = []
    ndarray = type(next(iter(variables.values()))[1])
    real_copy = ndarray.copy
    monkeypatch.setattr(ndarray, "copy", lambda self, *a, **k: copies.append(1) or real_copy(self, *a, **k))
    with config.set(snapshot_slab_bytes=4096):
        saver = gs.Saver({k: dev for k, (_, dev) in variables.items()}, sharded=sharded, snapshot_bytes=3 * 4096)
        sync = saver.save(str(tmp_path / "sync"))
        handle = saver.save_async(str(tmp_path / "async"), snapshot=snapshot)
        for _, dev in variables.values():
            fill(fake, dev, 7)  # the instant it returns
        assert handle.result() == str(tmp_path / "async")
    assert len(copies) == (len(variables) if snapshot == "device" else 0)
    want, got = _files(sync), _files(handle.prefix)
    assert want.keys() == got.keys()
    for suffix in want:
        assert want[suffix] == got[suffix], suffix
    reader = gs.load_checkpoint(handle.prefix)
    for name, (host, _) in variables.items():
        assert same(host, reader.get_tensor(name)), name
    assert_ring_idle(fake)
    saver.close()


def test_a_device_snapshot_without_room_falls_back_to_the_host(fake, tmp_path, monkeypatch) -> None:
    variables = gpu_variables(fake, 1)
    saver = gs.Saver({k: dev for k, (_, dev) in variables.items()})
    saver.save(str(tmp_path / "warm"))  # the backend's own buffers exist before free memory shrinks
    need = sum(int(dev.nbytes) for _, dev in variables.values())
    fake.set_free(0, need - 1)  # one byte short of a copy of the group (the save's own small buffers fit)
    copies = []
    ndarray = type(next(iter(variables.values()))[1])
    real_copy = ndarray.copy
    monkeypatch.setattr(ndarray, "copy", lambda self, *a, **k: copies.append(1) or real_copy(self, *a, **k))
    handle = saver.save_async(str(tmp_path / "m"), snapshot="device")
    for _, dev in variables.values():
        fill(fake, dev, 3)
    handle.result()
    assert copies == []  # no device copy was made
    reader = gs.load_checkpoint(handle.prefix)
    for name, (host, _) in variables.items():
        assert same(host, reader.get_tensor(name)), name
    assert_ring_idle(fake)
