r"""Ablation arm: Tuna-R (pretrained ViT + connector), masking off.

  python -m tuna2_jax.train --config=experiments/ablations/tuna_r.py:seed=0 \
      --workdir=runs/ablations/tuna_r/seed0

Everything else is ablation_base.py's, shared by every arm.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ablation_base  # noqa: E402

from tuna2_jax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  c = ablation_base.get_config(config_lib.with_arg(arg, vision='encoder'))
  c.ablation.arm = 'tuna_r'
  c.init_from = ablation_base.aligned_workdir(c)
  c.masking.enabled = False
  return c
