# Sourced by examples/run.sh and tests/run.sh. `gpusaver_setup EXTRAS` makes ./.venv (or
# $GPUSAVER_VENV) and installs gpusaver into it, editable, with those extras. Idempotent.
GPUSAVER_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="${GPUSAVER_VENV:-$GPUSAVER_ROOT/.venv}"

# The CuPy wheel must match the driver: CUDA 13 wheels need a CUDA 13 driver.
gpusaver_cuda_extra() {
    local v
    v=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1)
    if [ -n "$v" ] && [ "$v" -lt 13 ]; then echo cuda12; else echo cuda13; fi
}

gpusaver_setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    # A venv made by an older (hatchling) build can keep an empty site-packages/gpusaver/ after
    # the upgrade; as a namespace package it would shadow the editable install. Drop it.
    find "$VENV"/lib/python*/site-packages/gpusaver -depth -type d -empty -delete 2>/dev/null || true
    local spec="$GPUSAVER_ROOT"
    if [ -n "${1:-}" ]; then spec="$GPUSAVER_ROOT[$1]"; fi
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$spec"
}
