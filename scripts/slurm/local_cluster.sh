#!/bin/bash
# Opt-in check against a real scheduler: a one-node SLURM (slurm-wlm + munge) on localhost, as root.
# Starts munged, slurmctld and slurmd, submits scripts/slurm/train.sbatch with a small CPU run, requeues
# it with `scontrol requeue` once it has a checkpoint, and checks the requeued job resumed and finished.
# Stops the daemons it started (by pid) on exit. Needs root and apt (installs slurm-wlm munge if absent).
#
#   bash scripts/slurm/local_cluster.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${WORK:-$(mktemp -d /tmp/mqa-slurm.XXXXXX)}"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "needs root (slurmd runs jobs as the submitting user via root)"; exit 2; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi

# munge: a random key, the daemon as the munge user
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 400 /etc/munge/munge.key
su -s /bin/sh munge -c "/usr/sbin/munged --force"
PIDS+=("$(cat /run/munge/munged.pid)")
munge -n | unmunge >/dev/null

HOST="$(hostname)"
MEM=$(( $(free -m | awk '/^Mem:/{print $7}') * 9 / 10 ))
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobRequeue=1
NodeName=${HOST} CPUs=$(nproc) RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld; sleep 1; PIDS+=("$(cat /run/slurmctld.pid)")
slurmd; sleep 2; PIDS+=("$(cat /run/slurmd.pid)")
for _ in $(seq 30); do sinfo -h -o %t | grep -qE '^idle' && break; sleep 1; done
sinfo

printf 'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n%.0s' $(seq 200) > "$WORK/corpus.txt"
RUN_DIR="$WORK/run"
cd "$ROOT"
JOB=$(RUN_DIR="$RUN_DIR" sbatch --parsable --gpus-per-node=0 --cpus-per-task="$(nproc)" --time=10 \
  --output="$WORK/job-%j.out" scripts/slurm/train.sbatch \
  trainer=cpu trainer.max_steps=600 trainer.val_check_interval=100 data=text "data.paths=[$WORK/corpus.txt]" \
  data.tokenizer=char data.block_size=32 data.batch_size=8 "data.cache_dir=$WORK/cache" model.n_layers=2 \
  model.d_model=64 model.max_seq_len=32 "callbacks=[model_checkpoint,rng_state,preemption]" callbacks.recovery_checkpoint.every_n_train_steps=50 \
  trainer.enable_progress_bar=false sample.max_new_tokens=20)
echo "submitted job $JOB"
for _ in $(seq 300); do ls "$RUN_DIR"/checkpoints/recovery-step*.ckpt >/dev/null 2>&1 && break; sleep 1; done
ls "$RUN_DIR"/checkpoints
scontrol requeue "$JOB"
echo "requeued job $JOB"
for _ in $(seq 600); do
  state=$(squeue -h -j "$JOB" -o %T 2>/dev/null || true)
  [ -z "$state" ] && break; sleep 1
done
cat "$WORK"/job-"$JOB".out
grep -q "resuming from $RUN_DIR" "$WORK/job-$JOB.out" || { echo "FAIL: the requeued job did not resume"; exit 1; }
grep -q "max_steps=600. reached" "$WORK/job-$JOB.out" || { echo "FAIL: the requeued job did not finish"; exit 1; }
echo "OK: job $JOB was requeued, resumed from its checkpoint in $RUN_DIR and finished"
