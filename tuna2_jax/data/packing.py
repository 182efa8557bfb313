"""First-fit packing of variable-length samples into fixed-length rows, with exact resume.

Samples (data/sequence.py layout, of mixed tasks and resolutions) are placed whole, so an image
span is never split: each goes into the first of up to `num_bins` open rows with room, in
tokens and in image spans (at most `max_spans` per row, model.max_spans). A sample
that fits none of them closes the window: its rows are emitted in order and the sample opens the
next window. `sequence.pack` lays each row out (segments 1..n, span ids renumbered per row).

Fault markers ({FAULT_KEY: reason index, STREAM_KEY: the stream's task id}, from records the
loader skipped) are counted and the counts ride on the first row of their window as
'skipped/<reason>' scalars, so the counters reach the trainer through any number of worker
processes; SkippedRecords takes them off again and keeps the totals. A stream whose last
`max_consecutive_faults` records were all skipped stops the run with an error naming it (its
data went missing or unreadable mid-run).

The iterator state is (parent state at the window's start, rows already emitted from it):
restoring re-reads and re-packs that window and drops the emitted rows, so a resumed iterator
yields exactly the rows an uninterrupted one would, without storing any sample in the state.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from tuna2_jax import layout
from tuna2_jax.data import records
from tuna2_jax.data import sequence as seq

FAULT_KEY = 'fault'
STREAM_KEY = 'fault_stream'
SKIPPED_PREFIX = 'skipped/'
SKIPPED_KEYS = tuple(SKIPPED_PREFIX + r for r in records.FAULT_REASONS)


def fault_marker(reason: str, stream: int = 0) -> dict:
  """A skipped record of the stream with task id `stream` (layout.TASK_IDS; 0: unnamed)."""
  return {FAULT_KEY: np.int32(records.FAULT_REASONS.index(reason)), STREAM_KEY: np.int32(stream)}


def _stream_name(stream: int, stream_names: dict) -> str:
  name = next((t for t, i in layout.TASK_IDS.items() if i == stream), None)
  return stream_names.get(name, f'the {name} stream') if name else 'the data'


class FirstFitPackIterDataset(grain.IterDataset):
  """Samples -> rows of seq_len tokens (layout.FIELDS plus SKIPPED_KEYS scalars)."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, num_bins: int, patch_size: int,
               pad_id: int, max_consecutive_faults: int = 10_000,
               stream_names: dict | None = None, max_spans: int | None = None):
    """stream_names: {task: how the error names its stream}, e.g. {'mmu': "data.mmu='a.jsonl'"}."""
    super().__init__(parent)
    if num_bins < 1:
      raise ValueError(f'num_bins={num_bins}: expected at least 1 open row')
    if max_consecutive_faults < 1:
      raise ValueError(f'max_consecutive_faults={max_consecutive_faults}: expected >= 1')
    self._kw = dict(seq_len=seq_len, num_bins=num_bins, patch_size=patch_size, pad_id=pad_id,
                    max_consecutive_faults=max_consecutive_faults,
                    max_spans=max_spans or seq_len,
                    stream_names=dict(stream_names or {}))

  def __iter__(self) -> '_PackIterator':
    return _PackIterator(self._parent.__iter__(), **self._kw)

  def __str__(self) -> str:
    return f'FirstFitPackIterDataset({self._kw})'


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, num_bins: int,
               patch_size: int, pad_id: int, max_consecutive_faults: int, stream_names: dict,
               max_spans: int):
    super().__init__(parent)
    self._stream_names = stream_names
    # Skipped records of each stream since its last sample; kept across windows (not in the
    # state: a resumed run counts afresh, which only delays the error).
    self._consecutive: dict[int, int] = {}
    self._seq_len, self._num_bins, self._max_spans = seq_len, num_bins, max_spans
    self._patch_size, self._pad_id = patch_size, pad_id
    self._max_faults = max_consecutive_faults
    self._rows: list[dict] = []  # rows of the current window
    self._emitted = 0  # of them already returned
    self._window_state: Any = None  # parent state before the window's first sample
    self._carry: tuple[Any, dict] | None = None  # (parent state before it, sample)
    self._skip = 0  # rows to drop from the next window (set by set_state)
    self._exhausted = False

  def _fill_window(self) -> None:
    if self._carry is not None:
      start, first = self._carry
      bins = [[first]]
      used = [len(first['tokens'])]
      spans = [seq.image_spans(first)]
    else:
      start, bins, used, spans = self._parent.get_state(), [], [], []
    self._carry = None
    faults = np.zeros(len(records.FAULT_REASONS), np.int64)
    while True:
      before = self._parent.get_state()
      try:
        el = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      if FAULT_KEY in el:
        faults[int(el[FAULT_KEY])] += 1
        stream = int(el.get(STREAM_KEY, 0))
        self._consecutive[stream] = self._consecutive.get(stream, 0) + 1
        if self._consecutive[stream] >= self._max_faults:
          raise RuntimeError(
              f'{_stream_name(stream, self._stream_names)}: its last {self._consecutive[stream]} '
              'records were all skipped (this window\'s skips by reason: '
              f'{ {r: int(c) for r, c in zip(records.FAULT_REASONS, faults) if c} }); see the '
              'logged record locations and check the data paths')
        continue
      self._consecutive[int(el['task'][0])] = 0
      n, k = len(el['tokens']), seq.image_spans(el)
      if n > self._seq_len or k > self._max_spans:
        raise ValueError(f'a sample of {n} tokens and {k} image spans exceeds seq_len='
                         f'{self._seq_len} or max_spans={self._max_spans}; the loader should '
                         'have skipped it')
      for b, u in enumerate(used):
        if u + n <= self._seq_len and spans[b] + k <= self._max_spans:
          bins[b].append(el)
          used[b] += n
          spans[b] += k
          break
      else:
        if len(bins) < self._num_bins:
          bins.append([el])
          used.append(n)
          spans.append(k)
        else:
          self._carry = (before, el)
          break
    rows = [seq.pack(b, self._seq_len, patch_size=self._patch_size, pad_id=self._pad_id)
            for b in bins]
    if faults.any() and not rows:  # faults at the very end of a finite source
      rows = [seq.empty_row(self._seq_len, self._patch_size, self._pad_id)]
    for i, row in enumerate(rows):
      counts = faults if i == 0 else np.zeros_like(faults)
      row.update({k: np.int32(c) for k, c in zip(SKIPPED_KEYS, counts)})
    self._window_state, self._rows = start, rows
    self._emitted = min(self._skip, len(rows))
    self._skip = 0

  def __next__(self) -> dict:
    while self._emitted >= len(self._rows):
      if self._exhausted:
        raise StopIteration
      self._fill_window()
    row = self._rows[self._emitted]
    self._emitted += 1
    return row

  def get_state(self) -> dict:
    if self._emitted < len(self._rows):
      return {'parent': self._window_state, 'emitted': self._emitted}
    if self._carry is not None:  # the window is done; the next one starts at the carried sample
      return {'parent': self._carry[0], 'emitted': 0}
    return {'parent': self._parent.get_state(), 'emitted': 0}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state['parent'])
    self._rows, self._emitted, self._carry = [], 0, None
    self._skip, self._exhausted = int(state['emitted']), False


class SkippedRecords:
  """The one owner of skipped-record counts: takes them off batches, keeps the totals.

  The SKIPPED_KEYS scalars ride on rows (the only way out of grain's worker processes); `take`
  removes them from each batch, so the batch that goes to the devices holds only
  layout.FIELDS. `figures` are the totals summed over all processes plus those of the runs a
  resumed run continues (`resumed`, a checkpoint's meta), so the counts in metrics.jsonl and in
  the next checkpoint count from the start of training, not from the last restart. `seen` says
  whether any batch carried counts (data without a mixture has none; nothing is logged then).
  """

  def __init__(self, resumed: dict | None = None):
    resumed = resumed or {}  # checkpoints from before the counts were saved count from zero
    self._resumed = {k: float(resumed[k]) for k in SKIPPED_KEYS if k in resumed}
    self._local = np.zeros(len(SKIPPED_KEYS), np.int64)  # this process's, since this run began
    self.seen = False

  def take(self, batch: dict) -> None:
    """Removes the counts from `batch` (a row or a batch of rows) and adds them up."""
    if SKIPPED_KEYS[0] not in batch:
      return
    self.seen = True
    for i, key in enumerate(SKIPPED_KEYS):
      self._local[i] += int(np.sum(batch.pop(key)))

  def figures(self, process_count: int = 1) -> dict[str, float]:
    """{'skipped/<reason>': count}: every process must call this at the same step."""
    counts = self._local
    if process_count > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(
          -1, len(counts)).sum(0)
    return {k: float(c) + float(self._resumed.get(k, 0.0)) for k, c in zip(SKIPPED_KEYS, counts)}
