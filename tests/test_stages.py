"""The paper's stages as configs: frozen parameters carry no optimizer state and do not move;
a new stage starts from the previous stage's parameters (or pretrained weights) with a new
optimizer, as distinct from resuming."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_experiment
from tuna2_jax import checkpoint as ckpt_lib
from tuna2_jax import sharding, train, train_state
from tuna2_jax.convert import hf_folder, init_from, qwen2
from tuna2_jax.convert.hf_folder import ConversionError
from tuna2_jax.data import pipeline
from tuna2_jax.data.tokenizer import Tokenizer, tokenizer_path


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_stage_configs_follow_the_paper():
  align = load_experiment('tuna_r_7b_align')
  assert align.model.vision == 'encoder' and align.optim.trainable == 'connector'
  assert align.optim.lr == 5e-4 and align.total_steps == 3_000
  for name in ('tuna2_7b', 'tuna_r_7b'):
    stage1, stage2 = load_experiment(name), load_experiment(f'{name}_sft')
    assert stage1.optim.lr == 1e-4 and stage1.total_steps == 300_000
    assert stage2.optim.lr == 2e-5 and stage2.total_steps == 50_000
    assert stage2.model.vision == stage1.model.vision
    assert stage2.model.to_dict() == stage1.model.to_dict()  # its init_from is stage 1's workdir
  flat = hf_folder.flat_paths(train_state.abstract_model(align)[1])
  trained = [k for k, v in train_state.trainable_labels(flat, 'connector').items()
             if v == 'train']
  assert trained and all(k.startswith('vision/connector_') for k in trained)


def test_a_stage_without_its_starting_weights_is_refused(tmp_path):
  for name in ('tuna2_7b', 'tuna2_7b_sft', 'tuna_r_7b_align', 'tuna_r_7b', 'tuna_r_7b_sft'):
    assert load_experiment(name).init.required, name
  config = load_experiment('shapes', 'runlocal=True')
  config.batch_size = jax.device_count()
  config.init.required = True
  with pytest.raises(ValueError, match='init_from'):
    train.train(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  assert not (tmp_path / 'run' / ckpt_lib.CONFIG_FILE).exists()


def _encoder_config(**optim):
  c = load_experiment('shapes', 'runlocal=True,vision=encoder')
  c.batch_size = jax.device_count()
  c.optim.update(schedule='constant', warmup_steps=1, **optim)
  return c


def test_frozen_parameters_carry_no_optimizer_state_and_do_not_move():
  config = _encoder_config(trainable='connector', weight_decay=0.1)
  abstract = train_state.abstract_state(config)
  params = abstract['params']
  connector = _size([v for k, v in hf_folder.flat_paths(params).items()
                     if k.startswith('vision/connector_')])
  assert 0 < connector < _size(params) // 4
  # Adam's two moments for the connector alone, plus scalar counters.
  opt_arrays = [x for x in jax.tree.leaves(abstract['opt']) if x.shape]
  assert _size(opt_arrays) == 2 * connector

  mesh = sharding.make_mesh(config.mesh)
  graphdef, _ = train_state.abstract_model(config)
  step_fn = jax.jit(train.make_train_step(config, graphdef, train_state.optimizer(config, params)))
  state = train_state.create_sharded_state(config, mesh)
  before = jax.tree.map(np.asarray, hf_folder.flat_paths(state['params']))
  batch = sharding.global_batch(
      next(iter(pipeline.train_dataset(config, Tokenizer.load()))), mesh)
  for _ in range(2):  # the first step's learning rate is warm-up's 0
    state, _ = step_fn(state, batch, jax.random.key(0))
  after = hf_folder.flat_paths(state['params'])
  for k, v in before.items():
    moved = not np.array_equal(v, np.asarray(after[k]))
    assert moved == k.startswith('vision/connector_'), k


def _save_run(workdir, config, seed):
  """A finished 'previous stage': a checkpoint of perturbed parameters and its config.json."""
  mesh = sharding.make_mesh(config.mesh)
  state = train_state.create_sharded_state(config, mesh)
  rng = np.random.default_rng(seed)
  state['params'] = jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(x.dtype),
                                 state['params'])
  state['step'] = jnp.asarray(7, jnp.int32)
  with ckpt_lib.Checkpointer(str(workdir), keep=1, save_every=1, async_save=False) as ckpt:
    ckpt.save(7, state, force=True)
  ckpt_lib.write_config(str(workdir), config.to_json_best_effort())
  return state


def _pretrained(config):
  """What init_from / init.* load for config, without building a state."""
  mesh = sharding.make_mesh(config.mesh)
  abstract, shardings = train_state.state_shardings(config, mesh)
  return init_from.pretrained_params(config, abstract['params'], shardings['params']), shardings


@pytest.fixture(scope='module')
def stage1(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('stage1')
  return workdir, _save_run(workdir, load_experiment('shapes', 'runlocal=True'), seed=1)


def test_init_from_takes_parameters_only(stage1, caplog):
  workdir, previous = stage1
  config = load_experiment('shapes', 'runlocal=True')
  config.init_from = str(workdir)
  config.optim.lr = 1e-5  # a new stage: new optimizer, new schedule
  with caplog.at_level(logging.WARNING):
    loaded, shardings = _pretrained(config)
  # The step's metadata is read through the run's checkpoint manager, without orbax's warning
  # of a metadata file missing from the state item's folder.
  assert not [r for r in caplog.records if 'Metadata file does not exist' in r.getMessage()]
  state = init_from.start_from(
      train_state.create_sharded_state(config, sharding.make_mesh(config.mesh)), loaded)
  want = hf_folder.flat_paths(previous['params'])
  assert set(loaded) == set(want)
  for name, value in hf_folder.flat_paths(state['params']).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]))
    assert value.sharding == hf_folder.flat_paths(shardings['params'])[name]
  for name, value in hf_folder.flat_paths(state['ema']).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]))
  assert int(state['step']) == 0
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state['opt']))  # fresh moments


def test_init_from_a_relative_workdir(stage1, monkeypatch):
  workdir, previous = stage1
  monkeypatch.chdir(workdir.parent)
  config = load_experiment('shapes', 'runlocal=True')
  config.init_from = workdir.name  # as the configs write it: relative to where the run starts
  loaded, _ = _pretrained(config)
  want = hf_folder.flat_paths(previous['params'])
  assert set(loaded) == set(want)
  for name, value in loaded.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]))


def test_init_from_another_model_names_the_parameter(stage1, tmp_path):
  config = load_experiment('shapes', 'runlocal=True')
  config.model.decoder.mlp_dim = 96
  config.init_from = str(stage1[0])
  with pytest.raises(ConversionError, match='decoder/blocks/mlp/down_proj/kernel'):
    _pretrained(config)
  config.init_from = str(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match='nothing'):
    _pretrained(config)


def test_decoder_from_a_qwen2_folder_or_its_converted_checkpoint(tmp_path):
  from test_convert_qwen2 import save_tiny_qwen2
  config = load_experiment('shapes', 'runlocal=True')
  d = config.model.decoder  # 2 layers, width 64, 4 / 2 heads of 16, MLP 128, theta 1e4
  ref = save_tiny_qwen2(tmp_path / 'hf', vocab_size=120, hidden_size=d.width,
                        intermediate_size=d.mlp_dim, num_hidden_layers=d.num_layers,
                        num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads,
                        rms_norm_eps=d.norm_eps,
                        rope_parameters={'rope_type': 'default', 'rope_theta': d.rope_theta})
  qwen2.convert(str(tmp_path / 'hf'), str(tmp_path / 'converted'), config.model.vocab_size)
  results = []
  for source in ('hf', 'converted'):
    config.init.decoder_from = str(tmp_path / source)
    loaded, shardings = _pretrained(config)
    decoder_paths = {k for k in hf_folder.flat_paths(shardings['params'])
                     if k.startswith('decoder/')}
    assert set(loaded) == decoder_paths
    results.append(loaded)
  q1 = ref.model.layers[1].self_attn.q_proj.weight.detach().numpy()
  for loaded in results:
    np.testing.assert_array_equal(np.asarray(loaded['decoder/blocks/attn/q_proj/kernel'][1]),
                                  q1.T)
    assert loaded['decoder/embed/embedding'].shape == (config.model.vocab_size, d.width)
  for k in results[0]:
    np.testing.assert_array_equal(np.asarray(results[0][k]), np.asarray(results[1][k]))
  config.model.decoder.rope_theta = 1e6
  for source in ('hf', 'converted'):
    config.init.decoder_from = str(tmp_path / source)
    with pytest.raises(ConversionError, match='rope_theta'):
      _pretrained(config)


def test_encoder_from_a_siglip2_folder_or_its_converted_checkpoint(tmp_path):
  import subprocess
  import sys
  from conftest import REPO_ROOT
  from test_convert_siglip2 import save_tiny_siglip2
  config = load_experiment('shapes', 'runlocal=True,vision=encoder')
  e = config.model.encoder
  ref = save_tiny_siglip2(tmp_path / 'hf', hidden_size=e.width, num_hidden_layers=e.num_layers + 1,
                          num_attention_heads=e.num_heads, intermediate_size=e.mlp_dim,
                          patch_size=config.model.patch_size, num_patches=e.max_grid ** 2)
  out = tmp_path / 'converted'
  done = subprocess.run([sys.executable, '-m', 'tuna2_jax.convert.siglip2',
                         f'--hf_dir={tmp_path / "hf"}', f'--output={out}'],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
  assert done.returncode == 0, done.stderr
  results = []
  for source in ('hf', 'converted'):
    config.init.encoder_from = str(tmp_path / source)
    loaded, shardings = _pretrained(config)
    vit = {k for k in hf_folder.flat_paths(shardings['params'])
           if k.startswith('vision/') and not k.startswith(('vision/connector_',
                                                             'vision/mask_token'))}
    assert set(loaded) == vit
    results.append(loaded)
  last = e.num_layers - 1  # SigLIP's next layer is dropped
  q = ref.encoder.layers[last].self_attn.q_proj.weight.detach().numpy()
  table = ref.embeddings.position_embedding.weight.detach().numpy()
  for loaded in results:
    np.testing.assert_array_equal(np.asarray(loaded['vision/blocks/attn/q_proj/kernel'][last]),
                                  q.T)
    np.testing.assert_array_equal(np.asarray(loaded['vision/pos_embed']), table)
  for k in results[0]:
    np.testing.assert_array_equal(np.asarray(results[0][k]), np.asarray(results[1][k]))


def test_siglip2_conversion_of_a_bad_folder_writes_nothing(tmp_path):
  from tuna2_jax.convert import siglip2
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'config.json').write_text('{"model_type": "siglip2_vision_model"}')
  with pytest.raises(FileNotFoundError, match='no \\*.safetensors'):
    siglip2.convert(str(tmp_path / 'hf'), str(tmp_path / 'out'))
  (tmp_path / 'hf' / 'config.json').unlink()
  with pytest.raises(FileNotFoundError, match='no config.json'):
    siglip2.convert(str(tmp_path / 'hf'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_a_pretrained_decoder_brings_its_tokenizer_or_the_run_is_refused(tmp_path):
  """data.tokenizer='' with init.decoder_from: that folder's tokenizer.json (a converted
  checkpoint carries a copy), never the shipped 128-piece model."""
  from test_convert_qwen2 import save_tiny_qwen2
  from test_tokenizers import _qwen_like
  config = load_experiment('shapes', 'runlocal=True')
  save_tiny_qwen2(tmp_path / 'hf', vocab_size=512)  # more rows than the tokenizer's ~400 ids
  config.init.decoder_from = str(tmp_path / 'hf')
  with pytest.raises(ValueError, match='has no tokenizer.json and data.tokenizer is empty'):
    train.validate(config)
  _qwen_like(tmp_path / 'hf')
  qwen2.convert(str(tmp_path / 'hf'), str(tmp_path / 'converted'))
  toks = []
  for source in ('hf', 'converted'):
    config.init.decoder_from = str(tmp_path / source)
    assert tokenizer_path(config) == str(tmp_path / source)
    toks.append(Tokenizer.load(tokenizer_path(config)))
  assert toks[0].pieces() == toks[1].pieces()
  assert toks[1].img_id > toks[1].bos_id >= 512  # appended after the model's embedding rows
  stage1 = tmp_path / 'stage1'  # the next stage (init_from) keeps the tokenizer stage 1 used
  stage1.mkdir()
  ckpt_lib.write_config(str(stage1), config.to_json())
  stage2 = load_experiment('shapes', 'runlocal=True')
  stage2.init_from = str(stage1)
  assert tokenizer_path(stage2) == str(tmp_path / 'converted')
  config.data.tokenizer = str(tmp_path / 'elsewhere.model')
  assert tokenizer_path(config) == config.data.tokenizer  # an explicit one wins


def test_export_command_line_writes_a_workdirs_parameters(stage1, tmp_path):
  import subprocess
  import sys
  from conftest import REPO_ROOT
  from tuna2_jax.convert import export
  workdir, previous = stage1
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'tuna2_jax.convert.export', *args], capture_output=True, text=True,
      cwd=REPO_ROOT, timeout=300)
  done = run(f'--workdir={workdir}', f'--output={tmp_path / "out"}', '--use_ema=false')
  assert done.returncode == 0, done.stderr
  # The decoder under Qwen2 names (tests/test_export_hf.py checks them against transformers),
  # the rest under ours with the run's config.
  want = hf_folder.flat_paths(previous['params'])
  decoder = hf_folder.HFFolder(str(tmp_path / 'out'))
  assert 'model.layers.0.self_attn.q_proj.weight' in decoder.shapes
  np.testing.assert_array_equal(np.asarray(decoder.tensor('model.embed_tokens.weight')),
                                np.asarray(want['decoder/embed/embedding']))
  rest = hf_folder.HFFolder(str(tmp_path / 'out' / export.OTHER_DIR))
  others = {k: v for k, v in want.items() if not k.startswith('decoder/')}
  assert set(rest.shapes) == {k.replace('/', '.') for k in others}
  for k, v in others.items():
    np.testing.assert_array_equal(np.asarray(rest.tensor(k.replace('/', '.'))), np.asarray(v))
  assert rest.config['model']['vision'] == 'patch'

  # Only the exported parameters are restored, split over the devices rather than copied.
  params, _, step = export.restore_params(str(workdir), use_ema=False)
  assert step == 7 and set(params) == set(want)
  embed = params['decoder/embed/embedding']
  assert 'fsdp' in str(embed.sharding.spec)
  assert embed.addressable_shards[0].data.size < embed.size

  empty = tmp_path / 'empty'
  empty.mkdir()
  ckpt_lib.write_config(str(empty), load_experiment('shapes', 'runlocal=True').to_json())
  failed = run(f'--workdir={empty}', f'--output={tmp_path / "out2"}')
  last = failed.stderr.strip().splitlines()[-1]  # after orbax's log lines
  assert failed.returncode == 2 and last.startswith('error: --workdir=') and 'no checkpoint' in last
  assert 'Traceback' not in failed.stderr
  assert not (tmp_path / 'out2').exists()
