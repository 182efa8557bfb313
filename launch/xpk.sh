#!/usr/bin/env bash
# Submits tuna2_jax.train to a GKE cluster through XPK, on TPU slices or GPU node pools.
#
#   CLUSTER=my-cluster DEVICE=v5p-256 NUM_SLICES=2 WORKDIR=gs://BUCKET/tuna2_7b \
#     launch/xpk.sh --config=experiments/tuna2_7b.py --config.mesh.fsdp=-1 \
#       --config.mesh.dcn_data=2
#   CLUSTER=my-gpu-cluster DEVICE=h100-80gb-8 NUM_NODES=8 WORKDIR=gs://BUCKET/tuna2_7b \
#     launch/xpk.sh --config=experiments/tuna2_7b.py --config.mesh.fsdp=-1
#
# Needs `xpk` (pip install xpk) and a docker image with this repository installed (IMAGE, or
# xpk's --base-docker-image build of the current directory). Arguments go to
# `python -m tuna2_jax.train`. On TPU, jax.distributed finds the workers and slices itself;
# set --config.mesh.dcn_<axis> so that the DCN sizes multiply to NUM_SLICES. On GPU node pools
# JAX's own detection finds nothing (XPK sets JAX_COORDINATOR_IP/_PORT, NNODES and NODE_RANK in
# every pod), so the command passes them as --coordinator_address/--num_processes/--process_id,
# expanded inside the pod: one process per node, driving its 8 GPUs. The image needs the 'gcs'
# extra for gs:// workdirs (pip install -e '.[gpu,gcs]' or '.[tpu,gcs]').
set -euo pipefail

: "${CLUSTER:?set CLUSTER}"
: "${DEVICE:?set DEVICE, e.g. v5p-256, v6e-256 or h100-80gb-8}"
: "${WORKDIR:?set WORKDIR (a gs:// path)}"
WORKLOAD=${WORKLOAD:-tuna2-$(date +%m%d-%H%M)}
IMAGE_FLAG=${IMAGE:+--docker-image=$IMAGE}
IMAGE_FLAG=${IMAGE_FLAG:---base-docker-image=python:3.11}
ARGS=$(printf '%q ' "$@")

if [[ "$DEVICE" == h100* || "$DEVICE" == h200* ]]; then
  # Command buffers off as in slurm_gpu.sbatch: to be decided by benchmarks/gpu_suite.sh.
  ENV="XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_highest_priority_async_stream=true \
--xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true \
--xla_gpu_enable_while_loop_double_buffering=true --xla_gpu_enable_command_buffer=' \
XLA_PYTHON_CLIENT_MEM_FRACTION=0.92"
  SIZE_FLAG="--num-nodes=${NUM_NODES:-8}"
  # Single-quoted: expanded by the pod's shell, where XPK has set them.
  DIST_FLAGS='--coordinator_address=${JAX_COORDINATOR_IP}:${JAX_COORDINATOR_PORT} \
--num_processes=${NNODES} --process_id=${NODE_RANK}'
else
  ENV="LIBTPU_INIT_ARGS='--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true \
--xla_enable_async_reduce_scatter=true'"
  SIZE_FLAG="--num-slices=${NUM_SLICES:-1}"
  DIST_FLAGS=''
fi

xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --device-type="$DEVICE" \
  $SIZE_FLAG $IMAGE_FLAG \
  --command="$ENV python3 -m tuna2_jax.train --workdir=$WORKDIR $DIST_FLAGS $ARGS"
