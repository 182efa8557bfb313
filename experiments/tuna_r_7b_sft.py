"""Tuna-R stage 2 (SFT): as tuna2_7b_sft.py, from the Tuna-R stage-1 parameters.

  python -m tuna2_jax.train --config=experiments/tuna_r_7b_sft.py \\
      --workdir=gs://BUCKET/tuna_r_7b_sft --config.init_from=gs://BUCKET/tuna_r_7b

Compiled for a v5p-128 (`--dry_run --dry_run_topology=v5p-128`, docs/scaling.md): fsdp=64,
2 microbatches, peak 45.0 GiB per chip of 95.74 GiB (47.0%, fits), as tuna_r_7b.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tuna2_7b  # noqa: E402
import tuna2_7b_sft  # noqa: E402

from tuna2_jax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  return tuna2_7b_sft.sft(tuna2_7b.get_config(config_lib.with_arg(arg, vision='encoder')))
