#!/usr/bin/env bash
# mae_jax on a SLURM GPU cluster: several nodes, one process per node (driving all its GPUs) or one per GPU,
# joined with jax.distributed; the coordinator is the allocation's first node.
#
#   launch/slurm.sh [options] -- ARGS for python -m mae_jax.main
#
# Submits itself with sbatch; inside the allocation (--step, added by the submission) it computes the
# coordinator from SLURM's environment and starts every process with srun:
#   python -m mae_jax.main ARGS --coordinator_address=FIRST_NODE:PORT --num_processes=$SLURM_NTASKS \
#       --process_id=$SLURM_PROCID [--local_device_ids=$SLURM_LOCALID]
# srun --kill-on-bad-exit: if one process dies the others are stopped instead of waiting for it.
#
# Options:
#   --nodes=N            nodes (default 2)
#   --gpus-per-node=G    GPUs per node (default 8)
#   --per=node|gpu       one process per node (default; it drives the node's G GPUs) or one per GPU
#   --partition=P  --account=A  --time=HH:MM:SS  --job-name=NAME   passed to sbatch
#   --python=PATH        the Python of the environment with mae_jax and jax[cuda12] (default: python3)
#   --port=PORT          coordinator port (default: 20000 + job id % 20000)
#   --module=M           what every process runs (default mae_jax.main; mae_jax.bench benchmarks the cluster)
#   --dry-run            print the sbatch (or, with --step, the srun) command instead of running it
#
# Install once on the shared file system: pip install -e . 'jax[cuda12]>=0.10.2,<0.11'
# Example, ViT-L MAE on 4 nodes x 8 GPUs:
#   launch/slurm.sh --nodes=4 --partition=gpu --time=72:00:00 -- --config=configs/mae_vitl.py \
#       --workdir=/shared/runs/mae_vitl --config.data.source=tfds --config.data.name=imagenet2012 \
#       --config.model.dtype=bfloat16
# The mesh then spans all 32 GPUs; --config.mesh.dcn_data=4 keeps FSDP's all-gathers inside each node.
set -euo pipefail

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NODES=2
GPUS_PER_NODE=8
PER=node
PYTHON="${PYTHON:-python3}"
PORT=''
STEP=0
SBATCH_EXTRA=()
JOB_NAME=mae_jax
MODULE=mae_jax.main

parse_option() {
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS_PER_NODE="${1#*=}" ;;
    --per=*) PER="${1#*=}" ;;
    --partition=* | --account=* | --time=*) SBATCH_EXTRA+=("$1") ;;
    --job-name=*) JOB_NAME="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --module=*) MODULE="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --step) STEP=1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_main_args
[[ "$PER" == node || "$PER" == gpu ]] || die "--per=$PER: use node or gpu"
[[ "$NODES" =~ ^[1-9][0-9]*$ && "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--nodes and --gpus-per-node must be positive"

submit() {
  local tasks_per_node=1
  if [[ "$PER" == gpu ]]; then
    tasks_per_node="$GPUS_PER_NODE"
  fi
  # Every task sees all GPUs of its node; with --per=gpu, --local_device_ids picks one per process.
  run sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" "--ntasks-per-node=$tasks_per_node" \
    "--gpus-per-node=$GPUS_PER_NODE" --exclusive "--chdir=$REPO" "--output=$REPO/slurm-%j.out" \
    ${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"} \
    "$REPO/launch/slurm.sh" --step "--repo=$REPO" "--per=$PER" "--python=$PYTHON" "--module=$MODULE" \
    ${PORT:+"--port=$PORT"} -- "${MAIN_ARGS[@]}"
}

step() {
  [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] || die "--step runs inside a SLURM allocation"
  local first_node port process_flags
  # sed, not head: head's early exit would kill scontrol with SIGPIPE, which pipefail turns into a failure.
  first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
  [[ -n "$first_node" ]] || die "scontrol show hostnames $SLURM_JOB_NODELIST gave no node"
  port="${PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
  # Evaluated by each task's shell: its own rank and, per GPU, its GPU.
  # shellcheck disable=SC2016
  process_flags='--num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID'
  if [[ "$PER" == gpu ]]; then
    # shellcheck disable=SC2016
    process_flags+=' --local_device_ids=$SLURM_LOCALID'
  fi
  echo "mae_jax: coordinator $first_node:$port, ${SLURM_NTASKS:-?} processes on ${SLURM_JOB_NUM_NODES:-?} nodes" >&2
  cd "$REPO"
  run srun --kill-on-bad-exit=1 bash -c "exec $(quote "$PYTHON") -m $(quote "$MODULE") $(quote_all "${MAIN_ARGS[@]}") \
--coordinator_address=$first_node:$port $process_flags"
}

if [[ "$STEP" == 1 ]]; then
  step
else
  submit
fi
