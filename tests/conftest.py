"""Shared test set-up: eight fake CPU devices, the repo root importable, a `slow` marker.

XLA_FLAGS and JAX_PLATFORMS only take effect before jax is first imported, which is why they are
set at the top of this file (pytest imports conftest.py before any test module). A persistent
compilation cache, private to the session, lets the several tiny training runs of
test_training.py compile their (identical) programs once.
"""

import os
import shutil
import sys
import tempfile

# The tests' programs are tiny, so compiling them is most of their time: LLVM's optimisation
# off halves it, and XLA:CPU's older elemental emitter in place of its fusion emitters takes off
# about as much again (a train step of the shapes smoke config: 13.8 -> 6.4 -> 3.6 s).
# Subprocesses get the same through cpu_env().
CPU_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {CPU_XLA_FLAGS}')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix='tuna2_jax_test_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
else:
  _CACHE_DIR = None

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def cpu_env(devices: int | None = None, **extra) -> dict:
  """The environment of a CPU subprocess: this one's, with `devices` fake devices (None: one)."""
  flags = CPU_XLA_FLAGS + (f' --xla_force_host_platform_device_count={devices}' if devices
                           else '')
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags, **extra)


# The slowest files first (seconds of a whole run here, most first): pytest-xdist's --dist
# loadfile hands files to its workers in collection order, so the long ones start at once and
# the short ones fill in behind them instead of one long file ending the run alone.
SLOW_FILES = ('test_cli.py', 'test_attention_kernels.py', 'test_sharding.py', 'test_benchmarks.py',
              'test_multihost.py', 'test_data_pipeline.py', 'test_training.py',
              'test_ablations.py', 'test_real_data_eval.py', 'test_stages.py', 'test_gcs.py',
              'test_tpu_compile.py', 'test_data_faults.py', 'test_sampling.py')


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: runs a whole (tiny) training or sampling loop')


def pytest_unconfigure(config):
  if _CACHE_DIR is not None:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


from tuna2_jax import config_lib  # noqa: E402  (after the XLA flags above)


def load_experiment(name: str, arg: str | None = None):
  """get_config(arg) of experiments/<name>.py, loaded by path as --config=<file>:<arg> does."""
  path = os.path.join(REPO_ROOT, 'experiments', f'{name}.py')
  return config_lib.load(f'{path}:{arg}' if arg else path)


def perturbed_params(model, scale: float = 0.05, seed: int = 0):
  """Adds N(0, scale^2) to every parameter of `model` in place.

  Zero-initialised layers (the flow head's output and AdaLN) would otherwise make x_hat
  identically zero and every test of the head's dependencies vacuous.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  rng = np.random.default_rng(seed)
  # On the host: one small compiled program per parameter shape would cost seconds on a CPU.
  params = jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype),
      nnx.state(model, nnx.Param))
  nnx.update(model, params)
  return model


def train_losses(config, mesh, steps: int) -> list[float]:
  """The losses of steps 1..steps as train.train's loop computes them, run in-process on mesh."""
  import jax
  from tuna2_jax import sharding, train, train_state
  from tuna2_jax.data import pipeline
  from tuna2_jax.data.tokenizer import Tokenizer
  _, _, _, step_fn = train.setup(config, mesh)
  state = train_state.create_sharded_state(config, mesh)
  data = iter(pipeline.train_dataset(config, Tokenizer.for_config(config)))
  key = jax.random.key(config.seed)
  losses = []
  for _ in range(steps):
    batch = sharding.global_batch(next(data), mesh, config.sharding_rules)
    state, aux = step_fn(state, batch, key)
    losses.append(float(aux['loss']))
  return losses
