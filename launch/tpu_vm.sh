#!/usr/bin/env bash
# Cloud TPU VMs (one host or a pod slice) for mae_jax, with the GA `gcloud compute tpus tpu-vm` commands.
#
#   launch/tpu_vm.sh COMMAND [options] [-- ARGS for python -m mae_jax.main]   (options may come first)
#
# Commands:
#   create   create the TPU VM (every worker of a pod slice)
#   install  copy this checkout to every worker and install it with jax[tpu] in ~/mae_jax_venv
#   run      start `python -m mae_jax.main ARGS` on all workers at once, detached (MAE_JAX_DISTRIBUTED=1:
#            the workers find each other through the TPU metadata); output in ~/mae_jax.log on each worker
#   logs     stream ~/mae_jax.log of worker 0 (--worker=N or --worker=all for the others)
#   stop     stop the run on every worker
#   delete   delete the TPU VM
#   all      create, install, run, logs
#
# Options (or environment variables):
#   --name=NAME          TPU_NAME         (default mae-jax)
#   --zone=ZONE          TPU_ZONE         (default us-central2-b)
#   --type=TYPE          TPU_TYPE         accelerator type: v4-8 (one host), v4-32 (pod slice: 4 hosts),
#                                         v5litepod-8, v5p-8, v6e-8, ... (default v4-8)
#   --version=VERSION    TPU_VERSION      runtime image (default from the type: tpu-ubuntu2204-base for v4,
#                                         v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e)
#   --project=PROJECT    TPU_PROJECT      (default: gcloud's configured project)
#   --spot                                create a Spot TPU (preemptible; runs resume from their checkpoints)
#   --worker=W                            worker for `logs` (default 0)
#   --env=K=V                             extra environment for the run, repeatable (e.g. TFDS_DATA_DIR=gs://b/tfds)
#   --module=M                            what `run` starts (default mae_jax.main; mae_jax.bench benchmarks the pod)
#   --dry-run                             print the commands instead of running them
#
# Example: ViT-L MAE on a v4-32 pod slice, data on GCS:
#   launch/tpu_vm.sh all --name=mae-l --type=v4-32 --env=TFDS_DATA_DIR=gs://BUCKET/tfds -- \
#       --config=configs/mae_vitl.py --workdir=gs://BUCKET/mae_vitl --config.data.source=tfds \
#       --config.data.name=imagenet2012
set -euo pipefail

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME="${TPU_NAME:-mae-jax}"
ZONE="${TPU_ZONE:-us-central2-b}"
TYPE="${TPU_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-}"
PROJECT="${TPU_PROJECT:-}"
SPOT=0
WORKER=0
MODULE=mae_jax.main
RUN_ENV=()
JAX_TPU='jax[tpu]>=0.10.2,<0.11'
# libtpu: overlap FSDP's all-gathers and reduce-scatters with compute (MaxText's settings; not measured here).
# A LIBTPU_INIT_ARGS given with --env comes later on the command line and replaces this one.
TPU_FLAGS='LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true --xla_enable_async_reduce_scatter=true'
# Paths on the workers: the ~ expands there, in the remote shell.
# shellcheck disable=SC2088
REMOTE_DIR='~/mae_jax' REMOTE_VENV='~/mae_jax_venv' REMOTE_LOG='~/mae_jax.log' REMOTE_PID='~/mae_jax.pid'

default_version() {
  case "$1" in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod* | v5e*) echo v2-alpha-tpuv5-lite ;;
    v2* | v3* | v4*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime for --type=$1; pass --version (see https://cloud.google.com/tpu/docs/runtimes)" ;;
  esac
}

# The flags every `gcloud compute tpus tpu-vm` call takes.
target() {
  TARGET=("$NAME" "--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    TARGET+=("--project=$PROJECT")
  fi
}

ssh_all() {  # ssh_all WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "${TARGET[@]}" "--worker=$1" "--command=$2"
}

cmd_create() {
  local extra=()
  if [[ "$SPOT" == 1 ]]; then
    extra+=(--spot)
  fi
  run gcloud compute tpus tpu-vm create "${TARGET[@]}" "--accelerator-type=$TYPE" "--version=$VERSION" \
    ${extra[@]+"${extra[@]}"}
}

cmd_install() {
  local archive="${TMPDIR:-/tmp}/mae_jax-$NAME.tar.gz"
  # The checkout's tracked and new (not ignored) files: no .git, venvs or workdirs.
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "git -C $(quote "$REPO") ls-files -z --cached --others --exclude-standard" \
      "| tar -C $(quote "$REPO") --null -czf $(quote "$archive") -T -"
  else
    git -C "$REPO" ls-files -z --cached --others --exclude-standard |
      tar -C "$REPO" --null -czf "$archive" -T -
  fi
  run gcloud compute tpus tpu-vm scp "$archive" "$NAME:mae_jax.tar.gz" "--zone=$ZONE" \
    ${PROJECT:+"--project=$PROJECT"} --worker=all
  ssh_all all "set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/mae_jax.tar.gz -C $REMOTE_DIR \
&& python3 -m venv $REMOTE_VENV && $REMOTE_VENV/bin/pip install -q -U pip \
&& $REMOTE_VENV/bin/pip install -q -e $REMOTE_DIR '$JAX_TPU' \
&& $REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
}

cmd_run() {
  require_main_args "run needs the training arguments after --, e.g. -- --config=configs/mae_vitb.py --workdir=gs://BUCKET/run"
  local quoted_args quoted_env
  quoted_args="$(quote_all "${MAIN_ARGS[@]}") "
  quoted_env="$(quote_all MAE_JAX_DISTRIBUTED=1 "$TPU_FLAGS" ${RUN_ENV[@]+"${RUN_ENV[@]}"}) "
  # setsid + nohup: the run survives the ssh session; its process group id is in ~/mae_jax.pid for `stop`.
  ssh_all all "cd $REMOTE_DIR || exit 1; setsid nohup env ${quoted_env}$REMOTE_VENV/bin/python -m $(quote "$MODULE") \
${quoted_args}> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID; echo \"\$(hostname): started pid \$!\""
}

cmd_logs() {
  ssh_all "$WORKER" "tail -n +1 -F $REMOTE_LOG"
}

cmd_stop() {
  ssh_all all "if [ -f $REMOTE_PID ]; then kill -TERM -- -\$(cat $REMOTE_PID) 2>/dev/null || true; rm -f $REMOTE_PID; fi"
}

cmd_delete() {
  run gcloud compute tpus tpu-vm delete "${TARGET[@]}" --quiet
}

[[ $# -gt 0 ]] || usage 2
COMMAND=''
parse_option() {
  case "$1" in
    create | install | run | logs | stop | delete | all | help)
      [[ -z "$COMMAND" ]] || die "two commands: $COMMAND and $1"
      COMMAND="$1"
      ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --worker=*) WORKER="${1#*=}" ;;
    --env=*=*) RUN_ENV+=("${1#--env=}") ;;
    --module=*) MODULE="${1#*=}" ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
case "$COMMAND" in
  '') die "no command (create, install, run, logs, stop, delete, all; see --help)" ;;
  help) usage 0 ;;
esac
if [[ -z "$VERSION" ]]; then
  VERSION="$(default_version "$TYPE")" || exit 2
fi
target

case "$COMMAND" in
  create) cmd_create ;;
  install) cmd_install ;;
  run) cmd_run ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  all)
    cmd_create
    cmd_install
    cmd_run
    cmd_logs
    ;;
  *) die "unknown command $COMMAND (create, install, run, logs, stop, delete, all)" ;;
esac
