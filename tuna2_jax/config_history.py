"""The configs a workdir was trained with: `config.json` (the first) and `config.<step>.json`.

A resumed run whose config differs from the newest recorded one writes `config.<step>.json`
(step = the checkpoint it resumes from) beside the first and logs the changed keys; config.json
itself is never rewritten. A change that cannot resume is refused before anything is read or
written, naming the keys: the model's shape (its parameters would not fit the checkpoint) and
the parameters trained (the optimizer state would not). `read` gives the newest recorded config.
"""

from __future__ import annotations

import json
import re

from absl import logging

from tuna2_jax import config_lib
from tuna2_jax import paths

CONFIG_FILE = 'config.json'
_STEP_FILE = re.compile(r'config\.(\d+)\.json')
# Keys (dotted prefixes) a resumed run must keep. model.dtype, .remat and .attention only change
# how the same parameters are computed, so they are not here.
FIXED_ON_RESUME = ('model.vision', 'model.patch_size', 'model.vocab_size', 'model.time_embed_freqs',
                   'model.decoder', 'model.head', 'model.encoder', 'optim.trainable',
                   'data.worker_count')
_HINTS = {'data.worker_count': 'the data-iterator state is kept per worker, so grain cannot '
                               'continue it with another count'}
_MAX_LISTED = 8  # changed keys named in a log line or an error; the rest are counted


def flatten(tree: dict, prefix: str = '') -> dict[str, object]:
  """{'a.b.c': value} for a nested dict."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def changes(old: dict, new: dict) -> dict[str, tuple[object, object]]:
  """{dotted key: (old value, new value)} of every key that differs; a missing side is None."""
  a, b = flatten(old), flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _listed(diff: dict) -> str:
  items = [f'{k}: {old!r} -> {new!r}' for k, (old, new) in diff.items()]
  more = len(items) - _MAX_LISTED
  return '; '.join(items[:_MAX_LISTED] + ([f'... and {more} more'] if more > 0 else []))


def recorded(workdir: str) -> list[tuple[int, str]]:
  """[(step, path), ...] of the recorded configs, oldest first; config.json has step 0."""
  out = []
  for name in paths.listdir(workdir):
    if name == CONFIG_FILE:
      out.append((0, paths.join(workdir, name)))
    elif m := _STEP_FILE.fullmatch(name):
      out.append((int(m.group(1)), paths.join(workdir, name)))
  return sorted(out)


def read(workdir: str) -> str | None:
  """The text of the newest recorded config, or None when the workdir has none; a config
  recorded before a key moved reads with it moved (config_lib.RENAMED_KEYS)."""
  history = recorded(workdir)
  if not history:
    return None
  text = paths.read_text(history[-1][1])
  tree = json.loads(text)
  if not set(flatten(tree)) & set(config_lib.RENAMED_KEYS):
    return text
  return json.dumps(config_lib.upgrade(tree), indent=2)


def check_resumable(workdir: str, config_json: str, step: int) -> None:
  """Raises ValueError naming the keys when config_json changes a FIXED_ON_RESUME key."""
  stored = read(workdir)
  if stored is None:
    return
  diff = changes(json.loads(stored), json.loads(config_json))
  fixed = {k: v for k, v in diff.items()
           if any(k == p or k.startswith(p + '.') for p in FIXED_ON_RESUME)}
  if fixed:
    hints = ''.join(f' ({k}: {_HINTS[k]})' for k in fixed if k in _HINTS)
    flags = ' '.join(f'--config.{k}={old}' for k, (old, _) in fixed.items() if old is not None)
    raise ValueError(
        f'workdir {workdir} resumes from step {step}, but the config changes {len(fixed)} '
        f'key(s) a checkpoint cannot follow: {_listed(fixed)}{hints}. Resume with the recorded '
        f'values ({flags}; see {recorded(workdir)[-1][1]}) or use a new workdir; nothing was '
        'written.')


def record(workdir: str, config_json: str, step: int) -> str | None:
  """Writes config.json on a new workdir, or config.<step>.json when a resumed run's config
  differs from the newest recorded one (logging the changed keys); returns the path written."""
  stored = read(workdir)
  if stored is None:
    return paths.write_text(paths.join(workdir, CONFIG_FILE), config_json)
  diff = changes(json.loads(stored), json.loads(config_json))
  if not diff:
    return None
  path = paths.write_text(paths.join(workdir, f'config.{step}.json'), config_json)
  logging.warning('resuming at step %d with %d changed config key(s): %s; recorded in %s', step,
                  len(diff), _listed(diff), path)
  return path
