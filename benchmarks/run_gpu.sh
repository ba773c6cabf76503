#!/usr/bin/env bash
# On a machine with NVIDIA GPUs and CuPy: the GPU tests and the GPU benchmark in one go.
# Results go to ${OUT:-benchmarks/results}/<date>-<gpu>-gpu-{tests.txt,bench.txt,bench.json}.
#
# gpusaver is used from this checkout (PYTHONPATH); it needs numpy, cupy, crc32c, ml_dtypes,
# protobuf>=7.35.1, nvidia-ml-py and pytest. A machine without a package index can take them
# as wheels: python3 -m pip install --no-index --target /tmp/site WHEELS && export PYTHONPATH=/tmp/site
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
tag="$(date +%F)-${gpu:-gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPUSAVER_BACKEND=cupy
nvidia-smi | tee "$out/$tag-gpu-tests.txt"
# The C extension of the host path (gpusaver/_native.c), built in place; without it the pure-Python path runs.
python3 setup.py -q build_ext --inplace 2>&1 | tail -n 3 | tee -a "$out/$tag-gpu-tests.txt"
python3 -c "from gpusaver import native; print('host path:', native.reason)" | tee -a "$out/$tag-gpu-tests.txt"
python3 -m pytest -p no:cacheprovider -m gpu -q -rs \
    tests/test_kernels_gpu.py tests/test_saver.py tests/reliability/test_rel_corruption.py \
    2>&1 | tee -a "$out/$tag-gpu-tests.txt"
status=${PIPESTATUS[0]}
python3 benchmarks/gpu_bench.py --json "$out/$tag-gpu-bench.json" --text "$out/$tag-gpu-bench.txt"
exit $status
