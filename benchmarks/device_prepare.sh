#!/usr/bin/env bash
# Fills .carry/ (ignored by git) with what benchmarks/device_run.sh needs on a GPU machine whose Python 3.12 has
# CuPy, PyTorch and nvcc but no network:
#   .carry/wheels/   cp312 wheels of every package in benchmarks/device_requirements.txt (the versions carried)
#   .carry/native/   gpusaver's C extension built for CPython 3.12 here: the fallback where it cannot be built there
# Run it here, then on the GPU machine: bash benchmarks/device_run.sh, with .carry carried beside the working tree.
# CARRY_DIR=<dir> fills another folder (the tests use that). Needs pip and a Python 3.12 (pyenv's, or python3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
carry=${CARRY_DIR:-.carry}
rm -rf "$carry/wheels" "$carry/native"
mkdir -p "$carry/wheels" "$carry/native"

mapfile -t pins < <(awk '!/^#/ && NF == 4 {print $1 "==" $4}' benchmarks/device_requirements.txt)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64 any; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$carry/wheels" "${pins[@]}"

py312=${PYTHON312:-}
if [ -z "$py312" ]; then
    if command -v pyenv >/dev/null && [ -x "$(pyenv root)/versions/3.12.1/bin/python3.12" ]; then
        py312="$(pyenv root)/versions/3.12.1/bin/python3.12"
    else
        py312=$(ls "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -n1 || true)
        [ -n "$py312" ] || py312=$(command -v python3.12 || true)
    fi
fi
if [ -z "$py312" ]; then
    echo "device_prepare: no Python 3.12 here; .carry/native stays empty (the device builds the extension itself)" >&2
else
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    "$py312" -m venv "$build/venv"
    "$build/venv/bin/python" -m pip install -q numpy setuptools
    mkdir -p "$build/src"
    cp -r setup.py pyproject.toml README.md gpusaver kernels "$build/src/"
    rm -f "$build/src/gpusaver/"_native.cpython-*.so
    (cd "$build/src" && "$build/venv/bin/python" setup.py -q build_ext --inplace >/dev/null)
    cp "$build/src/gpusaver/"_native.cpython-312-*.so "$carry/native/"
fi
echo "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes') (prepared $(date -u +%FT%TZ))" >"$carry/COMMIT"
ls -l "$carry/wheels" "$carry/native"
du -sh "$carry"
