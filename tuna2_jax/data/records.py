"""The reference JSON-lines record formats, their faults, and the ArrayRecord record encoding.

Record formats (ARCHITECTURE.md; image paths relative to an image root):
  t2i   {"image", "caption"}
  mmu   {"image", "conversations": [{"from": "human"|"gpt"|..., "value"}, ...]}
  edit  {"raw_image", "out_image", "instruction"}
  text  {"conversations": [...]}
A record that cannot be used raises `Fault` with one of FAULT_REASONS; the pipeline counts,
logs (`FaultLog`, rate-limited) and skips it, so one bad line never stops a run.

ArrayRecord records (written by data/convert.py) keep the encoded image bytes as they were:
  uint32 little-endian header length | JSON header | image bytes, in the header's order
with header = {"task", "fields": the record's text fields, "images": [[key, nbytes], ...],
"where": "file:line"}.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import threading

from absl import logging

TASKS = ('t2i', 'mmu', 'edit', 'text')
IMAGE_KEYS = {'t2i': ('image',), 'mmu': ('image',), 'edit': ('raw_image', 'out_image'),
              'text': ()}
TEXT_KEYS = {'t2i': ('caption',), 'mmu': ('conversations',), 'edit': ('instruction',),
             'text': ('conversations',)}
# Every reason a sample can be skipped for; each one is a counter in metrics.jsonl.
FAULT_REASONS = ('bad_json', 'missing_key', 'bad_field', 'missing_image', 'bad_image',
                 'path_escape', 'too_long')
USER_ROLES = ('human', 'user')
ASSISTANT_ROLES = ('gpt', 'assistant')
SYSTEM_ROLES = ('system',)
IMAGE_MARKER = '<image>'  # LLaVA-style placeholder in a turn; the image span replaces it


class Fault(Exception):
  """A record that is skipped: `reason` in FAULT_REASONS, `detail` says what was wrong."""

  def __init__(self, reason: str, detail: str):
    if reason not in FAULT_REASONS:
      raise ValueError(f'fault reason {reason!r}: expected one of {FAULT_REASONS}')
    super().__init__(f'{reason}: {detail}')
    self.reason = reason
    self.detail = detail


class FaultLog:
  """Logs skipped records with their location and reason, rate-limited per reason.

  The first `first` records of each reason are logged, then every `every`-th with its running
  count, so a source with millions of bad records cannot flood the log. The counters in
  metrics.jsonl stay exact: they come from the pipeline's fault markers, not from this log.
  Counts are per process (each worker unpickles a fresh log); the loader threads share one.
  """

  def __init__(self, first: int = 10, every: int = 1000):
    if first < 0 or every < 1:
      raise ValueError(f'FaultLog(first={first}, every={every}): expected first >= 0, every >= 1')
    self.first, self.every = first, every
    self._counts = dict.fromkeys(FAULT_REASONS, 0)
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    return {'first': self.first, 'every': self.every}

  def __setstate__(self, state: dict) -> None:
    self.__init__(**state)

  def __call__(self, where: str, fault: Fault) -> bool:
    """Counts the fault and logs it if it is due; returns whether it was logged."""
    with self._lock:
      self._counts[fault.reason] += 1
      n = self._counts[fault.reason]
    if n > self.first and n % self.every:
      return False
    if n == self.first:
      note = f' (the first {n} {fault.reason} records are logged, then one in {self.every})'
    elif n > self.first:
      note = f' ({fault.reason} record {n} of this process)'
    else:
      note = ''
    logging.warning('skipped record %s: %s%s', where, fault, note)
    return True


def check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f'task {task!r}: expected one of {TASKS}')
  return task


def parse_json_line(line: bytes | str) -> dict:
  try:
    rec = json.loads(line)
  except (ValueError, UnicodeDecodeError) as e:
    raise Fault('bad_json', f'not valid JSON ({e})') from None
  if not isinstance(rec, dict):
    raise Fault('bad_json', f'expected a JSON object, got {type(rec).__name__}')
  return rec


def check_fields(task: str, rec: dict) -> None:
  """Raises Fault unless `rec` has the keys of `task`'s format with values of the right type.

  Text-only records may also be plain documents, {"text": "..."}, trained on in full.
  """
  if task == 'text' and 'conversations' not in rec and isinstance(rec.get('text'), str):
    return
  missing = [k for k in IMAGE_KEYS[task] + TEXT_KEYS[task] if k not in rec or rec[k] is None]
  if missing:
    raise Fault('missing_key', f'{task} record lacks {missing}; has {sorted(rec)}')
  for key in IMAGE_KEYS[task]:
    if not isinstance(rec[key], (str, bytes)) or not rec[key]:
      raise Fault('bad_field', f'{key!r} must be a non-empty image path, got {rec[key]!r:.80}')
  for key in TEXT_KEYS[task]:
    if key == 'conversations':
      conversation_turns(rec[key])
    elif not isinstance(rec[key], str):
      raise Fault('bad_field', f'{key!r} must be a string, got {type(rec[key]).__name__}')


def conversation_turns(conversations) -> list[tuple[str, str]]:
  """[(role, text)] with role in {'system', 'user', 'assistant'}; image markers removed."""
  if not isinstance(conversations, list) or not conversations:
    raise Fault('bad_field', 'conversations must be a non-empty list of turns')
  turns = []
  for n, turn in enumerate(conversations):
    if not isinstance(turn, dict) or 'from' not in turn or 'value' not in turn:
      raise Fault('bad_field', f'turn {n} must be {{"from": ..., "value": ...}}, got {turn!r:.80}')
    role, value = turn['from'], turn['value']
    if not isinstance(value, str):
      raise Fault('bad_field', f'turn {n} value must be a string, got {type(value).__name__}')
    if role in USER_ROLES:
      role = 'user'
    elif role in ASSISTANT_ROLES:
      role = 'assistant'
    elif role in SYSTEM_ROLES:
      role = 'system'
    else:
      raise Fault('bad_field', f'turn {n} role {role!r}: expected one of '
                  f'{USER_ROLES + ASSISTANT_ROLES + SYSTEM_ROLES}')
    turns.append((role, value.replace(IMAGE_MARKER, '').strip()))
  if not any(role == 'assistant' for role, _ in turns):
    raise Fault('bad_field', 'conversation has no assistant turn to train on')
  return turns


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
  return os.path.realpath(root)  # a few lstat calls per path component: once per root


def resolve_image(root: str, rel: str) -> str:
  """The file `rel` names under `root`; Fault('path_escape') for a path that leaves the root."""
  if isinstance(rel, bytes):
    rel = rel.decode('utf-8', 'replace')
  root_abs = _real_root(root)
  path = os.path.realpath(os.path.join(root_abs, rel))
  if os.path.isabs(rel) or os.path.commonpath([root_abs, path]) != root_abs:
    raise Fault('path_escape', f'image path {rel!r} leaves the image root {root!r}')
  return path


def read_image_bytes(root: str, rel: str) -> bytes:
  path = resolve_image(root, rel)
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise Fault('missing_image', f'cannot read image {rel!r} under {root!r} ({e.strerror})') \
        from None


def encode_record(task: str, rec: dict, images: dict[str, bytes], where: str) -> bytes:
  """One ArrayRecord record: the text fields and the encoded image bytes, unchanged."""
  order = list(IMAGE_KEYS[task])
  fields = {k: v for k, v in rec.items() if k not in order}
  header = json.dumps({'task': task, 'fields': fields, 'where': where,
                       'images': [[k, len(images[k])] for k in order]},
                      ensure_ascii=False).encode('utf-8')
  return b''.join([struct.pack('<I', len(header)), header] + [images[k] for k in order])


def decode_record(data: bytes) -> tuple[str, dict, dict[str, bytes], str]:
  """(task, text fields, {image key: encoded bytes}, where) of an encode_record record."""
  try:
    (n,) = struct.unpack_from('<I', data)
    header = json.loads(data[4:4 + n])
    offset, images = 4 + n, {}
    for key, size in header['images']:
      images[key] = data[offset:offset + size]
      offset += size
    if offset != len(data):
      raise ValueError(f'{len(data) - offset} trailing bytes')
  except (struct.error, ValueError, KeyError, TypeError) as e:
    raise Fault('bad_json', f'not a record written by data/convert.py ({e})') from None
  return header['task'], header['fields'], images, header.get('where', '?')
