"""Ablation configs differ only where they should; the pretrained encoder reaches Tuna-R intact."""

import itertools
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import load_experiment
from tuna2_jax import compare, pretrain_encoder, sharding, train, train_state
from tuna2_jax.convert import hf_folder, init_from, vision_ckpt
from tuna2_jax.convert.hf_folder import ConversionError

ARMS = ('tuna2', 'tuna2_masking', 'tuna_r', 'tuna_r_masking')
# Each pair of arms and the keys it ablates: nothing else may differ.
PAIRS = {
    ('tuna2', 'tuna_r'): {'model.vision', 'init_from'},
    ('tuna2_masking', 'tuna_r_masking'): {'model.vision', 'init_from'},
    ('tuna2', 'tuna2_masking'): {'masking.enabled'},
    ('tuna_r', 'tuna_r_masking'): {'masking.enabled'},
}


def _arm(name: str, arg: str = ''):
  return load_experiment(f'ablations/{name}', arg or None)


def _diff(a, b) -> set[str]:
  fa, fb = compare.flatten(a.to_dict()), compare.flatten(b.to_dict())
  return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


@pytest.mark.parametrize('arg', ['', 'seed=2,root=/tmp/study', 'runlocal=True'])
@pytest.mark.parametrize('pair', sorted(PAIRS))
def test_arm_pairs_differ_only_in_their_ablated_keys(pair, arg):
  a, b = (_arm(name, arg) for name in pair)
  assert _diff(a, b) == PAIRS[pair] | {'ablation.arm'}
  # Which is also what compare.py allows without a warning.
  assert _diff(a, b) <= set(a.ablation.varies)


def test_arms_share_seed_steps_data_and_schedule():
  configs = [_arm(name, 'seed=3') for name in ARMS]
  for a, b in itertools.combinations(configs, 2):
    for key in ('seed', 'total_steps', 'batch_size', 'seq_len', 'data', 'optim', 'eval',
                'sampling', 'objective', 'flow'):
      assert a[key] == b[key], key
  assert configs[0].seed == 3 and configs[0].eval.metrics_every > 0
  assert {c.ablation.arm for c in configs} == set(ARMS)
  # Every Tuna-R arm starts from the alignment run of its own seed.
  assert _arm('tuna_r', 'seed=3').init_from.endswith(os.path.join('tuna_r_align', 'seed3'))


@pytest.fixture(scope='module')
def study_root(tmp_path_factory):
  """An encoder pretrained (a few steps) where the ablation configs of root=ROOT look for it."""
  root = tmp_path_factory.mktemp('study')
  config = load_experiment('siglip_shapes', 'runlocal=True')
  results = pretrain_encoder.pretrain(config, str(root / 'siglip_shapes'))
  return root, config, results


def _saved_encoder(root) -> dict:
  path = os.path.join(str(root), 'siglip_shapes', 'encoder', vision_ckpt.PARAMS_DIR)
  with ocp.StandardCheckpointer() as ckpt:
    return hf_folder.flat_paths(ckpt.restore(path)['vision'])


def test_encoder_pretraining_writes_metrics_and_an_encoder(study_root):
  root, config, results = study_root
  for key in ('siglip/i2t_top1', 'siglip/t2i_top1'):
    assert 0.0 <= results[key] <= 1.0
  workdir = root / 'siglip_shapes'
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines] == [2, 4] and all(np.isfinite(l['loss']) for l in lines)
  saved = _saved_encoder(root)
  assert 'pos_embed' in saved and any(k.startswith('blocks/') for k in saved)
  assert not any(k.startswith(vision_ckpt.NOT_PRETRAINED) for k in saved)
  stored = json.loads((workdir / 'encoder' / vision_ckpt.ENCODER_CONFIG_FILE).read_text())
  assert stored['encoder']['width'] == config.model.encoder.width


@pytest.mark.slow
def test_encoder_checkpoint_round_trips_into_tuna_r_alignment(study_root):
  """Alignment loads the pretrained ViT, trains only the connector, and the ViT stays as saved."""
  root, _, _ = study_root
  config = _arm('tuna_r_align', f'runlocal=True,root={root}')
  config.batch_size = jax.device_count()
  config.update(total_steps=2, checkpoint_every=2, eval_every=2)
  config.eval.metrics_every = 0
  workdir = str(root / 'tuna_r_align' / 'seed0')
  train.train(config, workdir)
  model, _, step = train_state.load_model(workdir, use_ema=False)
  assert step == 2
  from flax import nnx
  vision = hf_folder.flat_paths(nnx.state(model.vision, nnx.Param))
  fresh = hf_folder.flat_paths(nnx.state(train_state.build_model(config).vision, nnx.Param))
  saved = _saved_encoder(root)
  for name, value in saved.items():
    np.testing.assert_array_equal(np.asarray(vision[name]), np.asarray(value), err_msg=name)
    assert not np.array_equal(np.asarray(fresh[name]), np.asarray(value)), name
  # The connector trained (it is the only thing that may).
  assert not np.allclose(vision['connector_fc1/kernel'], fresh['connector_fc1/kernel'])
  # And the Tuna-R arm of that seed starts from the aligned parameters.
  arm = _arm('tuna_r', f'runlocal=True,root={root}')
  assert arm.init_from == workdir


def test_encoder_checkpoint_of_another_width_is_refused(study_root):
  root, _, _ = study_root
  config = _arm('tuna_r_align', f'runlocal=True,root={root}')
  config.model.encoder.width = 48
  mesh = sharding.make_mesh(config.mesh)
  abstract, shardings = train_state.state_shardings(config, mesh)
  before = sorted(os.listdir(os.path.join(str(root), 'siglip_shapes', 'encoder')))
  with pytest.raises(ConversionError, match='width=32.*model.encoder.width=48'):
    init_from.pretrained_params(config, abstract['params'], shardings['params'])
  assert sorted(os.listdir(os.path.join(str(root), 'siglip_shapes', 'encoder'))) == before
