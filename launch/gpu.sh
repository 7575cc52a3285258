#!/usr/bin/env bash
# mae_jax on one machine with several NVIDIA GPUs: one process drives every GPU (JAX's single-controller
# model), the mesh spans them, no jax.distributed needed.
#
#   launch/gpu.sh [options] -- ARGS for python -m mae_jax.main
#
# Options:
#   --gpus=LIST       GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
#   --python=PATH     the Python of the environment with mae_jax and jax[cuda12] (default: python3)
#   --mem-fraction=F  share of each GPU's memory JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.9)
#   --dry-run         print the command instead of running it
#
# Install once: pip install -e . 'jax[cuda12]>=0.10.2,<0.11'
# Example, ViT-B MAE on 8 GPUs, batch 4096 as 2 micro-batches of 2048 (compute: bfloat16, config.model.dtype=auto):
#   launch/gpu.sh -- --config=configs/mae_vitb.py --workdir=workdirs/mae_vitb --config.data.source=tfds \
#       --config.data.name=imagenet2012 --config.train.grad_accum_steps=2
#
# XLA_FLAGS gets XLA:GPU's latency-hiding scheduler (collectives overlapped with compute) after any flags of
# your own; NCCL keeps its defaults, which suit one host (set NCCL_* in the environment for your fabric).
# None of this has been measured here (no GPU).
set -euo pipefail

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
GPUS="${CUDA_VISIBLE_DEVICES:-}"
PYTHON="${PYTHON:-python3}"
MEM_FRACTION=0.9

parse_option() {
  case "$1" in
    --gpus=*) GPUS="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --mem-fraction=*) MEM_FRACTION="${1#*=}" ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_main_args
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus=$GPUS: expected a list like 0,1,2,3"

COMMAND=(env)
if [[ -n "$GPUS" ]]; then
  COMMAND+=("CUDA_VISIBLE_DEVICES=$GPUS")
fi
# One process per host: never initialise jax.distributed here, even inside a SLURM allocation.
COMMAND+=(MAE_JAX_DISTRIBUTED=0 "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION"
  "XLA_FLAGS=${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
  "$PYTHON" -m mae_jax.main "${MAIN_ARGS[@]}")

cd "$REPO"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "cd $(quote "$REPO") && $(quote_all "${COMMAND[@]}")"
else
  exec "${COMMAND[@]}"
fi
