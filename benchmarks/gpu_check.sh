#!/usr/bin/env bash
# `make gpu-check`: everything headgain checks on a CUDA GPU, in one command, on a machine as
# it comes (a CUDA build of torch, transformers and pytest installed; no venv, no network):
#
#   1. build headgain._C in place with its CUDA kernels, for the visible GPU's architecture
#   2. the CUDA tests (compiled ops against the reference, attached models on the GPU, the vLLM
#      plugin's step plan built without waiting for the GPU), and the CPU kernels at several
#      thread counts (tests/test_threads.py, on this machine's cores)
#   3. benchmarks/ops.py on CUDA (Qwen2.5-VL-7B head shapes)
#   4. benchmarks/overhead.py at the Qwen2.5-VL-7B shape (random weights, bfloat16)
#
# Logs, the JSON of the overhead run, a summary and the updated benchmarks/RESULTS.md go to
# $OUT when it is set, else build/gpu-check. The whole check ends within GPU_CHECK_SECONDS
# (default 480, inside a 10-minute command limit): each step runs under its own limit and
# under what is left of that budget; a step that no longer fits is recorded as skipped. Exit
# status: 0 when every step passed, 1 when a step failed or was skipped (the later steps still
# run), 2 when there is no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/summary.txt"
failed=0
deadline=$(($(date +%s) + ${GPU_CHECK_SECONDS:-480}))

step() {  # step NAME SECONDS COMMAND...: run under min(SECONDS, time left), log to $OUT/NAME.log, record the outcome
  local name=$1 limit=$2 start rc left
  shift 2
  left=$((deadline - $(date +%s)))
  if [ "$left" -lt 30 ]; then
    echo "$name: skipped, ${left} s of GPU_CHECK_SECONDS left" | tee -a "$OUT/summary.txt"
    failed=1
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (at most $limit s): $*"
  start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $(($(date +%s) - start)) s$([ "$rc" -eq 124 ] && echo ' (time limit)')" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/summary.txt" || exit 2
import sys

try:
    import torch
    import transformers
except ImportError as err:
    sys.exit(f"gpu-check needs torch (a CUDA build) and transformers in {sys.executable}: {err}")
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit(f"gpu-check needs a CUDA GPU and a CUDA build of torch; torch {torch.__version__}, "
             f"CUDA build: {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")

print(f"GPU {torch.cuda.get_device_name()} (sm {'.'.join(map(str, torch.cuda.get_device_capability()))}), "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
PYEOF
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
rm -f headgain/_C*.so
step build 300 env HEADGAIN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
  "$PY" setup.py build_ext --inplace || { echo "the build failed: nothing else can run" | tee -a "$OUT/summary.txt"; exit 1; }
"$PY" -c "import sys; from headgain.core import ops; print('headgain._C: CUDA kernels', ops.extension_available('cuda'),
'/ CPU kernels on torch threads', ops.extension_parallel()); sys.exit(0 if ops.extension_available('cuda') else 'no CUDA kernels')" \
  2>&1 | tee -a "$OUT/summary.txt" || exit 1
step tests 180 env HEADGAIN_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_ops.py tests/test_cuda_models.py tests/test_fused_decode.py tests/test_core_api.py \
  tests/test_ratio_from_blocks.py tests/test_threads.py tests/test_vllm_rows.py
step ops 120 "$PY" benchmarks/ops.py --device cuda --full --repeats 10
step overhead 240 "$PY" benchmarks/overhead.py --shape qwen2.5-vl-7b --rounds 3 --new-tokens 32 \
  --json "$OUT/overhead.json"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit "$failed"
