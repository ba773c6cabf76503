#!/usr/bin/env bash
# The test command: sets up ./.venv (gpusaver with its test and CuPy extras) and runs the suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k table`.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh
gpusaver_setup "test,bench,$(gpusaver_cuda_extra)"
exec "$VENV/bin/python" -m pytest "$@"
