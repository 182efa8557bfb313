"""Tuna-R alignment: the connector alone learns to map SigLIP 2 features into the decoder.

Starts from the pretrained Qwen2.5-7B-Instruct decoder and SigLIP 2 So400M/16 encoder (Hugging
Face folders, or convert.qwen2's output for the decoder); every parameter but the connector is
frozen and carries no optimizer state. Paper: 3k steps at lr 5e-4.

  python -m tuna2_jax.train --config=experiments/tuna_r_7b_align.py \\
      --workdir=gs://BUCKET/tuna_r_7b_align \\
      --config.init.decoder_from=/data/Qwen2.5-7B-Instruct \\
      --config.init.encoder_from=/data/siglip2-so400m-patch16-512

Next stage: experiments/tuna_r_7b.py with --config.init_from=<this workdir>.

Compiled for a v5p-128 (`--dry_run --dry_run_topology=v5p-128`, docs/scaling.md): fsdp=64,
tuna2_7b.py's batch and 2 microbatches, only the connector differentiated: peak 32.0 GiB per
chip of 95.74 GiB (33.5%, fits).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tuna2_7b  # noqa: E402

from tuna2_jax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  c = tuna2_7b.get_config(config_lib.with_arg(arg, vision='encoder'))
  c.optim.update(trainable='connector', lr=5e-4, warmup_steps=100, schedule='constant')
  c.masking.enabled = False
  if c.total_steps > 4:  # runlocal keeps its few steps
    c.update(total_steps=3_000, eval_every=1_000, checkpoint_every=1_000)
  return c
