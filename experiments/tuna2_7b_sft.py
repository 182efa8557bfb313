"""Tuna-2 stage 2 (SFT): 50k steps at lr 2e-5 from the stage-1 parameters, new optimizer.

  python -m tuna2_jax.train --config=experiments/tuna2_7b_sft.py \\
      --workdir=gs://BUCKET/tuna2_7b_sft --config.init_from=gs://BUCKET/tuna2_7b

init_from takes the parameters of that workdir's latest checkpoint and nothing else (resuming
this run later restores its own full state instead).

Same model, batch and 2 microbatches as stage 1. Compiled for a v5p-128 (`--dry_run
--dry_run_topology=v5p-128`, docs/scaling.md): fsdp=64, peak 40.5 GiB per chip of 95.74 GiB
(42.3%, fits), as stage 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tuna2_7b  # noqa: E402


def sft(c):
  """Stage 2 on top of a stage-1 config: conversations, editing, high-quality generation."""
  c.data.weights.update(t2i=0.35, edit=0.25, mmu=0.3, text=0.1)
  c.masking.enabled = False
  if c.total_steps > 4:  # runlocal keeps its few steps
    c.total_steps = 50_000
    c.optim.update(lr=2e-5, warmup_steps=500)
  return c


def get_config(arg: str | None = None):
  return sft(tuna2_7b.get_config(arg))
