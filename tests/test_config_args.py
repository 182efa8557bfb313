"""The ':args' part of --config=file.py:args, parsed as big_vision does."""

import pytest

from tuna2_jax import config_lib


def test_bare_boolean_arg_means_true():
  args = config_lib.parse_arg('runlocal', runlocal=False, vision='patch')
  assert args.runlocal is True and args.vision == 'patch'
  args = config_lib.parse_arg('vision=encoder,runlocal', runlocal=False, vision='patch')
  assert args.runlocal is True and args.vision == 'encoder'
  assert config_lib.parse_arg('runlocal=false', runlocal=True).runlocal is False


def test_bare_non_boolean_arg_and_unknown_key_are_refused_by_name():
  with pytest.raises(ValueError, match=r"'vision'.*vision takes a str value.*vision=<value>"):
    config_lib.parse_arg('vision', runlocal=False, vision='patch')
  with pytest.raises(ValueError, match=r"unknown key 'runlcoal'.*\['runlocal', 'vision'\]"):
    config_lib.parse_arg('runlcoal', runlocal=False, vision='patch')
  with pytest.raises(ValueError, match='expected true or false'):
    config_lib.parse_arg('runlocal=yes please', runlocal=False)


def test_experiment_loads_with_bare_runlocal(tmp_path):
  from conftest import load_experiment
  bare, explicit = load_experiment('shapes', 'runlocal'), load_experiment('shapes', 'runlocal=True')
  assert bare.to_dict() == explicit.to_dict()


def test_with_arg_pins_a_key_and_refuses_another_value():
  assert config_lib.with_arg(None, vision='encoder') == 'vision=encoder'
  assert config_lib.with_arg('runlocal,vision=encoder', vision='encoder') == \
      'runlocal,vision=encoder'
  with pytest.raises(ValueError, match='fixes vision=encoder'):
    config_lib.with_arg('vision=patch', vision='encoder')


@pytest.mark.parametrize('tuna_r, tuna2', [('tuna_r_7b', 'tuna2_7b'),
                                           ('tuna_r_7b_sft', 'tuna2_7b_sft'),
                                           ('tuna_r_7b_restore', 'tuna2_7b_restore')])
def test_tuna_r_configs_are_their_tuna2_config_with_vision_encoder(tuna_r, tuna2):
  from conftest import load_experiment
  for arg in ('', 'runlocal=True,'):
    assert load_experiment(tuna_r, arg or None).to_dict() == \
        load_experiment(tuna2, f'{arg}vision=encoder').to_dict()
