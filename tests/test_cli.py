"""The command-line tools work end to end, and refuse bad input in one line without harm.

Each tool runs as a subprocess, as a user runs it. The `slow` tests share one smoke-sized
training run; the refusals that need no trained model use a workdir holding only a config.
"""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cpu_env
from tuna2_jax.data import shapes

REPO = Path(__file__).resolve().parents[1]
CONFIG = 'experiments/shapes.py:runlocal=True'


def _env() -> dict:
  # Other test modules fake 8 devices through XLA_FLAGS; the smoke config expects the real one.
  return cpu_env()


def _run(module: str, *args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', f'tuna2_jax.{module}', *map(str, args)],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _error_line(proc: subprocess.CompletedProcess) -> str:
  """The one 'error: ...' line of a refused command (which must show no traceback)."""
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def _snapshot(root: Path) -> dict:
  """{relative path: (size, sha256)} of every file under root; directories map to None."""
  out = {}
  for path in sorted(root.rglob('*')):
    out[str(path.relative_to(root))] = None
    if path.is_file():
      data = path.read_bytes()
      out[str(path.relative_to(root))] = (len(data), hashlib.sha256(data).hexdigest())
  return out


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp('run')
  # A checkpoint is all these tests need: no evaluation at the end of training.
  _ok(_run('train', f'--config={CONFIG}', f'--workdir={path}', '--config.eval_every=0'))
  return path


@pytest.fixture(scope='module')
def image_size(workdir) -> int:
  return json.loads((workdir / 'config.json').read_text())['data']['image_size']


@pytest.fixture
def scene_png(tmp_path) -> Path:
  """A shapes scene at 64 px, another size than the model's, so the tools must resize it."""
  scene = shapes.sample_scene(np.random.default_rng(0))
  path = tmp_path / 'scene.png'
  Image.fromarray(shapes.render(scene, 64)).save(path)
  return path


@pytest.fixture
def config_only_workdir(tmp_path) -> Path:
  """A workdir whose run wrote its config (as train does) but no checkpoint yet."""
  file, arg = CONFIG.split(':', 1)
  spec = importlib.util.spec_from_file_location('shapes_config', REPO / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  path = tmp_path / 'no_checkpoint'
  path.mkdir()
  (path / 'config.json').write_text(module.get_config(arg).to_json_best_effort(indent=2))
  return path


# --- What a user gets --------------------------------------------------------------------------

@pytest.mark.slow
def test_generate_writes_numbered_pngs_of_the_configured_size(workdir, image_size, tmp_path):
  out = tmp_path / 'gen' / 'img.png'
  proc = _ok(_run('generate', f'--workdir={workdir}', '--prompt', 'a red circle at the center.',
                  f'--out={out}', '--num=2', '--seed=1', '--steps=2', '--sampler=euler',
                  '--cfg_scale=1.5'))
  paths = [tmp_path / 'gen' / 'img_0.png', tmp_path / 'gen' / 'img_1.png']
  assert proc.stdout.split() == [str(p) for p in paths]
  for p in paths:
    with Image.open(p) as im:
      assert (im.format, im.mode, im.size) == ('PNG', 'RGB', (image_size, image_size))


@pytest.mark.slow
def test_generate_edits_a_source_image(workdir, image_size, scene_png, tmp_path):
  out = tmp_path / 'edit.png'
  proc = _ok(_run('generate', f'--workdir={workdir}', '--prompt', 'make the circle blue.',
                  f'--source={scene_png}', f'--out={out}', '--steps=2'))
  assert proc.stdout.split() == [str(out)]
  with Image.open(out) as im:
    assert im.size == (image_size, image_size)


@pytest.mark.slow
def test_understand_prints_an_answer(workdir, scene_png):
  proc = _ok(_run('understand', f'--workdir={workdir}', f'--image={scene_png}',
                  '--question', 'what colour is the circle?', '--max_new_tokens=6'))
  lines = proc.stdout.splitlines()
  assert len(lines) == 1 and lines[0].strip(), proc.stdout


@pytest.mark.slow
def test_evaluate_writes_eval_json(workdir):
  _ok(_run('evaluate', f'--workdir={workdir}'))
  results = json.loads((workdir / 'eval.json').read_text())
  for key in ('shapes/vqa_accuracy', 'shapes/vqa_majority_baseline', 'shapes/gen_accuracy',
              'shapes/gen_untrained_baseline', 'shapes/caption_exact'):
    assert 0.0 <= results[key] <= 1.0, key


# --- Bad input: one error line, nothing written ------------------------------------------------

@pytest.mark.parametrize('overrides, named', [
    (['--config.model.not_a_key=1'], 'not_a_key'),
    (['--config.objective.noise_scale=2'], '--config.flow.noise_scale=2'),  # a key that moved
    (['--config.model.patch_size=5'], 'divisible'),
    (['--config.model.decoder.num_heads=6', '--config.model.decoder.num_kv_heads=6'],
     'num_heads'),
])
def test_train_refuses_a_bad_config(overrides, named, tmp_path):
  workdir = tmp_path / 'run'
  line = _error_line(_run('train', f'--config={CONFIG}', f'--workdir={workdir}', *overrides))
  assert named in line
  assert not workdir.exists()


@pytest.mark.slow
def test_train_refuses_a_workdir_of_another_model_shape(workdir):
  before = _snapshot(workdir)
  config_bytes = (workdir / 'config.json').read_bytes()
  line = _error_line(_run('train', f'--config={CONFIG}', f'--workdir={workdir}',
                          '--config.model.decoder.mlp_dim=96'))
  assert 'model.decoder.mlp_dim: 128 -> 96' in line and 'cannot follow' in line
  assert _snapshot(workdir) == before
  assert (workdir / 'config.json').read_bytes() == config_bytes


@pytest.mark.parametrize('kind', ['missing', 'text'])
def test_understand_refuses_an_unreadable_image(kind, config_only_workdir, tmp_path):
  image = tmp_path / 'not_an_image.png'
  if kind == 'text':
    image.write_text('hello\n')
  before = _snapshot(config_only_workdir)
  line = _error_line(_run('understand', f'--workdir={config_only_workdir}', f'--image={image}',
                          '--question', 'what colour is the circle?'))
  assert str(image) in line
  assert _snapshot(config_only_workdir) == before


@pytest.mark.parametrize('tool, args', [
    ('generate', ['--prompt', 'a red circle at the center.', '--out=OUT/img.png']),
    ('understand', ['--image=IMAGE', '--question', 'what colour is the circle?']),
    ('evaluate', []),
])
def test_tools_refuse_a_workdir_without_checkpoint(tool, args, config_only_workdir, scene_png,
                                                    tmp_path):
  args = [a.replace('OUT', str(tmp_path)).replace('IMAGE', str(scene_png)) for a in args]
  before = _snapshot(config_only_workdir)
  line = _error_line(_run(tool, f'--workdir={config_only_workdir}', *args))
  assert 'checkpoint' in line
  assert _snapshot(config_only_workdir) == before


def test_evaluate_refuses_a_directory_that_is_no_workdir(tmp_path):
  line = _error_line(_run('evaluate', f'--workdir={tmp_path}'))
  assert 'checkpoint' in line and str(tmp_path) in line
  assert not any(tmp_path.iterdir())
