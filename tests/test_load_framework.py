"""Arrays of the caller's framework back (issue #23, item 5).

``gs.load(path, framework="torch" | "jax" | "cupy" | "numpy", device=...)`` returns that
framework's arrays, bfloat16 and float8 included, on the device asked for. Here on the CPU:
torch and JAX (the CUDA path is torch's ``.to`` and CuPy's own reads, tested elsewhere); the
old meaning of ``device=k`` (CuPy arrays on GPU k) is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import gpusaver as gs

torch = pytest.importorskip("torch")

DTYPES = [np.float32, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64, np.bool_, np.complex64,
          np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


def _tree() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    arrays = {np.dtype(d).name: rng.integers(0, 4, size=(2, 3)).astype(d) for d in DTYPES}
    return {"arrays": arrays, "step": 7, "name": "run", "strings": np.array([b"a", b"bc"], dtype=object)}


@pytest.fixture
def prefix(tmp_path: Path) -> str:
    return gs.save(_tree(), tmp_path / "f")


def _bits(t: Any) -> bytes:
    return np.asarray(t).tobytes()


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_torch_tensors_come_back_bf16_and_float8_included(prefix: str, device: Any) -> None:
    back = gs.load(prefix, framework="torch", device=device)
    want = _tree()
    for name, a in want["arrays"].items():
        t = back["arrays"][name]
        assert isinstance(t, torch.Tensor) and t.device.type == "cpu", name
        assert tuple(t.shape) == a.shape, name
        if a.dtype == ml_dtypes.bfloat16:
            assert t.dtype == torch.bfloat16 and t.view(torch.int16).numpy().tobytes() == a.tobytes()
        elif a.dtype.itemsize == 1 and a.dtype.type.__module__.startswith("ml_dtypes"):
            assert t.dtype == getattr(torch, a.dtype.name) and t.view(torch.uint8).numpy().tobytes() == a.tobytes()
        else:
            assert t.numpy().dtype == a.dtype and t.numpy().tobytes() == a.tobytes(), name
    assert back["step"] == 7 and type(back["step"]) is int and back["name"] == "run"
    assert isinstance(back["strings"], np.ndarray) and back["strings"].tolist() == [b"a", b"bc"]  # torch has no strings
    back["arrays"]["float32"] += 1  # writable, its own memory


def test_jax_arrays_come_back_on_the_cpu(prefix: str) -> None:
    jax = pytest.importorskip("jax")
    for device in (None, "cpu", jax.devices("cpu")[0]):
        with jax.enable_x64(True):
            back = gs.load(prefix, framework="jax", device=device)
        for name, a in _tree()["arrays"].items():
            x = back["arrays"][name]
            assert isinstance(x, jax.Array) and np.dtype(x.dtype) == a.dtype, name
            assert _bits(x) == a.tobytes(), name
            assert {d.platform for d in x.devices()} == {"cpu"}


def test_jax_without_64_bit_values_refuses_to_narrow_them(prefix: str, tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    with jax.enable_x64(False):
        with pytest.raises(gs.UnsupportedDTypeError, match=r"'arrays/float64' is float64.*jax_enable_x64"):
            gs.load(prefix, framework="jax")
        small = gs.save({"w": np.ones(2, np.float32), "h": np.ones(2, ml_dtypes.bfloat16)}, tmp_path / "s")
        back = gs.load(small, framework="jax")
        assert back["w"].dtype == np.float32 and back["h"].dtype == ml_dtypes.bfloat16


def test_numpy_is_the_default_and_a_flat_checkpoint_converts_too(tmp_path: Path, prefix: str) -> None:
    back = gs.load(prefix)
    assert isinstance(back["arrays"]["bfloat16"], np.ndarray) and back["arrays"]["bfloat16"].dtype == ml_dtypes.bfloat16
    assert gs.load(prefix, framework="numpy", device="cpu")["step"] == 7
    old = gs.Saver({"w": np.arange(3, dtype=ml_dtypes.bfloat16)}).save(str(tmp_path / "old"))
    t = gs.load(old, framework="torch")["w"]
    assert t.dtype == torch.bfloat16 and t.tolist() == [0, 1, 2]


def test_bad_framework_or_device_is_a_typed_error(prefix: str) -> None:
    with pytest.raises(gs.InvalidArgumentError, match="framework is"):
        gs.load(prefix, framework="tensorflow")
    with pytest.raises(gs.InvalidArgumentError, match="host"):
        gs.load(prefix, framework="numpy", device="cuda:0")
    with pytest.raises(gs.InvalidArgumentError, match="not a torch device"):
        gs.load(prefix, framework="torch", device="nowhere:0")
    with pytest.raises(gs.InvalidArgumentError, match="cuda:k"):
        gs.load(prefix, framework="cupy", device="cpu")
    with pytest.raises(gs.InvalidArgumentError, match="like"):
        gs.load(prefix, framework="torch", like=_tree())


def test_a_cuda_device_without_a_gpu_is_a_typed_error(prefix: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the CUDA path is tested elsewhere")
    with pytest.raises(gs.BackendUnavailableError, match="cuda"):
        gs.load(prefix, framework="torch", device="cuda:0")
    with pytest.raises(gs.BackendUnavailableError):
        gs.load(prefix, device=0)  # CuPy on GPU 0, as before


def test_device_k_still_means_cupy_on_gpu_k(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpusaver import api

    target = api._Target.of(None, 1)
    assert target.framework == "cupy" and target.read_device == 1
    assert api._Target.of("cupy", "cuda:2").read_device == 2
    assert api._Target.of(None, "cuda:3").read_device == 3
    assert api._Target.of("torch", "cuda:1").device == torch.device("cuda", 1)  # passed through to .to()
    assert api._Target.of("torch", 0).device == torch.device("cuda", 0)
    seen: list[Any] = []

    class FakeReader:  # what CheckpointReader.get_tensor is asked: the GPU index, as before
        def get_tensor(self, name: str, device: Any = None) -> Any:
            seen.append((name, device))
            return np.zeros(1)

        def get_variable_to_dtype_map(self) -> dict[str, Any]:
            return {"w": np.dtype(np.float32)}

    spec = {"format": "gpusaver.tree", "version": 1, "nodes": [["d", ["w", "step"], "ai"]], "names": {}, "values": {"1": 7}}
    fake = FakeReader()
    fake.prefix = "x"  # type: ignore[attr-defined]
    out = api._load_tree(fake, spec, target, False, None)
    assert seen == [("w", 1)] and out["step"] == 7
