"""The NVML device inventory, on this machine and against a small fake ``pynvml``."""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
from hypothesis import given, strategies as st

from gpusaver.cuda import nvml
from gpusaver.cli import main


@pytest.fixture(autouse=True)
def fresh_nvml() -> Iterator[None]:
    """Every test starts and ends with NVML shut down and nothing cached."""
    nvml.shutdown()
    yield
    nvml.shutdown()


# --------------------------------------------------------------- the fake
class FakeNVMLError(Exception):
    """Stands in for ``pynvml.NVMLError``."""


@dataclass
class FakeGpu:
    name: Any = "NVIDIA Fake 80GB"
    uuid: Any = "GPU-00000000-1111-2222-3333-444444444444"
    bus_id: Any = "00000000:3B:00.0"
    total: int = 80 << 30
    free: int = 79 << 30
    mask: list[int] = field(default_factory=lambda: [0b1111])
    fail: set[str] = field(default_factory=set)  # queries that raise


def make_fake(gpus: list[FakeGpu], init_error: str | None = None, count_error: str | None = None) -> types.ModuleType:
    """A module with just the ``pynvml`` functions gpusaver calls; ``calls`` counts them."""
    fake = types.ModuleType("pynvml")
    calls: Counter[str] = Counter()
    fake.calls = calls  # type: ignore[attr-defined]
    fake.NVMLError = FakeNVMLError  # type: ignore[attr-defined]

    def query(what: str, handle: int) -> FakeGpu:
        calls[what] += 1
        gpu = gpus[handle]
        if what in gpu.fail:
            raise FakeNVMLError("Not Supported")
        return gpu

    def nvmlInit() -> None:
        calls["init"] += 1
        if init_error:
            raise FakeNVMLError(init_error)

    def nvmlShutdown() -> None:
        calls["shutdown"] += 1

    def nvmlDeviceGetCount() -> int:
        calls["count"] += 1
        if count_error:
            raise FakeNVMLError(count_error)
        return len(gpus)

    def nvmlDeviceGetHandleByIndex(index: int) -> int:
        if not 0 <= index < len(gpus):
            raise FakeNVMLError("Invalid Argument")
        query("handle", index)
        return index

    def nvmlDeviceGetCpuAffinity(handle: int, cpu_set_size: int) -> list[int]:
        assert cpu_set_size * 64 >= (os.cpu_count() or 1)
        words = query("affinity", handle).mask
        return (words + [0] * cpu_set_size)[:cpu_set_size]

    fake.nvmlInit = nvmlInit  # type: ignore[attr-defined]
    fake.nvmlShutdown = nvmlShutdown  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = nvmlDeviceGetCount  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = nvmlDeviceGetHandleByIndex  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda h: query("name", h).name  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUUID = lambda h: query("uuid", h).uuid  # type: ignore[attr-defined]
    fake.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=query("pci", h).bus_id)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=query("memory", h).total, free=gpus[h].free, used=gpus[h].total - gpus[h].free
    )
    fake.nvmlDeviceGetCpuAffinity = nvmlDeviceGetCpuAffinity  # type: ignore[attr-defined]
    fake.nvmlSystemGetDriverVersion = lambda: b"999.12"  # type: ignore[attr-defined]
    return fake


def install(monkeypatch: pytest.MonkeyPatch, fake: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake)


# ------------------------------------------------------- this machine, real
def test_real_machine_never_raises(capsys: pytest.CaptureFixture[str]) -> None:
    gpus = nvml.inventory(refresh=True)
    assert isinstance(gpus, list) and all(isinstance(g, nvml.GpuInfo) for g in gpus)
    status = nvml.nvml_status()
    assert status
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    if not gpus:  # this CI machine: no driver, no GPU
        assert "NVML not available" in status or "no NVIDIA GPU" in status
        assert out.startswith("no NVIDIA GPU / NVML not available (")
        assert nvml.free_memory(0) is None and nvml.cpu_affinity(0) is None
        assert nvml.pin_current_thread_near(0) is False
    else:
        assert all(f"GPU {g.index}  {g.name}" in out for g in gpus)


def test_without_the_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, None)  # makes ``import pynvml`` raise ImportError
    assert nvml.inventory() == []
    assert "pynvml" in nvml.nvml_status() and "cannot be imported" in nvml.nvml_status()


def test_without_a_driver(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = make_fake([FakeGpu()], init_error="Driver Not Loaded")
    install(monkeypatch, fake)
    assert nvml.inventory() == []
    assert nvml.nvml_status() == (
        "NVML not available: nvmlInit failed (Driver Not Loaded); no NVIDIA driver on this machine?"
    )
    assert nvml.free_memory(0) is None and nvml.cpu_affinity(0) is None
    assert nvml.pin_current_thread_near(0) is False
    assert fake.calls["init"] == 1  # the failure is cached ...
    nvml.inventory(refresh=True)
    assert fake.calls["init"] == 2  # ... until a refresh
    assert main(["info"]) == 0
    assert capsys.readouterr().out.startswith("no NVIDIA GPU / NVML not available (NVML not available: nvmlInit")
    nvml.shutdown()
    assert fake.calls["shutdown"] == 0  # never initialised, never shut down


def test_no_gpu_with_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, make_fake([]))
    assert nvml.inventory() == []
    assert nvml.nvml_status() == "no NVIDIA GPU: NVML available: 0 NVIDIA GPUs (driver 999.12)"


def test_device_count_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, make_fake([FakeGpu()], count_error="GPU is lost"))
    assert nvml.inventory() == []
    assert "nvmlDeviceGetCount failed (GPU is lost)" in nvml.nvml_status()


# --------------------------------------------------------- fake GPUs found
def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(mask=[0b1011]),
        FakeGpu(
            name=b"NVIDIA Older Bindings",  # older nvidia-ml-py returns bytes
            uuid=b"GPU-ffffffff-0000-0000-0000-000000000001",
            bus_id=b"00000000:AF:00.0",
            total=16 << 30,
            free=1 << 30,
            mask=[0, 1 << 3],
        ),
    ]


def test_inventory_from_a_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_fake(two_gpus())
    install(monkeypatch, fake)
    gpus = nvml.inventory()
    assert gpus == [
        nvml.GpuInfo(0, "NVIDIA Fake 80GB", "GPU-00000000-1111-2222-3333-444444444444", "00000000:3B:00.0",
                     80 << 30, 79 << 30, [0, 1, 3]),
        nvml.GpuInfo(1, "NVIDIA Older Bindings", "GPU-ffffffff-0000-0000-0000-000000000001", "00000000:AF:00.0",
                     16 << 30, 1 << 30, [67]),
    ]
    assert nvml.nvml_status() == "NVML available: 2 NVIDIA GPUs (driver 999.12)"
    gpus[0].cpu_affinity.append(99)  # callers get copies
    assert nvml.inventory()[0].cpu_affinity == [0, 1, 3]
    assert fake.calls["init"] == 1 and fake.calls["count"] == 1  # cached
    nvml.inventory(refresh=True)
    assert fake.calls["init"] == 1 and fake.calls["count"] == 2  # re-probed, not re-initialised
    assert nvml.cpu_affinity(0) == [0, 1, 3] and nvml.cpu_affinity(1) == [67]
    assert nvml.cpu_affinity(2) is None and nvml.free_memory(2) is None
    nvml.shutdown()
    assert fake.calls["shutdown"] == 1
    nvml.shutdown()
    assert fake.calls["shutdown"] == 1


def test_free_memory_is_live(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = two_gpus()
    install(monkeypatch, make_fake(gpus))
    assert nvml.free_memory(1) == 1 << 30
    gpus[1].free = 3 << 30
    assert nvml.free_memory(1) == 3 << 30
    assert nvml.inventory()[1].memory_free == 1 << 30  # the cached snapshot


def test_unsupported_queries_degrade_per_field(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, make_fake([FakeGpu(fail={"affinity", "memory", "name"}), FakeGpu(fail={"handle"})]))
    gpus = nvml.inventory()
    assert len(gpus) == 1
    assert (gpus[0].name, gpus[0].memory_total, gpus[0].memory_free, gpus[0].cpu_affinity) == ("", None, None, [])
    assert gpus[0].uuid.startswith("GPU-")
    assert nvml.cpu_affinity(0) is None and nvml.pin_current_thread_near(0) is False
    assert nvml.free_memory(0) is None
    assert nvml.nvml_status().endswith("; skipped GPU 1: Not Supported")


def test_init_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_fake(two_gpus())
    install(monkeypatch, fake)
    results: list[int] = []
    barrier = threading.Barrier(8)

    def probe() -> None:
        barrier.wait()
        results.append(len(nvml.inventory()))

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2] * 8
    assert fake.calls["init"] == 1 and fake.calls["count"] == 1


def test_pci_bus_id_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, make_fake(two_gpus()))
    assert nvml.normalize_pci_bus_id("00000000:3B:00.0") == "0000:3b:00.0"
    assert nvml.normalize_pci_bus_id(b"0000:af:00.0") == "0000:af:00.0"
    assert nvml.normalize_pci_bus_id("3b:00.0") == "0000:3b:00.0"
    by_cuda_spelling = nvml.by_pci_bus_id("0000:af:00.0")
    assert by_cuda_spelling is not None and by_cuda_spelling.index == 1
    assert nvml.by_pci_bus_id("0000:01:00.0") is None


def _in_new_thread(fn: Any) -> Any:
    """Runs ``fn`` on a thread of its own (affinity is per thread) and returns its result."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


def test_pin_current_thread_near(monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    near = allowed[:1]
    mask = [0] * (near[0] // 64 + 1)
    mask[near[0] // 64] = 1 << (near[0] % 64)
    far = max(allowed) + 1  # a CPU this process may not use
    install(monkeypatch, make_fake([FakeGpu(mask=mask), FakeGpu(mask=[0] * (far // 64) + [1 << (far % 64)])]))

    def pin_and_read() -> tuple[bool, list[int] | None]:
        pinned = nvml.pin_current_thread_near(0)
        now = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return pinned, now

    pinned, now = _in_new_thread(pin_and_read)
    if hasattr(os, "sched_setaffinity"):
        assert pinned is True and now == near
        assert sorted(os.sched_getaffinity(0)) == allowed  # this thread is untouched
    else:
        assert pinned is False
    assert _in_new_thread(lambda: nvml.pin_current_thread_near(1)) is False  # no allowed CPU near GPU 1
    assert _in_new_thread(lambda: nvml.pin_current_thread_near(7)) is False  # no GPU 7


def test_info_command_with_fake_gpus(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    gpus = two_gpus()
    gpus[0].mask = [0b1_0000_1111]
    install(monkeypatch, make_fake(gpus))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "NVML available: 2 NVIDIA GPUs (driver 999.12)"
    assert "GPU 0  NVIDIA Fake 80GB" in out and "GPU 1  NVIDIA Older Bindings" in out
    assert "  pci bus id  00000000:AF:00.0" in out
    assert "  memory      80.0 GiB total, 79.0 GiB free" in out
    assert "  cpus        0-3,8" in out and "  cpus        67" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"].startswith("NVML available")
    assert [g["uuid"] for g in info["gpus"]] == [
        "GPU-00000000-1111-2222-3333-444444444444", "GPU-ffffffff-0000-0000-0000-000000000001"
    ]
    assert info["gpus"][0]["cpu_affinity"] == [0, 1, 2, 3, 8]


# ------------------------------------------------------ the bitmask decoder
def test_cpu_ids_from_mask_examples() -> None:
    assert nvml.cpu_ids_from_mask([]) == []
    assert nvml.cpu_ids_from_mask([0]) == []
    assert nvml.cpu_ids_from_mask([0b1011]) == [0, 1, 3]
    assert nvml.cpu_ids_from_mask([0, 1]) == [64]
    assert nvml.cpu_ids_from_mask([(1 << 64) - 1]) == list(range(64))
    assert nvml.cpu_ids_from_mask([1 << 63, 1 << 63]) == [63, 127]
    assert nvml.cpu_ids_from_mask([0x8000_0001, 0x1], bits_per_word=32) == [0, 31, 32]


@given(st.sets(st.integers(min_value=0, max_value=1023)), st.sampled_from([32, 64]))
def test_cpu_ids_from_mask_round_trip(cpus: set[int], bits: int) -> None:
    words = [0] * (1024 // bits)
    for cpu in cpus:
        words[cpu // bits] |= 1 << (cpu % bits)
    assert nvml.cpu_ids_from_mask(words, bits_per_word=bits) == sorted(cpus)
