#!/usr/bin/env bash
# One GPU check, under 10 minutes on one H100/H200: the GPU tests, then the loss benchmark on CUDA (bf16).
#
#   tools/gpu-check.sh                 # from the repository root, on a machine with one CUDA GPU
#
# Writes benchmarks/results/gpu_check_pytest.txt, loss_cuda.{csv,md,png} (the benchmark's own files) and
# gpu_check_env.txt (nvidia-smi, versions). Each phase has its own time limit, so a hang in one still leaves the
# others' results. Exit status: non-zero when the tests failed or the benchmark did not finish.
set -u
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
status=0

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: CUDA is not available here; nothing to check" >&2
    exit 2
fi

{ date -u +%Y-%m-%dT%H:%M:%SZ; git rev-parse HEAD 2>/dev/null; nvidia-smi 2>&1 | head -20
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/gpu_check_env.txt" 2>&1

# 1. Tests marked gpu (kernels at full size and in bf16), then the Triton block suite, which runs on the device
#    directly when CUDA is present (at most 4.5 min together).
timeout 180 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_kernels_triton.py tests/test_loss.py \
    2>&1 | tee "$out/gpu_check_pytest.txt" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 90 python3 -m pytest -q tests/test_kernels_block_triton.py 2>&1 | tee -a "$out/gpu_check_pytest.txt" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2. The loss benchmark (at most 5.5 min): bf16, R = M, D = 512, every provider, the fused Triton backward beside
#    the deterministic one (10 cases, each in a fresh process). The full sweep (R up to 64k, D 768 and 1024) is
#    `clove-dist bench loss --device cuda` (longer).
timeout 330 python3 benchmarks/bench_loss.py --device cuda --dtype bf16 --batch 8192 32768 \
    --neg-ratio 0 --dim 512 --providers reference chunked triton triton_det gemm --modes full backward \
    --repeat 5 --warmup 2 --case-timeout 90 || status=1

echo "gpu-check: done (status $status); results in $out/"
exit $status
