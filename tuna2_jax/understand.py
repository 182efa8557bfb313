r"""Answers a question about an image with a trained workdir's EMA model.

  python -m tuna2_jax.understand --workdir=runs/shapes --image img.png \
      --question "what colour is the circle?" [--max_new_tokens N] [--temperature T] [--seed 0]

The image is resized and centre-cropped as training does (onto the nearest of the config's
data.buckets, or its data.image_size square). Prints the answer (greedy unless --temperature > 0;
other settings from config.sampling).

`answer_questions` is the host side of text decoding that evaluate.py and the sample grids use
too: (image, question) -> left-padded prompt rows -> sampling.decode_text -> answers.
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags

from tuna2_jax import cli
from tuna2_jax import sampling
from tuna2_jax import sharding
from tuna2_jax import train_state
from tuna2_jax.data import sequence as seq
from tuna2_jax.data import tasks
from tuna2_jax.data.tokenizer import Tokenizer


def answer_questions(model, tok: Tokenizer, config: ml_collections.ConfigDict,
                     images: Sequence[np.ndarray], questions: Sequence[str], key,
                     max_new_tokens: int | None = None) -> list[str]:
  """Greedy (or configured temperature) answers to questions about images."""
  p = config.model.patch_size
  prompts = [tasks.understanding_prompt(im, q, tok, p) for im, q in zip(images, questions)]
  length = max(len(x['tokens']) for x in prompts)
  end = tasks.reply_end_id(tok)
  answers = []
  for i, (chunk, n) in enumerate(sampling.fixed_batches(prompts, config.eval.batch_size)):
    batch = seq.stack_left_padded(chunk, patch_size=p, pad_id=tok.pad_id, length=length)
    out = sampling.decode_text(
        model, batch, jax.random.fold_in(key, i),
        max_new_tokens=max_new_tokens or config.sampling.max_new_tokens,
        eos_id=end, pad_id=tok.pad_id, temperature=float(config.sampling.temperature))
    for row in sharding.to_host(out)[:n]:
      row = list(row)
      answers.append(tok.decode(row[:row.index(end)] if end in row else row))
  return answers


def answer(workdir: str, image_path: str, question: str, *, max_new_tokens: int | None = None,
           temperature: float | None = None, seed: int = 0) -> str:
  image = cli.read_image(image_path, train_state.load_config(workdir).data)
  model, config, _ = train_state.load_model(workdir, use_ema=True)
  if temperature is not None:
    config.sampling.temperature = temperature
  tok = Tokenizer.for_config(config)
  return answer_questions(model, tok, config, [image], [question], jax.random.key(seed),
                          max_new_tokens=max_new_tokens)[0]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  for name in ('workdir', 'image', 'question'):
    if f[name].value is None:
      raise app.UsageError(f'--{name} is required')
  if f.max_new_tokens is not None and f.max_new_tokens < 1:
    raise app.UsageError(f'--max_new_tokens={f.max_new_tokens}: expected at least 1')
  if f.temperature is not None and f.temperature < 0:
    raise app.UsageError(f'--temperature={f.temperature}: expected >= 0')
  print(answer(f.workdir, f.image, f.question, max_new_tokens=f.max_new_tokens,
               temperature=f.temperature, seed=f.seed))


if __name__ == '__main__':
  # Defined here, not at import, so the tools can import each other.
  flags.DEFINE_string('workdir', None, 'Training workdir whose latest checkpoint is used.')
  flags.DEFINE_string('image', None, 'Image file (any size; resized and cropped as in training).')
  flags.DEFINE_string('question', None, 'Question about the image.')
  flags.DEFINE_integer('max_new_tokens', None, 'Answer length limit (default: config).')
  flags.DEFINE_float('temperature', None, 'Sampling temperature; 0 is greedy (default: config).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed (used when temperature > 0).')
  cli.run(main)
