"""Tuna-R 7B restore: as tuna2_7b_restore.py, from an official Tuna-R checkpoint.

  python -m tuna2_jax.convert.tuna2 --checkpoint=/data/tuna_r_ckpt.safetensors \\
      --config=experiments/tuna_r_7b_restore.py --output=/data/tuna_r_7b_official \\
      --tokenizer=/data/Qwen2.5-7B-Instruct
  python -m tuna2_jax.train --config=experiments/tuna_r_7b_restore.py \\
      --workdir=gs://BUCKET/tuna_r_7b_restore --config.init_from=/data/tuna_r_7b_official \\
      --config.data.t2i=/data/t2i_ar --config.data.edit=/data/edit.jsonl \\
      --config.data.mmu=/data/llava.jsonl --config.data.text=/data/text.jsonl

The official Tuna-R has no mask token, so masking stays off.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tuna2_7b_restore  # noqa: E402

from tuna2_jax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  return tuna2_7b_restore.get_config(config_lib.with_arg(arg, vision='encoder'))
