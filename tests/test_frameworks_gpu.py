"""torch CUDA tensors and JAX GPU arrays through the CuPy backend, on a real GPU (skipped without one).

* CUDA tensors of every dtype torch has there (bfloat16 and float8 included) save and restore
  bit-exactly, in place, into the same tensors, strided views too; TensorFlow's layout on disk is the
  host path's (compared byte for byte with a save of CPU copies);
* a save waits for work queued on torch's current stream, even a non-default one, and a restore's
  bytes are in place before torch's next kernel on that stream reads them;
* ``gpusaver.load(like=...)`` fills CUDA tensors in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpusaver as gs

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU"),
]

DTYPES = ["float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "int16", "int32",
          "int64", "uint8", "bool", "complex64"]


def _random(dtype: Any, shape: tuple[int, ...], seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    t = (raw % 2).bool().reshape(shape) if dtype == torch.bool else raw.view(dtype).reshape(shape)
    return t.cuda()


def _bits(t: Any) -> bytes:
    t = t.detach().contiguous().reshape(-1).cpu()
    return t.numpy().tobytes() if t.dtype == torch.bool else t.view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", DTYPES)
def test_cuda_tensors_restore_in_place_bit_exact(tmp_path: Path, name: str) -> None:
    dtype = getattr(torch, name)
    tensors = {
        "plain": _random(dtype, (5, 7), 1),
        "big": _random(dtype, (1 << 21,), 2),  # several pinned slots with small slots below
        "scalar": _random(dtype, (), 3),
        "strided": _random(dtype, (6, 8), 4)[::2, 1::3],
    }
    want = {k: _bits(v) for k, v in tensors.items()}
    (tmp_path / "gpu").mkdir()
    (tmp_path / "cpu").mkdir()
    with gs.config.set(slot_bytes=1 << 20):
        saver = gs.Saver(tensors)
        prefix = saver.save(str(tmp_path / "gpu" / "m"))
        cpu_prefix = gs.Saver({k: v.cpu() for k, v in tensors.items()}).save(str(tmp_path / "cpu" / "m"))
        with torch.no_grad():
            for k, t in tensors.items():  # other random bytes, written in place (0-d and strided views too)
                t.copy_(_random(dtype, tuple(t.shape), 99))
        assert saver.restore(prefix) == ([], [])
    for k, t in tensors.items():
        assert _bits(t) == want[k], k
    for suffix in (".index", ".data-00000-of-00001"):
        assert Path(prefix + suffix).read_bytes() == Path(cpu_prefix + suffix).read_bytes()


def test_save_waits_for_torch_current_stream(tmp_path: Path) -> None:
    x = torch.zeros(1 << 24, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the stream busy, then write the value to save
        x.fill_(3.0)
        prefix = gs.save({"x": x}, tmp_path / "m")
    side.synchronize()
    assert np.all(gs.load(prefix)["x"] == 3.0)


def test_restore_is_in_place_before_torch_reads(tmp_path: Path) -> None:
    x = torch.full((1 << 22,), 5.0, device="cuda")
    prefix = gs.save({"x": x}, tmp_path / "m")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x.zero_()
        gs.load(prefix, like={"x": x})
        total = float(x.sum())  # on torch's current stream
    assert total == 5.0 * (1 << 22)


def test_load_like_fills_cuda_tensors(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 32).cuda()
    state = model.state_dict()
    prefix = gs.save(state, tmp_path / "m")
    fresh = torch.nn.Linear(64, 32).cuda()
    out = gs.load(prefix, like=fresh.state_dict())
    for k, v in state.items():
        assert torch.equal(out[k], v), k
        assert torch.equal(fresh.state_dict()[k], v), k


def test_jax_gpu_arrays_save_and_come_back(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    import ml_dtypes

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("JAX sees no GPU")
    x = jax.device_put(jnp.arange(1000, dtype=jnp.float32).reshape(10, 100), gpus[0])
    tree = {"x": x, "half": x.astype(jnp.bfloat16), "f8": x.astype(jnp.float8_e4m3fn)}
    prefix = gs.save(tree, tmp_path / "m")
    with gs.load_checkpoint(prefix) as reader:
        dtypes = reader.get_variable_to_dtype_map()
    assert dtypes["half"] == np.dtype(ml_dtypes.bfloat16) and dtypes["f8"] == np.dtype(ml_dtypes.float8_e4m3fn)
    out = gs.load(prefix, like={k: jnp.zeros_like(v) for k, v in tree.items()})
    for k, v in tree.items():
        assert np.array_equal(np.asarray(out[k]).view(np.uint8), np.asarray(v).view(np.uint8)), k
