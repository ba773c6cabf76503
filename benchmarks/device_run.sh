#!/usr/bin/env bash
# gpusaver on a GPU machine, in one command: install what is carried, build the C extension, check every CUDA
# kernel against the CPU reference, run the gpu-marked tests, benchmark, and run compute-sanitizer on a small
# save and restore. Meant for a machine whose Python 3.12 has CuPy, PyTorch and nvcc but no network.
#
#   here:   bash benchmarks/device_prepare.sh                 # fills .carry/ (wheels, a cp312 build of the extension)
#           DEVICE_REHEARSAL=1 bash benchmarks/device_run.sh   # every step that needs no GPU, in a fresh Python 3.12
#   there:  bash benchmarks/device_run.sh                      # from the repository root, with .carry/ beside it
#
# Each step has its own time limit inside DEVICE_BUDGET_S (default 510 s) and writes its log under $OUT as it
# goes (default: a new temporary folder): setup.log, kernels.log, tests.log, bench.log, bench.json,
# sanitizer.log, summary.txt. The summary table is printed last. The exit status is that of the first failed step.
# DEVICE_STEPS=setup,kernels,tests,bench,sanitizer,disk runs only the steps named (setup always runs); the order is
# setup, kernels, tests, bench, disk (the benchmark on the machine's disk with fsync, for information), sanitizer.
# DEVICE_BENCH_GIB (default 2) and DEVICE_BENCH_MANY (default 100000) size the benchmark's two workloads.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
T0=$SECONDS
budget=${DEVICE_BUDGET_S:-510}
rehearsal=${DEVICE_REHEARSAL:-0}
carry=${CARRY_DIR:-.carry}
steps=${DEVICE_STEPS:-setup,kernels,tests,bench,sanitizer,disk}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX takes 75% of the GPU otherwise
summary=()
first_failure=0

left() { echo $((budget - (SECONDS - T0))); }
wanted() { [[ ",$steps," == *",$1,"* ]]; }
note() { echo "$*" | tee -a "$OUT/setup.log"; }
record() {  # name status seconds detail
    summary+=("$(printf '%-10s %-8s %5ss  %s' "$1" "$2" "$3" "$4")")
    if [ "$2" = FAILED ] && [ "$first_failure" = 0 ]; then first_failure=1; fi
}
# run_step NAME LIMIT COMMAND...: the command's output goes to $OUT/NAME.log; its limit is cut to the time left.
run_step() {
    local name=$1 limit=$2 t rc
    shift 2
    local remain=$(( $(left) - 10 ))
    if ! wanted "$name"; then record "$name" skipped 0 "not in DEVICE_STEPS"; return 0; fi
    if (( remain < 20 )); then record "$name" skipped 0 "out of time (${remain}s left)"; return 0; fi
    (( limit > remain )) && limit=$remain
    t=$SECONDS
    echo "== $name: $* (limit ${limit}s)" | tee -a "$OUT/$name.log"
    timeout -k 5 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    local detail
    detail=$(grep -E -- "${STEP_SUMMARY_RE:-^$}" "$OUT/$name.log" | tail -n 1)
    if (( rc == 124 || rc == 137 )); then
        record "$name" FAILED $((SECONDS - t)) "timed out after ${limit}s; $detail"
    elif (( rc != 0 )); then
        record "$name" FAILED $((SECONDS - t)) "exit $rc; $detail"
    else
        record "$name" ok $((SECONDS - t)) "$detail"
    fi
    return $rc
}

# ------------------------------------------------------------------ setup
: >"$OUT/setup.log"
note "gpusaver device run, $(date -u +%FT%TZ), rehearsal=$rehearsal, budget ${budget}s, steps $steps"
# The device machine receives a copy of the working tree whose .git may be stale: name the tree by the commit
# device_prepare.sh recorded in the carried folder (and whether the tree had changes then).
note "tree: $(cat "$carry/COMMIT" 2>/dev/null || echo 'unknown (no .carry/COMMIT)')"
t=$SECONDS
if [ "$rehearsal" = 1 ]; then
    # A fresh Python 3.12 standing in for the GPU machine's: numpy and setuptools (which that image has) from the
    # usual index; everything else only from the carried wheels.
    py312=${PYTHON312:-$( (ls "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null || command -v python3.12) | tail -n1)}
    [ -n "$py312" ] || { note "rehearsal: no Python 3.12 here"; exit 2; }
    venv=$(mktemp -d)/py312
    "$py312" -m venv "$venv" >>"$OUT/setup.log" 2>&1 || { note "rehearsal: venv failed"; exit 2; }
    "$venv/bin/python" -m pip install -q numpy setuptools >>"$OUT/setup.log" 2>&1 || { note "rehearsal: numpy failed"; exit 2; }
    PY="$venv/bin/python"
    SITE=$(dirname "$venv")/site
else
    PY=${DEVICE_PYTHON:-python3}
    SITE=/tmp/gpusaver-site
    { nvidia-smi; nvcc --version | tail -n 2; } >>"$OUT/setup.log" 2>&1
fi
note "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# Which carried wheels this machine needs: a package it lacks, or has older than the minimum.
need=$("$PY" - "$carry/wheels" <<'PYEOF' 2>>"$OUT/setup.log"
import glob, importlib.metadata as md, os, re, sys

def key(v):
    return [int(x) for x in re.findall(r"\d+", v.split("+")[0])[:4]]

wheels, want = sys.argv[1], []
for line in open("benchmarks/device_requirements.txt"):
    if line.startswith("#") or len(line.split()) != 4:
        continue
    dist, _module, minimum, carried = line.split()
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        have = None
    ok = have is not None and key(have) >= key(minimum)
    print(f"  {dist:18} there {have or '-':14} minimum {minimum:10} -> {'kept' if ok else 'carried ' + carried}",
          file=sys.stderr)
    if not ok:
        norm = re.sub(r"[-_.]+", "_", dist).lower()
        found = [w for w in glob.glob(os.path.join(wheels, "*.whl"))
                 if re.sub(r"[-_.]+", "_", os.path.basename(w).split("-")[0]).lower() == norm
                 and os.path.basename(w).split("-")[1] == carried]
        if not found:
            sys.exit(f"no carried wheel of {dist} {carried} in {wheels}: run benchmarks/device_prepare.sh")
        want.append(found[0])
print("\n".join(want))
PYEOF
)
rc=$?
if (( rc != 0 )); then
    record setup FAILED $((SECONDS - t)) "a carried wheel is missing (setup.log)"
    printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
    exit 1
fi
rm -rf "$SITE"
mkdir -p "$SITE"
if [ -n "$need" ]; then
    # shellcheck disable=SC2086
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $need \
            >>"$OUT/setup.log" 2>&1; then
        record setup FAILED $((SECONDS - t)) "pip could not install the carried wheels (setup.log)"
        printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
        exit 1
    fi
fi
export PYTHONPATH="$SITE:$repo"

# The C extension: built here if this machine can; else the cp312 build carried in .carry/native.
rm -f gpusaver/_native.cpython-312-*.so
if timeout 180 "$PY" setup.py -q build_ext --inplace >>"$OUT/setup.log" 2>&1 \
        && "$PY" -c "import gpusaver._native" 2>>"$OUT/setup.log"; then
    native_from="built here"
else
    rm -f gpusaver/_native.cpython-312-*.so
    cp "$carry"/native/_native.cpython-312-*.so gpusaver/ 2>>"$OUT/setup.log" && native_from="carried cp312 build" \
        || native_from="none (pure-Python host path)"
fi
native=$("$PY" -c "from gpusaver import native; print('C extension' if native.available() else 'pure Python', '-', native.reason)" 2>&1)
note "host path: $native_from; $native"
imports=$("$PY" -c "
import importlib.metadata as md, gpusaver, crc32c, google.protobuf, ml_dtypes, pynvml, pytest, hypothesis
from gpusaver._proto import saver_pb2
print('gpusaver', gpusaver.__version__, '| protobuf', md.version('protobuf'), '| crc32c', md.version('crc32c'),
      '| numpy', md.version('numpy'))
" 2>&1)
rc=$?
note "imports: $imports"
if (( rc != 0 )); then
    record setup FAILED $((SECONDS - t)) "gpusaver or a dependency does not import (setup.log)"
else
    record setup ok $((SECONDS - t)) "host path: $native_from"
fi
if [ "$rehearsal" != 1 ]; then
    backend=$("$PY" -c "from gpusaver import backends; print(backends.gpu_backend() and 'cupy', backends.unavailable_reason())" 2>&1)
    note "gpu backend: $backend"
fi

# ------------------------------------------------------------------ the steps
pytest_args=(-p no:cacheprovider -q -rs -o addopts="--strict-markers")
if [ "$rehearsal" = 1 ]; then
    # What needs no GPU: the GPU tests and scripts must import and collect under this Python.
    STEP_SUMMARY_RE='tests? collected|passed|failed|error' \
        run_step kernels 120 "$PY" -m pytest "${pytest_args[@]}" --collect-only tests/cuda/test_kernels_gpu.py
    STEP_SUMMARY_RE='passed|failed|error' \
        run_step tests 300 "$PY" -m pytest "${pytest_args[@]}" -x tests/backends/test_cupy_backend_fake.py tests/cuda/test_kernels_compile.py
    STEP_SUMMARY_RE='elapsed' run_step bench 120 bash -c "
        '$PY' benchmarks/gpu_bench.py --dry-run --workload mixed --json /tmp/gs-bench-mixed.json >>'$OUT/bench.log' &&
        '$PY' benchmarks/gpu_bench.py --dry-run --workload many --many-count 500 --json /tmp/gs-bench-many.json &&
        '$PY' benchmarks/device_summary.py merge '$OUT/bench.json' /tmp/gs-bench-mixed.json /tmp/gs-bench-many.json"
    STEP_SUMMARY_RE='.' run_step sanitizer 60 "$PY" -m py_compile benchmarks/gpu_smoke.py
else
    STEP_SUMMARY_RE='compute capability|passed|failed|error' \
        run_step kernels 120 env GPUSAVER_KERNEL_SYNC=1 bash -c "
        '$PY' benchmarks/gpu_smoke.py --kernels-only && '$PY' -m pytest ${pytest_args[*]} tests/cuda/test_kernels_gpu.py"
    STEP_SUMMARY_RE='passed|failed|error' \
        run_step tests 150 "$PY" -m pytest "${pytest_args[@]}" -m gpu tests \
        --ignore=tests/test_saver_tf.py --ignore=tests/format/test_tf_interop.py  # TensorFlow only: not on that machine
    bench_dir=${DEVICE_BENCH_DIR:-/dev/shm/gpusaver-bench}
    mkdir -p "$bench_dir"
    STEP_SUMMARY_RE='elapsed' run_step bench 240 bash -c "
        '$PY' benchmarks/gpu_bench.py --workload mixed --size-gib ${DEVICE_BENCH_GIB:-2} --repeat 3 --durable off \
            --cache warm --dir '$bench_dir' --json /tmp/gs-bench-mixed.json &&
        '$PY' benchmarks/gpu_bench.py --workload many --many-count ${DEVICE_BENCH_MANY:-100000} --repeat 3 \
            --durable off --cache warm --dir '$bench_dir' --json /tmp/gs-bench-many.json;
        rc=\$?; '$PY' benchmarks/device_summary.py merge '$OUT/bench.json' /tmp/gs-bench-mixed.json /tmp/gs-bench-many.json
        exit \$rc"
    # For information: the same on the machine's disk, fsync on (before the sanitizer: it only adds rows).
    disk_dir=${DEVICE_DISK_DIR:-/var/tmp/gpusaver-bench}
    mkdir -p "$disk_dir"
    STEP_SUMMARY_RE='elapsed' run_step disk 120 bash -c "
        '$PY' benchmarks/gpu_bench.py --workload mixed --size-gib ${DEVICE_DISK_GIB:-1} --repeat 3 --durable on \
            --cache drop --dir '$disk_dir' --json /tmp/gs-bench-disk.json >>'$OUT/bench.log'; rc=\$?
        '$PY' benchmarks/device_summary.py merge '$OUT/bench.json' /tmp/gs-bench-mixed.json /tmp/gs-bench-many.json \
            /tmp/gs-bench-disk.json
        exit \$rc"
    if command -v compute-sanitizer >/dev/null; then
        STEP_SUMMARY_RE='ERROR SUMMARY|smoke' \
            run_step sanitizer 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" benchmarks/gpu_smoke.py
    else
        record sanitizer skipped 0 "compute-sanitizer is not on PATH"
    fi
fi

# ------------------------------------------------------------------ summary
{
    echo
    echo "gpusaver device run: $(date -u +%FT%TZ), ${SECONDS}s, rehearsal=$rehearsal"
    grep -E "^(host path|imports|gpu backend):" "$OUT/setup.log"
    printf '%s\n' "${summary[@]}"
    if [ -f "$OUT/bench.json" ]; then "$PY" benchmarks/device_summary.py table "$OUT/bench.json"; fi
} | tee "$OUT/summary.txt"
exit $first_failure
