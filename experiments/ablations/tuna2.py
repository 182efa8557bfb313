r"""Ablation arm: Tuna-2 (pixel patch embedding), masking off.

  python -m tuna2_jax.train --config=experiments/ablations/tuna2.py:seed=0 \
      --workdir=runs/ablations/tuna2/seed0

Everything else is ablation_base.py's, shared by every arm.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ablation_base  # noqa: E402

from tuna2_jax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  c = ablation_base.get_config(config_lib.with_arg(arg, vision='patch'))
  c.ablation.arm = 'tuna2'
  c.init_from = ''
  c.masking.enabled = False
  return c
