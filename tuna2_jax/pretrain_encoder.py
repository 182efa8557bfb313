r"""Pretrains Tuna-R's vision encoder with SigLIP's sigmoid image-text loss, in miniature.

  python -m tuna2_jax.pretrain_encoder --config=experiments/siglip_shapes.py --workdir=DIR

Trains models/siglip.py on shapes images and their captions (training scenes only), logs
loss, in-batch accuracy and held-out retrieval to DIR/metrics.jsonl and TensorBoard, resumes
from DIR's checkpoints like train.py (both are built from trainer.py), and at the last step
writes the ViT to DIR/encoder (convert/vision_ckpt.py), which a Tuna-R config loads with
--config.init.encoder_from=DIR/encoder. Held-out retrieval (image -> caption and caption ->
image top-1 among eval.num_retrieval held-out scenes) goes to DIR/eval.json.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from tuna2_jax import checkpoint as ckpt_lib
from tuna2_jax import cli
from tuna2_jax import distributed
from tuna2_jax import metrics as metrics_lib
from tuna2_jax import objectives
from tuna2_jax import sharding
from tuna2_jax import train_state
from tuna2_jax import trainer
from tuna2_jax.convert import vision_ckpt
from tuna2_jax.data import pipeline
from tuna2_jax.data import shapes
from tuna2_jax.data.tokenizer import Tokenizer
from tuna2_jax.models.siglip import Siglip
from tuna2_jax.models.tuna import validate_model_config

ENCODER_DIR = 'encoder'
EVAL_FILE = 'eval.json'


def build_model(config: ml_collections.ConfigDict) -> Siglip:
  s = config.siglip
  return Siglip(config.model, s.text, s.embed_dim, rngs=nnx.Rngs(config.seed))


def _init_state(config: ml_collections.ConfigDict) -> dict:
  _, params = nnx.split(build_model(config), nnx.Param)
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'opt': train_state.optimizer(config, params).init(params)}


def _to_unit(batch: dict) -> tuple[jax.Array, jax.Array]:
  return objectives.to_unit_range(batch['patches']), batch['patch_grid']


def siglip_loss(graphdef) -> trainer.LossFn:
  """SigLIP's sigmoid image-text loss of the parameters, with the in-batch accuracy."""

  def loss_fn(params, batch, key, step):
    del key, step  # deterministic, the same at every step
    model = nnx.merge(graphdef, params)
    img = model.embed_images(*_to_unit(batch))
    txt = model.embed_texts(batch['tokens'], batch['valid'])
    loss, acc = objectives.sigmoid_contrastive_loss(img, txt, model.log_temperature[...],
                                                    model.bias[...])
    return loss, {'loss': loss, 'batch_accuracy': acc}

  return loss_fn


@nnx.jit
def _similarity(model: Siglip, batch: dict) -> jax.Array:
  """Cosine similarity of every image to every caption [B images, B captions]."""
  return model.embed_images(*_to_unit(batch)) @ model.embed_texts(batch['tokens'],
                                                                  batch['valid']).T


def retrieval(model: Siglip, config: ml_collections.ConfigDict, tok: Tokenizer) -> dict:
  """Top-1 image -> caption and caption -> image retrieval among held-out scenes."""
  d = config.data
  held_out = shapes.eval_set('t2i', config.eval.num_retrieval, seed=4, size=d.image_size,
                             max_objects=d.max_objects)
  rows = [pipeline.caption_example(x['image'], x['prompt'], tok,
                                   patch_size=config.model.patch_size,
                                   max_len=config.siglip.text.max_len) for x in held_out]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  sim = np.asarray(_similarity(model, batch))
  # Different scenes can share a caption only if they are the same scene; count any exact hit.
  captions = np.array([x['prompt'] for x in held_out])
  i2t = captions[sim.argmax(1)] == captions
  t2i = captions[sim.argmax(0)] == captions
  return {'siglip/i2t_top1': float(i2t.mean()), 'siglip/t2i_top1': float(t2i.mean()),
          'siglip/chance': 1.0 / len(held_out)}


def export_encoder(config: ml_collections.ConfigDict, params, workdir: str) -> str:
  out = os.path.join(workdir, ENCODER_DIR)
  if vision_ckpt.is_checkpoint(out):
    logging.info('%s already holds the encoder; left as it is', out)
    return out
  return vision_ckpt.save(out, params['vision'], config.model.encoder, config.model.patch_size,
                          source=os.path.abspath(workdir))


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) encoder pretraining in workdir; returns the held-out retrieval metrics."""
  # --- config ---
  tok = Tokenizer.for_config(config)
  validate_model_config(config.model, config.data.image_size)
  if config.model.vision != 'encoder':
    raise ValueError(f'model.vision={config.model.vision!r}: encoder pretraining needs the '
                     'Tuna-R model (vision=encoder)')
  writes_logs = jax.process_index() == 0

  # --- mesh and state ---
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  abstract, shardings = trainer.state_layout(lambda: _init_state(config), mesh, rules)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(config)), nnx.Param)
  tx = train_state.optimizer(config, abstract['params'])
  step_fn = trainer.jit_step(
      trainer.make_step(siglip_loss(graphdef), tx,
                        train_state.learning_rate(config.optim, config.total_steps)),
      shardings, mesh, rules)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                               save_every=config.checkpoint_every)
  start, state, data_state, _ = trainer.restore_or_init(
      ckpt, abstract, shardings, lambda: trainer.init_into(lambda: _init_state(config),
                                                           shardings))
  if writes_logs:
    ckpt_lib.write_config(workdir, config.to_json_best_effort(indent=2))

  # --- data ---
  data_iter = iter(pipeline.caption_dataset(config, tok, process_index=jax.process_index(),
                                            process_count=jax.process_count()))
  if data_state is not None:
    trainer.continue_data(data_iter, data_state, start, config)

  # --- loop ---
  writer = metrics_lib.MetricsWriter(workdir, enabled=writes_logs)
  progress = metrics_lib.Progress(config.total_steps, start, enabled=writes_logs)
  key, total = jax.random.key(config.seed), config.total_steps  # the loss draws nothing
  for step in range(start + 1, total + 1):
    state, aux = step_fn(state, sharding.global_batch(next(data_iter), mesh, rules), key)
    if trainer.itstime(step, config.log_every, total):
      aux = {k: float(v) for k, v in jax.device_get(aux).items()}
      writer.write_scalars(step, aux)
      progress.update(step, {'loss': aux['loss'], 'acc': aux['batch_accuracy']})
    if trainer.itstime(step, config.checkpoint_every, total):
      ckpt.save(step, state, data_state=data_iter.get_state(), force=True)
  ckpt.wait()
  ckpt.close()
  progress.close()

  # --- held-out retrieval and the encoder checkpoint ---
  results = {'step': config.total_steps,
             **retrieval(nnx.merge(graphdef, state['params']), config, tok)}
  writer.write_tensorboard(config.total_steps, {k: v for k, v in results.items() if k != 'step'})
  writer.close()
  export_encoder(config, state['params'], workdir)
  if writes_logs:
    with open(os.path.join(workdir, EVAL_FILE), 'w') as f:
      json.dump(results, f, indent=2)
  distributed.barrier('pretrain_done', config.barrier_timeout_s)
  return results


def main(argv):
  del argv
  cli.config_file()
  if not flags.FLAGS.workdir:
    raise app.UsageError('--workdir is required')
  distributed.initialize_from_flags()
  print(json.dumps(pretrain(flags.FLAGS.config, flags.FLAGS.workdir), indent=2))


if __name__ == '__main__':
  # Defined here, not at import, so tests and other tools can import this module beside train.py.
  config_flags.DEFINE_config_file('config', None, 'Encoder pretraining config file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, encoder).')
  cli.run(main)
