"""Device strings: parsing, canonical form, errors, and the shard order they give."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

import gpusaver
from gpusaver.devices import DeviceSpec, canonical_device, parse_device

LOCAL = "/job:localhost/replica:0/task:0/device:"

CANONICAL = [
    ("gpu:1", LOCAL + "GPU:1"),
    ("/gpu:1", LOCAL + "GPU:1"),
    ("GPU:1", LOCAL + "GPU:1"),
    ("/GPU:1", LOCAL + "GPU:1"),
    ("/device:GPU:1", LOCAL + "GPU:1"),
    ("/device:gpu:1", LOCAL + "GPU:1"),
    ("cuda:1", LOCAL + "GPU:1"),
    ("/device:cuda:1", LOCAL + "GPU:1"),
    ("gpu", LOCAL + "GPU:0"),
    ("/cpu:0", LOCAL + "CPU:0"),
    ("cpu:0", LOCAL + "CPU:0"),
    ("CPU:0", LOCAL + "CPU:0"),
    ("/device:CPU:0", LOCAL + "CPU:0"),
    ("/cpu:7", LOCAL + "CPU:7"),
    ("cpu", LOCAL + "CPU:0"),
    ("/device:CPU:*", LOCAL + "CPU:0"),
    (" /gpu:1 ", LOCAL + "GPU:1"),
    ("/job:localhost/replica:0/task:0/device:GPU:1", LOCAL + "GPU:1"),
    ("/job:localhost/replica:0/task:0/device:CPU:3", LOCAL + "CPU:3"),
    ("/job:worker/task:1/gpu:0", "/job:worker/replica:0/task:1/device:GPU:0"),
    ("/job:worker/replica:2/task:3/device:gpu:4", "/job:worker/replica:2/task:3/device:GPU:4"),
    ("/replica:2/cpu:1", "/job:localhost/replica:2/task:0/device:CPU:1"),
    ("/task:3", "/job:localhost/replica:0/task:3/device:CPU:0"),
    ("/job:localhost/device:GPU:0/task:1", "/job:localhost/replica:0/task:1/device:GPU:0"),
]

# Strings TensorFlow's own canonicalisation understands (no "cuda", no padding).
TF_SPELLABLE = [s for s, _ in CANONICAL if "cuda" not in s.lower() and s == s.strip()]

BAD = [
    "",
    "/",
    "tpu:0",
    "/device:TPU:0",
    "gpu:-1",
    "gpu:x",
    "gpu:1.5",
    "gpu:1:2",
    "gpu::1",
    "/foo:1",
    "/job:/cpu:0",
    "/replica:x/cpu:0",
    "/task:-1/cpu:0",
    "/cpu:0/gpu:1",
    "/device:CPU:0/device:GPU:1",
]


@pytest.mark.parametrize(("spec", "canonical"), CANONICAL)
def test_canonical_form(spec: str, canonical: str) -> None:
    assert canonical_device(spec) == canonical
    parsed = parse_device(spec)
    assert parsed.canonical == canonical
    assert str(parsed) == canonical
    # The canonical form is a fixed point.
    assert canonical_device(canonical) == canonical
    assert parse_device(canonical) == parsed


def test_spellings_of_one_device_are_equal_and_hash_alike() -> None:
    specs = {parse_device(s) for s in ("gpu:1", "/device:GPU:1", "cuda:1", "/GPU:1", LOCAL + "GPU:1")}
    assert len(specs) == 1
    (spec,) = specs
    assert spec.is_gpu and spec.index == 1 and spec.short == "/gpu:1"
    assert not parse_device("/cpu:2").is_gpu and parse_device("/cpu:2").short == "/cpu:2"


def test_device_spec_passes_through() -> None:
    spec = DeviceSpec(device_type="GPU", index=3)
    assert parse_device(spec) is spec
    assert canonical_device(spec) == LOCAL + "GPU:3"


@pytest.mark.parametrize("spec", BAD)
def test_bad_strings_raise_value_error_naming_the_input(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_device(spec)
    assert repr(spec) in str(info.value) or spec.strip() in str(info.value)


@pytest.mark.parametrize("spec", [0, 1.0, None, b"/gpu:0", ["/cpu:0"]])
def test_non_strings_raise_type_error(spec: object) -> None:
    with pytest.raises(TypeError):
        parse_device(spec)  # type: ignore[arg-type]


def test_bad_device_given_to_a_variable_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="tpu"):
        gpusaver.Variable(np.zeros(2), name="v", device="/tpu:0")
    with pytest.raises(ValueError):  # host memory cannot be placed on a GPU
        gpusaver.Variable(np.zeros(2), name="v", device="/gpu:0")


def test_groups_are_sorted_by_canonical_string_as_tensorflow_sorts_them() -> None:
    # TensorFlow's sharded Saver sorts device groups by their device string, so
    # CPU:10 comes before CPU:2 and every CPU before any GPU.
    specs = ["/cpu:2", "cpu:10", "/job:localhost/replica:0/task:0/device:CPU:0", "/cpu:1"]
    arrays = {f"v{i}": np.full(3, i, np.int32) for i in range(len(specs))}
    variables = [gpusaver.Variable(arrays[f"v{i}"], name=f"v{i}", device=s) for i, s in enumerate(specs)]
    saver = gpusaver.Saver(variables[::-1], sharded=True)
    expected = sorted(canonical_device(s) for s in specs)
    assert saver.devices == expected
    assert saver.devices == [LOCAL + "CPU:0", LOCAL + "CPU:1", LOCAL + "CPU:10", LOCAL + "CPU:2"]
    assert sorted([LOCAL + "GPU:0", LOCAL + "CPU:5"]) == [LOCAL + "CPU:5", LOCAL + "GPU:0"]


def test_spellings_of_one_device_make_one_group() -> None:
    a, b, c = np.zeros(2), np.ones(2), np.full(2, 2.0)
    saver = gpusaver.Saver(
        [
            gpusaver.Variable(a, "a", "/cpu:1"),
            gpusaver.Variable(b, "b", "/device:CPU:1"),
            gpusaver.Variable(c, "c", LOCAL + "CPU:1"),
        ],
        sharded=True,
    )
    assert saver.devices == [LOCAL + "CPU:1"]


def test_default_device_of_a_host_array_is_cpu0() -> None:
    v = gpusaver.Variable(np.zeros(3), name="v")
    assert v.device.canonical == LOCAL + "CPU:0"
    assert gpusaver.Saver({"v": np.zeros(3)}).devices == [LOCAL + "CPU:0"]


@pytest.mark.tf
@pytest.mark.parametrize("spec", TF_SPELLABLE)
def test_same_canonical_form_as_tensorflow(spec: str, tf: ModuleType) -> None:
    from tensorflow.python.distribute import device_util

    assert canonical_device(spec) == device_util.canonicalize(spec)


@pytest.mark.tf
def test_tensorflow_also_rejects_two_device_types(tf: ModuleType) -> None:
    from tensorflow.python.distribute import device_util

    with pytest.raises(ValueError):
        device_util.canonicalize("/cpu:0/gpu:1")
