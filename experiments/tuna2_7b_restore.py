"""Tuna-2 7B restore: fine-tune the official foundation checkpoint (its few re-initialised LLM
and flow-head layers recover) with the official training guide's recipe.

Import the official checkpoint once, then train from it:

  python -m tuna2_jax.convert.tuna2 --checkpoint=/data/foundation_ckpt.pt \\
      --config=experiments/tuna2_7b_restore.py --output=/data/tuna2_7b_official \\
      --tokenizer=/data/Qwen2.5-7B-Instruct
  python -m tuna2_jax.train --config=experiments/tuna2_7b_restore.py \\
      --workdir=gs://BUCKET/tuna2_7b_restore --config.init_from=/data/tuna2_7b_official \\
      --config.data.t2i=/data/t2i_ar --config.data.edit=/data/edit.jsonl \\
      --config.data.mmu=/data/llava.jsonl --config.data.text=/data/text.jsonl

Recipe: AdamW lr 2e-5, weight decay 0.01, 1000 warm-up steps then constant, EMA 0.9999, bf16
compute; streams t2i 0.5 / edit 0.2 / mmu 0.2 / text 0.1; noise_scale 2; understanding images
noised with probability 0.1 at level up to 0.1; every official convention, the official pixel
layout and vocabulary (151669 rows: Qwen2.5's 151665 tokens and the official [PAD], <image>,
<|vid_start|>, <|vid_end|>) and the official tokenizer's special tokens (bos <|im_start|>, eos
<|im_end|>, pad [PAD], image <|vision_start|> <|image_pad|>... <|vision_end|>). The official
mask token (DeTok) draws a ratio from U(-0.7, 0.3) and masks when it is positive: here 0.3 of
the samples, ratio up to 0.3, from the first step.

Compiled for a v5p-128 (`--dry_run --dry_run_topology=v5p-128`, docs/scaling.md): tuna2_7b.py's
batch, 2 microbatches and mesh, peak 40.7 GiB per chip of 95.74 GiB (42.5%, fits).

Args: runlocal=True shrinks it for a smoke run with the same structure.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tuna2_7b  # noqa: E402
import tuna2_data  # noqa: E402  (the 7B model over the mixture of task streams)

from tuna2_jax import config_lib  # noqa: E402

# len(Qwen2.5 tokenizer) + the official added tokens: the official checkpoints' embedding rows.
OFFICIAL_VOCAB = 151_669
# The roles' tokens in the official Tuna-2 tokenizer (Qwen2.5's, [PAD] appended after it).
OFFICIAL_SPECIAL_TOKENS = dict(bos='<|im_start|>', eos='<|im_end|>', pad='[PAD]',
                               boi='<|vision_start|>', eoi='<|vision_end|>', img='<|image_pad|>')


def restore(c, runlocal: bool):
  """The official restore fine-tune on top of a 7B stage config (Tuna-2 or Tuna-R)."""
  c.model.update(config_lib.OFFICIAL_MODEL)
  c.sampling.update(config_lib.OFFICIAL_SAMPLING)
  c.init.required = not runlocal
  if not runlocal:  # the official tokenizer's ids (Qwen2.5 + its added [PAD])
    c.data.special_tokens.update(OFFICIAL_SPECIAL_TOKENS)
  c.data.weights.update(t2i=0.5, edit=0.2, mmu=0.2, text=0.1)
  c.optim.update(lr=2e-5, weight_decay=0.01, warmup_steps=1_000, schedule='constant',
                 ema_decay=0.9999)
  c.flow.update(noise_scale=2.0, mmu_noisy_prob=0.1, mmu_noisy_max=0.1)
  c.masking.update(enabled=c.model.vision == 'patch', start_fraction=0.0, sample_prob=0.3,
                   max_ratio=0.3)
  if runlocal:  # tuna2_7b.py:runlocal's tiny widths and vocabulary on the shapes data
    c.optim.warmup_steps = 1
  else:
    c.model.vocab_size = OFFICIAL_VOCAB
    c.total_steps = 10_000
  return c


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, vision='patch')
  if args.runlocal:
    return restore(tuna2_7b.get_config(f'runlocal=True,vision={args.vision}'), runlocal=True)
  return restore(tuna2_data.get_config(f'vision={args.vision}'), runlocal=False)
