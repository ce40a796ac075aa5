#!/usr/bin/env bash
# Build the extension and run the GPU tests and the benchmarks on a CUDA machine, writing logs, JSON and
# markdown to OUTDIR (default: $OUT, else bench/gpu_out). Stages: build tests train sample ops profile
# ceiling ddp autotune (default: all but autotune); e.g. `bench/run_gpu_checks.sh /tmp/out tests train`. Each stage has its own time limit
# (STAGE_TIMEOUT seconds, default 300) so one slow stage cannot starve the others on a time-limited lease.
# Set CBDM_FIXTURES to the golden fixture's folder if ../shared/fixtures is not beside the repository.
set -o pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-bench/gpu_out}}
shift || true
STAGES=${*:-build tests train sample ops profile ceiling ddp}
LIMIT=${STAGE_TIMEOUT:-300}
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}

for stage in $STAGES; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    build)
      { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
        $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        git rev-parse --short HEAD 2>/dev/null; } | tee "$OUTDIR/env.txt"
      $PY -m pip install --no-build-isolation --no-deps -e . > "$OUTDIR/build.log" 2>&1 \
        || { tail -30 "$OUTDIR/build.log"; exit 1; }
      $PY -c "from cbdm_fast import _C; print('extension CUDA:', _C.has_cuda(), _C.cuda_archs())" ;;
    tests)
      timeout "$LIMIT" $PY -m pytest -q -m gpu -p no:cacheprovider -ra tests 2>&1 | grep -v DEBUG \
        > "$OUTDIR/gpu_tests.log"; tail -15 "$OUTDIR/gpu_tests.log" ;;
    train)
      for B in 48 128; do
        timeout "$LIMIT" $PY -m cbdm_fast.bench train --device cuda --batch-size $B --channels-last on \
          --json "$OUTDIR/train$B.json" --markdown "$OUTDIR/train$B.md" --iters 20 --warmup 5 2>&1 | tail -8
      done ;;
    sample)
      timeout "$LIMIT" $PY -m cbdm_fast.bench sample --device cuda --batch-size 64 --steps-timed 30 --warmup 5 \
        --json "$OUTDIR/sample64.json" --markdown "$OUTDIR/sample64.md" 2>&1 | tail -7
      timeout "$LIMIT" $PY -m cbdm_fast.bench sample --device cuda --batch-size 256 --steps-timed 20 --warmup 5 \
        --backends reference,fast_compiled --json "$OUTDIR/sample256.json" --markdown "$OUTDIR/sample256.md" 2>&1 | tail -5 ;;
    ops)
      for timing in graph eager; do
        timeout "$LIMIT" $PY -m cbdm_fast.bench ops --device cuda --timing $timing \
          --json "$OUTDIR/ops_$timing.json" --markdown "$OUTDIR/ops_$timing.md" > "$OUTDIR/ops_$timing.log" 2>&1
        tail -3 "$OUTDIR/ops_$timing.log"
      done ;;
    profile)  # where the compiled bf16 step's GPU time goes, batch 48
      timeout "$LIMIT" $PY -m cbdm_fast.bench.profile_step --device cuda --batch-size 48 --backend compiled_bf16 \
        --channels-last --json "$OUTDIR/profile48.json" 2>&1 | grep -v Warning | tail -40 ;;
    ceiling)  # the matrix floor (cuDNN/cuBLAS alone, channels_last) and the bound it puts on the speed-ups, batch 48 / 64
      timeout "$LIMIT" $PY -m cbdm_fast.bench ceiling --device cuda --batch-size 48 --work train --channels-last \
        --iters 20 --warmup 5 --json "$OUTDIR/ceiling48.json" --markdown "$OUTDIR/ceiling48.md" 2>&1 | tail -5
      timeout "$LIMIT" $PY -m cbdm_fast.bench ceiling --device cuda --batch-size 64 --work sample --channels-last \
        --iters 20 --warmup 5 --json "$OUTDIR/ceiling64.json" --markdown "$OUTDIR/ceiling64.md" 2>&1 | tail -5 ;;
    ddp)  # DDP over NCCL in one process against the same step without DDP (#7: within 5%), batch 48; with
          # the whole-step CUDA graph (which DDP forgoes) and without it (DDP's own overhead)
      timeout "$LIMIT" $PY -m cbdm_fast.bench train --device cuda --batch-size 48 --channels-last on \
        --backends compiled_bf16,compiled_bf16_ddp --iters 20 --warmup 5 \
        --json "$OUTDIR/ddp48.json" --markdown "$OUTDIR/ddp48.md" 2>&1 | tail -4
      timeout "$LIMIT" $PY -m cbdm_fast.bench train --device cuda --batch-size 48 --channels-last on --no-cuda-graph \
        --backends compiled_bf16,compiled_bf16_ddp --iters 20 --warmup 5 \
        --json "$OUTDIR/ddp48_nograph.json" --markdown "$OUTDIR/ddp48_nograph.md" 2>&1 | tail -4
      timeout "$LIMIT" $PY -m cbdm_fast.bench train --device cuda --batch-size 48 --channels-last on --ddp-cuda-graph \
        --backends compiled_bf16,compiled_bf16_ddp --iters 20 --warmup 5 \
        --json "$OUTDIR/ddp48_graph.json" --markdown "$OUTDIR/ddp48_graph.md" 2>&1 | tail -4
      timeout "$LIMIT" $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_distributed.py -k cuda_graph 2>&1 | tail -3 ;;
    autotune)  # inductor's max-autotune (Triton conv/GEMM templates) against the default, batch 48
      timeout "$LIMIT" $PY -m cbdm_fast.bench train --device cuda --batch-size 48 --channels-last on \
        --backends compiled_bf16 --compile-mode max-autotune-no-cudagraphs --iters 20 --warmup 5 \
        --json "$OUTDIR/train48_autotune.json" --markdown "$OUTDIR/train48_autotune.md" 2>&1 | tail -5 ;;
    *) echo "unknown stage $stage (build tests train sample ops profile ceiling ddp autotune)"; exit 2 ;;
  esac
done
