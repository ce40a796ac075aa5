#!/usr/bin/env bash
# One call on a lent GPU machine: build the extension for this GPU's architecture only, run every GPU
# test and the key benchmarks at the current commit, and bundle the logs, JSON and markdown into at
# most two files under OUTDIR (a tarball and summary.md), refreshed after every stage so that a call
# stopped at its limit still returns what ran.
#
#   bench/run_gpu_checks.sh [--dry-run] [--budget SECONDS] [OUTDIR] [STAGE ...]
#
# OUTDIR defaults to $OUT (the device tool's folder), else bench/gpu_out. Stages, cheap ones first:
#   build tests kernels gnsweep train48 train128 profile sample ops diffusers ceiling ddp autotune
# (default: all but autotune). The whole run keeps to --budget seconds (default $GPU_CHECKS_BUDGET,
# else 480): a stage gets min(its own cap, what is left less a reserve for bundling), and a stage with
# under MIN_STAGE seconds left is skipped and says so. --dry-run prints the plan (each stage's cap and
# commands) and runs nothing; tests/bench/test_run_gpu_checks.py checks it on the CPU.
# Set CBDM_FIXTURES to the golden fixture's folder if ../shared/fixtures is not beside the repository
# (bench/prepare_gpu_carry.sh puts it, and the diffusers wheel the GPU image lacks, into .gpu_carry/).
set -o pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET=${GPU_CHECKS_BUDGET:-480}
ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
ALL_STAGES="build tests kernels gnsweep train48 train128 profile sample ops diffusers ceiling ddp autotune"
DEFAULT_STAGES="build tests kernels gnsweep train48 train128 profile sample ops diffusers ceiling ddp"
OUTDIR=${ARGS[0]:-${OUT:-bench/gpu_out}}
STAGES=${ARGS[*]:1}
STAGES=${STAGES:-$DEFAULT_STAGES}
case $BUDGET in ''|*[!0-9]*) echo "run_gpu_checks: --budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
for s in $STAGES; do
  case " $ALL_STAGES " in *" $s "*) ;; *) echo "run_gpu_checks: unknown stage '$s' (choose from: $ALL_STAGES)" >&2; exit 2 ;; esac
done

PY=${PYTHON:-python3}
RESERVE=15      # seconds kept for the final bundle
MIN_STAGE=25    # a stage with less left than this is skipped
START=$(date +%s)
BENCH="$PY -m cbdm_fast.bench"
export PYTHONUNBUFFERED=1

if [ $DRY = 0 ]; then
  mkdir -p "$OUTDIR"
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/cbdm_gpu_checks.XXXXXX")
  echo "# run_gpu_checks $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, stages: $STAGES" > "$WORK/summary.md"
else
  WORK='$WORK'
  echo "plan: budget ${BUDGET}s, stages: $STAGES, outputs bundled into $OUTDIR/gpu_checks.tar.gz and $OUTDIR/summary.md"
fi

left() { echo $(( BUDGET - ($(date +%s) - START) - RESERVE )); }

bundle() {  # everything under WORK into OUTDIR: the tarball plus the summary (2 files)
  [ $DRY = 1 ] && return
  tar czf "$OUTDIR/gpu_checks.tar.gz.tmp" -C "$WORK" . && mv "$OUTDIR/gpu_checks.tar.gz.tmp" "$OUTDIR/gpu_checks.tar.gz"
  cp "$WORK/summary.md" "$OUTDIR/summary.md"
}

# step LOG CAP CMD...: run CMD (a string, for the shell) with its output in WORK/LOG, time-boxed by
# min(CAP, what is left); prints its tail; records rc and seconds in the summary.
step() {
  local log=$1 cap=$2; shift 2
  local cmd="$*"
  if [ $DRY = 1 ]; then echo "  [cap ${cap}s] $(echo "$cmd" | tr -s ' \n' ' ')"; return 0; fi
  local avail; avail=$(left)
  if [ "$avail" -lt "$MIN_STAGE" ]; then
    echo "- $log: skipped, ${avail}s left of the budget" | tee -a "$WORK/summary.md"; return 0
  fi
  [ "$cap" -gt "$avail" ] && cap=$avail
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$cap" bash -c "$cmd" > "$WORK/$log" 2>&1
  local rc=$?
  local msg="rc $rc"
  [ $rc = 124 ] || [ $rc = 137 ] && msg="TIMED OUT at ${cap}s"
  echo "- $log: $msg, $(( $(date +%s) - t0 ))s" | tee -a "$WORK/summary.md"
  grep -v -e Warning -e DEBUG "$WORK/$log" | tail -6
  return $rc
}

md() {  # append a markdown table written by a stage to the summary
  [ $DRY = 1 ] && return
  for f in "$@"; do
    [ -f "$WORK/$f" ] && { printf '\n### %s\n\n' "$f"; cat "$WORK/$f"; echo; } >> "$WORK/summary.md"
  done
}

stage_build() {
  step env.txt 30 "nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv,noheader;
    $PY -c \"import torch, triton, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'python', sys.version.split()[0])\";
    nvcc --version | tail -2; git rev-parse --short HEAD 2>/dev/null || echo 'commit: not a git checkout'"
  [ $DRY = 0 ] && { cat "$WORK/env.txt" >> "$WORK/summary.md"; }
  # only the lent GPU's architecture (e.g. compute_cap 9.0 -> 90): a third of the default build's time
  local arch
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
  step build.log 200 "CBDM_FAST_CUDA=1 CBDM_FAST_CUDA_ARCHS=${arch:-90} CBDM_FAST_BUILD_JOBS=16 \
    $PY -m pip install --no-build-isolation --no-deps -e . &&
    $PY -c \"from cbdm_fast import _C; print('extension CUDA:', _C.has_cuda(), _C.cuda_archs())\"" || {
    echo "build failed: the later stages need the extension" | tee -a "$WORK/summary.md"; bundle; exit 1; }
}

stage_tests() {  # every GPU test (slow ones too: -m gpu replaces the default 'not slow'), in parallel workers
  local par=""
  if [ $DRY = 1 ] || $PY -c "import xdist" 2>/dev/null; then par="-n 8"; fi
  step gpu_tests.log 200 "$PY -m pytest -q -m gpu -p no:cacheprovider -ra $par tests"
  [ $DRY = 0 ] && { grep -E '^(FAILED|ERROR)|passed|failed' "$WORK/gpu_tests.log" | tail -40 >> "$WORK/summary.md"; }
}

stage_kernels() {  # the compiled bf16 step on our kernels against inductor's, batch 48 and 128 (#14), and where
  # the fused step's GPU time goes; each compile takes ~100 s on an H200 (the profile reuses batch 48's cache)
  step kernels48.log 300 "$BENCH train --device cuda --batch-size 48 --channels-last on --backends compiled_bf16 \
    --kernels fused,inductor --iters 20 --warmup 5 --json $WORK/kernels48.json --markdown $WORK/kernels48.md"
  step kernels128.log 300 "$BENCH train --device cuda --batch-size 128 --channels-last on --backends compiled_bf16 \
    --kernels fused,inductor --iters 20 --warmup 5 --json $WORK/kernels128.json --markdown $WORK/kernels128.md"
  step profile48_fused.log 200 "$PY -m cbdm_fast.bench.profile_step --device cuda --batch-size 48 --backend compiled_bf16 \
    --kernels fused --channels-last --copies --json $WORK/profile48_fused.json"
  md kernels48.md kernels128.md
  [ $DRY = 0 ] && { printf '\n### profile48_fused\n\n```\n' ; grep -v Warning "$WORK/profile48_fused.log" | tail -40; printf '```\n'; } >> "$WORK/summary.md"
}

stage_gnsweep() {  # GroupNorm+SiLU launch configurations (groups vs rows strategies) at the 8 training shapes (#14)
  step gn_sweep.log 240 "$PY -m cbdm_fast.bench.gn_sweep --device cuda --json $WORK/gn_sweep.json --markdown $WORK/gn_sweep.md"
  md gn_sweep.md
}

stage_ops() {  # GPU time of each op (one CUDA graph of many calls), ours against torch and torch.compile
  step ops_norm.log 150 "$BENCH ops --device cuda --timing graph --ops group_norm_silu,group_norm_silu_add,group_norm,q_sample,cb_loss \
    --json $WORK/ops_norm.json --markdown $WORK/ops_norm.md"
  step ops_rest.log 90 "$BENCH ops --device cuda --timing graph --ops attn_block,ddpm_step,ddim_step \
    --json $WORK/ops_rest.json --markdown $WORK/ops_rest.md"
  md ops_norm.md ops_rest.md
}

stage_train48() {  # the reference step against the compiled one, batch 48 (#14: >= 5x eager); compiling takes ~100 s on an H200
  step train48.log 200 "$BENCH train --device cuda --batch-size 48 --channels-last on --backends eager,compiled_bf16 \
    --iters 20 --warmup 5 --json $WORK/train48.json --markdown $WORK/train48.md"
  md train48.md
}

stage_train128() {  # batch 128 (#14: >= 3,200 img/s on an H200)
  step train128.log 180 "$BENCH train --device cuda --batch-size 128 --channels-last on --backends eager,compiled_bf16 \
    --iters 20 --warmup 5 --json $WORK/train128.json --markdown $WORK/train128.md"
  md train128.md
}

stage_sample() {  # the guided sampling step, batch 64 and 256; at 256 DDPM-1000 and DPM-Solver++-20 samples/s (#15)
  step sample64.log 100 "$BENCH sample --device cuda --batch-size 64 --steps-timed 30 --warmup 5 \
    --backends reference,fast_graph,fast_compiled --json $WORK/sample64.json --markdown $WORK/sample64.md"
  step sample256.log 110 "$BENCH sample --device cuda --batch-size 256 --steps-timed 20 --warmup 5 \
    --backends reference,fast_compiled --sampler ddpm,dpm++2m --json $WORK/sample256.json --markdown $WORK/sample256.md"
  md sample64.md sample256.md
}

stage_profile() {  # where the compiled bf16 step's GPU time goes on inductor's kernels, batch 48 (ours: stage kernels)
  step profile48.log 150 "$PY -m cbdm_fast.bench.profile_step --device cuda --batch-size 48 --backend compiled_bf16 \
    --kernels inductor --channels-last --copies --json $WORK/profile48.json"
  [ $DRY = 0 ] && { printf '\n### profile48\n\n```\n' ; grep -v Warning "$WORK/profile48.log" | tail -40; printf '```\n'; } >> "$WORK/summary.md"
}

stage_diffusers() {  # patch_model inside HF diffusers' UNet2DModel (#16), CIFAR size, fwd+bwd, batch 64
  local whl=.gpu_carry/wheels
  step diffusers.log 200 "{ ls $whl/diffusers-*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-deps --no-index \
    --target /tmp/site_diffusers $whl/diffusers-*.whl && export PYTHONPATH=/tmp/site_diffusers:\$PYTHONPATH; } ;
    $BENCH.diffusers_bench --device cuda --batch-size 64 --json $WORK/diffusers64.json --markdown $WORK/diffusers64.md"
  md diffusers64.md
}

stage_ceiling() {  # the matrix floor (cuDNN/cuBLAS alone, channels_last) and the bound it puts on speed-ups
  step ceiling48.log 90 "$BENCH ceiling --device cuda --batch-size 48 --work train --channels-last \
    --iters 20 --warmup 5 --json $WORK/ceiling48.json --markdown $WORK/ceiling48.md"
  step ceiling64.log 60 "$BENCH ceiling --device cuda --batch-size 64 --work sample --channels-last \
    --iters 20 --warmup 5 --json $WORK/ceiling64.json --markdown $WORK/ceiling64.md"
  md ceiling48.md ceiling64.md
}

stage_ddp() {  # DDP over NCCL in one process against the same step without it (#7: within 5%), batch 48
  step ddp48.log 120 "$BENCH train --device cuda --batch-size 48 --channels-last on \
    --backends compiled_bf16,compiled_bf16_ddp --iters 20 --warmup 5 --json $WORK/ddp48.json --markdown $WORK/ddp48.md"
  step ddp48_nograph.log 120 "$BENCH train --device cuda --batch-size 48 --channels-last on --no-cuda-graph \
    --backends compiled_bf16,compiled_bf16_ddp --iters 20 --warmup 5 --json $WORK/ddp48_nograph.json --markdown $WORK/ddp48_nograph.md"
  md ddp48.md ddp48_nograph.md
}

stage_autotune() {  # inductor's max-autotune (Triton conv/GEMM templates) against the default, batch 48
  step train48_autotune.log 300 "$BENCH train --device cuda --batch-size 48 --channels-last on --backends compiled_bf16 \
    --compile-mode max-autotune-no-cudagraphs --iters 20 --warmup 5 --json $WORK/train48_autotune.json --markdown $WORK/train48_autotune.md"
  md train48_autotune.md
}

for stage in $STAGES; do
  if [ $DRY = 1 ]; then echo "stage $stage:"; else echo "== $stage ($(date -u +%H:%M:%S), $(left)s left)"; fi
  "stage_$stage"
  bundle
done
[ $DRY = 0 ] && echo "done in $(( $(date +%s) - START ))s; bundle: $OUTDIR/gpu_checks.tar.gz, $OUTDIR/summary.md"
exit 0
