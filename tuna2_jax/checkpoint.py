"""Checkpoints of a run: `workdir/checkpoints/<step>/{state,data,meta}` over one orbax manager.

Items of a step:
  state  pytree of arrays (parameters, optimizer state, EMA, step counter). It is restored onto an
         abstract target of `jax.ShapeDtypeStruct`s whose `.sharding` decides the layout, so a run
         saved on one mesh resumes on another.
  data   optional JSON: every process's data iterator position, {'process_count': P,
         'per_process': [state of process 0, ...]}; `save` gathers them and `restore` hands each
         process its own. On another process count, the positions are used only if they are all
         equal (the pipeline's row order does not depend on the process count, see
         data/pipeline.py); otherwise restore raises, as the data would not continue exactly.
  meta   optional JSON dict: config summary, model shape signature.

Rules that keep checkpoints safe:
  - Reading (`latest_step`, `check`, `restore`) never writes, moves or deletes anything. A state
    whose shapes differ from the checkpoint raises CheckpointMismatchError before any array is read.
  - `save` deletes old steps (only `keep` are kept), so it runs only on an empty checkpoints dir or
    after the state's shapes were found equal to a finalized step's: a passing `check`/`restore`
    records that, and otherwise the first `save` of this object checks against the newest step.
  - orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` on commit, so
    a save cut off half-way is never listed. Such leftovers are kept on start-up
    (cleanup_tmp_directories=False, as cleaning is a write); a later save of that step replaces one.

`write_config`/`read_config` keep the run's config next to the checkpoints (`workdir/config.json`).
On several processes every process calls the Checkpointer methods (orbax syncs them); only
process 0 calls `write_config`.
"""

import json
import os
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from tuna2_jax.convert import hf_folder

CHECKPOINTS_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
_STATE, _DATA, _META = 'state', 'data', 'meta'
_MAX_LISTED = 5  # mismatching paths named in an error; the rest are counted


class CheckpointMismatchError(ValueError):
  """The checkpoint on disk does not have the shapes of the state it is restored onto."""


def shape_signature(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/decoder/kernel': (L, D, F), ...} for every array leaf of `tree`.

  Paths are written with '/' and bare key names, so a namedtuple field, a dict key and orbax's
  stored metadata (which turns namedtuples into dicts and tuples into lists) name a leaf alike.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    if not hasattr(leaf, 'shape'):
      raise TypeError(f'state leaf {name!r} is {type(leaf).__name__} {leaf!r}; expected an '
                      'array or jax.ShapeDtypeStruct')
    out[name] = tuple(leaf.shape)
  return out


def _mismatches(stored: dict, expected: dict) -> list[str]:
  lines = []
  for name in sorted(stored.keys() | expected.keys()):
    if name not in stored:
      lines.append(f'{name}: missing from checkpoint, expected shape {expected[name]}')
    elif name not in expected:
      lines.append(f'{name}: in checkpoint with shape {stored[name]}, absent from the target')
    elif stored[name] != expected[name]:
      lines.append(f'{name}: checkpoint shape {stored[name]} != expected shape {expected[name]}')
  return lines


def gather_json(value: Any) -> list:
  """[value of process 0, value of process 1, ...] on every process (JSON-serialisable values)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]


def _own_data_state(stored: Any, where: str) -> Any:
  """This process's entry of a stored data item (see the module docstring)."""
  if not isinstance(stored, dict) or 'per_process' not in stored:
    return stored  # written by one process, before positions were kept per process
  states, count = stored['per_process'], jax.process_count()
  if len(states) == count:
    return states[jax.process_index()]
  if all(s == states[0] for s in states):
    return states[0]
  raise ValueError(
      f'{where}: the data positions were saved by {len(states)} processes and differ, so they '
      f'cannot be split over {count} processes; resume with {len(states)} processes. The '
      'checkpoint was left untouched.')


class Checkpointer:
  """Saves and restores steps under `workdir/checkpoints`, keeping the newest `keep`."""

  def __init__(self, workdir: str, keep: int, save_every: int, async_save: bool = True):
    if keep < 1:
      raise ValueError(f'keep={keep}: expected at least 1 checkpoint to keep')
    if save_every < 1:
      raise ValueError(f'save_every={save_every}: expected a positive number of steps')
    self.workdir = workdir
    root = hf_folder.absolute(workdir)  # orbax's tensorstore layer needs absolute paths
    self.directory = os.path.join(root, CHECKPOINTS_DIR)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    # Registering the items up front is what lets a fresh manager read a step's metadata;
    # unregistered items come back as None.
    for item, save_args, restore_args in ((_STATE, ocp.args.StandardSave, ocp.args.StandardRestore),
                                          (_DATA, ocp.args.JsonSave, ocp.args.JsonRestore),
                                          (_META, ocp.args.JsonSave, ocp.args.JsonRestore)):
      registry.add(item, save_args)
      registry.add(item, restore_args)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Not orbax's default policy: that one also saves the first step whatever its number.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        create=False,  # opening a workdir to read must not create its checkpoints dir; save does
        cleanup_tmp_directories=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    self._verified: dict[str, tuple[int, ...]] | None = None  # shapes matching the newest step

  def wait(self) -> None:
    """Blocks until an asynchronous save has been written and committed."""
    self._manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    """Finalized steps on disk, oldest first."""
    self.wait()
    self._manager.reload()  # also sees steps written by another job since start-up
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finalized step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def check(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError unless `step` holds exactly the arrays of `abstract_state`."""
    self._check_against(step, shape_signature(abstract_state))

  def _check_against(self, step: int, expected: dict[str, tuple[int, ...]]) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise FileNotFoundError(f'no finalized checkpoint for step {step} in {self.directory}; '
                              f'found steps {steps}')
    stored_tree = self._manager.item_metadata(step)[_STATE]
    if stored_tree is None:
      raise CheckpointMismatchError(
          f'checkpoint step {step} in {self.directory} has no {_STATE!r} item; expected one '
          'written by this module. The checkpoint was left untouched.')
    stored = shape_signature(stored_tree.tree)
    problems = _mismatches(stored, expected)
    if problems:
      more = len(problems) - _MAX_LISTED
      listed = '\n  '.join(problems[:_MAX_LISTED] + ([f'... and {more} more'] if more > 0 else []))
      raise CheckpointMismatchError(
          f'checkpoint step {step} in workdir {self.workdir} does not match the model '
          f'({len(problems)} array paths differ):\n  {listed}\n'
          'The checkpoint was left untouched; use the config it was written with '
          f'(see {os.path.join(self.workdir, CONFIG_FILE)}) or a new workdir.')
    self._verified = expected

  def save(self, step: int, state: Any, data_state: dict | None = None,
           meta: dict | None = None, force: bool = False) -> bool:
    """Saves `state` at `step` if it is a multiple of save_every (or `force`); True if it did.

    With async_save the arrays are copied off the devices before this returns and written in the
    background; `wait()` or the next `save` blocks on it.
    """
    if not force and not self._manager.should_save(step):
      return False
    signature = shape_signature(state)
    if self._verified is None:
      latest = self.latest_step()
      if latest is None:
        self._verified = signature  # empty dir: nothing another model could lose
      else:
        self._check_against(latest, signature)
    if signature != self._verified:
      raise CheckpointMismatchError(
          f'save at step {step} in workdir {self.workdir}: the state differs from the one '
          'checked against the checkpoints:\n  ' +
          '\n  '.join(_mismatches(self._verified, signature)[:_MAX_LISTED]) +
          '\nNothing was written.')
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_state is not None:
      # Every process takes part in the gather; orbax writes the JSON item from process 0.
      per_process = gather_json(data_state)
      items[_DATA] = ocp.args.JsonSave({'process_count': len(per_process),
                                        'per_process': per_process})
    if meta is not None:
      items[_META] = ocp.args.JsonSave(meta)
    # force=True: should_save was asked above; orbax would otherwise ask again.
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None, dict | None]:
    """(state, data_state, meta) of `step`; arrays get the shardings of `abstract_state`'s leaves.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding`, e.g. from
    `jax.eval_shape` plus the run's shardings. data_state (this process's) and meta are None
    when not saved.
    """
    self.check(step, abstract_state)
    step_dir = os.path.join(self.directory, str(step))
    items = {_STATE: ocp.args.StandardRestore(abstract_state)}
    # Json items have no orbax metadata, so their presence is read off the step directory.
    for item in (_DATA, _META):
      if os.path.isdir(os.path.join(step_dir, item)):
        items[item] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    data_state = None
    if _DATA in items:
      data_state = _own_data_state(restored[_DATA], f'checkpoint step {step} in {self.directory}')
    return restored[_STATE], data_state, restored[_META] if _META in items else None

  def close(self) -> None:
    """Waits for a pending save and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_config(workdir: str, config_json: str) -> str:
  """Writes `workdir/config.json` atomically (temp file + rename; an object store's single
  write is atomic itself); returns its path."""
  if not hf_folder.is_local(workdir):
    path = epath.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_json)
    return os.fspath(path)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f'.{CONFIG_FILE}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(config_json)
      f.flush()
      os.fsync(f.fileno())  # the rename must not publish a file whose bytes are still in cache
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path


def read_config(workdir: str) -> str | None:
  """The text of `workdir/config.json` (a local path or a URL), or None when it has none."""
  path = epath.Path(workdir) / CONFIG_FILE
  return path.read_text() if path.exists() else None
