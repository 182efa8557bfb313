r"""Encoder pretraining in miniature: Tuna-R's ViT learns SigLIP's sigmoid image-text loss on
shapes images and their captions (training scenes only), then is saved for the Tuna-R configs.

  python -m tuna2_jax.pretrain_encoder --config=experiments/siglip_shapes.py \
      --workdir=runs/ablations/siglip_shapes

writes runs/ablations/siglip_shapes/encoder, which experiments/ablations/tuna_r_align.py loads
(--config.init.encoder_from). The ViT is the shapes Tuna-R encoder (config_lib.shapes_model):
2 layers of width 96 on 48 x 48 images with 16 px patches.

Args: runlocal=True shrinks it for a smoke run; seed=N.
"""

import ml_collections

from tuna2_jax import config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, seed=0)
  c = config_lib.base(config_lib.shapes_model('encoder'))
  c.seed = args.seed
  c.total_steps = 600
  c.batch_size = 128
  c.log_every = 50
  c.checkpoint_every = 300
  c.data.image_size = 48
  c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=1e-4)
  c.siglip = ml_collections.ConfigDict(dict(
      embed_dim=64,
      text=dict(width=64, num_layers=2, num_heads=4, mlp_dim=256, max_len=40, norm_eps=1e-6)))
  c.eval.num_retrieval = 256
  if args.runlocal:
    c.update(total_steps=4, batch_size=8, log_every=2, checkpoint_every=2)
    c.optim.warmup_steps = 1
    c.model.encoder.update(width=32, num_layers=1, num_heads=2, mlp_dim=64)
    c.siglip.update(embed_dim=16)
    c.siglip.text.update(width=32, num_layers=1, num_heads=2, mlp_dim=64)
    c.eval.num_retrieval = 16
  return c
