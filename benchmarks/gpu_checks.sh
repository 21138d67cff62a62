#!/usr/bin/env bash
# Every GPU figure the README and docs quote, and the GPU tests, in one call (under 9 minutes on one H200).
#
#   bash benchmarks/gpu_checks.sh            # on a CUDA machine, from anywhere; prints each figure with the doc line it feeds
#   bash benchmarks/gpu_checks.sh --dry_run  # every step with tiny CPU settings: checks the script, measures nothing
#
# Each step runs under its own time limit (`timeout`); a failed or timed-out step is reported and the others still
# run; the exit status is non-zero when any step failed. Without a CUDA device (and without --dry_run) it prints
# SKIP and exits 0: no GPU figure is measured then.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry_run) DRY_RUN=1 ;;
  *) echo "usage: $0 [--dry_run] (got: $*)" >&2; exit 2 ;;
esac

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [[ "$DRY_RUN" == 0 && "$GPUS" == 0 ]]; then
  echo "SKIP: no CUDA device here; no GPU figure was measured (run on a GPU machine, or --dry_run to check the script)."
  exit 0
fi

FAILED=()
START=$SECONDS

# step LABEL SECONDS FEEDS COMMAND...: runs COMMAND under a time limit, saying which doc line its figures feed.
step() {
  local label="$1" limit="$2" feeds="$3"
  shift 3
  echo
  echo "=== $label (limit ${limit} s; at $((SECONDS - START)) s)"
  echo "=== feeds: $feeds"
  local began=$SECONDS status=0
  timeout --kill-after=5 "$limit" "$@" || status=$?
  if [[ "$status" == 0 ]]; then
    echo "=== $label: done in $((SECONDS - began)) s"
  else
    [[ "$status" == 124 || "$status" == 137 ]] && echo "=== $label: TIMED OUT after ${limit} s" || true
    echo "=== $label: FAILED (exit $status)"
    FAILED+=("$label")
  fi
}

if [[ "$DRY_RUN" == 1 ]]; then
  echo "DRY RUN: tiny settings on the CPU; the figures below measure nothing."
  DEVICE=cpu
  step "environment" 60 "-" "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'CUDA devices: $GPUS')"
  step "GPU tests (collection only)" 120 "README: the gpu-marked tests" "$PYTHON" -m pytest -p no:cacheprovider -m gpu --collect-only -q tests/test_gpu.py
  step "pretraining step rate" 240 "README: the H200 step rate (batch 48, bfloat16); docs/reproducing.md H200 rows" \
    "$PYTHON" benchmarks/gpu_paper_scale.py --device cpu --dry_run
  step "MFU of a bf16 pretraining step" 180 "README: the MFU of a bf16 pretraining step (gpu_mfu.py)" \
    "$PYTHON" benchmarks/gpu_mfu.py --device cpu --dry_run --backends sdpa
  step "extraction images/s" 240 "docs/regions.md (GPU figures); README bench_extraction row" \
    "$PYTHON" benchmarks/bench_extraction.py --device cpu --dry_run --workers 1
  step "loader feeding" 240 "README bench_loader row: samples/s per core against the H200 step rate" \
    "$PYTHON" benchmarks/bench_loader.py --num_images 40 --num_samples 48 --batch_size 8
  step "FSDP 2-process smoke" 240 "README: FSDP on more than one GPU" \
    "$PYTHON" benchmarks/gpu_fsdp_smoke.py --device cpu --dry_run
else
  DEVICE=cuda
  # Limits add up to 475 s (510 s with each kill's 5 s grace): the call stays under 9 minutes even when every
  # step runs to its limit. The MFU step has the most: on one H200 with torch 2.11, compiling the step for its first
  # batch shape took about 50 s, and the other steps used under half their limits.
  step "environment" 15 "-" "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), '$GPUS GPU(s)')"
  step "GPU tests" 50 "README: the gpu-marked tests" "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu.py
  step "pretraining step rate" 60 "README: the H200 step rate (batch 48, bfloat16); docs/reproducing.md H200 rows" \
    "$PYTHON" benchmarks/gpu_paper_scale.py --device cuda
  # Inductor's coalesce tiling analysis does not support dynamic shapes, and on torch 2.11 it failed on this
  # step's length-grouped batches (an AssertionError in tiling_utils.get_pw_red_splits; a known PyTorch bug):
  # turning it off is PyTorch's own workaround.
  step "MFU of a bf16 pretraining step" 190 "README: the MFU of a bf16 pretraining step (gpu_mfu.py)" \
    env TORCHINDUCTOR_COALESCE_TILING_ANALYSIS=0 "$PYTHON" benchmarks/gpu_mfu.py --batch_size 256 --steps 10 --backends sdpa
  step "extraction images/s at batch 64" 60 "docs/regions.md (GPU figures); README bench_extraction row" \
    "$PYTHON" benchmarks/bench_extraction.py --device cuda --batch_size 64 --images 256 --rounds 2 --workers 8
  step "loader feeding" 60 "README bench_loader row: samples/s per core against the H200 step rate" \
    "$PYTHON" benchmarks/bench_loader.py --num_images 500 --num_samples 960
  if [[ "$GPUS" -gt 1 ]]; then
    step "FSDP 2-process smoke" 40 "README: FSDP on more than one GPU" "$PYTHON" benchmarks/gpu_fsdp_smoke.py --device cuda
  else
    echo
    echo "=== FSDP 2-process smoke: SKIPPED (one GPU here; it needs two)"
  fi
fi

echo
echo "=== gpu_checks.sh on $DEVICE took $((SECONDS - START)) s"
if [[ "${#FAILED[@]}" -gt 0 ]]; then
  echo "=== FAILED steps: ${FAILED[*]}"
  exit 1
fi
echo "=== all steps passed"
