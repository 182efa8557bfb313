"""Evaluates a trained workdir: held-out shapes metrics, held-out losses, sample grids.

  python -m tuna2_jax.evaluate --workdir=DIR

Prints JSON and writes DIR/eval.json with, under eval.shapes_metrics, shapes/vqa_accuracy (and
per question type), shapes/vqa_majority_baseline, shapes/gen_accuracy,
shapes/gen_untrained_baseline (the same checker on a freshly initialised model's images) and
shapes/caption_exact; and heldout/<task>/... for every held-out stream data.eval names
(heldout.py). Sample grids go to DIR/samples (sample_grids.py says what they show). Images come
from generate.generate_images, answers from understand.answer_questions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from tuna2_jax import cli
from tuna2_jax import heldout
from tuna2_jax import metrics as metrics_lib
from tuna2_jax import paths
from tuna2_jax import sample_grids
from tuna2_jax import train_state
from tuna2_jax import trainer
from tuna2_jax.data import shapes
from tuna2_jax.data.tokenizer import Tokenizer
from tuna2_jax.generate import generate_images
from tuna2_jax.understand import answer_questions

HISTORY_FILE = 'eval_history.jsonl'


def gen_accuracy(images: Sequence[np.ndarray], scenes: Sequence[shapes.Scene]) -> float:
  return float(np.mean([shapes.parse(im) == sc for im, sc in zip(images, scenes)]))


@functools.lru_cache(maxsize=8)
def majority_answers(image_size: int, max_objects: int) -> dict[str, str]:
  """The most common training answer per question type (the majority baseline)."""
  dist = shapes.answer_distribution(2000, seed=2, size=image_size, max_objects=max_objects)
  return {q: c.most_common(1)[0][0] for q, c in dist.items()}


def eval_sets(config: ml_collections.ConfigDict) -> dict[str, list[dict]]:
  """The held-out shapes sets the metrics use: {'vqa', 'caption', 't2i'}, fixed by their seeds;
  {} when eval.shapes_metrics is off."""
  d, e = config.data, config.eval
  if not e.get('shapes_metrics', True):
    return {}
  kw = dict(size=d.image_size, max_objects=d.max_objects)
  return {'vqa': shapes.eval_set('mmu', e.num_vqa, seed=1, **kw),
          'caption': shapes.eval_set('caption', e.num_caption, seed=3, **kw),
          't2i': shapes.eval_set('t2i', e.num_gen, seed=4, **kw)}


def eval_set_digest(sets: dict[str, list[dict]], streams: Sequence = ()) -> str:
  """A short hash of every held-out question, answer and prompt and the image size, and of the
  held-out loss streams (heldout.describe: sources, batches, rows).

  Two runs' metrics are comparable only when their digests are equal (compare.py checks).
  """
  h = hashlib.sha256()
  for name in sorted(sets):
    for x in sets[name]:
      image = x.get('image')
      h.update(json.dumps([name, x.get('question'), x.get('answer'), x.get('prompt'),
                           None if image is None else list(image.shape)]).encode())
  for stream in streams:
    h.update(json.dumps(['heldout', *stream]).encode())
  return h.hexdigest()[:16]


def evaluate(model, tok: Tokenizer, config: ml_collections.ConfigDict, *,
             baseline_model=None, sets: dict[str, list[dict]] | None = None) -> dict:
  """The shapes metrics for `model` (and the untrained baseline if baseline_model is given)."""
  d = config.data
  sets = sets or eval_sets(config)
  key = jax.random.key(config.seed + 1)
  out = {}
  vqa = sets['vqa']
  answers = answer_questions(model, tok, config, [x['image'] for x in vqa],
                             [x['question'] for x in vqa], key, max_new_tokens=8)
  correct = np.array([a.strip() == x['answer'] for a, x in zip(answers, vqa)])
  out['shapes/vqa_accuracy'] = float(correct.mean())
  for qtype in shapes.QTYPES:
    sel = np.array([x['qtype'] == qtype for x in vqa])
    if sel.any():
      out[f'shapes/vqa_accuracy_{qtype}'] = float(correct[sel].mean())
  majority = majority_answers(d.image_size, d.max_objects)
  out['shapes/vqa_majority_baseline'] = float(np.mean(
      [majority.get(x['qtype']) == x['answer'] for x in vqa]))

  caps = sets['caption']
  longest = max(len(tok.encode(x['answer'])) for x in caps) + 2
  said = answer_questions(model, tok, config, [x['image'] for x in caps],
                          [x['question'] for x in caps], key, max_new_tokens=longest)
  out['shapes/caption_exact'] = float(np.mean(
      [s.strip() == x['answer'] for s, x in zip(said, caps)]))

  gen = sets['t2i']
  prompts, scenes = [x['prompt'] for x in gen], [x['scene'] for x in gen]
  out['shapes/gen_accuracy'] = gen_accuracy(generate_images(model, tok, config, prompts, key),
                                            scenes)
  if baseline_model is not None:
    out['shapes/gen_untrained_baseline'] = gen_accuracy(
        generate_images(baseline_model, tok, config, prompts, key), scenes)
  return out


def check(config: ml_collections.ConfigDict) -> None:
  """Raises, before training starts, for held-out streams or sample settings that cannot be
  used (heldout.check, sample_grids.check)."""
  heldout.check(config)
  sample_grids.check(config)


class EvalHistory:
  """Held-out metrics during training: workdir/eval_history.jsonl and TensorBoard.

  Every eval.metrics_every steps (and at the last step) one line {step, train_flops, wall_s,
  eval_set, shapes/..., heldout/...}: the shapes metrics under eval.shapes_metrics, the held-out
  loss of every data.eval stream (heldout.py). train_flops are the analytic model FLOPs of the
  steps so far (flops.py), wall_s the seconds of training so far without the evaluations
  themselves; both are kept in the checkpoints (totals()) so that a resumed run continues them.
  """

  def __init__(self, config: ml_collections.ConfigDict, tok: Tokenizer,
               writer: metrics_lib.MetricsWriter, totals: dict | None = None):
    self.config, self.tok, self.writer = config, tok, writer
    self.every = int(config.eval.metrics_every)
    if self.every < 0:
      raise ValueError(f'eval.metrics_every={self.every}: expected 0 (off) or a positive step '
                       'count')
    self._heldout = heldout.HeldoutLoss(config, tok)
    totals = totals or {}
    self._flops = float(totals.get('train_flops', 0.0))
    self._wall_base = float(totals.get('train_wall_s', 0.0))
    self._eval_s = 0.0
    self._t0 = time.perf_counter()
    self._sets = eval_sets(config) if self.every else {}
    if self.every and not self._sets and not self._heldout.streams:
      logging.warning('eval.metrics_every=%d but there is nothing to evaluate: set a held-out '
                      'stream (data.eval.t2i, .mmu, .edit or .text) or eval.shapes_metrics=True; '
                      'no held-out metrics are written', self.every)
      self.every = 0
    if not self.every and self._heldout.streams:
      logging.warning('data.eval names held-out streams %s but eval.metrics_every=0: their '
                      'loss is not evaluated during training', [t for t, _ in
                                                                self._heldout.streams])
    self.digest = (eval_set_digest(self._sets, heldout.describe(config)) if self.every
                   else None)

  def add_step_flops(self, step_flops: float) -> None:
    """Counts one training step's model FLOPs (all processes') into train_flops."""
    self._flops += step_flops

  def wall_s(self) -> float:
    return self._wall_base + time.perf_counter() - self._t0 - self._eval_s

  def totals(self) -> dict:
    return {'train_flops': self._flops, 'train_wall_s': self.wall_s()}

  def due(self, step: int) -> bool:
    return trainer.itstime(step, self.every, self.config.total_steps)

  def evaluate(self, model, step: int) -> dict:
    """Runs the held-out metrics (every process; process 0 writes) and appends the line."""
    t0 = time.perf_counter()
    wall = self.wall_s()
    results = evaluate(model, self.tok, self.config, sets=self._sets) if self._sets else {}
    results.update(self._heldout(model))
    record = {'step': int(step), 'train_flops': self._flops, 'wall_s': wall,
              'eval_set': self.digest, **results}
    self.writer.write_jsonl(HISTORY_FILE, record)
    self.writer.write_tensorboard(step, {f'eval/{k}': v for k, v in results.items()})
    self._eval_s += time.perf_counter() - t0
    return record


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise app.UsageError('--workdir is required')
  model, config, step = train_state.load_model(workdir, use_ema=True)
  tok = Tokenizer.for_config(config)
  sets = eval_sets(config)
  baseline = None
  if sets and not flags.FLAGS.skip_untrained_baseline:
    baseline = train_state.build_model(config)
  results = {'step': step, 'eval_set': eval_set_digest(sets, heldout.describe(config))}
  if sets:
    results.update(evaluate(model, tok, config, baseline_model=baseline, sets=sets))
  results.update(heldout.HeldoutLoss(config, tok)(model))
  sample_grids.write_samples(model, tok, config, workdir, step)
  paths.write_text(paths.join(workdir, 'eval.json'), json.dumps(results, indent=2))
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  # Defined here, not at import, so train.py can import this module beside its own flags.
  flags.DEFINE_string('workdir', None, 'Training workdir to evaluate.')
  flags.DEFINE_bool('skip_untrained_baseline', False, 'Skip sampling a freshly initialised model.')
  cli.run(main)
