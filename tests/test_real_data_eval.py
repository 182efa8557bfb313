"""Real-data evaluation: the held-out loss of each data.eval stream covers its records exactly
once (no repeat, no drop; skipped ones counted), is the same at every evaluation and on a mesh;
sample grids draw the config's prompts (with the shapes checker's marks where the grammar
applies) and answer the config's questions about its images, and go to TensorBoard; bad eval
settings stop a run before anything runs, naming the key."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import fake_data
from conftest import load_experiment, perturbed_params
from tuna2_jax import evaluate as eval_lib
from tuna2_jax import heldout, metrics, sample_grids, sharding, train, train_state
from tuna2_jax.data import shapes, sources, tasks
from tuna2_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  # 48 records a stream: a few batches of 8 rows, so that eval.loss_batches can cut them.
  return fake_data.write_corpus(str(tmp_path_factory.mktemp('heldout')), n=48)


def _config(corpus, **eval_streams):
  c = load_experiment('tuna2_data', 'runlocal=True')
  c.data.t2i = corpus['t2i']
  c.data.eval.update(eval_streams)
  return c


def _expected_counts(config, task, spec, tok):
  """Trained text tokens and target patches of every usable record, formatted one by one."""
  items = sources.open_stream(task, spec)
  loader = sources.stream_loader(task, spec, '', config.data.buckets, config.data.resize)
  text = flow = usable = 0
  for i in range(len(items)):
    try:
      _, ex = loader(items[i])
    except Exception:  # the records the pipeline skips  # pylint: disable=broad-except
      continue
    s = tasks.format_example(ex, tok, config.model.patch_size)
    if len(s['tokens']) > config.seq_len:
      continue
    usable += 1
    text += float(s['loss_mask'].sum())
    flow += float((s['gen_mask'] & s['is_patch']).sum())
  return text, flow, len(items) - usable


@pytest.fixture(scope='module')
def model_and_config(corpus):
  config = _config(corpus, t2i=corpus['t2i'], mmu=corpus['mmu'], text=corpus['text'])
  config.batch_size = 8  # one row per fake device
  config.eval.loss_batches = 16  # more than the streams fill: they end on their own
  return perturbed_params(train_state.build_model(config)), config


def test_heldout_loss_covers_each_record_once(model_and_config):
  model, config = model_and_config
  tok = Tokenizer.for_config(config)
  got = heldout.HeldoutLoss(config, tok)(model)
  for task in ('t2i', 'mmu', 'text'):
    text, flow, skipped = _expected_counts(config, task, config.data.eval[task], tok)
    name = f'heldout/{task}'
    assert got[f'{name}/text_tokens'] == text and got[f'{name}/flow_tokens'] == flow, task
    assert got[f'{name}/skipped'] == skipped, task
    assert np.isfinite(got[f'{name}/loss']) and got[f'{name}/loss'] > 0
  assert got['heldout/t2i/skipped'] == len(fake_data.BAD_T2I)
  assert 'heldout/t2i/flow_loss' in got and 'heldout/text/flow_loss' not in got
  assert got['heldout/mmu/loss'] == pytest.approx(got['heldout/mmu/text_loss'])
  # The same numbers at the next evaluation (fixed t and noise): comparable over steps.
  assert heldout.HeldoutLoss(config, tok)(model) == got


def test_heldout_loss_is_the_same_on_a_mesh_and_stops_at_loss_batches(model_and_config):
  model, config = model_and_config
  tok = Tokenizer.for_config(config)
  plain = heldout.HeldoutLoss(config, tok)(model)
  mesh = sharding.make_mesh(config.mesh)
  _, shardings = train_state.state_shardings(config, mesh)
  graphdef, params = nnx.split(model, nnx.Param)
  placed = jax.device_put(params, shardings['params'])
  sharded = heldout.HeldoutLoss(config, tok)(nnx.merge(graphdef, placed))
  assert set(sharded) == set(plain)
  for key, value in plain.items():
    assert sharded[key] == pytest.approx(value, rel=1e-4), key
  one = config.copy_and_resolve_references()
  one.eval.loss_batches = 1  # the same compiled program, fewer batches
  cut = heldout.HeldoutLoss(one, tok)(model)
  assert 0 < cut['heldout/mmu/text_tokens'] < plain['heldout/mmu/text_tokens']


def test_sample_grids_draw_the_configured_prompts_and_images(corpus, tmp_path, monkeypatch):
  config = _config(corpus)
  config.eval.prompts = ('a red circle at the top left.', 'a photo of a cat.')
  image = os.path.join(os.path.dirname(corpus['t2i']), 'images', '1.png')
  config.eval.images = (image,)
  config.eval.questions = ('what colour is the circle?',)
  model = perturbed_params(train_state.build_model(config))
  writer = metrics.MetricsWriter(str(tmp_path))
  shown = {}
  monkeypatch.setattr(writer, 'write_image',
                      lambda step, tag, image_HW3: shown.setdefault(tag, image_HW3))
  paths = sample_grids.write_samples(model, Tokenizer.for_config(config), config,
                                     str(tmp_path), 6, writer=writer)
  writer.close()
  assert [os.path.basename(p) for p in paths] == ['step_000006.png',
                                                  'step_000006_understanding.png']
  generation = json.load(open(str(tmp_path / 'samples' / 'step_000006.json')))
  assert generation['marks'][1] is None and isinstance(generation['marks'][0], bool)
  assert generation['captions'][0].endswith('a red circle at the top left.')
  understood = json.load(open(str(tmp_path / 'samples' / 'step_000006_understanding.json')))
  assert understood['captions'][0].startswith('Q: what colour is the circle?\nA: ')
  # The whole grids go to TensorBoard, as written to the PNG files.
  assert set(shown) == {'samples/generation', 'samples/understanding'}
  from PIL import Image
  np.testing.assert_array_equal(shown['samples/generation'], np.asarray(Image.open(paths[0])))


def test_checker_marks_pass_fail_or_none_and_frame_the_tile():
  scene = shapes.sample_scene(np.random.default_rng(0), 2)
  drawn = shapes.render(scene, 48)
  other = shapes.caption(shapes.sample_scene(np.random.default_rng(5), 3))
  assert sample_grids.marks([drawn] * 3, [shapes.caption(scene), other, 'a cat.']) == [
      True, False, None]
  grid = metrics.sample_grid([drawn, drawn], ['x', 'y'], marks=[True, False], scale=1)
  gap = metrics.TILE_GAP
  assert tuple(grid[gap - 1, gap + 5]) == metrics.MARK_COLOURS[True]
  assert tuple(grid[gap - 1, 2 * gap + 48 + 5]) == metrics.MARK_COLOURS[False]


@pytest.mark.parametrize('change, error, match', [
    (dict(eval_t2i='missing.jsonl'), FileNotFoundError, r'data\.eval\.t2i=.*missing\.jsonl'),
    (dict(eval_t2i='shapes'), ValueError, 'not held out'),
    (dict(images=('nope.png',)), ValueError, r"eval\.images\[0\]='nope\.png'"),
    (dict(images=('IMG', 'IMG'), questions=('a?', 'b?', 'c?')), ValueError,
     '2 images and eval.questions 3'),
    (dict(prompts=('a cat.', ' ')), ValueError, r"eval\.prompts\[1\]=' '"),
])
def test_bad_eval_settings_stop_the_run_before_anything_runs(corpus, tmp_path, change, error,
                                                             match):
  config = _config(corpus)
  image = os.path.join(os.path.dirname(corpus['t2i']), 'images', '0.jpg')
  for key, value in change.items():
    if key == 'eval_t2i':
      config.data.eval.t2i = value
    else:
      config.eval[key] = tuple(image if v == 'IMG' else v for v in value)
  with pytest.raises(error, match=match):
    train.train(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_heldout_streams_need_a_mixture_config(corpus):
  config = load_experiment('shapes', 'runlocal=True')
  config.data.eval.mmu = corpus['mmu']
  with pytest.raises(ValueError, match="data.eval.mmu=.* but data.name='shapes'"):
    heldout.check(config)


@pytest.mark.slow
def test_training_writes_heldout_losses_and_sample_grids(corpus, tmp_path):
  config = _config(corpus, t2i=corpus['t2i'], text=corpus['text'])
  config.batch_size = jax.device_count()
  config.optim.schedule = 'constant'  # test_data_pipeline's training step: compiled once
  config.update(total_steps=1, log_every=1, checkpoint_every=1, eval_every=1)
  config.eval.update(metrics_every=1, loss_batches=1, prompts=())  # grids: the test above
  workdir = str(tmp_path / 'run')
  train.train(config, workdir)
  (line,) = [json.loads(x) for x in open(os.path.join(workdir, eval_lib.HISTORY_FILE))]
  assert line['step'] == 1 and not any(k.startswith('shapes/') for k in line)
  assert np.isfinite(line['heldout/t2i/flow_loss']) and np.isfinite(line['heldout/text/loss'])
  assert line['eval_set'] == eval_lib.eval_set_digest({}, heldout.describe(config))
  # Without prompts or images a real-data run draws no grid (never shapes prompts).
  assert not os.path.exists(os.path.join(workdir, 'samples'))
