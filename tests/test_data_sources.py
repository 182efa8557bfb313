"""Real-data sources: every record format, faults, buckets, the converter, TFDS, clear errors."""

import collections
import io
import json
import logging
import os
import sys
import types

import grain
import numpy as np
import pytest
from PIL import Image

import fake_data
from conftest import load_experiment
from tuna2_jax.data import build_records, images, packing, pipeline, records, sources, tasks
from tuna2_jax.data import sequence as seq
from tuna2_jax.data.tokenizer import Tokenizer

BUCKETS = ((64, 64), (48, 80), (80, 48))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  return fake_data.write_corpus(str(root))


@pytest.fixture(scope='module')
def tok():
  return Tokenizer.load()


def _config(**streams):
  c = load_experiment('tuna2_data', 'runlocal=True')
  c.data.update(streams)
  return c


def _load_all(task, path):
  """Every record of a stream in file order: (where, example) or the Fault raised."""
  items = sources.open_stream(task, path)
  loader = sources.stream_loader(task, path, '', BUCKETS)
  out = []
  for i in range(len(items)):
    try:
      out.append(loader(items[i]))
    except records.Fault as f:
      out.append(f)
  return out


def test_t2i_record_layout(corpus, tok):
  where, ex = _load_all('t2i', corpus['t2i'])[0]
  assert where.endswith('t2i.jsonl:1')
  assert ex['image'].dtype == np.uint8 and ex['image'].shape == (64, 64, 3)  # 80 x 80 source
  s = tasks.format_example(ex, tok, 16)
  caption = tok.encode(ex['prompt'])
  n = len(caption)
  assert list(s['tokens'][:n + 2]) == [tok.bos_id] + caption + [tok.boi_id]
  assert s['is_time'][n + 2] and s['is_patch'][n + 3:n + 3 + 16].all()
  assert s['gen_mask'][n + 2:n + 3 + 16].all()
  assert list(s['tokens'][-2:]) == [tok.eoi_id, tok.eos_id]
  assert s['loss_mask'].sum() == 0  # captions condition, never trained


def test_unicode_caption_is_read(corpus, tok):
  _, ex = _load_all('t2i', corpus['t2i'])[1]
  assert ex['prompt'].startswith('ünïcödé ✓ 日本 ')
  assert len(tasks.format_example(ex, tok, 16)['tokens']) > 20


def test_multi_turn_conversation_trains_only_assistant_turns(corpus, tok):
  _, ex = _load_all('mmu', corpus['mmu'])[0]
  assert ex['turns'][0] == ('user', 'what colour is the circle?')  # <image> marker removed
  s = tasks.format_example(ex, tok, 16)
  assert s['span_ids'].max() == 1 and s['gen_mask'].sum() == 0
  trained = s['targets'][s['loss_mask'] > 0]
  assert list(trained) == tok.encode('red.') + [tok.eos_id] + tok.encode('two.') + [tok.eos_id]
  e = tok.encode
  want = ([tok.bos_id, tok.boi_id] + [tok.img_id] * 17 + [tok.eoi_id] +
          e('user: what colour is the circle?') + e('assistant:') + e('red.') + [tok.eos_id] +
          e('user: how many objects are there?') + e('assistant:') + e('two.') + [tok.eos_id])
  assert list(s['tokens']) == want


def test_edit_record_has_a_clean_source_and_a_generated_target(corpus, tok):
  _, ex = _load_all('edit', corpus['edit'])[1]
  assert ex['source'].shape == (48, 80, 3) and ex['target'].shape == (80, 48, 3)
  s = tasks.format_example(ex, tok, 16)
  assert set(np.unique(s['span_ids'])) == {0, 1, 2}
  assert not s['gen_mask'][s['span_ids'] == 1].any() and s['gen_mask'][s['span_ids'] == 2].all()


def test_text_records_conversations_and_documents(corpus, tok):
  loaded = _load_all('text', corpus['text'])
  conv, doc = loaded[0][1], loaded[-1][1]
  assert 'turns' in conv and doc['text']
  s = tasks.format_example(doc, tok, 16)
  assert s['loss_mask'].sum() == len(tok.encode(doc['text'])) + 1  # the text and its EOS
  assert not s['is_patch'].any()


def test_every_fault_is_detected_with_its_reason_and_line(corpus, tok):
  config = _config(t2i=corpus['t2i'])
  items = sources.open_stream('t2i', corpus['t2i'])
  loader = sources.stream_loader('t2i', corpus['t2i'], '', config.data.buckets)
  make = pipeline.SampleMaker(loader, tok, 16, config.seq_len, 0.0, 0, 1)
  got = [make(i, items[i]) for i in range(len(items))]
  reasons = [records.FAULT_REASONS[int(g[packing.FAULT_KEY])] for g in got
             if packing.FAULT_KEY in g]
  assert collections.Counter(reasons) == collections.Counter(r for _, r in fake_data.BAD_T2I)
  assert len(got) == 8 + len(fake_data.BAD_T2I)  # the blank line is not a record


def test_path_escape_is_rejected(tmp_path):
  (tmp_path / 'a').mkdir()
  assert records.resolve_image(str(tmp_path), 'a/../a/x.png').endswith('a/x.png')
  for bad in ('../x.png', 'a/../../x.png', '/etc/passwd'):
    with pytest.raises(records.Fault, match='path_escape'):
      records.resolve_image(str(tmp_path), bad)


def test_missing_fields_and_bad_conversations():
  with pytest.raises(records.Fault, match='missing_key'):
    records.normalise('edit', {'raw_image': 'a.png', 'instruction': 'x'})
  for conv in ([], [{'from': 'human', 'value': 'hi'}], [{'from': 'robot', 'value': 'x'}],
               [{'from': 'gpt'}], 'hello'):
    with pytest.raises(records.Fault, match='bad_field'):
      records.normalise('mmu', {'image': 'a.png', 'conversations': conv})


@pytest.mark.parametrize('hw,bucket', [((100, 100), (64, 64)), ((60, 100), (48, 80)),
                                       ((100, 55), (80, 48)), ((10, 500), (48, 80)),
                                       ((90, 100), (64, 64))])
def test_bucket_is_the_nearest_aspect_ratio(hw, bucket):
  assert images.choose_bucket(*hw, BUCKETS) == bucket


@pytest.mark.parametrize('resampler', images.RESAMPLERS)
@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_resize_keeps_the_centre_and_crops_the_sides(fmt, resampler):
  # 128 x 256 (1:2) onto 64 x 64: the left and right quarters are cropped away.
  img = np.zeros((128, 256, 3), np.uint8)
  img[:, :64] = (255, 0, 0)
  img[:, 64:192] = (0, 255, 0)
  img[:, 192:] = (0, 0, 255)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, fmt, quality=95)
  out = images.decode_to_bucket(buf.getvalue(), ((64, 64),), resampler=resampler)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - (0, 255, 0)).max() < 40  # only the green centre is left


def test_opencv_and_pillow_resamplers_agree_on_a_photo():
  # 720 x 1280 onto the 16:9 bucket of 512-class: a 1.9x shrink, the largest these photos see.
  rng = np.random.default_rng(1)
  buf = io.BytesIO()
  fake_data.scene_image(rng, 720, 1280)[1].save(buf, 'JPEG', quality=90)
  fast, exact = (images.decode_to_bucket(buf.getvalue(), ((384, 672),), resampler=r)
                 for r in ('opencv', 'pillow'))
  assert fast.shape == exact.shape == (384, 672, 3)
  assert np.abs(fast.astype(int) - exact).mean() < 3


def test_unknown_resampler_is_refused():
  with pytest.raises(ValueError, match='data.resize'):
    images.check_resampler('lanczos')


def test_large_jpeg_decodes_at_reduced_scale_to_the_same_size():
  rng = np.random.default_rng(0)
  _, img = fake_data.scene_image(rng, 600, 800)
  buf = io.BytesIO()
  img.save(buf, 'JPEG', quality=90)
  out = images.decode_to_bucket(buf.getvalue(), ((48, 64),))
  want = np.asarray(img.resize((64, 48), Image.BICUBIC))
  assert out.shape == (48, 64, 3)
  assert np.abs(out.astype(int) - want).mean() < 8


def test_converter_round_trip_keeps_bytes_and_text(corpus, tmp_path, tok, capsys):
  out = str(tmp_path / 'ar')
  assert build_records.main(['--jsonl', corpus['t2i'], '--task', 't2i', '--output', out,
                             '--num_shards', '3', '--workers', '0']) == 0
  printed = capsys.readouterr()
  meta = json.load(open(f'{out}/meta.json'))
  want_skips = collections.Counter(r for _, r in fake_data.BAD_T2I if r != 'too_long')
  assert meta['records'] == 8 + 1 and meta['skipped'] == dict(want_skips)  # too long: at training
  assert 'wrote 9 records to 3 shards' in printed.out
  assert 't2i.jsonl:4' in printed.err  # the first bad line is logged with its location
  from_ar = _load_all('t2i', out)
  from_jsonl = [x for x in _load_all('t2i', corpus['t2i']) if not isinstance(x, records.Fault)]
  # Record k is in shard k % 3; ArrayRecordDataSource reads the shards one after the other.
  order = [k for s in range(3) for k in range(len(from_jsonl)) if k % 3 == s]
  assert len(from_ar) == len(from_jsonl)
  for (where, ex), k in zip(from_ar, order):
    assert ex['prompt'] == from_jsonl[k][1]['prompt']
    np.testing.assert_array_equal(ex['image'], from_jsonl[k][1]['image'])
    assert from_jsonl[k][0] in where  # the original line travels with the record
  with pytest.raises(FileExistsError):
    build_records.convert(corpus['t2i'], 't2i', out)


def _shard_records(folder):
  """{shard file name: [record bytes]} of a converted folder."""
  return {name: list(grain.sources.ArrayRecordDataSource([os.path.join(folder, name)]))
          for name in sorted(os.listdir(folder)) if name.endswith(sources.ARRAY_RECORD_SUFFIX)}


def test_converter_workers_write_the_same_records_with_the_original_image_bytes(corpus,
                                                                              tmp_path):
  written = {}
  for workers in (0, 2):
    out = str(tmp_path / f'workers{workers}')
    build_records.convert(corpus['t2i'], 't2i', out, num_shards=3, workers=workers,
                          log=lambda m: None)
    written[workers] = (_shard_records(out), json.load(open(os.path.join(out, 'meta.json'))))
  assert written[2] == written[0]  # same shards, same records in the same order, same summary
  shards, meta = written[0]
  assert len(shards) == 3 and sum(map(len, shards.values())) == meta['records'] == 9
  root = os.path.dirname(corpus['t2i'])
  lines = open(corpus['t2i'], encoding='utf-8').read().splitlines()
  for record in (r for recs in shards.values() for r in recs):
    task, fields, blobs, where = records.decode_record(record)
    line = json.loads(lines[int(where.rsplit(':', 1)[1]) - 1])
    assert task == 't2i' and fields == line  # the JSON record as it was
    with open(os.path.join(root, line['image']), 'rb') as f:
      assert blobs['image'] == f.read()  # the file's bytes, not a re-encode


def test_1024_class_buckets_and_a_1024_class_sample(tok):
  config = load_experiment('tuna2_data', 'buckets=1024')
  buckets = images.check_buckets(config.data.buckets, config.model.patch_size)
  assert buckets[0] == (1024, 1024) and config.data.image_size == 1344
  for h, w in buckets:  # ~4096 patches of 16 px at about 1:1, 4:5, 5:4, 4:7, 7:4
    assert 4000 <= (h // 16) * (w // 16) <= 4096
  ratios = sorted(round(w / h, 2) for h, w in buckets)
  assert ratios == [0.57, 0.78, 1.0, 1.29, 1.75]
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  fake_data.scene_image(rng, 720, 1280)[1].save(buf, 'JPEG', quality=90)  # 16:9
  pixels = images.decode_to_bucket(buf.getvalue(), buckets)
  assert pixels.shape == (768, 1344, 3) and pixels.dtype == np.uint8
  s = tasks.format_example({'task': 't2i', 'prompt': 'a red circle.', 'image': pixels}, tok, 16)
  assert s['is_patch'].sum() == 48 * 84 and s['is_time'].sum() == 1
  assert s['patches'].shape == (len(s['tokens']), 16 * 16 * 3)


def test_converted_folder_of_another_task_is_refused(corpus, tmp_path):
  out = str(tmp_path / 'text_ar')
  build_records.convert(corpus['text'], 'text', out, workers=0, log=lambda m: None)
  with pytest.raises(ValueError, match="holds 'text' records"):
    sources.open_stream('mmu', out)


def test_missing_source_stops_with_one_clear_error(tmp_path):
  config = _config(t2i=str(tmp_path / 'nowhere.jsonl'))
  with pytest.raises(FileNotFoundError, match='data.t2i=.*nowhere.jsonl.* does not exist'):
    pipeline.check_data(config)
  with pytest.raises(FileNotFoundError, match='without .array_record shards'):
    pipeline.check_data(_config(mmu=str(tmp_path)))


def _fake_tfds(rows=None):
  """A stand-in for tensorflow_datasets knowing one dataset, 'vqa' (train, validation)."""
  def builder(name):
    if name != 'vqa':
      raise ValueError(f'Dataset {name} not found.')  # as tfds's DatasetNotFoundError
    return types.SimpleNamespace(info=types.SimpleNamespace(splits={'train': 3, 'validation': 1}))

  def data_source(name, split):
    if rows is None:
      raise AssertionError('checking a config must not read (or download) the dataset')
    return rows if name == 'vqa' else None

  return types.SimpleNamespace(builder=builder, data_source=data_source)


def test_unusable_sources_stop_the_run_before_training(corpus, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # not installed
  with pytest.raises(ImportError, match='data.mmu=.tfds:vqa. needs tensorflow-datasets'):
    pipeline.check_data(_config(mmu='tfds:vqa'))
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', _fake_tfds())
  pipeline.check_data(_config(mmu='tfds:vqa:validation[:50%]'))
  with pytest.raises(ValueError, match="data.mmu='tfds:vqa_v9'.* no dataset 'vqa_v9'"):
    pipeline.check_data(_config(mmu='tfds:vqa_v9'))
  with pytest.raises(ValueError, match="no split 'test'; expected one of \\['train', 'valid"):
    pipeline.check_data(_config(mmu='tfds:vqa:test'))

  config = _config(t2i=corpus['t2i'])
  config.data.image_root.t2i = str(tmp_path / 'no_images_here')
  with pytest.raises(FileNotFoundError, match='data.image_root.t2i=.*no_images_here.* not a '
                     'folder'):
    pipeline.check_data(config)

  out = str(tmp_path / 'text_ar')
  build_records.convert(corpus['text'], 'text', out, workers=0, log=lambda m: None)
  pipeline.check_data(_config(text=out))
  with pytest.raises(ValueError, match="data.mmu=.*text_ar.* holds 'text' records"):
    pipeline.check_data(_config(mmu=out))


def test_a_weighted_stream_without_a_source_is_a_warning_unless_none_is_left(corpus, caplog):
  config = _config(t2i=corpus['t2i'], text=corpus['text'])
  config.data.weights.update(t2i=0.5, mmu=0.25, edit=0.0, text=0.25)
  caplog.set_level(logging.WARNING)
  pipeline.check_data(config)
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warning.startswith('data.weights.mmu=0.25 but data.mmu is empty: the mmu stream is '
                            'left out and t2i, text share its weight')
  config.data.weights.update(t2i=0.0, text=0.0)
  with pytest.raises(ValueError, match='needs at least one stream'):
    pipeline.check_data(config)  # the only weighted stream has no source
  with pytest.raises(ValueError, match='needs at least one stream'):
    pipeline.check_data(_config())


def test_tfds_stream_maps_features_onto_the_task(monkeypatch, tok):
  rng = np.random.default_rng(0)
  rows = [{'img': fake_data.scene_image(rng, 60, 100)[1], 'q': b'how many objects?', 'a': b'two.'}
          for _ in range(3)]
  rows = [dict(r, img=np.asarray(r['img'])) for r in rows]
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', _fake_tfds(rows))
  config = _config(mmu='tfds:vqa:train')
  config.data.tfds_fields.mmu = 'image=img,question=q,answer=a'
  samples = pipeline.stream_dataset(config, 'mmu', config.data.mmu, tok)
  s = samples[0]
  assert packing.FAULT_KEY not in s
  assert s['is_patch'].sum() == 15  # 60 x 100 -> the 48 x 80 bucket: 3 x 5 patches
  trained = s['targets'][s['loss_mask'] > 0]
  assert list(trained) == tok.encode('two.') + [tok.eos_id]


def test_assemble_matches_a_token_by_token_layout():
  rng = np.random.default_rng(0)
  img = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  pieces = [seq.Text([2, 9]), seq.Image(img(4, 6)), seq.Text([5, 7, 8], train=True),
            seq.Image(img(2, 2), generate=True), seq.Text([3])]
  s = seq.assemble(pieces, 'edit', img_id=6, patch_size=2)
  assert list(s['tokens']) == [2, 9] + [6] * 7 + [5, 7, 8] + [6] * 2 + [3]
  assert list(s['span_ids']) == [0, 0] + [1] * 7 + [0] * 3 + [2] * 2 + [0]
  assert list(s['pos3'][3]) == [3, 3, 3] and list(s['pos3'][8]) == [3, 4, 5]  # (t, h+row, w+col)
  assert list(s['patch_grid'][8]) == [1, 2, 2, 3]  # (row, col) in a 2 x 3 patch grid
  assert list(s['patch_grid'][2]) == [0, 0, 0, 0]  # the time token is no patch
  np.testing.assert_array_equal(s['patches'][3:9], seq.patchify(pieces[1].pixels, 2))
  assert list(s['loss_mask']) == [0] * 8 + [1, 1, 1] + [0] * 4  # predicts 5, 7, 8
