#!/usr/bin/env bash
# Prepare .gpu_carry/ (git-ignored through .git/info/exclude) on the development machine before a device
# call: the golden fixtures (../shared does not travel with the repository) and the wheels the GPU image
# lacks (HF diffusers for the diffusers stage, installed there with --no-deps). Then:
#   device run: carry [".gpu_carry"], command
#   "export CBDM_FIXTURES=$PWD/.gpu_carry/fixtures; bash bench/run_gpu_checks.sh --budget 520 $OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
mkdir -p .gpu_carry/wheels
cp -r "${CBDM_FIXTURES:-../shared/fixtures}" .gpu_carry/
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry/wheels "diffusers==0.42.1"
du -sh .gpu_carry
