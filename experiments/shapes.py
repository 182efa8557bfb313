"""Tuna-2 on the embedded "shapes" dataset, sized for a 2-core CPU (about 7 minutes).

  python -m tuna2_jax.train --config=experiments/shapes.py --workdir=runs/shapes
  python -m tuna2_jax.evaluate --workdir=runs/shapes

Args after ':' (comma-separated key=value): runlocal=True shrinks everything for a smoke run
(the tests use it); vision=encoder builds Tuna-R instead of Tuna-2.

48 x 48 images with 16 px patches put each cell of the 3 x 3 scene grid in one patch token,
which keeps sequences short enough for a CPU.
"""

from tuna2_jax import config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, vision='patch')
  c = config_lib.base(config_lib.shapes_model(args.vision))
  c.total_steps = 600
  c.batch_size = 24  # 600 x 24 rows learned more than 450 x 32 rows, at the same cost
  c.seq_len = 128
  c.log_every = 25
  c.eval_every = 600
  c.checkpoint_every = 300
  c.data.image_size = 48
  c.optim.update(lr=2e-3, warmup_steps=50, ema_decay=0.99)
  # A 16 x 16 x 3 patch of a mostly black scene shows its object through noise of scale 1 from
  # t ~ 0.1, so the layout would be decided in a band of t that training rarely samples; more
  # noise widens that band (the paper likewise scales noise with resolution).
  c.flow.noise_scale = 3.0
  c.sampling.update(sampler='heun', steps=16, cfg_scale=2.0)
  c.eval.update(num_vqa=200, num_gen=64, num_caption=48)

  if args.runlocal:
    c.total_steps = 6
    c.batch_size = 4
    c.log_every = 2
    c.eval_every = 6
    c.checkpoint_every = 3
    c.optim.warmup_steps = 2
    c.model.decoder.update(num_layers=2, width=64, num_heads=4, num_kv_heads=2, head_dim=16,
                           mlp_dim=128)
    c.model.head.update(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                        rope_split=(4, 6, 6))
    c.model.encoder.update(width=32, num_layers=1, num_heads=2, mlp_dim=64)
    c.eval.update(num_vqa=8, num_gen=4, num_caption=4, batch_size=4, num_samples_png=4)
    c.sampling.steps = 3
  return c
