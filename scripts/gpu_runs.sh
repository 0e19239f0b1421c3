#!/usr/bin/env bash
# The GPU checks and runs behind docs/benchmarks.md, one stage per argument:
#   tests       GPU test files (bf16 parity of torch/flash/triton against float64)
#   curves      gpt2_small, 300 steps, same seed and data, attn_impl torch vs triton vs flash
#   shakespeare experiment=shakespeare_char end to end in bf16
# Usage: bash scripts/gpu_runs.sh tests curves shakespeare   (SHAKESPEARE=path/to/input.txt)
# Run directories go to $RUNS (default /tmp/mqa_gpu_runs); the few files worth keeping are copied
# to $OUT (or ./gpu_out): test output, metrics CSVs, the loss-curve comparison.
set -uo pipefail
out=${OUT:-gpu_out}
runs=${RUNS:-/tmp/mqa_gpu_runs}
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"

for stage in "$@"; do
  case $stage in
  tests)
    python3 -m pytest -q -rs tests/test_gpu_core.py tests/test_triton_attention_gpu.py tests/test_training_gpu.py 2>&1 | tee "$out/gpu_tests.txt" | tail -25
    ;;
  curves)
    # docs/benchmarks.md measured eager runs: module.compile (auto = on for CUDA) stays off unless COMPILE=auto|true.
    # optim=adamw: the curves of docs/benchmarks.md were measured with it (before optim=muon became the default).
    common=(module.compile=${COMPILE:-false} optim=adamw model=gpt2_small trainer=gpu data=stdlib data.max_chars=null data.vocab_size=8192
            data.block_size=1024 data.batch_size=16 trainer.max_steps=300 trainer.val_check_interval=100
            trainer.log_every_n_steps=10 optim.warmup_steps=30 sample.max_new_tokens=50 trainer.enable_progress_bar=false
            callbacks.model_checkpoint.save_top_k=0 callbacks.model_checkpoint.save_last=false
            callbacks.recovery_checkpoint.save_top_k=0 callbacks.attention_maps.every_n_steps=100)
    for impl in torch triton flash; do
      start=$(date +%s)
      timeout 240 python3 train.py "${common[@]}" model.attn_impl=$impl hydra.run.dir="$runs/curve_$impl" \
        > "$runs/curve_$impl.log" 2>&1
      echo "curve $impl: exit $? in $(( $(date +%s) - start )) s"
      tail -4 "$runs/curve_$impl.log"
      cp "$runs/curve_$impl/csv/metrics.csv" "$out/curve_$impl.csv" 2>/dev/null
    done
    python3 scripts/compare_loss_curves.py "$out"/curve_{torch,triton,flash}.csv --names torch triton flash \
      | tee "$out/curves.txt"
    ;;
  shakespeare)
    start=$(date +%s)
    timeout 420 python3 train.py experiment=shakespeare_char data.paths="[${SHAKESPEARE:-.gpudata/input.txt}]" \
      module.compile=${COMPILE:-false} trainer.enable_progress_bar=false hydra.run.dir="$runs/shakespeare" > "$runs/shakespeare.log" 2>&1
    echo "shakespeare_char: exit $? in $(( $(date +%s) - start )) s"
    tail -30 "$runs/shakespeare.log"
    cp "$runs/shakespeare/csv/metrics.csv" "$out/shakespeare_metrics.csv" 2>/dev/null
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
