"""Fault injection: a corpus with 30% bad records of every kind trains from JSON lines and from
ArrayRecord without a crash, and the skip counters in metrics.jsonl equal the injected counts.

The counters are totals over every record the run read, so the expected counts come from the
records themselves: each line of the corpus carries the reason it must be skipped for (or none),
and the run's record order (the stream's seeded shuffle) and the number of records it read (the
data iterator's position after the 20 steps) say which lines were read how often.
"""

import collections
import io
import json
import os
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

import fake_data
from conftest import load_experiment
from test_data_records import png_header_only
from tuna2_jax import train
from tuna2_jax.data import build_records, packing, pipeline, records
from tuna2_jax.data.tokenizer import Tokenizer

STEPS = 20
GOOD = 30  # with the 13 bad records below: 30% bad


def _jpeg_bytes(rng, height, width) -> bytes:
  buf = io.BytesIO()
  fake_data.scene_image(rng, height, width)[1].save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def write_faulty_corpus(root: str) -> tuple[str, list[str | None]]:
  """A t2i JSON-lines file under root and, per line, the reason it is skipped for (None: kept).

  Besides the bad records it holds a 16-bit grayscale PNG, which must train (not be skipped).
  """
  rng = np.random.default_rng(0)
  good = fake_data.write_images(root, GOOD)  # also images/corrupt.jpg and ../outside.png
  img = lambda name: os.path.join(root, 'images', name)
  ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
  Image.fromarray(ramp).save(img('gray16.png'))
  open(img('empty.jpg'), 'wb').close()
  jpeg = _jpeg_bytes(rng, 96, 96)
  with open(img('truncated.jpg'), 'wb') as f:
    f.write(jpeg[:len(jpeg) // 2])
  with open(img('notes.png'), 'w', encoding='utf-8') as f:
    f.write('these are notes, not an image\n')
  with open(img('bomb.png'), 'wb') as f:
    f.write(png_header_only(12_000, 12_000))  # 144M pixels > data.max_image_pixels
  caption = 'a red circle.'
  line = lambda image, text=caption: json.dumps({'image': image, 'caption': text})
  bad = [
      ('{"image": "images/0.jpg", "caption": ', 'bad_json'),
      (json.dumps({'image': 'images/0.jpg'}), 'missing_key'),
      (line('images/missing.jpg'), 'missing_image'),
      (line('images/empty.jpg'), 'bad_image'),
      (line('images/truncated.jpg'), 'bad_image'),
      (line('images/notes.png'), 'bad_image'),
      (line('../outside.png'), 'path_escape'),
      (line('images/0.jpg\x00.png'), 'bad_field'),
      ('{"image": "images/0.jpg", "caption": "a \\ud83d circle."}', 'bad_text'),
      ('{"image": "images/0.jpg", "caption": "caf\udce9 circle."}', 'bad_text'),  # Latin-1 byte
      (line('images/0.jpg', 'x' * (records.MAX_TEXT_CHARS + 1)), 'too_long'),
      (line('images/bomb.png'), 'image_too_large'),
      (line('images/1.png', 'a red circle. ' * 40), 'too_long'),  # more tokens than seq_len
  ]
  # Of these, the converter finds all but the last (it does not know seq_len).
  lines = [(line(rel, cap), None) for rel, cap in good[:-1]] + [(line('images/gray16.png'), None)]
  assert len(bad) / (len(bad) + len(lines)) == pytest.approx(0.3, abs=0.01)
  order = np.random.default_rng(1).permutation(len(lines) + len(bad))
  everything = [(lines + bad)[i] for i in order]
  path = os.path.join(root, 't2i.jsonl')
  with open(path, 'wb') as f:
    for text, _ in everything:
      f.write(text.encode('utf-8', 'surrogateescape') + b'\n')
  return path, [reason for _, reason in everything]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('faulty')
  os.makedirs(root / 'data')
  return write_faulty_corpus(str(root / 'data'))


@pytest.fixture(scope='module')
def tok():
  return Tokenizer.load()


def _config(spec: str):
  c = load_experiment('tuna2_data', 'runlocal=True')
  c.data.update(t2i=spec, mmu='', edit='', text='')
  c.data.pack_bins = 1  # one row per window: the iterator's position is exactly the records read
  c.batch_size = jax.device_count()
  c.objective.caption_dropout = 0.0  # a dropped caption would make the too-long record fit
  c.optim.schedule = 'constant'  # as test_data_pipeline's runs: the same compiled step
  c.update(total_steps=STEPS, log_every=STEPS, checkpoint_every=STEPS, eval_every=10 * STEPS)
  return c


def _line_of(item) -> int:
  """The JSON-lines line number a stream item came from (ArrayRecord records keep it)."""
  where, payload = item
  if isinstance(payload, bytes) and not where.rpartition(':')[2].isdigit():
    where = records.decode_record(payload)[3]
  return int(where.rpartition(':')[2])


def _expected_skips(config, tok, labels) -> collections.Counter:
  """The injected reasons of the records a run of STEPS steps reads, counted."""
  it = iter(pipeline.train_dataset(config, tok))
  for _ in range(STEPS):
    next(it)
  state = it.get_state()
  assert state['emitted'] == 0  # at a window boundary: every record before it was counted
  read = state['parent']['next_index']
  items, _, _ = pipeline.stream_parts(config, 't2i', config.data.t2i, tok, process_index=0,
                                      process_count=1)
  assert read > 2 * len(labels)  # the run went through the corpus more than twice
  return collections.Counter(labels[_line_of(items[i]) - 1] for i in range(read)) - \
      collections.Counter({None: read})


def _train(config, workdir) -> dict:
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    train.train(config, str(workdir))
  (last,) = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert last['step'] == STEPS and np.isfinite(last['loss'])
  return {k[len(packing.SKIPPED_PREFIX):]: v for k, v in last.items()
          if k.startswith(packing.SKIPPED_PREFIX) and v}


@pytest.mark.slow
def test_json_lines_with_every_kind_of_bad_record_train_with_exact_skip_counts(corpus, tok,
                                                                              tmp_path):
  path, labels = corpus
  config = _config(path)
  expected = _expected_skips(config, tok, labels)
  assert set(expected) == set(r for r in labels if r)  # every kind was read
  assert _train(config, tmp_path / 'run') == dict(expected)


@pytest.mark.slow
def test_array_record_conversion_and_training_count_every_bad_record_exactly(corpus, tok,
                                                                            tmp_path):
  path, labels = corpus
  out = str(tmp_path / 'ar')
  assert build_records.main(['--jsonl', path, '--task', 't2i', '--output', out,
                             '--num_shards', '2', '--workers', '0']) == 0
  meta = json.load(open(os.path.join(out, 'meta.json')))
  injected = collections.Counter(r for r in labels if r)
  # The converter skips every bad record but the one too long for seq_len, which it cannot know.
  assert meta['skipped'] == dict(injected - collections.Counter(too_long=1))
  assert meta['records'] == GOOD + 1
  config = _config(out)
  expected = _expected_skips(config, tok, labels)
  assert set(expected) == {'too_long'}
  assert _train(config, tmp_path / 'run') == dict(expected)
