#!/bin/bash
# launch.sh: GRPO on SLURM, data-parallel over nodes × GPUs with torchrun, and preemption-safe.
#
#   sbatch launch.sh [grpo.py args…]                         # 1 node × 4 GPUs (the #SBATCH lines below)
#   sbatch -N 4 -p gpu -A myproject -t 12:00:00 launch.sh --output-dir runs/rv --reasoning-vocab-size -1
#   sbatch launch.sh --model Qwen/Qwen3-4B --shard fsdp --output-dir runs/4b   # past one GPU: FSDP2 (README)
#
# sbatch options override the #SBATCH lines, and so do SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT and
# SBATCH_GPUS_PER_NODE in the environment. Environment variables read here:
#   OUTPUT_DIR       passed as grpo.py --output-dir (or give --output-dir yourself; default runs/grpo)
#   NPROC_PER_NODE   trainer processes per node (default: the GPUs SLURM gave the node; 1 on a node without GPUs)
#   MODULES          modules to load first, e.g. MODULES="WebProxy cuda/12.4"
#   MASTER_PORT      rendezvous port on the first node (default 29500 + job id % 1000)
#   SCRIPT           the Python script every rank runs (default grpo.py; e.g. evaluate.py, or your own wrapper)
# Run it from the repository root: the job uses that checkout and its uv environment (.venv).
#
# Preemption: 5 minutes before the time limit SLURM sends USR1 to this script (or you do:
# `scancel --signal=USR1 --batch JOBID`). The trainer checkpoints and exits, the job requeues itself with the same
# arguments, and the rerun resumes from the checkpoint in the same output directory.
#
# No partition, account or --time default: clusters differ (and reject what they lack); the partition's default
# time limit applies unless you pass -t.
#SBATCH --job-name=grpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# sbatch runs a spooled copy of this script, so the checkout is where sbatch was called, not beside $0.
cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
echo "[launch] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST"

if [ -n "${MODULES:-}" ]; then
    set +u  # module init scripts read unset variables
    if ! type module >/dev/null 2>&1; then  # batch shells are not login shells: `module` may be undefined
        for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh; do
            # shellcheck disable=SC1090
            if [ -r "$init" ]; then . "$init" && break; fi
        done
    fi
    for m in $MODULES; do module load "$m"; done
    set -u
fi

# The project's uv environment, activated here and inherited by every node's task (a per-node `uv run` would sync
# the same shared .venv from all nodes at once). Created once, from the lock file, if missing.
venv=${UV_PROJECT_ENVIRONMENT:-$PWD/.venv}
[ -x "$venv/bin/python" ] || uv sync --frozen
export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH

hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${hosts%%$'\n'*}
export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}

# wait_for PID: PID's exit status. `wait` returns early (128 + signal) whenever a trapped signal arrives, so wait
# again until PID is gone; bash keeps the status of an exited child for the last `wait`.
wait_for() {
    while kill -0 "$1" 2>/dev/null; do wait "$1" || true; done
    wait "$1"
}

# One per node, started by srun: per-node values (this node's index, its process count) are evaluated here, on the
# node. Expanded in the batch shell they would be the first node's values on every node.
# shellcheck disable=SC2317  # called through srun and trap, which shellcheck cannot follow
node_task() {
    local nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
    [ "$nproc" -gt 0 ] || nproc=1
    # torchrun would set 1 thread per process; share the task's CPUs instead (CPU runs, tokenizers, rewards)
    local threads=$((${SLURM_CPUS_PER_TASK:-1} / nproc))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
    # torchrun's agent handles TERM/INT/HUP/QUIT but dies of USR1, and SLURM may signal every process of the step:
    # start it with USR1 ignored. The workers inherit that until grpo.py installs its handler.
    trap '' USR1
    # What this node brings: a job that asked for GPUs but whose torch cannot use them stops in grpo.py at once.
    python - <<'PY' || true
import os, socket, torch
gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"[launch] {socket.gethostname()}: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPUs usable by torch: {gpus}", flush=True)
PY
    torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$nproc" \
        --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
        --rdzv_conf "is_host=$((SLURM_NODEID == 0))" \
        "${SCRIPT:-grpo.py}" "$@" &
    agent=$!
    # Hand USR1 and TERM to the workers, torchrun's children. Each checkpoints (rank 0) and exits 0, and torchrun
    # with them; a worker that already got the signal from SLURM directly just gets it twice.
    trap 'pkill -USR1 -P "$agent"' USR1
    trap 'pkill -TERM -P "$agent"' TERM
    wait_for "$agent"
}
export -f node_task wait_for

preempted=0
# shellcheck disable=SC2317  # a trap handler
on_usr1() {
    [ "$preempted" = 0 ] || return 0
    preempted=1
    echo "[launch] USR1: the trainer checkpoints and stops, then the job requeues"
    # Every step on every node, not this batch shell. Under `set -e` a failure here would end the job: don't.
    scancel --signal=USR1 "$SLURM_JOB_ID" || echo "[launch] scancel --signal=USR1 failed" >&2
}
trap on_usr1 USR1
# On TERM (scancel, the hard time limit, preemption) SLURM signals the workers itself; this shell waits for them
# to checkpoint: exiting now would end the job and kill them.
trap 'echo "[launch] TERM: waiting for the trainer to checkpoint"' TERM

args=("$@")
if [ -n "${OUTPUT_DIR:-}" ]; then args=(--output-dir "$OUTPUT_DIR" "${args[@]}"); fi
# srun no longer passes the job's --cpus-per-task on to its tasks (Slurm >= 22.05): pass it explicitly.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c 'node_task "$@"' node_task "${args[@]}" &
rc=0
wait_for $! || rc=$?

if [ "$preempted" = 1 ]; then
    echo "[launch] requeueing job $SLURM_JOB_ID (trainer exit status $rc): the rerun resumes from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
