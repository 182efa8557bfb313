"""Config building blocks shared by experiments/*.py: defaults, named model sizes, arg parsing.

Experiment files compose these and set their own values; every number from the paper lives in
a config, never in model code.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load(spec: str) -> ml_collections.ConfigDict:
  """get_config(arg) of 'path/to/config.py[:arg]', as --config=path:arg loads it."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} not found')
  name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f'experiments_{name}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'a=1,b=True' (the part after ':' in --config=file.py:...) with typed defaults.

  A bare key of a boolean default means True, as in big_vision: 'runlocal' is 'runlocal=True'.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'config arg {item!r}: unknown key {key!r}; expected one of '
                       f'{sorted(defaults)}')
    kind = type(defaults[key])
    if not sep:
      if kind is not bool:
        raise ValueError(f'config arg {item!r}: {key} takes a {kind.__name__} value; expected '
                         f'{key}=<value> (only boolean keys may be given bare)')
      value = 'true'
    if kind is bool:
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config arg {key}={value!r}: expected true or false')
      out[key] = value.lower() in ('true', '1')
    else:
      out[key] = kind(value)
  return out


def with_arg(arg: str | None, **fixed) -> str:
  """The arg string `arg` with `fixed` keys set: how a config that is another one with a key
  pinned (Tuna-R's vision=encoder) passes it on. Raises ValueError when arg sets one of them
  otherwise."""
  items = [item for item in (arg or '').split(',') if item]
  for item in items:
    key, _, value = item.partition('=')
    if key in fixed and value != str(fixed[key]):
      raise ValueError(f'config arg {item!r}: this config fixes {key}={fixed[key]}')
  items = [item for item in items if item.partition('=')[0] not in fixed]
  return ','.join(items + [f'{k}={v}' for k, v in fixed.items()])


def decoder(num_layers, width, num_heads, num_kv_heads, head_dim, mlp_dim, *, rope_theta=1e6,
            norm_eps=1e-6, qkv_bias=True, tie_embeddings=False) -> ml_collections.ConfigDict:
  """A Qwen2-style decoder."""
  return ml_collections.ConfigDict(dict(
      num_layers=num_layers, width=width, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, mlp_dim=mlp_dim, rope_theta=rope_theta, norm_eps=norm_eps,
      qkv_bias=qkv_bias, tie_embeddings=tie_embeddings))


def flow_head(num_layers, num_heads, num_kv_heads, head_dim, mlp_dim, rope_split, *,
              rope_theta=1e4, norm_eps=1e-6, qk_norm_eps=1e-6, final_norm_eps=1e-6,
              text_rope='sectioned', text_rope_theta=1e4, text_rope_scaling=None,
              text_rope_pairing='half', image_rope_pairing='half', image_rope_origin='sample',
              time_token_rope=True) -> ml_collections.ConfigDict:
  """The flow head; the defaults are this project's conventions, `official_flow_head` the
  official Tuna-2's (README "Official weights").

  rope_theta / rope_split: the image tokens' 3D (t, h, w) rope. text_rope: 'sectioned' (text
  tokens' 1D position in every section of the image rope) or '1d' (a plain rope over head_dim
  with text_rope_theta and text_rope_scaling). *_pairing: 'half' (rotate-half, pairs
  (i, i + K/2)) or 'interleaved' (pairs (2i, 2i+1) rotated by minus the angle).
  image_rope_origin: 'sample' ((start, start + row, start + col), start = the span's first
  patch position) or 'image' ((0, row, col), restarting at every image). time_token_rope: the
  time token gets the text rope (True) or none.
  """
  scaling = ml_collections.ConfigDict(dict(kind='none', factor=1.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position=8192))
  scaling.update(text_rope_scaling or {})
  return ml_collections.ConfigDict(dict(
      num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      mlp_dim=mlp_dim, rope_theta=rope_theta, rope_split=tuple(rope_split), norm_eps=norm_eps,
      qk_norm_eps=qk_norm_eps, final_norm_eps=final_norm_eps, text_rope=text_rope,
      text_rope_theta=text_rope_theta, text_rope_scaling=scaling,
      text_rope_pairing=text_rope_pairing, image_rope_pairing=image_rope_pairing,
      image_rope_origin=image_rope_origin, time_token_rope=time_token_rope))


# The official Tuna-2 head (facebookresearch/tuna-2 DiffusionHeadConfig and its rope): image
# tokens 3D rope (16, 24, 24) theta 1e4 as interleaved pairs at (0, row, col); text tokens a 1D
# llama3-scaled rope, theta 5e5, rotate-half; no rope on the time token; norms 1e-5, q/k 1e-6,
# final layer 1e-6.
OFFICIAL_HEAD = dict(
    rope_theta=1e4, norm_eps=1e-5, qk_norm_eps=1e-6, final_norm_eps=1e-6, text_rope='1d',
    text_rope_theta=5e5, text_rope_pairing='half', image_rope_pairing='interleaved',
    image_rope_origin='image', time_token_rope=False,
    text_rope_scaling=dict(kind='llama3', factor=32.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position=8192))
# The official model's other conventions: raw t (no x1000), cos first, one time embedder
# shared by the time tokens and the head; the patch embedding's RMSNorm at float32 machine
# epsilon (torch RMSNorm eps=None); flat p*p raster strips per output token and training spans
# without each image's last patch; CFG on lo < t < hi (lo = 0 from the start).
OFFICIAL_MODEL = dict(time_embed_t_scale=1.0, time_embed_order='cos_sin', time_embed_shared=True,
                      patch_norm_eps=1.1920928955078125e-07, pixel_layout='official')
OFFICIAL_SAMPLING = dict(cfg_interval=(0.0, 1.0), cfg_interval_open=True)


def official_flow_head(num_layers, num_heads, num_kv_heads, head_dim, mlp_dim,
                       rope_split) -> ml_collections.ConfigDict:
  return flow_head(num_layers, num_heads, num_kv_heads, head_dim, mlp_dim, rope_split,
                   **OFFICIAL_HEAD)


def vision_encoder(width, num_layers, num_heads, mlp_dim, max_grid, *,
                   norm_eps=1e-6) -> ml_collections.ConfigDict:
  """A SigLIP-style ViT (Tuna-R's representation encoder).

  max_grid: the side of its learned square position table, which each image's patch grid gets
  a bilinear resize of (as in SigLIP 2; So400M/16's table is 16 x 16).
  """
  return ml_collections.ConfigDict(dict(width=width, num_layers=num_layers, num_heads=num_heads,
                                        mlp_dim=mlp_dim, max_grid=max_grid, norm_eps=norm_eps))


def qwen2_5_7b() -> ml_collections.ConfigDict:
  return decoder(28, 3584, 28, 4, 128, 18944)


def qwen2_5_1_5b() -> ml_collections.ConfigDict:
  return decoder(28, 1536, 12, 2, 128, 8960, tie_embeddings=True)


def siglip2_so400m_16(max_grid: int = 32) -> ml_collections.ConfigDict:
  """So400M/16 with its 27th layer dropped (26 used) as the paper does; max_grid 32 is the
  position table of the 512 px checkpoint."""
  return vision_encoder(1152, 26, 16, 4304, max_grid)


def shapes_model(vision: str = 'patch') -> ml_collections.ConfigDict:
  """The CPU-sized shapes model (experiments/shapes.py, siglip_shapes.py, ablations/).

  48 x 48 images with 16 px patches put each cell of the 3 x 3 scene grid in one patch token;
  Tuna-R's position table is 3 x 3 too, so at 48 px it is used as it is (no resize).
  """
  return model(vision, patch_size=16, vocab_size=128,
               dec=decoder(3, 128, 4, 2, 32, 384, rope_theta=1e4),
               head=flow_head(2, 4, 2, 32, 384, rope_split=(8, 12, 12)),
               encoder=vision_encoder(96, 2, 4, 256, max_grid=3))


def model(vision: str, patch_size: int, vocab_size: int, dec, head,
          encoder=None) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vision = vision  # 'patch' (Tuna-2) | 'encoder' (Tuna-R)
  m.patch_size = patch_size
  m.vocab_size = vocab_size
  m.time_embed_freqs = 256
  m.time_embed_t_scale = 1000.0  # sinusoids of t_scale * t; official: 1 (raw t)
  m.time_embed_order = 'cos_sin'  # models/timestep.py ORDERS
  m.time_embed_max_period = 10_000.0
  m.time_embed_shared = False  # True (official): one embedder for time tokens and head AdaLN
  m.patch_norm_eps = 1e-6  # the patch embedding's RMSNorm; official: float32 machine epsilon
  # 'exact': each output token is its own p x p block; 'official': token k fills the k-th strip
  # of p*p raster pixels and training spans leave out each image's last patch (flow.py).
  m.pixel_layout = 'exact'
  # The most image spans one row may hold: the flow head computes its AdaLN conditioning once
  # per span, in a table of this many rows; the data packer closes a row before it has more.
  m.max_spans = 64
  m.dtype = 'float32'  # compute dtype; parameters are stored in param_dtype
  m.param_dtype = 'float32'
  m.remat = 'none'  # models/transformer.py REMAT_POLICIES
  m.attention = 'auto'  # models/attention.py IMPLS; auto picks the kernel per backend
  m.decoder = dec
  m.head = head
  m.encoder = encoder or vision_encoder(128, 2, 4, 384, 16)
  return m


def flow(*, p_mean=-0.8, p_std=0.8, mmu_noisy_prob=0.0, mmu_noisy_max=0.1, noise_scale=1.0,
         t_eps=0.05) -> ml_collections.ConfigDict:
  """The flow's one config (flow.py), read by the training loss and the sampler alike.

  p_mean, p_std: generated images' t = sigmoid(N(p_mean, p_std)); mmu_noisy_prob of the
  understanding images at t = 1 - U(0, mmu_noisy_max) (the reference code: 0.1 of them);
  noise_scale: e ~ N(0, I) * noise_scale; t_eps: v_hat's floor on 1 - t.
  """
  return ml_collections.ConfigDict(dict(
      p_mean=p_mean, p_std=p_std, mmu_noisy_prob=mmu_noisy_prob, mmu_noisy_max=mmu_noisy_max,
      noise_scale=noise_scale, t_eps=t_eps))


# Keys that moved: {old dotted key: new one}. Old recorded configs are read with them moved
# (config_history.read); an old key given on the command line is refused naming the new one.
RENAMED_KEYS = {f'objective.{k}': f'flow.{k}' for k in (
    'p_mean', 'p_std', 'mmu_noisy_prob', 'mmu_noisy_max', 'noise_scale', 't_eps')}


def upgrade(tree: dict) -> dict:
  """A recorded config (nested dicts, as config.json holds it) with RENAMED_KEYS moved."""
  for old, new in RENAMED_KEYS.items():
    *old_parents, old_leaf = old.split('.')
    *new_parents, new_leaf = new.split('.')
    src = tree
    for name in old_parents:
      src = src.get(name) if isinstance(src, dict) else None
    if not isinstance(src, dict) or old_leaf not in src:
      continue
    dst = tree
    for name in new_parents:
      dst = dst.setdefault(name, {})
    dst.setdefault(new_leaf, src.pop(old_leaf))
  return tree


def base(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every key the trainer reads, with the paper's recipe defaults where it gives one."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 16
  c.seq_len = 256
  c.log_every = 25
  c.eval_every = 500  # evaluation and samples every so many steps and at the last; 0: never
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.model = model_cfg
  # Starting weights of a new run (parameters only; the optimizer starts afresh). A workdir with
  # checkpoints resumes instead. See convert/init_from.py.
  c.init_from = ''  # a training workdir: the previous stage's parameters
  c.init = ml_collections.ConfigDict(dict(
      decoder_from='',  # Qwen2 / Qwen2.5 Hugging Face folder, or convert.qwen2's output
      encoder_from='',  # SigLIP 2 Hugging Face folder (Tuna-R)
      required=False))  # True: a new run without init_from / init.* is refused (stage configs)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'shapes'
  c.data.image_size = 64
  c.data.max_objects = 3
  # Stream weights; generation (t2i + edit) : understanding (mmu) = 7 : 3 as in the paper.
  c.data.weights = ml_collections.ConfigDict(dict(t2i=0.5, edit=0.13, mmu=0.27, text=0.1))
  c.data.worker_count = 0
  c.data.tokenizer = ''  # '': init.decoder_from's tokenizer.json, else shipped (data/tokenizer.py)
  # Held-out splits of the task streams, for the held-out loss (heldout.py; mixture data only).
  c.data.eval = ml_collections.ConfigDict(dict(t2i='', mmu='', edit='', text=''))
  # Tokens of the sequence format's roles ('' = the tokenizer's own, else appended ones);
  # Hugging Face tokenizers only (data/tokenizer.py).
  c.data.special_tokens = ml_collections.ConfigDict(dict(bos='', eos='', pad='', boi='', eoi='',
                                                         img=''))

  c.flow = flow()
  c.objective = ml_collections.ConfigDict(dict(
      text_coeff=1.0, flow_coeff=1.0,
      caption_dropout=0.1))  # prompt dropped -> null prompt, for classifier-free guidance

  c.masking = ml_collections.ConfigDict(dict(
      enabled=False, start_fraction=0.6, sample_prob=0.5, max_ratio=0.5))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
      warmup_steps=1000, schedule='cosine', min_lr_ratio=0.1, ema_decay=0.9999,
      # Gradient accumulation: each step's rows run in this many microbatches, one at a time
      # (trainer.accumulate), for the same batch in less activation memory.
      microbatches=1,
      trainable=''))  # regex over parameter paths; '' trains everything

  c.sampling = ml_collections.ConfigDict(dict(
      sampler='euler', steps=50, cfg_scale=3.0, cfg_interval=(0.0, 1.0),
      cfg_interval_open=False,  # False: lo <= t <= hi; True (official): lo < t < hi, lo=0 from 0
      max_new_tokens=32, temperature=0.0))

  c.eval = ml_collections.ConfigDict(dict(
      num_vqa=200, num_gen=64, num_caption=64, batch_size=32, use_ema=True, num_samples_png=16,
      # Held-out metrics during training, appended to workdir/eval_history.jsonl every this
      # many steps (and at the last step); 0 = only the samples at eval_every.
      metrics_every=0,
      shapes_metrics=True,  # the held-out shapes metrics (evaluate.py); off for real data
      loss_batches=8,  # held-out loss: at most this many batches per data.eval stream
      # Sample grids (sample_grids.py): prompts to draw (() = held-out shapes prompts on shapes
      # data), image files to ask eval.questions about (one question each, or one for all).
      prompts=(), images=(), questions=()))

  # Devices per axis inside a slice (ICI) and slices per axis (DCN, multi-slice TPU or several
  # GPU nodes); one ICI and one DCN size may be -1 to take what is left (sharding.make_mesh).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  # The one logical-axis -> mesh-axis table; parameters, optimizer state, EMA, the batch and
  # the residual-stream activation constraints all use it.
  c.sharding_rules = (('layers', None), ('embed', 'fsdp'), ('mlp', 'tensor'),
                      ('heads', 'tensor'), ('kv_heads', 'tensor'), ('vocab', 'tensor'),
                      ('patch', None), ('batch', ('data', 'fsdp')),
                      ('activation_length', None), ('activation_embed', None))
  # Under an fsdp mesh, a run refuses to start when more of the parameter bytes than this are
  # not split over 'fsdp' (every fsdp shard would hold a whole copy).
  c.max_replicated_fraction = 0.02
  # Seconds a process waits at a barrier for the others before failing with their names.
  c.barrier_timeout_s = 600
  # Optional Weights & Biases sink beside metrics.jsonl and TensorBoard (metrics.WandbSink);
  # needs the 'wandb' extra. mode: online | offline | disabled; run_id '' = from the workdir.
  c.wandb = ml_collections.ConfigDict(dict(enabled=False, project='tuna2_jax', entity='',
                                           name='', run_id='', mode='online'))
  return c
