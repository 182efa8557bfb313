#!/usr/bin/env bash
# Every figure of the README's speed table on one GPU, in one run (< 8 minutes on one H100):
#   bash benchmarks/gpu_suite.sh [--smoke] [--out suite.json]
# 1. benchmarks/suite.py with the launch scripts' flags but command buffers (CUDA graphs) on:
#    bf16 GEMM ceiling; omni attention vs cuDNN causal (8k, 16k; decoder and flow-head heads;
#    checked against dense first); Tuna-2 and Tuna-R 1.5B train steps at 8k packed tokens;
#    sampling with and without the prompt cache, decode tokens/s.
# 2. the Tuna-2 train step again with command buffers off (--xla_gpu_enable_command_buffer=,
#    what launch/ sets today), so that the launch flags can follow the faster of the two.
# Writes one JSON (default runs/gpu_suite_<date>.json) and prints one table.
# --smoke runs the same steps at tiny sizes on a CPU (tests/test_benchmarks.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
out="runs/gpu_suite_$(date -u +%Y%m%d_%H%M%S).json"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=(--smoke); shift ;;
    --out) out="$2"; shift 2 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (expected --smoke or --out FILE)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python}"
if [[ ${#smoke[@]} -gt 0 ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"  # no accelerator plugin probing on a CPU host
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# As launch/: XLA may take 92% of the GPU's memory (its default is 75%), which the train steps'
# remat policies are sized for.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# The single-GPU part of launch/slurm_gpu.sbatch's flags, command buffers at XLA's default (on).
base_flags="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_highest_priority_async_stream=true \
--xla_gpu_enable_while_loop_double_buffering=true"
mkdir -p "$(dirname "$out")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
XLA_FLAGS="$base_flags" "$python" benchmarks/suite.py "${smoke[@]}" --out "$tmp/main.json"
# A CPU (--smoke) has no command buffers: the second pass keeps the first's flags there, so that
# with JAX_COMPILATION_CACHE_DIR set it reuses the first pass's compiled step.
off_flags="--xla_gpu_enable_command_buffer="
if [[ ${#smoke[@]} -gt 0 ]]; then off_flags=""; fi
XLA_FLAGS="$base_flags $off_flags" "$python" benchmarks/suite.py \
  "${smoke[@]}" --parts train --train tuna2 --tag no_command_buffer \
  --out "$tmp/no_command_buffer.json"
"$python" benchmarks/suite.py --merge "$tmp/main.json" "$tmp/no_command_buffer.json" --out "$out"
echo "suite: $((SECONDS - start)) s; figures in $out"
