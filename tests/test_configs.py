"""Every experiment config builds (abstractly, nothing allocated) at the size the paper states."""

import glob
import math
import os

import jax
import pytest
from flax import nnx

from conftest import REPO_ROOT, load_experiment
from tuna2_jax import train_state
from tuna2_jax.models.patch_embed import PatchEmbed
from tuna2_jax.models.vision_encoder import VisionEncoder

EXPERIMENTS = sorted(os.path.relpath(os.path.splitext(p)[0], os.path.join(REPO_ROOT, 'experiments'))
                     for pattern in ('*.py', os.path.join('ablations', '*.py'))
                     for p in glob.glob(os.path.join(REPO_ROOT, 'experiments', pattern)))
_SHAPES_ARGS = ['', 'runlocal=True', 'vision=encoder', 'runlocal=True,vision=encoder']
ARGS = {'shapes': _SHAPES_ARGS, 'shapes_gpu': _SHAPES_ARGS}  # others: ['', 'runlocal=True']


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract_params(name, arg=''):
  config = load_experiment(name, arg or None)
  _, params = train_state.abstract_model(config)
  leaves = jax.tree.leaves(params)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  return config, params


@pytest.mark.parametrize('name, arg', [(n, a) for n in EXPERIMENTS
                                       for a in ARGS.get(n, ['', 'runlocal=True'])])
def test_every_config_builds_abstractly(name, arg, capsys):
  config, params = _abstract_params(name, arg)
  n = _count(params)
  with capsys.disabled():
    print(f'\n  experiments/{name}.py:{arg}  {n:,} parameters '
          f'(head {_count(params["head"]):,})')
  assert n > 0
  assert config.total_steps > 0 and config.batch_size > 0


def test_known_experiments_are_there():
  assert {'shapes', 'tuna2_7b', 'tuna_r_7b', 'siglip_shapes', 'ablations/tuna2',
          'ablations/tuna_r'} <= set(EXPERIMENTS)


@pytest.mark.parametrize('arg', ['', 'runlocal=True'])
def test_siglip_config_builds_its_image_text_model(arg, capsys):
  from tuna2_jax import pretrain_encoder
  config = load_experiment('siglip_shapes', arg or None)
  params = nnx.split(nnx.eval_shape(lambda: pretrain_encoder.build_model(config)), nnx.Param)[1]
  with capsys.disabled():
    print(f'\n  experiments/siglip_shapes.py:{arg}  {_count(params):,} parameters '
          f'(ViT {_count(params["vision"]):,})')
  # Its ViT is exactly the Tuna-R shapes model's, without the connector.
  _, tuna_r = _abstract_params('shapes', 'runlocal=True,vision=encoder' if arg else
                               'vision=encoder')
  vit = {k: v.shape for k, v in jax.tree_util.tree_leaves_with_path(params['vision'])}
  ours = {k: v.shape for k, v in jax.tree_util.tree_leaves_with_path(tuna_r['vision'])}
  assert vit and set(vit) < set(ours) and all(ours[k] == s for k, s in vit.items())


def test_tuna2_7b_has_the_papers_size():
  config, params = _abstract_params('tuna2_7b')
  assert config.model.vision == 'patch'
  assert 12.4e9 <= _count(params) <= 12.9e9
  assert 4.8e9 <= _count(params['head']) <= 5.3e9
  assert 7.3e9 <= _count(params['decoder']) <= 7.8e9  # Qwen2.5-7B plus the added token rows


def _encoder_and_connector(enc, patch: int, width: int) -> int:
  """SigLIP-style ViT (patch proj, position table, mask token, layers) and the connector."""
  we = enc.width
  layer = (2 * 2 * we  # two LayerNorms (scale, bias)
           + 4 * (we * we + we)  # q, k, v, o with biases
           + we * enc.mlp_dim + enc.mlp_dim + enc.mlp_dim * we + we)
  vit = (patch * patch * 3 * we + we) + enc.max_grid ** 2 * we + we + enc.num_layers * layer
  connector = we + (we * width + width) + (width * width + width)
  return vit + connector


def test_tuna_r_7b_adds_the_encoder_and_connector():
  config, params_r = _abstract_params('tuna_r_7b')
  _, params_2 = _abstract_params('tuna2_7b')
  assert config.model.vision == 'encoder'
  p, width = config.model.patch_size, config.model.decoder.width
  patch_embed = (p * p * 3 * width + width) + width + width  # conv, RMSNorm, mask token
  added = _encoder_and_connector(config.model.encoder, p, width) - patch_embed
  assert _count(params_r) - _count(params_2) == added
  assert 0.35e9 < _count(params_r['vision']) < 0.5e9  # So400M with 26 of its 27 layers


def test_shapes_encoder_variant_builds_a_vision_encoder():
  config = load_experiment('shapes', 'vision=encoder')
  model = nnx.eval_shape(lambda: train_state.build_model(config))
  assert isinstance(model.vision, VisionEncoder)
  assert config.model.encoder.num_layers == len(model.vision.blocks.attn.q_proj.kernel)
  model = nnx.eval_shape(lambda: train_state.build_model(load_experiment('shapes')))
  assert isinstance(model.vision, PatchEmbed)


def test_a_config_recorded_before_the_flow_keys_moved_reads_with_them_moved(tmp_path):
  """A workdir of an older release (objective.noise_scale, ...) resumes and evaluates as before."""
  import json
  from tuna2_jax import config_history
  old = load_experiment('shapes').to_dict()
  flow = old.pop('flow')
  old['objective'].update(flow)
  (tmp_path / 'config.json').write_text(json.dumps(old))
  read = json.loads(config_history.read(str(tmp_path)))
  new = json.loads(json.dumps(load_experiment('shapes').to_dict()))
  assert read['flow'] == flow and config_history.changes(read, new) == {}
