"""Tuna-2 on the embedded "shapes" dataset, sized for a 2-core CPU.

Train, evaluate and write samples (about 10 minutes on 2 CPU cores):

  python -m tuna2_jax.train --config=experiments/shapes.py --workdir=runs/shapes
  python -m tuna2_jax.evaluate --workdir=runs/shapes

Smoke-sized (used by the tests):

  python -m tuna2_jax.train --config=experiments/shapes.py:runlocal=True --workdir=/tmp/t

Arguments after ':' are comma-separated key=value pairs: `runlocal` (bool) and `vision`
('patch' for Tuna-2, 'encoder' for Tuna-R).
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'a=1,b=True' into a ConfigDict, with types taken from `defaults`."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ValueError(f'config arg {item!r}: expected one of {sorted(defaults)} as key=value')
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config arg {key}={value!r}: expected true or false')
      out[key] = value.lower() in ('true', '1')
    else:
      out[key] = kind(value)
  return out


def model_config(vision: str) -> ml_collections.ConfigDict:
  """A small Tuna-2 / Tuna-R for 64 x 64 shapes images."""
  m = ml_collections.ConfigDict()
  m.vision = vision  # 'patch' (Tuna-2) | 'encoder' (Tuna-R)
  m.patch_size = 8
  m.vocab_size = 128  # the shapes SentencePiece model fits; checked at start-up
  m.time_embed_freqs = 256
  m.dtype = 'float32'  # compute dtype; parameters are always param_dtype
  m.param_dtype = 'float32'
  m.remat = 'none'  # see models/remat.py for the names
  m.scan_layers = True
  m.attention = 'dense'
  m.decoder = ml_collections.ConfigDict(dict(
      num_layers=3, width=192, num_heads=6, num_kv_heads=2, head_dim=32, mlp_dim=512,
      rope_theta=10_000.0, norm_eps=1e-6, qkv_bias=True, tie_embeddings=False))
  m.head = ml_collections.ConfigDict(dict(
      num_layers=2, num_heads=6, num_kv_heads=2, head_dim=32, mlp_dim=512,
      rope_theta=10_000.0, rope_split=(8, 12, 12)))
  m.encoder = ml_collections.ConfigDict(dict(
      width=128, num_layers=2, num_heads=4, mlp_dim=384, max_grid=16, norm_eps=1e-6))
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, runlocal=False, vision='patch')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1500
  c.batch_size = 16
  c.seq_len = 224
  c.log_every = 25
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.init_from = ''  # a checkpoint directory to take parameters from (not optimizer state)

  c.model = model_config(args.vision)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'shapes'
  c.data.image_size = 64
  c.data.max_objects = 3
  # Stream weights; generation (t2i + edit) : understanding (mmu) = 7 : 3 as in the paper.
  c.data.weights = ml_collections.ConfigDict(dict(t2i=0.5, edit=0.13, mmu=0.27, text=0.1))
  c.data.worker_count = 0
  c.data.tokenizer = ''  # '' = the shipped shapes SentencePiece model

  c.objective = ml_collections.ConfigDict(dict(
      text_coeff=1.0, flow_coeff=1.0, p_mean=-0.8, p_std=0.8, noise_scale=1.0, t_eps=0.05,
      caption_dropout=0.1,  # prompt dropped -> null prompt, for classifier-free guidance
      mmu_noisy_prob=0.0, mmu_noisy_max=0.1))  # reference code: 10% of mmu images at t=1-U(0,0.1)

  c.masking = ml_collections.ConfigDict(dict(
      enabled=False, start_fraction=0.6, sample_prob=0.5, max_ratio=0.5))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
      warmup_steps=100, schedule='cosine', min_lr_ratio=0.1, ema_decay=0.999,
      trainable=''))  # regex over parameter paths; '' trains everything

  c.sampling = ml_collections.ConfigDict(dict(
      sampler='heun', steps=20, cfg_scale=2.0, cfg_interval=(0.0, 1.0),
      max_new_tokens=24, temperature=0.0))

  c.eval = ml_collections.ConfigDict(dict(
      num_vqa=200, num_gen=64, num_caption=64, batch_size=32, use_ema=True, num_samples_png=16))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = (('layers', None), ('embed', 'fsdp'), ('mlp', 'tensor'),
                      ('heads', 'tensor'), ('kv_heads', 'tensor'), ('vocab', 'tensor'),
                      ('patch', None))

  if args.runlocal:
    c.total_steps = 6
    c.batch_size = 4
    c.seq_len = 128
    c.data.image_size = 32
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
