#!/usr/bin/env bash
# The GPU check, for when a GPU machine is at hand (< 8 minutes on one H100):
#   1. installs the package with its test extras and the CUDA jax wheel of the pinned jax (skipped when this
#      Python already sees a GPU through jax, or with GPU_CHECK_NO_INSTALL=1: no network there);
#   2. runs the GPU-relevant tests on the GPU: model parity with transformers (einsum, xla and cudnn attention,
#      cached decoding), LoRA, the hypernetwork, the losses and the trainer's one-device steps;
#   3. measures the T5-Base training steps in bfloat16 (bench/mfu.py): step time, TFLOP/s and MFU.
# One line per figure, `gpu_check: <name> = <value>`; exits non-zero on the first failure with an `error:` line.
#
#     bash bench/gpu_check.sh            # from the repository root or anywhere
#     GPU_CHECK_PYTHON=/path/python bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${GPU_CHECK_PYTHON:-python3}"
START=$(date +%s)

fail() { echo "error: gpu_check: $*" >&2; exit 1; }
figure() { echo "gpu_check: $1 = $2"; }
gpu_name() {
  JAX_PLATFORMS=cuda "$PY" -c 'import jax; d = jax.devices()[0]; print(d.device_kind if d.platform == "gpu" else "")' \
    2>/dev/null | tail -n 1
}

GPU="$(gpu_name)"
if [ -z "$GPU" ] && [ "${GPU_CHECK_NO_INSTALL:-0}" != "1" ]; then
  JAX_VERSION="$("$PY" -c 'import re; print(re.search(r"\"jax==([^\"]+)\"", open("setup.py").read()).group(1))')" \
    || fail "cannot read the jax pin from setup.py"
  "$PY" -m pip install -q -e ".[test]" "jax[cuda12]==${JAX_VERSION}" || fail "pip install of jax[cuda12]==${JAX_VERSION} failed"
  GPU="$(gpu_name)"
fi
[ -n "$GPU" ] || fail "jax sees no GPU (JAX_PLATFORMS=cuda); install a CUDA jax wheel or run on a GPU machine"
figure gpu "$GPU"
figure jax "$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null | tail -n 1)"

# The tests' conftest defaults to 8 fake CPU devices; on the GPU the one-device tests run (the mesh tests need 8
# devices and stay on CPU, where CI runs them).
TESTS="tests/test_t5_parity.py tests/test_lora.py tests/test_hypernet.py tests/test_losses.py tests/test_trainer.py"
LOG="$(mktemp)"
JAX_PLATFORMS=cuda XLA_FLAGS="" timeout 300 "$PY" -m pytest -q -p no:cacheprovider $TESTS -k "not mesh and not shard" \
  >"$LOG" 2>&1
STATUS=$?
SUMMARY="$(grep -E '(passed|failed|error)' "$LOG" | tail -n 1)"
figure tests "${SUMMARY:-no summary (status $STATUS)}"
if [ "$STATUS" -ne 0 ] && [ "$STATUS" -ne 5 ]; then
  tail -n 30 "$LOG" >&2
  fail "the GPU tests failed (status $STATUS; log $LOG)"
fi

OUT="$(JAX_PLATFORMS=cuda timeout 240 "$PY" bench/mfu.py --dtype=bfloat16 --repeats=10 2>&1)" \
  || { echo "$OUT" | tail -n 20 >&2; fail "bench/mfu.py failed"; }
echo "$OUT" | grep -E '^(step_s|tflops_per_s|mfu) ' | sed -E 's/^([a-z_]+) ([a-z_]+) = /gpu_check: \1 \2 = /'
figure seconds "$(( $(date +%s) - START ))"
