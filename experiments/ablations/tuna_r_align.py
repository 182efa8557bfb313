r"""Tuna-R alignment in miniature: only the connector trains, on the pretrained shapes ViT.

  python -m tuna2_jax.train --config=experiments/ablations/tuna_r_align.py:seed=0 \
      --workdir=runs/ablations/tuna_r_align/seed0

Starts from ROOT/siglip_shapes/encoder (experiments/siglip_shapes.py) for the ViT; the decoder
and head keep the seed's initialisation and, like everything but the connector, stay frozen
(no optimizer state). Paper: 3k steps at lr 5e-4; here 60 steps at lr 5e-4. The Tuna-R arms
(tuna_r.py, tuna_r_masking.py) of the same seed start from this run's parameters.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ablation_base  # noqa: E402

from tuna2_jax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  c = ablation_base.get_config(config_lib.with_arg(arg, vision='encoder'))
  c.ablation.arm = 'tuna_r_align'
  c.init.encoder_from = ablation_base.encoder_dir(c.ablation.root)
  c.optim.update(trainable='connector', lr=5e-4, schedule='constant')
  if c.total_steps > 10:  # runlocal keeps its few steps
    c.total_steps = 60
    c.optim.warmup_steps = 10
    c.checkpoint_every = 60
    c.eval_every = 60
    c.eval.metrics_every = 0
  return c
