"""Tuna-2 at the paper's 7B scale: Qwen2.5-7B decoder, 16-block flow head of width 3584.

About 12.6B parameters (decoder ~7.6B, head ~5.0B). Patch 16 on 512-class images. Launch on a
pod or cluster (launch/) with a mesh sized for it, e.g.

  python -m tuna2_jax.train --config=experiments/tuna2_7b.py --workdir=gs://BUCKET/tuna2_7b \
      --config.mesh.fsdp=-1 --config.mesh.data=1 \
      --config.init.decoder_from=/data/Qwen2.5-7B-Instruct

Stage 1 of the paper, starting from Qwen2.5-7B-Instruct (a Hugging Face folder, or the output of
`python -m tuna2_jax.convert.qwen2 --hf_dir=... --output=... --vocab_size=152128`); stage 2 is
tuna2_7b_sft.py.

Compiled for a v5p-128 from a CPU host (pip install -e '.[tpu-aot]'; docs/scaling.md):

  python -m tuna2_jax.train --config=experiments/tuna2_7b.py --dry_run --dry_run_topology=v5p-128

fsdp=64, 4 rows of 16k tokens per chip in 2 microbatches (optim.microbatches), splash: peak
40.5 GiB per chip of 95.74 GiB HBM (42.3%, fits). In one pass (`--config.optim.microbatches=1`)
69.1 GiB (72.2%, fits too, with less headroom). Before the text loss's hand-written VJP
(objectives._chunked_nll) they were 90.3 GiB and 103.2 GiB (107.8%, no fit). On a v6e-256
(31.25 GiB per chip) see docs/scaling.md for the mesh that fits.

Args: vision=patch|encoder (encoder: Tuna-R, tuna_r_7b.py); runlocal=True shrinks the widths
for a smoke run with the same structure.
"""

from tuna2_jax import config_lib

# Qwen2.5's embedding has 152064 rows; the multimodal special tokens are appended after them.
QWEN_VOCAB = 152064
ADDED_SPECIAL_TOKENS = 64


def model_config(vision: str):
  return config_lib.model(
      vision, patch_size=16, vocab_size=QWEN_VOCAB + ADDED_SPECIAL_TOKENS,
      dec=config_lib.qwen2_5_7b(),
      head=config_lib.official_flow_head(16, 56, 14, 64, 18944, rope_split=(16, 24, 24)),
      encoder=config_lib.siglip2_so400m_16())


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, vision='patch')
  c = config_lib.base(model_config(args.vision))
  c.model.update(dtype='bfloat16', param_dtype='float32', remat='full')
  # The official model's conventions (README "Official weights"), except the pixel layout: new
  # training keeps the exact one; tuna2_7b_restore.py (official weights) sets 'official'.
  c.model.update(config_lib.OFFICIAL_MODEL, pixel_layout='exact')
  c.sampling.update(config_lib.OFFICIAL_SAMPLING)
  # Stage 1 of the paper: 300k steps, AdamW 1e-4, 16k-token sequences, 7 : 3 gen : und.
  c.total_steps = 300_000
  c.seq_len = 16_384
  c.batch_size = 256
  c.log_every = 50
  c.eval_every = 5_000
  c.checkpoint_every = 1_000
  c.data.image_size = 512
  c.data.tokenizer = ''
  c.data.weights.update(t2i=0.5, edit=0.06, mmu=0.24, text=0.2)
  c.optim.update(lr=1e-4, warmup_steps=1_000, ema_decay=0.9999)
  c.flow.update(noise_scale=2.0, mmu_noisy_prob=0.1)
  c.masking.update(enabled=True, start_fraction=0.6, sample_prob=0.5, max_ratio=0.5)
  c.sampling.update(sampler='euler', steps=50, cfg_scale=3.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  # Two microbatches of 2 rows per chip on a v5p-128 (the compiled figure above).
  c.optim.microbatches = 2
  # Every stage starts from pretrained weights (Qwen2.5, SigLIP 2) or the previous stage.
  c.init.required = not args.runlocal
  if args.runlocal:
    c.model.update(dtype='float32', remat='none')
    c.optim.microbatches = 1
    c.model.decoder.update(num_layers=2, width=64, num_heads=4, num_kv_heads=2, head_dim=16,
                           mlp_dim=128)
    c.model.head.update(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                        rope_split=(4, 6, 6))
    c.model.encoder.update(width=32, num_layers=1, num_heads=2, mlp_dim=64)
    c.model.vocab_size = 128
    c.update(total_steps=4, seq_len=256, batch_size=2, log_every=1, eval_every=4,
             checkpoint_every=2)
    c.data.image_size = 64
    c.optim.warmup_steps = 1
  return c
