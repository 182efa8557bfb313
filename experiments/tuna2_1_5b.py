"""Tuna-2 at Qwen2.5-1.5B size: the one-GPU benchmark and ablation scale.

Decoder: Qwen2.5-1.5B (28 layers, width 1536, 12 / 2 heads of 128). Flow head: 16 modulated
blocks of width 1536 with 24 query / 6 key-value heads of 64. Patch 16 on 512 px images,
8k-token packed rows, bf16 compute with float32 master weights. `:vision=encoder` gives Tuna-R
at the same size (SigLIP 2 So400M/16 encoder and connector in front of the same decoder).

  python benchmarks/train_step.py --config=experiments/tuna2_1_5b.py
  python benchmarks/train_step.py --config=experiments/tuna2_1_5b.py:vision=encoder
  python -m tuna2_jax.train --config=experiments/tuna2_1_5b.py --workdir=runs/1_5b \
      --config.init.decoder_from=/data/Qwen2.5-1.5B-Instruct
  python -m tuna2_jax.train --config=experiments/tuna2_1_5b.py --dry_run --dry_run_topology=v6e-8

The TPU it is sized for: a v6e-8 (fsdp=8, one 8k row per chip, splash): peak 11.9 GiB per chip
of 31.25 GiB (37.9%, fits; compiled from a CPU host with libtpu, docs/scaling.md).

Args: vision=patch|encoder; runlocal=True shrinks the widths for a smoke run with the same
structure.
"""

from tuna2_jax import config_lib

# Qwen2.5-1.5B's embedding has 151936 rows; the multimodal special tokens follow them.
QWEN_VOCAB = 151936
ADDED_SPECIAL_TOKENS = 64


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, vision='patch')
  c = config_lib.base(config_lib.model(
      args.vision, patch_size=16, vocab_size=QWEN_VOCAB + ADDED_SPECIAL_TOKENS,
      dec=config_lib.qwen2_5_1_5b(),
      head=config_lib.official_flow_head(16, 24, 6, 64, 8960, rope_split=(16, 24, 24)),
      encoder=config_lib.siglip2_so400m_16(max_grid=32)))
  # Compiled for a v6e-8 (8 x 31.25 GiB; docs/scaling.md): with fsdp over the 8 chips and full
  # remat, one 8k row per chip peaks at 11.9 GiB (37.9% of HBM); remat='dots_no_batch' needed
  # 39.2 GiB (125%, an earlier release) and does not fit.
  c.model.update(dtype='bfloat16', param_dtype='float32', remat='full')
  # The official Tuna-2 conventions, with the exact pixel layout of new training.
  c.model.update(config_lib.OFFICIAL_MODEL, pixel_layout='exact')
  c.sampling.update(config_lib.OFFICIAL_SAMPLING)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.total_steps = 100_000
  c.seq_len = 8192
  c.batch_size = 8
  c.log_every = 50
  c.eval_every = 5_000
  c.checkpoint_every = 1_000
  c.data.image_size = 512
  c.optim.update(lr=1e-4, warmup_steps=1_000, ema_decay=0.9999)
  c.flow.update(noise_scale=2.0, mmu_noisy_prob=0.1)
  c.masking.update(enabled=True, start_fraction=0.6, sample_prob=0.5, max_ratio=0.5)
  c.sampling.update(sampler='euler', steps=50, cfg_scale=3.0)
  if args.runlocal:
    c.model.update(dtype='float32', remat='none')
    c.model.decoder.update(num_layers=2, width=64, num_heads=4, num_kv_heads=2, head_dim=16,
                           mlp_dim=128)
    c.model.head.update(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                        rope_split=(4, 6, 6))
    c.model.encoder.update(width=32, num_layers=1, num_heads=2, mlp_dim=64, max_grid=8)
    c.model.vocab_size = 256
    c.update(total_steps=4, seq_len=256, batch_size=2, log_every=1, eval_every=4,
             checkpoint_every=2)
    c.data.image_size = 64
    c.optim.warmup_steps = 1
  return c
