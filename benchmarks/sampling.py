r"""Sampling speed: text->image images/s (with and without the prompt cache) and decode tokens/s.

  python benchmarks/sampling.py [--config=experiments/tuna2_1_5b.py] [--batch_sizes 1,16]

Text->image: config.data.image_size images (512 px for tuna2_1_5b: 1025-token spans), N Euler
steps with classifier-free guidance (conditional and null-prompt rows in one batch), prompts of
--prompt_tokens random ids; each batch size runs once with the prompt's keys and values cached
(sampling.py's prompt cache) and once recomputing the whole sequence at every step, and the
ratio of the two is printed. Understanding: KV-cached greedy decoding of --new_tokens tokens
after an image and a question, tokens/s over the batch (EOS disabled, so every row decodes
them all). Random weights in the config's compute dtype: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.packed_batch import IMG_ID, PAD_ID, device_line  # noqa: E402
from tuna2_jax import config_lib, sampling, train_state  # noqa: E402
from tuna2_jax.data import sequence as seq  # noqa: E402


def _ids(rng, n, vocab):
  return seq.Text(rng.integers(16, min(vocab, 30000), n))


def generation_batch(rng, rows: int, prompt_tokens: int, size: int, p: int, vocab: int) -> dict:
  """rows conditional prompts then rows null prompts, left-padded to a shared target span."""
  blank = np.zeros((size, size, 3), np.uint8)
  cond = [seq.assemble([_ids(rng, prompt_tokens, vocab), seq.Image(blank, generate=True)], 't2i',
                       img_id=IMG_ID, patch_size=p) for _ in range(rows)]
  null = [seq.assemble([_ids(rng, 3, vocab), seq.Image(blank, generate=True)], 't2i',
                       img_id=IMG_ID, patch_size=p) for _ in range(rows)]
  return seq.stack_left_padded(cond + null, patch_size=p, pad_id=PAD_ID)


def understanding_batch(rng, rows: int, size: int, p: int, vocab: int) -> dict:
  image = lambda: seq.Image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
  samples = [seq.assemble([_ids(rng, 2, vocab), image(), _ids(rng, 24, vocab)], 'mmu',
                          img_id=IMG_ID, patch_size=p) for _ in range(rows)]
  return seq.stack_left_padded(samples, patch_size=p, pad_id=PAD_ID)


def timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/tuna2_1_5b.py')
  parser.add_argument('--batch_sizes', default='1,16')
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--cfg_scale', type=float, default=3.0)
  parser.add_argument('--prompt_tokens', type=int, default=128)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  config = config_lib.load(args.config)
  model = train_state.build_model(config)
  p, size, vocab = config.model.patch_size, config.data.image_size, config.model.vocab_size
  rng = np.random.default_rng(0)
  print(device_line())
  print(f'config: {args.config} vision={config.model.vision} attention={config.model.attention} '
        f'dtype={config.model.dtype}; {size} px images ({(size // p) ** 2 + 1}-token spans), '
        f'{args.steps} Euler steps, CFG {args.cfg_scale}, {args.prompt_tokens}-token prompts')
  out = {}
  for b in map(int, args.batch_sizes.split(',')):
    batch = generation_batch(rng, b, args.prompt_tokens, size, p, vocab)
    run = lambda cache: sampling.sample_images(
        model, batch, jax.random.key(0), config.flow, steps=args.steps, sampler='euler',
        cfg_scale=args.cfg_scale, prompt_cache=cache)
    cached, full = timed(lambda: run(True), args.repeats), timed(lambda: run(False), args.repeats)
    out[f't2i_b{b}'] = dict(cached_images_per_s=b / cached, full_images_per_s=b / full,
                            speedup=full / cached)
    print(f'text->image batch {b:>3}: {b / cached:8.3f} images/s with the prompt cache, '
          f'{b / full:8.3f} without: {full / cached:.2f}x')
  for b in map(int, args.batch_sizes.split(',')):
    batch = understanding_batch(rng, b, size, p, vocab)
    dt = timed(lambda: sampling.decode_text(model, batch, jax.random.key(0),
                                            max_new_tokens=args.new_tokens, eos_id=-1,
                                            pad_id=PAD_ID), args.repeats)
    prompt = batch['tokens'].shape[1]
    out[f'decode_b{b}'] = b * args.new_tokens / dt
    print(f'understanding batch {b:>3}: {b * args.new_tokens / dt:10.1f} tokens/s '
          f'({args.new_tokens} new tokens after a {prompt}-token prompt, prefill included)')
  return out


if __name__ == '__main__':
  main()
