"""Held-out loss per task stream: the training objective on a held-out split of each stream.

`data.eval.<task>` (t2i, mmu, edit, text) names a held-out source in any form a training stream
takes (a JSON-lines file, an ArrayRecord folder, tfds:NAME:SPLIT), read with the stream's image
root, TFDS fields, buckets and resampler. Its records are read in order (no shuffle, no repeat,
no prompt dropout; each process its share), packed into seq_len rows as in training, and run
through the objective in batches of batch_size rows for at most eval.loss_batches batches, with
a fixed key per batch (the same t and noise at every evaluation, so the numbers are comparable
over steps) and no masking. Records that cannot be used are skipped and counted as in training.

Each stream gives heldout/<task>/loss (text_coeff * text + flow_coeff * flow), text_loss and
flow_loss (means over all its target tokens and patches; a part the stream has no targets for
is left out), text_tokens, flow_tokens and skipped.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tuna2_jax import layout
from tuna2_jax import objectives
from tuna2_jax import sharding
from tuna2_jax.data import packing
from tuna2_jax.data import pipeline
from tuna2_jax.data import sequence as seq
from tuna2_jax.data import sources
from tuna2_jax.data.tokenizer import Tokenizer

PREFIX = 'heldout'
_KEY_OFFSET = 3  # the held-out key is seed + 3 (the sampler's are seed + 1 and seed + 2)


def streams(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """[(task, held-out source)] of the streams data.eval names, in task order."""
  held = config.data.get('eval') or {}
  return [(task, held[task]) for task in layout.TASK_IDS if held.get(task)]


def check(config: ml_collections.ConfigDict) -> None:
  """Raises, before training starts, for held-out sources the evaluation could not read."""
  held = config.data.get('eval') or {}
  unknown = sorted(set(held) - set(layout.TASK_IDS))
  if unknown:
    raise ValueError(f'data.eval names unknown streams {unknown}; expected a subset of '
                     f'{tuple(layout.TASK_IDS)}')
  named = streams(config)
  if not named:
    return
  if config.data.name != 'mixture':
    raise ValueError(f'data.eval.{named[0][0]}={named[0][1]!r} but data.name='
                     f'{config.data.name!r}: held-out streams need a mixture config (e.g. '
                     'experiments/tuna2_data.py), which sets their image buckets')
  if int(config.eval.loss_batches) < 1:
    raise ValueError(f'eval.loss_batches={config.eval.loss_batches}: expected at least 1')
  for task, spec in named:
    if spec == pipeline.SHAPES_SPEC:
      raise ValueError(f'data.eval.{task}={spec!r}: shapes samples are drawn from the training '
                       'distribution, so they are not held out; the shapes metrics '
                       '(eval.shapes_metrics) evaluate shapes')
    try:
      sources.check_stream(task, spec, config.data.image_root[task])
    except (FileNotFoundError, ValueError) as e:
      raise type(e)(f'held-out stream data.eval.{task}={spec!r}: {e}') from None


def describe(config: ml_collections.ConfigDict) -> list:
  """What the numbers depend on, for the eval-set digest (evaluate.eval_set_digest)."""
  return [[task, spec, int(config.eval.loss_batches), int(config.batch_size), int(config.seq_len)]
          for task, spec in streams(config)]


def _rows(config: ml_collections.ConfigDict, tok: Tokenizer, task: str, spec: str,
          process_index: int, process_count: int):
  """This process's packed rows of the held-out source, then empty rows forever."""
  data, p = config.data, config.model.patch_size
  items = sources.open_stream(task, spec, data.tfds_fields[task])
  items = items[process_index::process_count]
  loader = sources.stream_loader(task, spec, data.image_root[task], data.buckets, data.resize,
                                 absolute_paths=data.absolute_paths,
                                 max_text_chars=data.max_text_chars,
                                 max_image_pixels=data.max_image_pixels)
  samples = items.map_with_index(pipeline.SampleMaker(
      loader, tok, p, config.seq_len, 0.0, config.seed, layout.TASK_IDS[task],
      pixel_layout=config.model.pixel_layout))
  it = samples.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                                 prefetch_buffer_size=data.read_buffer))
  yield from packing.FirstFitPackIterDataset(it, seq_len=config.seq_len, num_bins=data.pack_bins,
                                             patch_size=p, pad_id=tok.pad_id)
  while True:
    yield seq.empty_row(config.seq_len, p, tok.pad_id)


def _sums_fn(config: ml_collections.ConfigDict, graphdef, mesh):
  """(params, batch, key) -> the batch's loss sums and counts (jitted)."""
  quiet = config.copy_and_resolve_references()
  quiet.masking.enabled = False
  quiet.flow.mmu_noisy_prob = 0.0

  def sums(params, batch, key):
    with sharding.activation_sharding(mesh, config.sharding_rules):
      _, aux = objectives.compute_loss(nnx.merge(graphdef, params), batch, key, 0, quiet)
    return {'text_sum': aux['text_loss'] * aux['text_tokens'], 'text_tokens': aux['text_tokens'],
            'flow_sum': aux['flow_loss'] * aux['flow_tokens'], 'flow_tokens': aux['flow_tokens'],
            'tokens': jnp.sum(batch['segment_ids'] > 0)}
  return jax.jit(sums)


def _mesh_of(params):
  first = jax.tree.leaves(params)[0]
  return getattr(first.sharding, 'mesh', None)


class HeldoutLoss:
  """The held-out losses of a config's data.eval streams; one compiled program for all."""

  def __init__(self, config: ml_collections.ConfigDict, tok: Tokenizer):
    check(config)
    self.config, self.tok = config, tok
    self.streams = streams(config)
    self._fn, self._graphdef = None, None

  def __call__(self, model) -> dict[str, float]:
    """{heldout/<task>/<metric>: value} for every stream (every process calls it)."""
    if not self.streams:
      return {}
    graphdef, params = nnx.split(model)
    mesh = _mesh_of(params)
    if self._fn is None or graphdef != self._graphdef:
      self._fn, self._graphdef = _sums_fn(self.config, graphdef, mesh), graphdef
    out = {}
    for task, spec in self.streams:
      out.update(self._stream(task, spec, params, mesh))
    return out

  def _stream(self, task: str, spec: str, params, mesh) -> dict[str, float]:
    c = self.config
    count, index = jax.process_count(), jax.process_index()
    local = c.batch_size // count
    rows = _rows(c, self.tok, task, spec, index, count)
    totals = dict.fromkeys(('text_sum', 'text_tokens', 'flow_sum', 'flow_tokens'), 0.0)
    skipped = packing.SkippedRecords()  # every process sums them below
    key = jax.random.key(c.seed + _KEY_OFFSET)
    for b in range(int(c.eval.loss_batches)):
      batch = [next(rows) for _ in range(local)]
      for row in batch:
        skipped.take(row)
      host = {k: np.stack([r[k] for r in batch]) for k in layout.FIELDS}
      placed = (sharding.global_batch(host, mesh, c.sharding_rules) if mesh is not None
                else host)
      got = jax.device_get(self._fn(params, placed, jax.random.fold_in(key, b)))
      if not got['tokens']:  # every process has run out of records
        break
      for k in totals:
        totals[k] += float(got[k])
    obj, name = c.objective, f'{PREFIX}/{task}'
    out = {f'{name}/text_tokens': totals['text_tokens'],
           f'{name}/flow_tokens': totals['flow_tokens']}
    parts = [(part, coeff) for part, coeff in (('text', obj.text_coeff), ('flow', obj.flow_coeff))
             if totals[f'{part}_tokens']]
    for part, _ in parts:
      out[f'{name}/{part}_loss'] = totals[f'{part}_sum'] / totals[f'{part}_tokens']
    if parts:  # a stream whose records were all skipped has no loss, only its counts
      out[f'{name}/loss'] = sum(coeff * out[f'{name}/{part}_loss'] for part, coeff in parts)
    out[f'{name}/skipped'] = float(sum(skipped.figures(count).values()))
    return out
