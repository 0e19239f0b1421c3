#!/usr/bin/env bash
# Data-parallel scaling on one host, every number from the same machine and call:
#   gpt2_small: 1 GPU (trainer=gpu), then trainer=ddp on each count in COUNTS;
#   mqa_1b:     1 GPU (trainer=gpu), then trainer=fsdp on each count;
#   then an FSDP run stopped at STEPS/2 and the same command again to STEPS (resume=auto);
#   then (STAGES profile) 8 steps of each multi-GPU run with TORCH_LOGS=ddp_graphs,graph_breaks,recompiles
#   and Lightning's PyTorchProfiler (a Chrome trace per rank), logs and traces into $OUT/profile/.
# The defaults a user gets: module.compile=auto (on), the default optimizer (Muon), trainer=fsdp = FSDP2.
# Same micro-batch per GPU everywhere, so the global batch grows with the GPU count. Tokens/s come
# from each run's CSV log (throughput/tokens_per_sec, median of the last 5 logged windows).
# Usage: COUNTS="2 4" bash scripts/gpu_scaling.sh     (env: STEPS, ATTN, RUNS, OUT, COMPILE (auto), OPTIM
#   (muon), STAGES: any of small big resume profile, default all; DDP_EXTRA: overrides for an extra small DDP run)
set -uo pipefail
out=${OUT:-gpu_out}
runs=${RUNS:-/tmp/mqa_scaling_runs}
counts=${COUNTS:-2}
steps=${STEPS:-120}
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/cards.txt"
# COMPILE=false OPTIM=adamw: what docs/benchmarks.md measured before 2026-12-06 (eager; FSDP1 refused Muon).
common=(module.compile=${COMPILE:-auto} optim=${OPTIM:-muon} data=stdlib data.vocab_size=8192 data.block_size=1024 model.attn_impl=${ATTN:-torch}
        trainer.val_check_interval=100000 trainer.limit_val_batches=0 trainer.log_every_n_steps=5
        trainer.enable_progress_bar=false optim.warmup_steps=10 sample.max_new_tokens=0
        callbacks.attention_maps.every_n_steps=100000 callbacks.model_checkpoint.save_top_k=0
        callbacks.model_checkpoint.save_last=false)
small=(model=gpt2_small data.batch_size=16)
big=(model=mqa_1b data.batch_size=8)

tokens_per_sec() {
  python3 - "$1" <<'PY'
import csv, statistics, sys
try:
    rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("throughput/tokens_per_sec")]
    print(f"{statistics.median(float(r['throughput/tokens_per_sec']) for r in rows[-5:]):.0f}")
except Exception as err:
    print("nan")
PY
}

run() {  # name, then overrides
  local name=$1; shift
  local start=$(date +%s)
  timeout 170 python3 train.py "${common[@]}" "$@" hydra.run.dir="$runs/$name" > "$runs/$name.log" 2>&1
  local code=$?
  local tps=$(tokens_per_sec "$runs/$name/csv/metrics.csv")
  echo "$name: exit $code, $(( $(date +%s) - start )) s, tokens/s $tps, $(grep -h 'global batch' "$runs/$name.log" | head -1)" | tee -a "$out/scaling.txt"
  [ $code -eq 0 ] || tail -5 "$runs/$name.log"
}

stages=${STAGES:-small big resume profile}
no_recovery=(callbacks.recovery_checkpoint.save_top_k=0 trainer.max_steps=$steps)
if [[ " $stages " == *" small "* ]]; then
  run small_1gpu "${small[@]}" trainer=gpu "${no_recovery[@]}"
  for n in $counts; do run small_ddp$n "${small[@]}" trainer=ddp trainer.devices=$n "${no_recovery[@]}"; done
  if [ -n "${DDP_EXTRA:-}" ]; then
    for n in $counts; do run small_ddp${n}_extra "${small[@]}" trainer=ddp trainer.devices=$n "${no_recovery[@]}" $DDP_EXTRA; done
  fi
fi
if [[ " $stages " == *" big "* ]]; then
  run big_1gpu "${big[@]}" trainer=gpu "${no_recovery[@]}"
  for n in $counts; do run big_fsdp$n "${big[@]}" trainer=fsdp trainer.devices=$n "${no_recovery[@]}"; done
fi
n=$(echo $counts | awk '{print $NF}')
if [[ " $stages " == *" resume "* ]]; then
  half=$((steps / 2))
  resume=("${big[@]}" trainer=fsdp trainer.devices=$n callbacks.recovery_checkpoint.every_n_train_steps=$((half / 2)))
  run big_fsdp_resume "${resume[@]}" trainer.max_steps=$half
  mv "$runs/big_fsdp_resume.log" "$runs/big_fsdp_first.log"
  run big_fsdp_resume "${resume[@]}" trainer.max_steps=$steps
  grep -h "resuming from\|final metrics" "$runs/big_fsdp_first.log" "$runs/big_fsdp_resume.log" | tee -a "$out/scaling.txt"
  ls -la "$runs/big_fsdp_resume/checkpoints" | tee -a "$out/scaling.txt"
fi
[[ " $stages " == *" profile "* ]] || exit 0

# Where the multi-GPU step goes: Dynamo's graph splits at DDP buckets and any graph breaks or
# recompiles (stderr, in the run's log), and a torch.profiler trace per rank of steps 3-5 (Lightning's
# default schedule: one step skipped, one warm-up, three recorded).
mkdir -p "$out/profile"
profile() {  # name, then overrides
  local name=$1; shift
  TORCH_LOGS=ddp_graphs,graph_breaks,recompiles run "$name" "$@" trainer.max_steps=8 trainer.log_every_n_steps=1 \
    callbacks.recovery_checkpoint.save_top_k=0 +trainer.profiler._target_=lightning.pytorch.profilers.PyTorchProfiler \
    +trainer.profiler.dirpath="$out/profile/$name" +trainer.profiler.filename=trace \
    +trainer.profiler.record_module_names=false
  cp "$runs/$name.log" "$out/profile/$name.log"
}
for c in $counts; do
  profile prof_small_ddp$c "${small[@]}" trainer=ddp trainer.devices=$c
  profile prof_big_fsdp$c "${big[@]}" trainer=fsdp trainer.devices=$c
done
