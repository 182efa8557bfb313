"""Record safety: every official record variant normalised in one place, every kind of bad
record a counted reason, all-or-nothing conversion, loud stream checks, inference image loading."""

import io
import json
import os
import struct
import warnings
import zlib

import grain
import numpy as np
import pytest
from PIL import Image

import fake_data
from conftest import load_experiment
from tuna2_jax import cli, layout
from tuna2_jax.data import build_records, images, packing, pipeline, records, sources, tasks
from tuna2_jax.data import sequence as seq
from tuna2_jax.data.tokenizer import Tokenizer

BUCKETS = ((64, 64), (48, 80), (80, 48))


@pytest.fixture(scope='module')
def tok():
  return Tokenizer.load()


def _config(**streams):
  c = load_experiment('tuna2_data', 'runlocal=True')
  c.data.update(streams)
  return c


def _fault(fn, *args, **kwargs) -> records.Fault:
  with pytest.raises(records.Fault) as info:
    fn(*args, **kwargs)
  return info.value


def png_header_only(width: int, height: int) -> bytes:
  """A PNG that claims width x height pixels but holds almost no data (an image bomb)."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
          chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))


# --- The official variants, each normalised by records.normalise -----------------------------

def test_role_content_turns_are_conversations():
  rec = {'image': 'a.png', 'conversations': [
      {'role': 'system', 'content': 'be brief.'}, {'role': 'user', 'content': '<image>\nhue?'},
      {'role': 'assistant', 'content': 'red.'}]}
  got = records.normalise('mmu', rec)
  assert got.images == {'image': 'a.png'}
  assert got.text == {'turns': [('system', 'be brief.'), ('user', 'hue?'), ('assistant', 'red.')]}
  # The two turn forms may mix; both give the same turns.
  mixed = {'conversations': [{'from': 'human', 'value': 'hi'}, {'role': 'assistant',
                                                                 'content': 'hello.'}]}
  assert records.normalise('text', mixed).text == {'turns': [('user', 'hi'),
                                                            ('assistant', 'hello.')]}


def test_t2i_record_in_conversation_form_prompts_with_the_last_user_turn():
  rec = {'image': 'a.png', 'conversations': [
      {'from': 'human', 'value': 'draw a cat.'}, {'from': 'gpt', 'value': '<image>'},
      {'from': 'human', 'value': 'a red circle.'}, {'from': 'gpt', 'value': '<image>'}]}
  assert records.normalise('t2i', rec).text == {'prompt': 'a red circle.'}
  only_replies = {'image': 'a.png', 'conversations': [{'from': 'gpt', 'value': 'x'}]}
  assert _fault(records.normalise, 't2i', only_replies).reason == 'bad_field'


def test_mmu_record_in_caption_form_replies_with_the_caption(tok):
  got = records.normalise('mmu', {'image': 'a.png', 'caption': 'a red circle.'})
  assert got.text == {'turns': [('assistant', 'a red circle.')]}
  ex = {'task': 'mmu', 'image': np.zeros((16, 16, 3), np.uint8), **got.text}
  s = tasks.format_example(ex, tok, 16)
  assert list(s['targets'][s['loss_mask'] > 0]) == tok.encode('a red circle.') + [tok.eos_id]


def test_edit_record_without_an_instruction_has_the_empty_one():
  for rec in ({'raw_image': 'a.png', 'out_image': 'b.png'},
              {'raw_image': 'a.png', 'out_image': 'b.png', 'instruction': None}):
    got = records.normalise('edit', rec)
    assert got.text == {'instruction': ''}
    assert got.images == {'raw_image': 'a.png', 'out_image': 'b.png'}


def test_numeric_text_is_its_str():
  assert records.normalise('t2i', {'image': 'a.png', 'caption': 1984}).text == {'prompt': '1984'}
  assert records.normalise('t2i', {'image': 'a.png', 'caption': 2.5}).text == {'prompt': '2.5'}
  turns = [{'from': 'human', 'value': 'how many?'}, {'from': 'gpt', 'value': 3}]
  assert records.normalise('mmu', {'image': 'a.png', 'conversations': turns}).text['turns'][1] \
      == ('assistant', '3')
  for bad in (True, ['a'], {'a': 1}):
    assert _fault(records.normalise, 't2i', {'image': 'a.png', 'caption': bad}).reason == \
        'bad_field'


def test_absolute_paths_allowed_without_a_root_or_with_the_flag(tmp_path):
  root, outside = tmp_path / 'root', tmp_path / 'elsewhere'
  root.mkdir(), outside.mkdir()
  image = str(outside / 'a.png')
  inside = str(root / 'b.png')
  assert records.resolve_image(str(root), image, absolute_ok=True) == image
  assert records.resolve_image(str(root), inside) == inside  # inside a set root: fine
  fault = _fault(records.resolve_image, str(root), image)
  assert fault.reason == 'path_escape' and 'data.absolute_paths' in fault.detail
  # The loaders: no configured root allows them; a configured root refuses them unless the flag.
  assert sources.stream_loader('t2i', __file__, '', BUCKETS).absolute_ok
  assert not sources.stream_loader('t2i', __file__, str(root), BUCKETS).absolute_ok
  assert sources.stream_loader('t2i', __file__, str(root), BUCKETS, absolute_paths=True).absolute_ok


def test_symlinked_image_folders_inside_the_root_are_followed(tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  Image.new('RGB', (8, 8)).save(disk / 'a.png')
  (tmp_path / 'root').mkdir()
  os.symlink(disk, tmp_path / 'root' / 'images')
  assert records.read_image_bytes(str(tmp_path / 'root'), 'images/a.png')[:4] == b'\x89PNG'
  assert _fault(records.resolve_image, str(tmp_path / 'root'),
                'images/../../disk/a.png').reason == 'path_escape'


def test_video_records_are_refused_as_unsupported():
  fault = _fault(records.normalise, 't2i', {'video': 'videos/a.mp4', 'caption': 'a panda.'})
  assert fault.reason == 'unsupported' and 'video is not supported' in fault.detail


# --- Bad records: one counted reason each, never a crash --------------------------------------

@pytest.mark.parametrize('line, reason', [
    (b'{"image": "a.png", "caption": "\\ud83d"}', 'bad_text'),  # a lone surrogate
    (b'{"image": "a.png", "caption": "caf\xe9"}', 'bad_text'),  # Latin-1, not UTF-8
    (b'{"image": "a\\u0000.png", "caption": "x"}', 'bad_field'),  # NUL in the path
    (b'[' * 100_000 + b']' * 100_000, 'bad_json'),  # nesting deeper than the parser's stack
    (b'{"image": ["a.png", "b.png"], "caption": "x"}', 'bad_field'),
    (b'{"caption": "x"}', 'missing_key'),
    (json.dumps({'image': 'a.png', 'caption': 'x' * (records.MAX_TEXT_CHARS + 1)}).encode(),
     'too_long'),
])
def test_bad_lines_are_faults_with_a_reason(line, reason):
  fault = _fault(lambda: records.normalise('t2i', records.parse_json_line(line)))
  assert fault.reason == reason, fault


def test_a_surrogate_reaches_neither_the_tokenizer_nor_the_converter(tmp_path, tok):
  fake_data.write_images(str(tmp_path), 1)
  path = tmp_path / 't2i.jsonl'
  path.write_bytes(b'{"image": "images/0.jpg", "caption": "a \\ud83d circle."}\n'
                   b'{"image": "images/0.jpg\\u0000", "caption": "a red circle."}\n')
  loader = sources.stream_loader('t2i', str(path), '', BUCKETS)
  items = sources.open_stream('t2i', str(path))
  make = pipeline.SampleMaker(loader, tok, 16, 128, 0.0, 0, 1)
  reasons = [records.FAULT_REASONS[int(make(i, items[i])[packing.FAULT_KEY])] for i in range(2)]
  assert reasons == ['bad_text', 'bad_field']
  lines = []
  assert build_records.convert(str(path), 't2i', str(tmp_path / 'ar'), workers=0,
                               log=lines.append)['skipped'] == {'bad_text': 1, 'bad_field': 1}
  assert f'{path}:1: bad_text' in lines[0] and f'{path}:2: bad_field' in lines[1]


def test_every_pil_mode_converts_to_rgb_or_is_refused_with_a_reason():
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
  gray8 = np.asarray(rgb.convert('L'))
  gray16 = gray8.astype(np.uint16) * 257  # the same picture in 16 bits
  made = {mode: rgb.convert(mode) for mode in ('1', 'L', 'P', 'RGB', 'RGBA', 'CMYK', 'YCbCr',
                                               'LAB', 'HSV', 'LA', 'PA', 'RGBX')}
  made['I;16'] = Image.fromarray(gray16)
  made['I;16B'] = Image.frombytes('I;16B', (32, 32), gray16.astype('>u2').tobytes())
  made['I'] = Image.fromarray(gray16.astype(np.int32))
  made['I (8-bit values)'] = Image.fromarray(gray8.astype(np.int32))
  for name, image in made.items():
    out = np.asarray(images.to_rgb(image))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name
    assert 40 < out.mean() < 215, (name, out.mean())  # not clipped to white or black
    if name in ('L', 'I;16', 'I;16B', 'I', 'I (8-bit values)'):
      np.testing.assert_array_equal(out[..., 1], gray8, err_msg=name)
  with pytest.raises(ValueError, match='mode F'):
    images.to_rgb(Image.fromarray(gray8.astype(np.float32)))
  with pytest.raises(ValueError, match='expected 16-bit values'):
    images.to_rgb(Image.fromarray(np.full((4, 4), 1 << 20, np.int32)))


def test_a_16_bit_png_keeps_its_grey_levels():
  ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
  buf = io.BytesIO()
  Image.fromarray(ramp).save(buf, 'PNG')
  with Image.open(io.BytesIO(buf.getvalue())) as im:
    assert im.mode == 'I;16'
  out = images.decode_to_bucket(buf.getvalue(), ((64, 64),))
  np.testing.assert_allclose(out[..., 0].mean(), 127.5, atol=2)  # Pillow's convert: ~254 white
  assert out[:, 0].max() < 8 and out[:, -1].min() > 247


def test_an_image_bomb_is_refused_from_its_header():
  bomb = png_header_only(12_000, 12_000)  # 144M pixels in 120 bytes
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    for check in (images.check_decodes, lambda b: images.decode_to_bucket(b, BUCKETS)):
      fault = _fault(check, bomb)
      assert fault.reason == 'image_too_large' and '12000x12000' in fault.detail
    huge = png_header_only(40_000, 40_000)  # beyond Pillow's own bomb limit
    assert _fault(images.check_decodes, huge).reason == 'image_too_large'
  assert _fault(images.check_decodes, png_header_only(64, 64), max_pixels=4000).reason == \
      'image_too_large'


def test_an_unreadable_image_is_named_by_its_path_not_by_a_buffer(tmp_path, tok):
  (tmp_path / 'images').mkdir()
  (tmp_path / 'images' / 'junk.png').write_bytes(b'not an image at all')
  path = fake_data.write_jsonl(str(tmp_path / 't2i.jsonl'),
                               [{'image': 'images/junk.png', 'caption': 'x'}])
  loader = sources.stream_loader('t2i', path, '', BUCKETS)
  fault = _fault(loader, sources.open_stream('t2i', path)[0])
  assert fault.reason == 'bad_image' and "'images/junk.png'" in fault.detail
  assert 'BytesIO' not in str(fault) and fault.where == f'{path}:1'


# --- The converter: all or nothing -------------------------------------------------------------

def test_a_failed_conversion_leaves_nothing_and_a_rerun_succeeds(tmp_path, monkeypatch, capsys):
  corpus = fake_data.write_corpus(str(tmp_path / 'corpus'))
  (tmp_path / 'out').mkdir()
  out = tmp_path / 'out' / 'ar'

  class FullDisk:  # an ArrayRecordWriter whose third write finds the disk full
    def __init__(self, path, options):
      self.n = 0

    def write(self, data):
      self.n += 1
      if self.n == 3:
        raise OSError(28, 'No space left on device')

    def close(self):
      pass

  import array_record.python.array_record_module as arm  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(arm, 'ArrayRecordWriter', FullDisk)
  assert build_records.main(['--jsonl', corpus['text'], '--task', 'text', '--output', str(out),
                             '--workers', '0']) == build_records.EXIT_WRITE_FAILED
  assert 'No space left on device' in capsys.readouterr().err
  assert os.listdir(tmp_path / 'out') == []  # no output, no staging folder
  monkeypatch.undo()

  real, seen = build_records.LineConverter._convert, []

  def interrupted(self, line, where):  # Ctrl-C at the fifth record
    seen.append(where)
    if len(seen) == 5:
      raise KeyboardInterrupt
    return real(self, line, where)

  monkeypatch.setattr(build_records.LineConverter, '_convert', interrupted)
  with pytest.raises(KeyboardInterrupt):
    build_records.convert(corpus['t2i'], 't2i', str(out), workers=0, log=lambda m: None)
  assert os.listdir(tmp_path / 'out') == []
  monkeypatch.undo()

  out.mkdir()  # an empty folder is a fine output
  assert build_records.main(['--jsonl', corpus['t2i'], '--task', 't2i', '--output', str(out),
                             '--workers', '0']) == 0  # skipped records still exit 0
  meta = json.loads((out / 'meta.json').read_text())
  assert meta['records'] == 9 and sum(meta['skipped'].values()) == len(fake_data.BAD_T2I) - 1
  assert sorted(os.listdir(out)) == sorted(meta['files'] + ['meta.json'])
  assert os.listdir(tmp_path / 'out') == ['ar']
  with pytest.raises(FileExistsError, match='not an empty folder'):
    build_records.convert(corpus['t2i'], 't2i', str(out), workers=0, log=lambda m: None)


def test_the_trainer_refuses_a_folder_without_a_complete_meta_json(tmp_path):
  corpus = fake_data.write_corpus(str(tmp_path / 'corpus'), bad=False)
  out = tmp_path / 'ar'
  build_records.convert(corpus['text'], 'text', str(out), num_shards=2, workers=0,
                        log=lambda m: None)
  pipeline.check_data(_config(text=str(out)))
  shard = out / json.loads((out / 'meta.json').read_text())['files'][1]
  os.rename(shard, tmp_path / 'moved')
  with pytest.raises(ValueError, match='lists 2 shards, the folder holds 1'):
    pipeline.check_data(_config(text=str(out)))
  os.rename(tmp_path / 'moved', shard)
  (out / 'meta.json').unlink()
  with pytest.raises(ValueError, match=f"data.text='{out}' has shards but no meta.json"):
    pipeline.check_data(_config(text=str(out)))
  (out / 'meta.json').write_text('{"task": "text", "rec')
  with pytest.raises(ValueError, match='meta.json cannot be read'):
    pipeline.check_data(_config(text=str(out)))


# --- Streams that cannot train stop the run, naming the stream ---------------------------------

def test_a_stream_whose_samples_never_fit_seq_len_stops_the_run(tmp_path, tok):
  fake_data.write_images(str(tmp_path), 2)
  long_turns = [{'from': 'human', 'value': 'describe the picture in detail. ' * 6},
                {'from': 'gpt', 'value': 'there is a red circle at the top left. ' * 6}]
  path = fake_data.write_jsonl(str(tmp_path / 'mmu.jsonl'),
                               [{'image': 'images/0.jpg', 'conversations': long_turns}] * 40)
  with pytest.raises(ValueError, match=r"data.mmu='.*mmu.jsonl': its samples never fit "
                     r"seq_len=128: none of its first 32 records does \(the shortest has \d+ "
                     r"tokens\); raise --config.seq_len to at least \d+"):
    pipeline.check_streams(_config(mmu=path), tok)
  c = _config(mmu=path)
  c.seq_len = 1024
  pipeline.check_streams(c, tok)  # the same records fit a longer row


def test_a_stream_that_skips_every_record_stops_the_run(tmp_path, tok):
  path = fake_data.write_jsonl(str(tmp_path / 'video_pairs.jsonl'),
                               [{'video': f'videos/{i}.mp4', 'caption': 'a panda.'}
                                for i in range(5)])
  with pytest.raises(ValueError, match=r"data.t2i='.*video_pairs.jsonl': none of its first 5 "
                     r"records can be trained on \(skipped: unsupported 5\); first unsupported: "
                     r".*video_pairs.jsonl:\d: a video record .*video is not supported"):
    pipeline.check_streams(_config(t2i=path), tok)


def test_the_packer_names_a_stream_that_skips_every_record_mid_run():
  sample = seq.assemble([seq.Text([2, 9, 3])], 'mmu', img_id=6, patch_size=16)
  # The t2i stream (task id 1) only ever skips; the mmu stream's samples do not reset it.
  elements = [packing.fault_marker('bad_image', layout.TASK_IDS['t2i'])] * 3 + [sample] * 2
  ds = packing.FirstFitPackIterDataset(
      grain.MapDataset.source(elements).repeat().to_iter_dataset(), seq_len=8, num_bins=1,
      patch_size=16, pad_id=0, max_consecutive_faults=7, stream_names={'t2i': "data.t2i='x'"})
  it = iter(ds)
  with pytest.raises(RuntimeError, match=r"data.t2i='x': its last 7 records were all skipped"):
    for _ in range(100):
      next(it)


# --- understand / generate --source load images as training does ------------------------------

def test_inference_images_are_resized_and_cropped_as_in_training(tmp_path):
  img = np.zeros((64, 192, 3), np.uint8)  # 1:3, bands of red | green | blue
  img[:, :64], img[:, 64:128], img[:, 128:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
  path = tmp_path / 'wide.png'
  Image.fromarray(img).save(path)
  shapes_data = load_experiment('shapes', 'runlocal=True').data
  square = cli.read_image(str(path), shapes_data)
  size = shapes_data.image_size
  assert square.shape == (size, size, 3)
  assert np.abs(square.astype(int) - (0, 255, 0)).max() < 40  # the centre, not a squashed image
  data = _config().data
  with open(path, 'rb') as f:
    want = images.decode_to_bucket(f.read(), images.buckets_of(data), resampler=data.resize)
  np.testing.assert_array_equal(cli.read_image(str(path), data), want)
  assert want.shape == (48, 80, 3)
  (tmp_path / 'bomb.png').write_bytes(png_header_only(4000, 4000))
  data.max_image_pixels = 1000
  with pytest.raises(cli.InputError, match='bomb.png.*more than data.max_image_pixels'):
    cli.read_image(str(tmp_path / 'bomb.png'), data)


def test_an_unexpected_error_in_one_record_is_a_counted_skip(tok, caplog):
  def loader(item):
    raise KeyError('a bug a record can trigger')

  make = pipeline.SampleMaker(loader, tok, 16, 128, 0.0, 0, 1)
  marker = make(0, ('data.jsonl:7', b'{}'))
  assert records.FAULT_REASONS[int(marker[packing.FAULT_KEY])] == 'load_error'
  assert int(marker[packing.STREAM_KEY]) == 1
  (message,) = [r.getMessage() for r in caplog.records]
  assert message.startswith("skipped record data.jsonl:7: load_error: KeyError: 'a bug a record")
