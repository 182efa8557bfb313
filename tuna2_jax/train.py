r"""Trains Tuna-2 / Tuna-R.

  python -m tuna2_jax.train --config=experiments/shapes.py[:args] --workdir=DIR \
      [--config.total_steps=2000 ...]

Sections: config -> mesh -> data -> state (init or resume) -> step -> loop (log, eval,
checkpoint). Re-running with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from tuna2_jax import checkpoint as ckpt_lib
from tuna2_jax import cli
from tuna2_jax import evaluate as eval_lib
from tuna2_jax import metrics as metrics_lib
from tuna2_jax import objectives
from tuna2_jax import sharding
from tuna2_jax import train_state
from tuna2_jax.data import pipeline
from tuna2_jax.data.tokenizer import Tokenizer
from tuna2_jax.models.tuna import validate_model_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, samples).')


def validate(config: ml_collections.ConfigDict, tok: Tokenizer) -> None:
  validate_model_config(config.model, config.data.image_size)
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f'the tokenizer has {tok.vocab_size} tokens but model.vocab_size='
                     f'{config.model.vocab_size}')
  for key in ('total_steps', 'batch_size', 'seq_len', 'log_every', 'eval_every',
              'checkpoint_every', 'keep_checkpoints'):
    if config[key] <= 0:
      raise ValueError(f'{key}={config[key]}: expected a positive integer')
  train_state.learning_rate(config.optim, config.total_steps)  # raises on an unknown schedule


def make_train_step(config: ml_collections.ConfigDict, graphdef, tx: optax.GradientTransformation):
  """(state, batch, key) -> (state, metrics): one AdamW step plus the EMA update."""
  ema_decay = config.optim.ema_decay

  def train_step(state, batch, key):
    key = jax.random.fold_in(key, state['step'])

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      return objectives.compute_loss(model, batch, key, state['step'], config)

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt = tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state['ema'], params)
    aux = dict(aux, grad_norm=optax.global_norm(grads),
               lr=train_state.learning_rate(config.optim, config.total_steps)(state['step']))
    return {'step': state['step'] + 1, 'params': params, 'opt': opt, 'ema': ema}, aux

  return train_step


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training in workdir; returns the last logged metrics."""
  # --- config ---
  tok = Tokenizer.load(config.data.tokenizer or None)
  validate(config, tok)
  lead = jax.process_index() == 0

  # --- mesh ---
  mesh = sharding.make_mesh(config.mesh)
  batch_shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
  if config.batch_size % batch_shards:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the {batch_shards} '
                     f'batch shards of the mesh {dict(mesh.shape)}')

  # --- state: resume, or initialise directly into its shardings ---
  graphdef, _ = train_state.abstract_model(config)
  abstract, shardings = train_state.state_shardings(config, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                               save_every=config.checkpoint_every)
  start = ckpt.latest_step()
  data_state = None
  if start is not None:
    state, data_state, _ = ckpt.restore(start, train_state.with_shardings(abstract, shardings))
    logging.info('resumed from step %d', start)
  else:
    state = train_state.create_sharded_state(config, mesh)
    start = 0
  # Written only after the restore: a checkpoint of another model raises there, untouched.
  if lead:
    ckpt_lib.write_config(workdir, config.to_json_best_effort(indent=2))

  # --- data ---
  dataset = pipeline.train_dataset(config, tok, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  data_iter = iter(dataset)
  if data_state is not None:
    data_iter.set_state(data_state)

  # --- step ---
  tx = train_state.optimizer(config, abstract['params'])
  step_fn = jax.jit(make_train_step(config, graphdef, tx),
                    in_shardings=(shardings, sharding.batch_sharding(mesh), None),
                    out_shardings=(shardings, None), donate_argnums=(0,))

  # --- loop ---
  writer = metrics_lib.MetricsWriter(workdir, enabled=lead)
  progress = metrics_lib.Progress(config.total_steps, start, enabled=lead)
  key = jax.random.key(config.seed)
  last, tokens, t0 = {}, 0.0, time.perf_counter()
  for step in range(start + 1, config.total_steps + 1):
    local = next(data_iter)
    tokens += float((local['segment_ids'] > 0).sum()) * jax.process_count()
    state, aux = step_fn(state, sharding.global_batch(local, mesh), key)
    if step % config.log_every == 0 or step == config.total_steps:
      aux = jax.device_get(aux)
      elapsed = time.perf_counter() - t0
      last = {k: float(v) for k, v in aux.items()}
      last['tokens_per_s'] = tokens / elapsed
      writer.write_scalars(step, last)
      progress.update(step, {'loss': last['loss'], 'tok/s': last['tokens_per_s']})
      tokens, t0 = 0.0, time.perf_counter()
    if step % config.eval_every == 0 or step == config.total_steps:
      model = nnx.merge(graphdef, state['ema' if config.eval.use_ema else 'params'])
      samples = eval_lib.write_samples(model, tok, config, workdir, step, writer=writer)
      logging.info('wrote %s', samples)
      t0 = time.perf_counter()
    if step % config.checkpoint_every == 0 or step == config.total_steps:
      ckpt.save(step, state, data_state=data_iter.get_state(), force=True)
  ckpt.wait()
  ckpt.close()
  progress.close()
  writer.close()
  return last


def main(argv):
  del argv
  cli.config_file()
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
