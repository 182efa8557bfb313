"""The reference JSON-lines record formats, their accepted variants, faults, ArrayRecord records.

Record formats (ARCHITECTURE.md; image paths relative to an image root):
  t2i   {"image", "caption"}
  mmu   {"image", "conversations": [{"from": "human"|"gpt"|..., "value"}, ...]}
  edit  {"raw_image", "out_image", "instruction"}
  text  {"conversations": [...]} or {"text"}
Variants the official loaders also accept, all normalised here (`normalise`) and nowhere else:
  - turns as {"role", "content"} (roles user / assistant / system, as well as human / gpt);
  - a t2i record in conversation form: the prompt is its last user turn;
  - an mmu record in caption form: the caption is the reply to the image, with no question;
  - an edit record without "instruction" (or null): the empty instruction;
  - a number where text is expected (a numeric caption): its str().
A record that cannot be used raises `Fault` with one of FAULT_REASONS; the pipeline and the
converter count, log (`FaultLog`, rate-limited) and skip it, so one bad line never stops a run.
Video records ({"video", ...}, the official video_pairs.jsonl) are refused: video is not
supported.

ArrayRecord records (written by data/build_records.py) keep the encoded image bytes as they were:
  uint32 little-endian header length | JSON header | image bytes, in the header's order
with header = {"task", "fields": the JSON record as it was, "images": [[key, nbytes], ...],
"where": "file:line"}.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
import threading
from typing import Callable

from absl import logging

TASKS = ('t2i', 'mmu', 'edit', 'text')
IMAGE_KEYS = {'t2i': ('image',), 'mmu': ('image',), 'edit': ('raw_image', 'out_image'),
              'text': ()}
# Every reason a sample can be skipped for; each one is a counter in metrics.jsonl.
FAULT_REASONS = ('bad_json', 'bad_text', 'missing_key', 'bad_field', 'unsupported',
                 'missing_image', 'bad_image', 'image_too_large', 'path_escape', 'too_long',
                 'load_error')
USER_ROLES = ('human', 'user')
ASSISTANT_ROLES = ('gpt', 'assistant')
SYSTEM_ROLES = ('system',)
IMAGE_MARKER = '<image>'  # LLaVA-style placeholder in a turn; the image span replaces it
VIDEO_KEY = 'video'  # the official video records' key
# Limits no real record reaches (data.max_text_chars, data.max_image_pixels): a longer text is
# refused before it is tokenized, a larger image before its raster is decoded.
MAX_TEXT_CHARS = 1 << 20
MAX_IMAGE_PIXELS = 1 << 27  # 134M pixels; 16k x 8k panoramas still pass


class Fault(Exception):
  """A record that is skipped: `reason` in FAULT_REASONS, `detail` says what was wrong."""

  def __init__(self, reason: str, detail: str):
    if reason not in FAULT_REASONS:
      raise ValueError(f'fault reason {reason!r}: expected one of {FAULT_REASONS}')
    super().__init__(f'{reason}: {detail}')
    self.reason = reason
    self.detail = detail


def _warn(message: str) -> None:
  logging.warning('%s', message)


class FaultLog:
  """Logs skipped records with their location and reason, rate-limited per reason.

  The first `first` records of each reason are logged, then every `every`-th with its running
  count, so a source with millions of bad records cannot flood the log. The counters in
  metrics.jsonl stay exact: they come from the pipeline's fault markers, not from this log.
  Counts are per process (each worker unpickles a fresh log); the loader threads share one.
  `sink` receives each line (absl's warning log by default; the converter prints to stderr).
  """

  def __init__(self, first: int = 10, every: int = 1000, sink: Callable[[str], None] = _warn):
    if first < 0 or every < 1:
      raise ValueError(f'FaultLog(first={first}, every={every}): expected first >= 0, every >= 1')
    self.first, self.every, self.sink = first, every, sink
    self._counts = dict.fromkeys(FAULT_REASONS, 0)
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    return {'first': self.first, 'every': self.every, 'sink': self.sink}

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
    self.sink(f'skipped record {where}: {fault}{note}')
    return True


def check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f'task {task!r}: expected one of {TASKS}')
  return task


def parse_json_line(line: bytes | str) -> dict:
  if isinstance(line, bytes):
    try:
      line = line.decode('utf-8')
    except UnicodeDecodeError as e:
      raise Fault('bad_text', f'the line is not UTF-8 (byte 0x{line[e.start]:02x} at offset '
                  f'{e.start})') from None
  try:
    rec = json.loads(line)
  except (ValueError, RecursionError) as e:
    raise Fault('bad_json', f'not valid JSON ({type(e).__name__}: {str(e)[:200]})') from None
  if not isinstance(rec, dict):
    raise Fault('bad_json', f'expected a JSON object, got {type(rec).__name__}')
  return rec


@dataclasses.dataclass(frozen=True)
class Record:
  """A normalised record: its image paths by key, and the text of the example data/tasks.py
  formats (t2i {'prompt'}, mmu {'turns'}, edit {'instruction'}, text {'turns'} or {'text'})."""
  images: dict
  text: dict


def _text(value, what: str, max_chars: int) -> str:
  """A text field: a string (a number becomes its str()), valid Unicode, not enormous."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise Fault('bad_field', f'{what} must be a string, got {type(value).__name__}')
  if len(value) > max_chars:
    raise Fault('too_long', f'{what} has {len(value)} characters, more than '
                f'data.max_text_chars={max_chars}')
  try:
    value.encode('utf-8')
  except UnicodeEncodeError as e:
    raise Fault('bad_text', f'{what} holds {value[e.start]!r} at character {e.start}, a lone '
                'surrogate (not valid Unicode text)') from None
  return value


def _image_path(value, key: str) -> str:
  if isinstance(value, list):
    raise Fault('bad_field', f'{key!r} is a list of {len(value)} paths; expected one image path '
                '(multi-image records are not supported)')
  if not isinstance(value, str) or not value:
    raise Fault('bad_field', f'{key!r} must be a non-empty image path, got {value!r:.80}')
  if '\x00' in value:
    raise Fault('bad_field', f'{key!r} image path {value!r:.120} holds a NUL byte')
  return _text(value, f'{key!r} image path', MAX_TEXT_CHARS)


def conversation_turns(conversations, max_chars: int = MAX_TEXT_CHARS, *,
                       need_reply: bool = True) -> list[tuple[str, str]]:
  """[(role, text)] with role in {'system', 'user', 'assistant'}; image markers removed.

  A turn is {"from", "value"} or {"role", "content"}. need_reply: at least one assistant turn
  (the text trained on) is required.
  """
  if not isinstance(conversations, list) or not conversations:
    raise Fault('bad_field', 'conversations must be a non-empty list of turns')
  turns = []
  for n, turn in enumerate(conversations):
    if isinstance(turn, dict) and 'from' in turn and 'value' in turn:
      role, value = turn['from'], turn['value']
    elif isinstance(turn, dict) and 'role' in turn and 'content' in turn:
      role, value = turn['role'], turn['content']
    else:
      raise Fault('bad_field', f'turn {n} must be {{"from": ..., "value": ...}} or {{"role": '
                  f'..., "content": ...}}, got {turn!r:.80}')
    value = _text(value, f'turn {n} text', max_chars)
    if role in USER_ROLES:
      role = 'user'
    elif role in ASSISTANT_ROLES:
      role = 'assistant'
    elif role in SYSTEM_ROLES:
      role = 'system'
    else:
      raise Fault('bad_field', f'turn {n} role {role!r:.40}: expected one of '
                  f'{USER_ROLES + ASSISTANT_ROLES + SYSTEM_ROLES}')
    turns.append((role, value.replace(IMAGE_MARKER, '').strip()))
  if need_reply and not any(role == 'assistant' for role, _ in turns):
    raise Fault('bad_field', 'conversation has no assistant turn to train on')
  if sum(len(text) for _, text in turns) > max_chars:
    raise Fault('too_long', f'the conversation has {sum(len(t) for _, t in turns)} characters, '
                f'more than data.max_text_chars={max_chars}')
  return turns


def _present(rec: dict, key: str) -> bool:
  return rec.get(key) is not None


def normalise(task: str, rec: dict, max_text_chars: int = MAX_TEXT_CHARS) -> Record:
  """The one place where every accepted record variant (module docstring) becomes a Record.

  Raises Fault for anything unusable: a missing key, a value of the wrong type, text that is
  not valid Unicode or longer than max_text_chars, a NUL byte in a path, a video record.
  """
  keys = IMAGE_KEYS[task]
  if task != 'text' and not any(_present(rec, k) for k in keys) and _present(rec, VIDEO_KEY):
    raise Fault('unsupported', f'a video record ({{"{VIDEO_KEY}": {rec[VIDEO_KEY]!r:.60}}}): '
                f'video is not supported; expected {task} records with {list(keys)}')
  missing = [k for k in keys if not _present(rec, k)]
  text_keys = {'t2i': ('caption', 'conversations'), 'mmu': ('conversations', 'caption'),
               'edit': (), 'text': ('conversations', 'text')}[task]
  if text_keys and not any(_present(rec, k) for k in text_keys):
    missing.append(' or '.join(text_keys))
  if missing:
    raise Fault('missing_key', f'{task} record lacks {missing}; has {sorted(rec)[:20]}')
  images = {k: _image_path(rec[k], k) for k in keys}
  if task == 't2i':
    if _present(rec, 'caption'):
      prompt = _text(rec['caption'], "'caption'", max_text_chars)
    else:
      turns = conversation_turns(rec['conversations'], max_text_chars, need_reply=False)
      users = [text for role, text in turns if role == 'user']
      if not users:
        raise Fault('bad_field', 'a t2i conversation needs a user turn (its last one is the '
                    'prompt)')
      prompt = users[-1]
    return Record(images, {'prompt': prompt})
  if task == 'mmu':
    if _present(rec, 'conversations'):
      return Record(images, {'turns': conversation_turns(rec['conversations'], max_text_chars)})
    return Record(images, {'turns': [('assistant',
                                      _text(rec['caption'], "'caption'", max_text_chars))]})
  if task == 'edit':
    instruction = rec.get('instruction')
    return Record(images, {'instruction': '' if instruction is None else
                           _text(instruction, "'instruction'", max_text_chars)})
  if _present(rec, 'conversations'):
    return Record(images, {'turns': conversation_turns(rec['conversations'], max_text_chars)})
  return Record(images, {'text': _text(rec['text'], "'text'", max_text_chars)})


@functools.lru_cache(maxsize=64)
def _abs_root(root: str) -> str:
  return os.path.abspath(root)


def _inside(root_abs: str, path: str) -> bool:
  return os.path.commonpath([root_abs, path]) == root_abs


def resolve_image(root: str, rel: str, absolute_ok: bool = False) -> str:
  """The file `rel` names under `root`; Fault('path_escape') for a path that leaves the root.

  The check is on the normalised path, so `..` cannot climb out of the root while symbolic links
  inside it (an image folder linked to another disk) are followed. An absolute path is allowed
  anywhere when `absolute_ok` (no configured image root, or data.absolute_paths), else only
  inside the root.
  """
  if '\x00' in rel:
    raise Fault('bad_field', f'image path {rel!r:.120} holds a NUL byte')
  root_abs = _abs_root(root)
  if os.path.isabs(rel):
    path = os.path.normpath(rel)
    if absolute_ok or _inside(root_abs, path):
      return path
    raise Fault('path_escape', f'absolute image path {rel!r} is outside the image root {root!r} '
                '(data.absolute_paths=True allows absolute paths anywhere)')
  path = os.path.normpath(os.path.join(root_abs, rel))
  if not _inside(root_abs, path):
    raise Fault('path_escape', f'image path {rel!r} leaves the image root {root!r}')
  return path


def read_image_bytes(root: str, rel: str, absolute_ok: bool = False) -> bytes:
  path = resolve_image(root, rel, absolute_ok)
  try:
    with open(path, 'rb') as f:
      return f.read()
  except (OSError, ValueError) as e:
    raise Fault('missing_image', f'cannot read image {rel!r} under {root!r} '
                f'({getattr(e, "strerror", None) or e})') from None


def encode_record(task: str, rec: dict, images: dict[str, bytes], where: str) -> bytes:
  """One ArrayRecord record: the JSON record as it was and the encoded image bytes, unchanged.

  Raises Fault('bad_text') for text that cannot be written as UTF-8 (normalise refuses it first).
  """
  order = list(IMAGE_KEYS[task])
  try:
    header = json.dumps({'task': task, 'fields': rec, 'where': where,
                         'images': [[k, len(images[k])] for k in order]},
                        ensure_ascii=False).encode('utf-8')
  except UnicodeEncodeError as e:
    raise Fault('bad_text', f'the record holds text that is not valid Unicode ({e.reason})') \
        from None
  return b''.join([struct.pack('<I', len(header)), header] + [images[k] for k in order])


def decode_record(data: bytes) -> tuple[str, dict, dict[str, bytes], str]:
  """(task, JSON record, {image key: encoded bytes}, where) of an encode_record record."""
  try:
    (n,) = struct.unpack_from('<I', data)
    header = json.loads(data[4:4 + n])
    offset, images = 4 + n, {}
    for key, size in header['images']:
      images[key] = data[offset:offset + size]
      offset += size
    if offset != len(data):
      raise ValueError(f'{len(data) - offset} trailing bytes')
    task, fields, where = header['task'], dict(header['fields']), header.get('where', '?')
  except (struct.error, ValueError, KeyError, TypeError, RecursionError) as e:
    raise Fault('bad_json', f'not a record written by data/build_records.py ({e})') from None
  for key in images:  # records written before the paths were kept: the key stands for it
    fields.setdefault(key, key)
  return task, fields, images, where
