"""Checkpoints of a run: `workdir/checkpoints/<step>/{state,data,meta,checksums}` over one orbax
manager; the workdir may be local or a gs:// URL (tuna2_jax.paths).

Items of a step:
  state      pytree of arrays (parameters, optimizer state, EMA, step counter). It is restored onto
             an abstract target of `jax.ShapeDtypeStruct`s whose `.sharding` decides the layout, so
             a run saved on one mesh resumes on another.
  data       JSON: every process's data iterator position, {'process_count': P, 'per_process':
             [state of process 0, ...]}; `save` gathers them and `restore` hands each process its
             own. A training restore requires it (require_data=True): a resume without it would
             silently restart the data stream. On another process count, the positions are used
             only if they are all equal (the pipeline's row order does not depend on the process
             count, see data/pipeline.py); otherwise restore raises, as the data would not continue.
  meta       optional JSON dict: run totals (FLOPs, wall time, skipped records).
  checksums  JSON: a content checksum of every state array (two uint32 sums of its words, plain
             and position-weighted, computed on the devices, so they do not depend on the mesh)
             and a sha256 of each JSON item; checked on every restore, so a flipped byte that
             still decodes is caught.

Damage: `restore_latest` tries the newest finalized step and, when it is damaged (unreadable
metadata or files, a missing item, a checksum that differs), logs what is damaged and falls back
to the next older step, never silently; the damaged newer steps are deleted only by the first
`save` after it (before it writes), so that the keep-newest policy cannot delete the intact step
in their place. A checkpoint of another model (shapes differ) is not damage: it raises
CheckpointMismatchError and nothing falls back.

Rules that keep checkpoints safe:
  - Reading (`latest_step`, `check`, `restore`, `restore_latest`) never writes, moves or deletes
    anything. A state whose shapes differ from the checkpoint raises CheckpointMismatchError
    before any array is read.
  - `save` deletes old steps (only `keep` are kept), so it runs only on an empty checkpoints dir or
    after the state's shapes were found equal to a finalized step's: a passing `check`/`restore`
    records that, and otherwise the first `save` of this object checks against the newest step.
  - orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` on commit, so
    a save cut off half-way is never listed. Such leftovers are kept on start-up
    (cleanup_tmp_directories=False, as cleaning is a write); a later save of that step replaces one.
  - A local disk without room for the state stops the save before it writes (one line naming
    the workdir and the bytes needed); a write that still runs out of space removes the step's
    temporary folder and raises CheckpointSaveError (other failures are re-raised as they are).
    With async_save such a failure surfaces at the next `save` or `wait`.

`write_config`/`read_config` keep the run's config next to the checkpoints (config_history.py).
On several processes every process calls the Checkpointer methods (orbax syncs them); only
process 0 calls `write_config`.
"""

import errno
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from tuna2_jax import config_history
from tuna2_jax import paths

CHECKPOINTS_DIR = 'checkpoints'
CONFIG_FILE = config_history.CONFIG_FILE
_STATE, _DATA, _META, _SUMS = 'state', 'data', 'meta', 'checksums'
_JSON_ITEMS = (_DATA, _META)
_MAX_LISTED = 5  # mismatching paths named in an error; the rest are counted
_MAX_DETAIL = 300  # characters of a library's error kept in a damage report


class CheckpointMismatchError(ValueError):
  """The checkpoint on disk does not have the shapes of the state it is restored onto."""


class CheckpointDamagedError(ValueError):
  """A finalized step cannot be read back as it was written."""


class CheckpointSaveError(ValueError):
  """A save could not be written (e.g. the disk is full); its temporary folder was removed."""


def _words(x: jax.Array) -> jax.Array:
  """x's bytes as uint32 words (narrower dtypes widened, 8-byte ones split in two)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _array_sums(tree: Any) -> Any:
  """Per leaf: uint32[2] = (sum of words, sum of words * (flat index + 1)), both mod 2**32."""
  def one(x):
    w = jnp.atleast_1d(_words(x))
    index = jax.lax.broadcasted_iota(jnp.uint32, w.shape, 0)
    for axis in range(1, w.ndim):  # the flat (row-major) index, built without a reshape
      index = index * jnp.uint32(w.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, w.shape,
                                                                           axis)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                      jnp.sum(w * (index + jnp.uint32(1)), dtype=jnp.uint32)])
  return jax.tree.map(one, tree)


def state_checksums(state: Any) -> dict[str, str]:
  """{'params/decoder/kernel': '<16 hex digits>', ...}: the content checksum of every array."""
  sums = jax.device_get(_array_sums(state))
  out = {}
  for path, pair in jax.tree_util.tree_flatten_with_path(sums)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    out[name] = f'{int(pair[0]):08x}{int(pair[1]):08x}'
  return out


def json_checksum(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _first_line(e: BaseException) -> str:
  text = ' '.join(str(e).split()) or type(e).__name__
  return f'{type(e).__name__}: {text[:_MAX_DETAIL]}'


def _is_disk_full(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if 'No space left on device' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _tree_nbytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


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


def _single_process_saves_without_replica_slices() -> None:
  """One process writes every array whole, from one replica.

  orbax's replica-parallel saving (its default off GPU) splits each replicated array among its
  replicas, so that several hosts share the writes; within one process it only adds an eager
  slice per array and replica (8 devices: 8 small programs per array at every save). Called
  after jax.distributed is initialised, when the process count is known.
  """
  if jax.process_count() > 1:
    return
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if isinstance(handler, _WholeArrayHandler):
    return
  # orbax logs a warning for every override; this one is meant.
  absl_logger = logging.get_absl_logger()
  absl_logger.addFilter(_drop_override_warning)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, _WholeArrayHandler(), override=True)
  finally:
    absl_logger.removeFilter(_drop_override_warning)


def _drop_override_warning(record) -> bool:
  return 'overriding' not in record.getMessage()


class _WholeArrayHandler(ocp.type_handlers.ArrayHandler):
  """orbax's array handler without replica-parallel saving."""

  def __init__(self):
    super().__init__(use_replica_parallel=False)


class Checkpointer:
  """Saves and restores steps under `workdir/checkpoints`, keeping the newest `keep`."""

  def __init__(self, workdir: str, keep: int, save_every: int, async_save: bool = True):
    if keep < 1:
      raise ValueError(f'keep={keep}: expected at least 1 checkpoint to keep')
    if save_every < 1:
      raise ValueError(f'save_every={save_every}: expected a positive number of steps')
    paths.check_supported(workdir)
    _single_process_saves_without_replica_slices()
    self.workdir = workdir
    root = paths.absolute(workdir)  # orbax's tensorstore layer needs absolute paths
    self.directory = paths.join(root, CHECKPOINTS_DIR)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    # Registering the items up front is what lets a fresh manager read a step's metadata;
    # unregistered items come back as None.
    for item, save_args, restore_args in ((_STATE, ocp.args.StandardSave, ocp.args.StandardRestore),
                                          (_DATA, ocp.args.JsonSave, ocp.args.JsonRestore),
                                          (_META, ocp.args.JsonSave, ocp.args.JsonRestore),
                                          (_SUMS, ocp.args.JsonSave, ocp.args.JsonRestore)):
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
    self._damaged: list[int] = []  # steps restore_latest skipped; deleted by the next save
    self._pending: int | None = None  # step of an asynchronous save not yet waited for
    self._save_bytes = 0  # of the latest save's state

  def wait(self) -> None:
    """Blocks until an asynchronous save has been written and committed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # orbax re-raises the background thread's error
      self._save_failed(self._pending, e)
    self._pending = None

  def _save_failed(self, step: int | None, e: BaseException) -> None:
    """A full disk: removes the half-written step and raises one CheckpointSaveError line.
    Any other failure is re-raised as it is (its temporary folder is kept, as after a crash)."""
    if not _is_disk_full(e):
      raise e
    removed = ''
    if step is not None:
      for name in paths.listdir(self.directory):
        if name.startswith(f'{step}.orbax-checkpoint-tmp'):
          epath.Path(paths.join(self.directory, name)).rmtree(missing_ok=True)
          removed = f'; removed its temporary folder {name}'
    raise CheckpointSaveError(
        f'checkpoint step {step}: no space left on the disk of workdir {self.workdir} (the save '
        f'needs about {self._save_bytes:,} bytes){removed}; the steps already saved are intact. '
        'Free space and resume.') from None

  def _check_free_space(self, step: int, state: Any) -> None:
    """Raises CheckpointSaveError before writing when a local disk cannot hold the state."""
    self._save_bytes = _tree_nbytes(state)
    if not paths.is_local(self.directory):
      return
    existing = self.directory
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < self._save_bytes:
      raise CheckpointSaveError(
          f'checkpoint step {step}: the disk of workdir {self.workdir} has {free:,} bytes free '
          f'and the save needs about {self._save_bytes:,} bytes; nothing was written, the steps '
          'already saved are intact. Free space and resume.')

  def all_steps(self) -> list[int]:
    """Finalized steps on disk, oldest first."""
    self.wait()
    self._manager.reload()  # also sees steps written by another job since start-up
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finalized step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def state_metadata(self, step: int) -> dict:
    """`step`'s state ({'params', 'opt', 'ema', 'step', ...}) as a tree of orbax array metadata
    (shapes, dtypes), read from its metadata alone."""
    return self._manager.item_metadata(step)[_STATE].tree

  def check(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError unless `step` holds exactly the arrays of `abstract_state`."""
    self._check_against(step, shape_signature(abstract_state))

  def _check_against(self, step: int, expected: dict[str, tuple[int, ...]]) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise FileNotFoundError(f'no finalized checkpoint for step {step} in {self.directory}; '
                              f'found steps {steps}')
    try:
      stored_tree = self._manager.item_metadata(step)[_STATE]
    except Exception as e:  # orbax / tensorstore raise their own kinds for unreadable metadata
      raise CheckpointDamagedError(f'step {step}: the metadata of its {_STATE!r} item cannot be '
                                   f'read ({_first_line(e)})') from e
    if stored_tree is None:
      raise CheckpointDamagedError(f'step {step}: no readable {_STATE!r} item metadata')
    stored = shape_signature(stored_tree.tree)
    problems = _mismatches(stored, expected)
    if problems:
      more = len(problems) - _MAX_LISTED
      listed = '\n  '.join(problems[:_MAX_LISTED] + ([f'... and {more} more'] if more > 0 else []))
      raise CheckpointMismatchError(
          f'checkpoint step {step} in workdir {self.workdir} does not match the model '
          f'({len(problems)} array paths differ):\n  {listed}\n'
          'The checkpoint was left untouched; use the config it was written with '
          f'(see {paths.join(self.workdir, CONFIG_FILE)}) or a new workdir.')
    self._verified = expected

  def save(self, step: int, state: Any, data_state: dict | None = None,
           meta: dict | None = None, force: bool = False) -> bool:
    """Saves `state` at `step` if it is a multiple of save_every (or `force`); True if it did.

    With async_save the arrays are copied off the devices before this returns and written in the
    background; `wait()` or the next `save` blocks on it.
    """
    self.wait()  # an earlier asynchronous save's failure stops the run here, named
    for damaged in self._damaged:  # see the module docstring; also what should_save compares to
      logging.warning('deleting damaged checkpoint step %d in %s before saving step %d',
                      damaged, self.directory, step)
      self._manager.delete(damaged)
    self._damaged = []
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
    self._check_free_space(step, state)
    items = {_STATE: ocp.args.StandardSave(state)}
    sums = {_STATE: state_checksums(state)}
    if data_state is not None:
      # Every process takes part in the gather; orbax writes the JSON item from process 0.
      per_process = gather_json(data_state)
      value = {'process_count': len(per_process), 'per_process': per_process}
      items[_DATA], sums[_DATA] = ocp.args.JsonSave(value), json_checksum(value)
    if meta is not None:
      items[_META], sums[_META] = ocp.args.JsonSave(meta), json_checksum(meta)
    items[_SUMS] = ocp.args.JsonSave(sums)
    try:
      # force=True: should_save was asked above; orbax would otherwise ask again.
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
      self._save_failed(step, e)
    self._pending = step
    return saved

  def restore(self, step: int, abstract_state: Any,
              require_data: bool = True) -> tuple[Any, dict | None, dict | None]:
    """(state, data_state, meta) of `step`; arrays get the shardings of `abstract_state`'s leaves.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding`, e.g. from
    `jax.eval_shape` plus the run's shardings. data_state is this process's position; without
    require_data (readers of the parameters only) it and meta are None when not saved.
    Raises CheckpointMismatchError for another model's checkpoint and CheckpointDamagedError
    naming what is damaged (the checksums are checked on every restore).
    """
    self.check(step, abstract_state)
    step_dir = paths.join(self.directory, str(step))
    present = set(paths.listdir(step_dir))
    missing = [item for item in ((_SUMS, _DATA) if require_data else (_SUMS,))
               if item not in present]
    if missing:
      raise CheckpointDamagedError(f'step {step}: its {" and ".join(map(repr, missing))} '
                                   f'item{"s are" if len(missing) > 1 else " is"} missing')
    items = {_STATE: ocp.args.StandardRestore(abstract_state), _SUMS: ocp.args.JsonRestore()}
    # Json items have no orbax metadata, so their presence is read off the step directory.
    for item in _JSON_ITEMS:
      if item in present:
        items[item] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # truncated or deleted files: orbax / tensorstore's own errors
      raise CheckpointDamagedError(f'step {step}: cannot be read ({_first_line(e)})') from e
    self._verify(step, restored, [item for item in _JSON_ITEMS if item in items])
    data_state = None
    if _DATA in items:
      data_state = _own_data_state(restored[_DATA], f'checkpoint step {step} in {self.directory}')
    return restored[_STATE], data_state, restored[_META] if _META in items else None

  def _verify(self, step: int, restored: Any, json_items: list[str]) -> None:
    sums = restored[_SUMS]
    if not isinstance(sums, dict) or not isinstance(sums.get(_STATE), dict):
      raise CheckpointDamagedError(f'step {step}: its {_SUMS!r} item is unreadable')
    for item in _JSON_ITEMS:
      if item in sums and item not in json_items:
        raise CheckpointDamagedError(f'step {step}: its {item!r} item is missing')
    for item in json_items:
      if sums.get(item) != json_checksum(restored[item]):
        raise CheckpointDamagedError(f'step {step}: the content of its {item!r} item differs '
                                     'from its checksum')
    found = state_checksums(restored[_STATE])
    bad = sorted(name for name in found.keys() | sums[_STATE].keys()
                 if found.get(name) != sums[_STATE].get(name))
    if bad:
      more = f' and {len(bad) - _MAX_LISTED} more' if len(bad) > _MAX_LISTED else ''
      raise CheckpointDamagedError(f'step {step}: the content of {len(bad)} array(s) of its '
                                   f'{_STATE!r} item differs from its checksum: '
                                   f'{", ".join(bad[:_MAX_LISTED])}{more}')

  def restore_latest(self, abstract_state: Any, require_data: bool = True
                     ) -> tuple[int, Any, dict | None, dict | None] | None:
    """(step, state, data_state, meta) of the newest intact step; None when there is no step.

    A damaged step is logged (what is damaged, which step is used instead) and skipped; its
    deletion waits for the next save. Raises CheckpointDamagedError when every step is damaged,
    CheckpointMismatchError (no fallback) for another model's checkpoint.
    """
    steps = self.all_steps()
    damage = []
    for step in reversed(steps):
      try:
        state, data_state, meta = self.restore(step, abstract_state, require_data)
      except CheckpointDamagedError as e:
        damage.append(str(e))
        older = [s for s in steps if s < step]
        logging.warning('checkpoint %s damaged: %s; %s', self.directory, e,
                        f'falling back to step {older[-1]}' if older else 'no older step')
        continue
      self._damaged = [s for s in steps if s > step]
      return step, state, data_state, meta
    if damage:
      raise CheckpointDamagedError(
          f'every checkpoint in {self.directory} is damaged: ' + '; '.join(damage) +
          '. Nothing was changed; restore a copy of the checkpoints or use a new workdir.')
    return None

  def close(self) -> None:
    """Waits for a pending save and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_config(workdir: str, config_json: str) -> str:
  """Writes `workdir/config.json` atomically, mode 0644; returns its path."""
  return paths.write_text(paths.join(workdir, CONFIG_FILE), config_json)


def read_config(workdir: str) -> str | None:
  """The text of the newest recorded config of `workdir` (local or a URL), None without one."""
  return config_history.read(workdir)
