"""The compare tool on synthetic eval histories: curve statistics, table values, warnings."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from tuna2_jax import compare

STEPS = [10, 20, 30]
KEYS = ('ablation.arm', 'model.vision')


def _config(arm: str, seed: int, vision: str, lr: float = 1e-3) -> dict:
  return {'seed': seed, 'total_steps': 30, 'optim': {'lr': lr},
          'model': {'vision': vision, 'width': 64},
          'ablation': {'arm': arm, 'varies': list(KEYS)}}


def _write_run(root, name: str, config: dict, vqa: list[float], eval_set: str = 'abc'):
  workdir = root / name
  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps(config))
  with open(workdir / 'eval_history.jsonl', 'w') as f:
    for i, (step, v) in enumerate(zip(STEPS, vqa)):
      f.write(json.dumps({'step': step, 'train_flops': 1e12 * step, 'wall_s': step / 10,
                          'eval_set': eval_set, 'shapes/vqa_accuracy': v,
                          'shapes/gen_accuracy': v / 2,
                          'shapes/vqa_majority_baseline': 0.3}) + '\n')
  return str(workdir)


@pytest.fixture
def runs(tmp_path):
  """Two arms x two seeds, with values whose statistics are known."""
  return [
      _write_run(tmp_path, 'a/seed0', _config('tuna2', 0, 'patch'), [0.2, 0.5, 0.9]),
      _write_run(tmp_path, 'a/seed1', _config('tuna2', 1, 'patch'), [0.4, 0.7, 0.7]),
      _write_run(tmp_path, 'b/seed0', _config('tuna_r', 0, 'encoder'), [0.6, 0.7, 0.8]),
      _write_run(tmp_path, 'b/seed1', _config('tuna_r', 1, 'encoder'), [0.6, 0.9, 0.8]),
  ]


def test_curves_and_table_values(runs, tmp_path):
  out = tmp_path / 'report'
  result = compare.compare(runs, str(out), thresholds=(0.5, 0.75))
  assert result['warnings'] == []
  vqa = result['summary']['shapes/vqa_accuracy']
  assert set(vqa) == {'tuna2', 'tuna_r'}  # grouped by ablation.arm
  a = vqa['tuna2']
  assert a['seeds'] == 2 and a['steps'] == STEPS
  np.testing.assert_allclose(a['mean'], [0.3, 0.6, 0.8])
  np.testing.assert_allclose(a['min'], [0.2, 0.5, 0.7])
  np.testing.assert_allclose(a['max'], [0.4, 0.7, 0.9])
  assert a['final_mean'] == pytest.approx(0.8) and a['final_std'] == pytest.approx(0.1)
  assert a['best_mean'] == pytest.approx(0.8) and a['best_step'] == 30
  assert a['reach']['0.5'] == [20, 2e13] or tuple(a['reach']['0.5']) == (20, 2e13)
  b = vqa['tuna_r']
  assert b['best_mean'] == pytest.approx(0.8) and b['best_step'] == 20  # first of the ties
  assert tuple(b['reach']['0.5']) == (10, 1e13)
  assert b['reach']['0.75'][0] == 20
  assert a['reach']['0.75'][0] == 30
  np.testing.assert_allclose(result['summary']['shapes/gen_accuracy']['tuna2']['mean'],
                             [0.15, 0.3, 0.4])
  assert 'shapes/vqa_majority_baseline' not in result['summary']  # a constant, not a curve

  for metric in ('shapes_vqa_accuracy', 'shapes_gen_accuracy'):
    with Image.open(out / f'{metric}.png') as im:
      assert im.size[0] > 500 and im.size[1] > 200
  report = (out / 'report.md').read_text()
  assert '| tuna2 | 2 | 0.800 ± 0.100 | 0.800 (30) | 20 (2.00e+13) | 30 (3.00e+13) |' in report
  assert '| tuna_r | 2 | 0.800 ± 0.000 | 0.800 (20) | 10 (1.00e+13) | 20 (2.00e+13) |' in report
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['summary']['shapes/vqa_accuracy']['tuna2']['final_mean'] == pytest.approx(0.8)


def test_runs_that_differ_beyond_the_ablated_keys_are_flagged(runs, tmp_path):
  odd = _write_run(tmp_path, 'c/seed0', _config('tuna2_lr', 0, 'patch', lr=3e-3), [0.1] * 3)
  result = compare.compare(runs + [odd], str(tmp_path / 'report'))
  assert len(result['warnings']) == 1
  warning = result['warnings'][0]
  assert odd in warning and 'optim.lr' in warning and '0.003' in warning
  assert 'model.vision' not in warning  # ablated: differs by design
  assert 'Warnings' in (tmp_path / 'report' / 'report.md').read_text()


def test_seeds_of_one_arm_may_differ_only_in_the_seed(tmp_path):
  runs = [_write_run(tmp_path, 'a/seed0', _config('tuna2', 0, 'patch'), [0.2] * 3),
          _write_run(tmp_path, 'a/seed1', _config('tuna2', 1, 'encoder'), [0.2] * 3)]
  warnings = compare.compare(runs, str(tmp_path / 'report'))['warnings']
  assert len(warnings) == 1 and 'model.vision' in warnings[0]


def test_per_seed_paths_are_not_differences(tmp_path):
  def config(arm, seed, vision):
    c = _config(arm, seed, vision)
    c['init_from'] = f'runs/align/seed{seed}' if vision == 'encoder' else ''
    c['ablation']['varies'] = list(KEYS) + ['init_from']
    return c
  runs = [_write_run(tmp_path, 'b/seed0', config('tuna_r', 0, 'encoder'), [0.5] * 3),
          _write_run(tmp_path, 'b/seed1', config('tuna_r', 1, 'encoder'), [0.5] * 3),
          _write_run(tmp_path, 'a/seed0', config('tuna2', 0, 'patch'), [0.5] * 3)]
  assert compare.compare(runs, str(tmp_path / 'report'))['warnings'] == []


def test_different_evaluation_sets_are_flagged(runs, tmp_path):
  other = _write_run(tmp_path, 'b/seed2', _config('tuna_r', 2, 'encoder'), [0.5] * 3,
                     eval_set='xyz')
  warnings = compare.compare(runs + [other], str(tmp_path / 'report'))['warnings']
  assert len(warnings) == 1
  assert 'different evaluation sets' in warnings[0] and 'xyz' in warnings[0] and other in \
      warnings[0]


def test_cli_writes_the_report_and_refuses_a_run_without_history(runs, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu')
  out = tmp_path / 'cli_report'
  proc = subprocess.run([sys.executable, '-m', 'tuna2_jax.compare', *runs, f'--out={out}',
                         '--thresholds=0.5'], capture_output=True, text=True, env=env,
                        cwd=REPO_ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (out / 'report.md').is_file() and (out / 'shapes_vqa_accuracy.png').is_file()

  empty = tmp_path / 'not_a_run'
  empty.mkdir()
  (empty / 'config.json').write_text('{}')
  proc = subprocess.run([sys.executable, '-m', 'tuna2_jax.compare', runs[0], str(empty),
                         f'--out={tmp_path / "r2"}'], capture_output=True, text=True, env=env,
                        cwd=REPO_ROOT, timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and 'eval_history.jsonl' in lines[0] and str(empty) in lines[0]
  assert not (tmp_path / 'r2').exists()  # nothing written
