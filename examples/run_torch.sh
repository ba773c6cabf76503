#!/usr/bin/env bash
# The torch job: sets up ./.venv (gpusaver with torch, plus CuPy when an NVIDIA driver is present),
# then runs examples/train_torch.py three times: once straight through (the reference), once killed
# with SIGKILL part way, and once restarted from the newest checkpoint, which must end with
# parameters and Adam state bit-identical to the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    gpusaver_setup "torch,$(gpusaver_cuda_extra)"
else
    gpusaver_setup "torch"
fi
PY="$VENV/bin/python"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpusaver-torch-example.XXXXXX")
trap 'rm -rf "$work"' EXIT
args=(--steps 40 --save-every 5)

echo "== reference: train without a crash, keep the final state =="
"$PY" examples/train_torch.py --ckpt-dir "$work/reference" "${args[@]}" --final "$work/final/state" | tail -n 3
echo
echo "== run 1: train, and die at step 23 =="
set +e
"$PY" examples/train_torch.py --ckpt-dir "$work/ckpts" "${args[@]}" --die-at 23
status=$?
set -e
echo "(the job died with exit status $status)"
echo
echo "== run 2: restart; it resumes from the newest checkpoint and compares with the reference =="
"$PY" examples/train_torch.py --ckpt-dir "$work/ckpts" "${args[@]}" --compare "$work/final/state"
"$PY" -m gpusaver inspect "$work/ckpts" 2>/dev/null | head -n 24 || true
