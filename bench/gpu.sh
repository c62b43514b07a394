#!/usr/bin/env bash
# The GPU check in one call, for a machine with an NVIDIA GPU and a CUDA build of torch (an H100/H200 lease):
# build askd._C with its CUDA kernels in place, run the GPU tests (CUDA ext, Triton compiled, the compiled
# student step), then time CBAM and the loss (eager, torch.compile, ext, triton) and write the report.
#
#   bash bench/gpu.sh [OUT_DIR]          # OUT_DIR: $OUT if set, else bench/results
#   ASKD_GPU_TRAIN_STEP=1 bash bench/gpu.sh   # also the whole training step (IR-50, B=128): several compiles
#
# It installs nothing: it uses the machine's python3 and its torch, triton, pytest and pytest-benchmark.
# Each stage prints its wall time; the kernel benchmark comes last, its summary at the end of the output.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # Hopper; sm_90 machine code, no PTX JIT at start
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

stage() { printf '\n== %s (%ds so far)\n' "$1" "$SECONDS"; }

stage "device"
python3 - <<'EOF'
import torch, triton
assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA device"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| triton", triton.__version__)
EOF
nvcc --version | tail -n 2

stage "build askd._C with CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
python3 setup.py -q build_ext --inplace > "$out/gpu-build.log" 2>&1 || { tail -n 40 "$out/gpu-build.log"; exit 1; }
python3 -m askd.info

stage "GPU tests"
# a failing test does not stop the timings (the lease is short); the script's exit status reports it at the end
tests_ok=1
python3 -m pytest -q -p no:cacheprovider tests/test_op_cbam.py tests/test_op_cosine_distill.py \
  tests/test_compile_fused.py tests/test_backend.py > "$out/gpu-tests.log" 2>&1 || tests_ok=0
tail -n 25 "$out/gpu-tests.log"

name=$(python3 -c "import torch; print('gpu-' + torch.cuda.get_device_name().lower().replace('nvidia', '').strip().replace(' ', '-'))")
files=(bench/test_cbam.py bench/test_cosine_distill.py)
if [ "${ASKD_GPU_TRAIN_STEP:-0}" = 1 ]; then files+=(bench/test_train_step.py); fi
stage "benchmarks: ${files[*]}"
python3 -m pytest -q -p no:cacheprovider "${files[@]}" --benchmark-only --benchmark-json="$out/$name.json" \
  > "$out/gpu-bench.log" 2>&1 || { tail -n 40 "$out/gpu-bench.log"; exit 1; }
python3 -m bench.report "$out/$name.json" \
  --command "bash bench/gpu.sh (pytest ${files[*]} --benchmark-only --benchmark-json=$name.json)"
sed -n '/^## Summary/,/^## Per group/p' "$out/$name.md"
stage "done"
[ "$tests_ok" = 1 ] || { echo "GPU tests FAILED: see $out/gpu-tests.log"; exit 1; }
