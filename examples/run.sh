#!/usr/bin/env bash
# The main job: sets up ./.venv (gpusaver, plus CuPy when an NVIDIA driver is present), then runs
# examples/train.py, kills it part way as if the job died, restarts it from the newest checkpoint,
# and checks that the resumed run ends with exactly the weights of an uninterrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    gpusaver_setup "$(gpusaver_cuda_extra)"
else
    gpusaver_setup ""
fi
PY="$VENV/bin/python"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpusaver-example.XXXXXX")
trap 'rm -rf "$work"' EXIT
args=(--steps 40 --save-every 5)

echo "== run 1: train, and die at step 23 =="
set +e
"$PY" examples/train.py --ckpt-dir "$work/ckpts" "${args[@]}" --crash-at 23
status=$?
set -e
echo "(the job died with exit status $status)"
echo
echo "== run 2: restart; it resumes from the newest checkpoint =="
"$PY" examples/train.py --ckpt-dir "$work/ckpts" "${args[@]}" --print-digest | tee "$work/resumed.log"
echo
echo "== reference: the same training without a crash =="
"$PY" examples/train.py --ckpt-dir "$work/reference" "${args[@]}" --print-digest | tail -n 1 | tee "$work/reference.log"
resumed=$(tail -n 1 "$work/resumed.log")
reference=$(tail -n 1 "$work/reference.log")
if [ "$resumed" = "$reference" ]; then
    echo "OK: the resumed run matches the uninterrupted run exactly"
else
    echo "MISMATCH: $resumed vs $reference" >&2
    exit 1
fi
"$PY" -m gpusaver inspect "$work/ckpts" 2>/dev/null | head -n 12 || true
