#!/usr/bin/env bash
# Runs tuna2_jax.train on every worker of a Cloud TPU VM pod slice (v5p, v6e) over gcloud ssh.
#
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a WORKDIR=gs://BUCKET/tuna2_7b \
#     launch/tpu_pod.sh --config=experiments/tuna2_7b.py [--config.mesh.fsdp=-1 ...]
#
# Every argument is passed to `python -m tuna2_jax.train` on all workers. The repository must
# already be at $REPO_DIR on each worker with the package installed (`pip install -e '.[tpu]'`);
# set SETUP to a command run first on every worker (e.g. a git pull). jax.distributed finds the
# other workers by itself on TPU VMs, so no coordinator flag is needed. Multi-slice jobs (DCN):
# launch through launch/xpk.sh and set --config.mesh.dcn_data=<slices>.
# Stop the job with `gcloud compute tpus tpu-vm ssh $TPU_NAME --worker=all --command
# "pkill -TERM -f tuna2_jax.train"`: SIGTERM saves a checkpoint at the next step and exits.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${WORKDIR:?set WORKDIR (a gs:// path every worker can write)}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=${REPO_DIR:-'~/tuna2_jax'}
SETUP=${SETUP:-true}

# Overlap FSDP's all-gathers and reduce-scatters with compute (the flags MaxText-style trainers
# use on v5p / v6e); replace with your own through LIBTPU_INIT_ARGS.
DEFAULT_LIBTPU_ARGS="--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true \
--xla_enable_async_reduce_scatter=true \
--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true"
LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-$DEFAULT_LIBTPU_ARGS}

ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="cd $REPO_DIR && $SETUP && \
    LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS' TF_CPP_MIN_LOG_LEVEL=1 \
    python3 -m tuna2_jax.train --workdir=$WORKDIR $ARGS 2>&1 | tee /tmp/tuna2_train.log"
