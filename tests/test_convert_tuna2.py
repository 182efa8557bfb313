"""convert/tuna2.py: official Tuna-2 / Tuna-R checkpoints in and out.

The whole official 7B name list (tests/data/official_param_names_7b.txt, 560 Tuna-2 and 980
Tuna-R tensors) is checked against the 7B configs by eval_shape (no memory); tiny models
round-trip through the official names as safetensors and .pt; bad checkpoints stop with one
error naming the file and leave the output unwritten.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from conftest import load_experiment, perturbed_params

from tuna2_jax import train_state
from tuna2_jax.convert import hf_folder, init_from, tuna2
from tuna2_jax.convert.hf_folder import ConversionError

NAMES_FILE = os.path.join(os.path.dirname(__file__), 'data', 'official_param_names_7b.txt')


def official_names() -> dict[str, dict[str, tuple[int, ...]]]:
  """{'patch' | 'encoder': {name: shape}} from the official name list."""
  out, current = {}, None
  with open(NAMES_FILE) as f:
    for line in f:
      if line.startswith('## '):
        current = 'patch' if 'Tuna-2' in line else 'encoder'
        out[current] = {}
      elif line.strip() and not line.startswith('#'):
        name, shape = line.rstrip('\n').split('\t')
        out[current][name] = tuple(int(n) for n in shape.strip('[]').split(','))
  return out


@pytest.mark.parametrize('name, vision, count, elements', [
    ('tuna2_7b_restore', 'patch', 560, 12_664_134_912),
    ('tuna_r_7b_restore', 'encoder', 980, 13_076_646_432)])
def test_every_official_7b_name_maps_one_to_one(name, vision, count, elements):
  official = official_names()[vision]
  assert len(official) == count
  assert sum(int(np.prod(s)) for s in official.values()) == elements
  config = load_experiment(name)
  _, abstract = train_state.abstract_model(config)
  flat = hf_folder.flat_paths(abstract)
  sources = tuna2.plan(config.model)
  expected = tuna2.expected_shapes(sources, flat)
  tuna2.check_names(name, official, expected)  # raises listing any difference
  assert set(flat) - set(sources) <= set(tuna2.NOT_OFFICIAL)
  names = [n for s in sources.values() for n in s.names]
  assert len(names) == len(set(names)) == count
  # The stage configs differ from the official checkpoints in the vocabulary alone.
  stage = load_experiment('tuna2_7b' if vision == 'patch' else 'tuna_r_7b')
  with pytest.raises(ConversionError, match='embed_tokens.weight: \\(151669, 3584\\)'):
    tuna2.check_names('tuna2_7b', official, tuna2.expected_shapes(
        tuna2.plan(stage.model), hf_folder.flat_paths(train_state.abstract_model(stage)[1])))


def tiny(vision: str):
  """(config, {path: array}) of a tiny official-convention model with random parameters."""
  config = load_experiment('tuna2_7b_restore' if vision == 'patch' else 'tuna_r_7b_restore',
                           'runlocal=True')
  config.model.attention = 'dense'
  model = train_state.build_model(config)
  perturbed_params(model)
  from flax import nnx
  return config, hf_folder.flat_paths(nnx.state(model, nnx.Param))


@pytest.fixture(scope='module', params=['patch', 'encoder'])
def trained(request):
  return tiny(request.param)


def _read_back(directory: str, config) -> dict[str, np.ndarray]:
  _, abstract = train_state.abstract_model(config)
  flat = hf_folder.flat_paths(abstract)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded, step = init_from.workdir_params(directory, flat, {k: default for k in flat})
  assert step == 0
  return {k: np.asarray(v) for k, v in loaded.items()}


@pytest.mark.parametrize('suffix', ['.safetensors', '.pt'])
def test_export_then_import_gives_the_same_parameters(trained, suffix, tmp_path):
  config, params = trained
  file = str(tmp_path / f'official{suffix}')
  tuna2.export(params, config.model, file)
  if suffix == '.pt':
    state = torch.load(file, weights_only=True)
  else:
    state = {n: s for n, s in tuna2.Checkpoint(file).shapes.items()}
  names = {n for s in tuna2.plan(config.model).values() for n in s.names}
  assert set(state) == names
  out = str(tmp_path / 'imported')
  tuna2.import_checkpoint(file, config, out)
  back = _read_back(out, config)
  for path, value in params.items():
    if path in tuna2.NOT_OFFICIAL:
      continue
    np.testing.assert_array_equal(back[path], np.asarray(value), err_msg=path)
  # The imported folder is a workdir: init_from takes it, and generate / understand load it.
  model, loaded_config, step = train_state.load_model(out)
  assert step == 0
  assert json.loads(loaded_config.model.to_json()) == json.loads(config.model.to_json())
  from flax import nnx
  got = hf_folder.flat_paths(nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(got['head/out/kernel'], np.asarray(params['head/out/kernel']))


def test_official_layouts_of_tensors():
  """The conv kernel and mask token take the official layouts; linears are transposed."""
  conv = np.arange(4 * 3 * 2 * 2, dtype=np.float32).reshape(4, 3, 2, 2)  # [out, C, p, p]
  ours = tuna2.to_ours('conv', conv)
  assert ours.shape == (12, 4)
  # Our row (i, j, c) of the flattened patch block is the conv weight at [:, c, i, j].
  np.testing.assert_array_equal(ours[(1 * 2 + 0) * 3 + 2], conv[:, 2, 1, 0])
  np.testing.assert_array_equal(tuna2.to_official('conv', ours, conv.shape), conv)
  token = np.ones((1, 1, 5), np.float32)
  assert tuna2.to_ours('token', token).shape == (5,)
  assert tuna2.official_shape('linear', (3, 7)) == (7, 3)


def _exported(trained, tmp_path, name='official.safetensors'):
  config, params = trained
  file = str(tmp_path / name)
  tuna2.export(params, config.model, file)
  return config, file


def test_a_checkpoint_of_the_other_variant_is_refused(trained, tmp_path):
  config, file = _exported(trained, tmp_path)
  other = load_experiment('tuna_r_7b_restore' if config.model.vision == 'patch' else
                          'tuna2_7b_restore', 'runlocal=True')
  out = tmp_path / 'out'
  with pytest.raises(ConversionError) as err:
    tuna2.import_checkpoint(file, other, str(out))
  assert file in str(err.value) and 'official Tuna-' in str(err.value)
  assert 'checkpoint' in str(err.value) and not out.exists()


def test_a_checkpoint_of_other_dimensions_is_refused(trained, tmp_path):
  config, file = _exported(trained, tmp_path)
  other = load_experiment(
      'tuna2_7b_restore' if config.model.vision == 'patch' else 'tuna_r_7b_restore',
      'runlocal=True')
  other.model.decoder.mlp_dim = 96
  other.model.head.num_layers = 3
  out = tmp_path / 'out'
  with pytest.raises(ConversionError) as err:
    tuna2.import_checkpoint(file, other, str(out))
  message = str(err.value)
  assert file in message and 'missing tensors' in message and 'other dimensions' in message
  assert 'diffusion_head_a.2.mlp.up_proj.weight' in message  # the layer it lacks
  assert 'tuna.model.layers.0.mlp.up_proj.weight: (128, 64)' in message  # the width it has
  assert not out.exists()


def test_unknown_and_missing_tensors_are_listed(trained, tmp_path):
  config, params = trained
  file = str(tmp_path / 'edited.pt')
  state = {n: torch.from_numpy(f()) for n, _, f in tuna2.official_tensors(params, config.model)}
  del state['tuna.model.norm.weight']
  state['extra.weight'] = torch.zeros(3)
  torch.save(state, file)
  out = tmp_path / 'out'
  with pytest.raises(ConversionError) as err:
    tuna2.import_checkpoint(file, config, str(out))
  assert 'tuna.model.norm.weight' in str(err.value) and 'extra.weight' in str(err.value)
  assert not out.exists()


class NotATensor:
  """An object that only a full unpickler would rebuild."""


def test_a_pickled_object_is_refused_by_weights_only(tmp_path):
  config = load_experiment('tuna2_7b_restore', 'runlocal=True')
  file = str(tmp_path / 'pickled.pt')
  torch.save({'tuna.model.norm.weight': torch.zeros(3), 'hook': NotATensor()}, file)
  out = tmp_path / 'out'
  with pytest.raises(ConversionError) as err:
    tuna2.import_checkpoint(file, config, str(out))
  assert file in str(err.value) and 'weights_only=True' in str(err.value)
  assert not out.exists()


def test_named_special_tokens_take_the_official_ids(tmp_path):
  """The restore configs name the official tokenizer's role tokens; a named token the
  tokenizer lacks ([PAD]) comes right after its vocabulary, not after the model's rows."""
  from test_tokenizers import _qwen_like

  from tuna2_jax.data.tokenizer import Tokenizer
  base = _qwen_like(tmp_path, model_rows=512)
  names = dict(bos='<|im_start|>', eos='<|im_end|>', pad='[PAD]', boi='<|endoftext|>',
               eoi='<|im_end|>', img='<|im_start|>')
  tok = Tokenizer.load(str(tmp_path), names)
  n = base.get_vocab_size(with_added_tokens=True)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (base.token_to_id('<|im_start|>'),
                                                  base.token_to_id('<|im_end|>'), n)
  assert tok.boi_id == base.token_to_id('<|endoftext|>') and tok.vocab_size == n + 1
  restore = load_experiment('tuna2_7b_restore')
  assert dict(restore.data.special_tokens) == dict(
      bos='<|im_start|>', eos='<|im_end|>', pad='[PAD]', boi='<|vision_start|>',
      eoi='<|vision_end|>', img='<|image_pad|>')


def test_the_command_refuses_with_one_error_line(tmp_path):
  """`python -m tuna2_jax.convert.tuna2` reports a bad checkpoint as one `error:` line."""
  import subprocess
  import sys
  _, file = _exported(tiny('patch'), tmp_path)
  other = 'tuna_r_7b_restore'
  out = tmp_path / 'out'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  run = subprocess.run(
      [sys.executable, '-m', 'tuna2_jax.convert.tuna2', f'--checkpoint={file}',
       f'--config={root}/experiments/{other}.py:runlocal=True', f'--output={out}'],
      capture_output=True, text=True, env=env, cwd=root, timeout=300)
  assert run.returncode == 2, run.stderr[-2000:]
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and file in last and 'Nothing was written' in last
  assert not out.exists()
