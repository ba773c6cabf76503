"""The CUDA kernels compile everywhere, and their logic is right, without a GPU.

* Every ``kernels/*.cu`` compiles with the real ``nvcc`` for sm_80 and sm_90
  with warnings as errors (and with NVRTC, the compiler CuPy uses at run time,
  when its library is present).
* The kernels' per-chunk helpers are ``__host__ __device__``: a small host
  program compiled by ``nvcc`` runs the exact kernel code on the CPU over every
  chunk and lane, and the results are compared with the CPU reference.
* ``import gpusaver.cuda.kernels`` does not import CuPy, and finds the sources.

Without ``nvcc`` these tests skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import struct
import subprocess
import sys

import crc32c
import numpy as np
import pytest

from gpusaver.cuda import kernels as _kernels, reference as _kernels_ref

REPO = pathlib.Path(__file__).resolve().parents[2]
KERNEL_DIR = REPO / "kernels"
KERNEL_FILES = sorted(KERNEL_DIR.glob("*.cu"))
ARCHS = ("80", "90")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = pathlib.Path(candidate, "bin", "nvcc")
        if candidate and path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def _require_nvcc() -> str:
    """Returns nvcc's path; skips without it, or fails in CI."""
    nvcc = _find_nvcc()
    if nvcc is None:
        message = "nvcc not found on PATH or in /usr/local/cuda/bin"
        if _in_ci():
            pytest.fail(message + " (required in CI)")
        pytest.skip(message)
    return nvcc


def _run(cmd: list[str], cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_kernel_sources_exist() -> None:
    assert {p.stem for p in KERNEL_FILES} >= set(_kernels.KERNELS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_without_warnings(
    source: pathlib.Path, arch: str, tmp_path: pathlib.Path
) -> None:
    nvcc = _require_nvcc()
    out = tmp_path / f"{source.stem}.sm_{arch}.cubin"
    cmd = [
        nvcc,
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-cubin",
        "-std=c++17",
        "-Werror",
        "all-warnings",
        "-Xptxas",
        "-warn-spills,-warn-lmem-usage",
        "-o",
        str(out),
        str(source),
    ]
    result = _run(cmd)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert not result.stderr.strip(), result.stderr
    assert out.stat().st_size > 0
    # Every entry point the launcher looks up is in the binary's symbols.
    binary = out.read_bytes()
    for kernel in _kernels.KERNELS.get(source.stem, ()):
        assert kernel.encode() + b"\0" in binary


@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_nvrtc_compiles(source: pathlib.Path) -> None:
    """CuPy compiles with NVRTC (no implicit host headers): check it does too.

    Uses NVRTC directly (CuPy's own wrapper asks the driver for the device's
    architecture), so it runs wherever the NVRTC library is installed.
    """
    pytest.importorskip("cupy")
    from cupy.cuda import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as exc:  # the NVRTC shared library is not installed
        pytest.skip(f"NVRTC is not available: {exc}")
    code = source.read_text(encoding="utf-8")
    for arch in ARCHS:
        prog = nvrtc.createProgram(code, source.name, (), ())
        try:
            options = (f"-arch=compute_{arch}", "-std=c++17")
            try:
                nvrtc.compileProgram(prog, options)
            except nvrtc.NVRTCError:
                pytest.fail(f"NVRTC {options}:\n{nvrtc.getProgramLog(prog)}")
            log = nvrtc.getProgramLog(prog).strip().strip("\0").strip()
            assert not log, log
            ptx = nvrtc.getPTX(prog)
        finally:
            nvrtc.destroyProgram(prog)
        text = ptx.decode() if isinstance(ptx, bytes) else ptx
        for kernel in _kernels.KERNELS.get(source.stem, ()):
            assert f".entry {kernel}(" in text


def test_import_does_not_import_cupy() -> None:
    code = (
        "import sys\n"
        "import gpusaver.cuda.kernels as k\n"
        "assert k.kernel_source_dir().is_dir()\n"
        "k.kernel_sources()\n"
        "import gpusaver.cuda.reference\n"
        "print('cupy' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_source_dir_found_from_checkout() -> None:
    assert _kernels.kernel_source_dir() == KERNEL_DIR.resolve()
    sources = _kernels.kernel_sources()
    assert set(sources) == {p.stem for p in KERNEL_FILES}
    for name, entries in _kernels.KERNELS.items():
        for entry in entries:
            assert 'extern "C" __global__' in sources[name]
            assert entry in sources[name]


def test_source_dir_found_in_installed_layout(tmp_path: pathlib.Path) -> None:
    """A wheel holds the sources in gpusaver/kernels/ (pyproject force-include)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "gpusaver", tmp_path / "gpusaver", ignore=ignore)
    shutil.copytree(KERNEL_DIR, tmp_path / "gpusaver" / "kernels", ignore=ignore)
    code = "import gpusaver.cuda.kernels as k; print(k.kernel_source_dir())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert pathlib.Path(result.stdout.strip()) == (tmp_path / "gpusaver" / "kernels").resolve()


# --- The kernels' logic, run on the CPU --------------------------------------

HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include "pack.cu"
#include "crc32c.cu"

typedef unsigned long long u64;

static std::vector<u64> read_u64(FILE* f, size_t n) {
    std::vector<u64> v(n);
    if (n && fread(v.data(), 8, n, f) != n) { std::exit(3); }
    return v;
}

// 64-byte aligned buffer with 64 spare bytes, so aligned word reads past a
// range's last byte stay inside the allocation.
static unsigned char* read_blob(FILE* f, u64 n) {
    unsigned char* p = (unsigned char*)std::aligned_alloc(64, ((n + 64) / 64 + 1) * 64);
    if (!p) { std::exit(4); }
    if (n && fread(p, 1, n, f) != n) { std::exit(3); }
    return p;
}

int main(int argc, char** argv) {
    if (argc != 4) { return 2; }
    const std::string mode = argv[1];
    FILE* in = std::fopen(argv[2], "rb");
    FILE* out = std::fopen(argv[3], "wb");
    if (!in || !out) { return 2; }
    std::vector<u64> head = read_u64(in, 4);
    const u64 n = head[0], chunk = head[1], blob_size = head[2], stage_size = head[3];
    std::vector<u64> offs = read_u64(in, n);      // range offsets in the blob
    std::vector<u64> soffs = read_u64(in, n);     // staging offsets (pack/unpack)
    std::vector<u64> sizes = read_u64(in, n);
    std::vector<u64> starts = read_u64(in, n + 1);
    std::vector<u64> ntab = read_u64(in, 1);
    std::vector<unsigned> tables(ntab[0]);
    if (ntab[0] && fread(tables.data(), 4, ntab[0], in) != ntab[0]) { return 3; }
    unsigned char* blob = read_blob(in, blob_size);
    unsigned char* stage = read_blob(in, stage_size);
    std::vector<u64> ptrs(n);
    for (u64 r = 0; r < n; ++r) { ptrs[r] = (u64)(blob + offs[r]); }
    const u64 total = starts[n];
    if (mode == "pack" || mode == "unpack") {
        const int to_staging = mode == "pack";
        // Lanes in reverse order: the result must not depend on the order.
        for (u64 c = 0; c < total; ++c) {
            for (int lane = 31; lane >= 0; --lane) {
                gs_copy_chunk(c, (unsigned)lane, 32u, ptrs.data(), soffs.data(),
                              sizes.data(), starts.data(), (int)n, chunk, stage,
                              to_staging);
            }
        }
        if (to_staging) { std::fwrite(stage, 1, stage_size, out); }
        else { std::fwrite(blob, 1, blob_size, out); }
    } else if (mode == "crc") {
        std::vector<unsigned> crc(n, 0u);
        for (u64 c = 0; c < total; ++c) {
            const int r = gs_crc_find_range(starts.data(), (int)n, c);
            crc[r] ^= gs_crc_chunk_term(c, r, ptrs.data(), sizes.data(), starts.data(),
                                        chunk, tables.data(), tables.data() + 2048);
        }
        for (u64 r = 0; r < n; ++r) {
            const unsigned pair[2] = {crc[r], gs_crc_mask(crc[r])};
            std::fwrite(pair, 4, 2, out);
        }
    } else {
        return 2;
    }
    std::fclose(out);
    return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    nvcc = _require_nvcc()
    work = tmp_path_factory.mktemp("harness")
    src = work / "harness.cu"
    src.write_text(HARNESS, encoding="utf-8")
    exe = work / "harness"
    cmd = [
        nvcc,
        "-std=c++17",
        "-O2",
        "-arch=sm_80",
        "-I",
        str(KERNEL_DIR),
        "-Xcompiler",
        "-fno-strict-aliasing,-Wall",
        "-o",
        str(exe),
        str(src),
    ]
    result = _run(cmd, cwd=work)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return exe


def _u64(values: np.ndarray | list[int]) -> bytes:
    return np.asarray(values, dtype="<u8").tobytes()


def _run_harness(
    exe: pathlib.Path,
    mode: str,
    *,
    blob: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    chunk: int,
    staging: np.ndarray | None = None,
    staging_offsets: np.ndarray | None = None,
    tables: np.ndarray | None = None,
) -> bytes:
    n = len(sizes)
    staging = np.zeros(0, np.uint8) if staging is None else staging
    staging_offsets = np.zeros(n, np.uint64) if staging_offsets is None else staging_offsets
    tables = np.zeros(0, np.uint32) if tables is None else tables
    payload = b"".join(
        [
            _u64([n, chunk, blob.size, staging.size]),
            _u64(offsets),
            _u64(staging_offsets),
            _u64(sizes),
            _u64(_kernels.chunk_starts(sizes, chunk)),
            _u64([tables.size]),
            tables.astype("<u4").tobytes(),
            blob.tobytes(),
            staging.tobytes(),
        ]
    )
    inp = exe.parent / f"{mode}.in"
    outp = exe.parent / f"{mode}.out"
    inp.write_bytes(payload)
    result = _run([str(exe), mode, str(inp), str(outp)])
    assert result.returncode == 0, result.stderr
    return outp.read_bytes()


def _layout(rng: np.random.Generator, sizes: list[int], max_gap: int) -> np.ndarray:
    """Offsets placing ranges one after another with random gaps (unaligned)."""
    offsets, pos = [], 0
    for size in sizes:
        pos += int(rng.integers(0, max_gap + 1))
        offsets.append(pos)
        pos += size
    return np.asarray(offsets, dtype=np.uint64)


def _copy_cases() -> list[tuple[str, list[int]]]:
    rng = np.random.default_rng(1234)
    sizes = (0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1000)
    every_alignment = [s for s in sizes for _ in range(16)]
    return [
        ("alignments", every_alignment),
        ("tiny", [int(x) for x in rng.integers(0, 40, 3000)]),
        ("ones", [1] * 500),
        ("mixed", [int(x) for x in rng.integers(0, 70000, 60)] + [0, 0, 16384, 16385, 32768]),
        ("empty", [0, 0, 0]),
    ]


@pytest.mark.parametrize("case", _copy_cases(), ids=lambda c: c[0])
def test_pack_unpack_logic_on_host(harness: pathlib.Path, case: tuple[str, list[int]]) -> None:
    name, size_list = case
    rng = np.random.default_rng(len(size_list))
    sizes = np.asarray(size_list, dtype=np.uint64)
    src_offsets = _layout(rng, size_list, 19)
    stage_offsets = _layout(rng, size_list, 23)
    blob = rng.integers(0, 256, int(src_offsets[-1] + sizes[-1]) + 40, dtype=np.uint8)
    stage_size = int(stage_offsets[-1] + sizes[-1]) + 40
    for chunk in (16384, 48):
        # pack: blob ranges -> staging, bytes outside the ranges untouched.
        staging = np.full(stage_size, 0xAB, dtype=np.uint8)
        got = _run_harness(
            harness,
            "pack",
            blob=blob,
            offsets=src_offsets,
            sizes=sizes,
            chunk=chunk,
            staging=staging,
            staging_offsets=stage_offsets,
        )
        want = staging.copy()
        _kernels_ref.pack_ref(
            [blob[o : o + s] for o, s in zip(src_offsets.tolist(), size_list)],
            want,
            stage_offsets.tolist(),
        )
        assert got == want.tobytes(), (name, chunk)
        # unpack: staging -> blob ranges.
        packed = rng.integers(0, 256, stage_size, dtype=np.uint8)
        got = _run_harness(
            harness,
            "unpack",
            blob=blob,
            offsets=src_offsets,
            sizes=sizes,
            chunk=chunk,
            staging=packed,
            staging_offsets=stage_offsets,
        )
        want = blob.copy()
        _kernels_ref.unpack_ref(
            packed,
            [want[o : o + s] for o, s in zip(src_offsets.tolist(), size_list)],
            stage_offsets.tolist(),
        )
        assert got == want.tobytes(), (name, chunk)


@pytest.mark.parametrize("chunk", [4096, 64, 48, 1])
def test_crc32c_logic_on_host(harness: pathlib.Path, chunk: int) -> None:
    rng = np.random.default_rng(chunk)
    size_list = [0, 1, 2, 15, 16, 17, 63, 64, 65, 4095, 4096, 4097, 12288, 100000]
    size_list += [int(x) for x in rng.integers(0, 300, 400)]
    size_list += [int(x) for x in rng.integers(0, 3 * 4096, 20)]
    if chunk == 1:
        size_list = size_list[:40]
    sizes = np.asarray(size_list, dtype=np.uint64)
    offsets = _layout(rng, size_list, 21)
    blob = rng.integers(0, 256, int(offsets[-1] + sizes[-1]) + 16, dtype=np.uint8)
    tables = _kernels.crc32c_tables(chunk)
    got = _run_harness(
        harness, "crc", blob=blob, offsets=offsets, sizes=sizes, chunk=chunk, tables=tables
    )
    pairs = struct.unpack(f"<{2 * len(size_list)}I", got)
    ranges = [blob[o : o + s] for o, s in zip(offsets.tolist(), size_list)]
    plain = _kernels_ref.crc32c_ranges_ref(ranges)
    masked = _kernels_ref.crc32c_ranges_ref(ranges, masked=True)
    assert list(pairs[0::2]) == plain.tolist()
    assert list(pairs[1::2]) == masked.tolist()
    assert plain.tolist() == [crc32c.crc32c(r.tobytes()) for r in ranges]
