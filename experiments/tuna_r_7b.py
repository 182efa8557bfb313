"""Tuna-R at 7B: the same decoder and flow head as tuna2_7b.py, with a SigLIP 2 So400M/16
encoder (26 of its 27 layers, no post-norm) and the RMSNorm -> Linear -> GELU -> Linear
connector in place of the patch embedding.

Stage 1, from the parameters of the connector alignment (tuna_r_7b_align.py); stage 2 is
tuna_r_7b_sft.py.

  python -m tuna2_jax.train --config=experiments/tuna_r_7b.py --workdir=gs://BUCKET/tuna_r_7b \
      --config.init_from=gs://BUCKET/tuna_r_7b_align

Compiled for a v5p-128 (`--dry_run --dry_run_topology=v5p-128`, docs/scaling.md): fsdp=64,
4 rows of 16k tokens per chip in tuna2_7b.py's 2 microbatches, splash: peak 45.0 GiB per chip
of 95.74 GiB (47.0%, fits).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tuna2_7b  # noqa: E402  (the sibling config this one differs from in one key)

from tuna2_jax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  return tuna2_7b.get_config(config_lib.with_arg(arg, vision='encoder'))
