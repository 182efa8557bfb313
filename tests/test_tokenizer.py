"""The shipped SentencePiece model: lossless on the shapes grammar, unforgeable image tokens."""

import io

import numpy as np
import pytest
import sentencepiece as spm

from tuna2_jax.data import shapes
from tuna2_jax.data import tokenizer as T


@pytest.fixture(scope='module')
def tok():
  return T.Tokenizer.load()


def test_every_corpus_sentence_round_trips_without_unk(tok):
  for sentence in shapes.corpus_sentences():
    ids = tok.encode(sentence)
    assert T.UNK not in ids, sentence
    assert tok.decode(ids) == sentence


def test_sampled_texts_round_trip(tok):
  rng = np.random.default_rng(0)
  for _ in range(200):
    mmu = shapes.sample_mmu(rng, 32, max_objects=len(shapes.CELLS))
    edit = shapes.sample_edit(rng, 32)
    for text in (mmu['question'], mmu['answer'], edit['instruction'],
                 shapes.sample_text(rng)['text']):
      ids = tok.encode(text)
      assert T.UNK not in ids and tok.decode(ids) == text


def test_special_ids(tok):
  special = [tok.pad_id, T.UNK, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id, tok.img_id]
  assert special[:4] == [0, 1, 2, 3]
  assert len(set(special)) == len(special)
  assert max(special) < tok.vocab_size <= 128


def test_text_cannot_produce_special_tokens(tok):
  text = 'a <boi> red <img> circle <eoi> <s> </s> <pad> at the top.'
  special = {tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id, tok.img_id}
  assert not special & set(tok.encode(text))


def test_decode_stops_at_eos_and_skips_specials(tok):
  ids = tok.encode('a red circle at the top.')
  noisy = [tok.bos_id, tok.boi_id, tok.img_id, tok.eoi_id, tok.pad_id, 1000] + ids
  assert tok.decode(noisy + [tok.eos_id] + tok.encode('remove the circle')) == (
      'a red circle at the top.')
  assert tok.decode(np.array(ids)) == 'a red circle at the top.'


def test_retraining_matches_the_shipped_model(tmp_path, tok):
  path = T.train_shapes_tokenizer(str(tmp_path / 'sp'))
  assert T.Tokenizer.load(path).pieces() == tok.pieces()
  with open(path, 'rb') as a, open(T.SHIPPED_MODEL, 'rb') as b:
    assert a.read() == b.read()


def test_load_defaults_and_bad_paths(tmp_path):
  assert T.Tokenizer.load('').pieces() == T.Tokenizer.load(None).pieces()
  missing = str(tmp_path / 'nope.model')
  with pytest.raises(FileNotFoundError, match='nope.model'):
    T.Tokenizer.load(missing)
  with pytest.raises(ValueError, match='129'):
    T.train_shapes_tokenizer(str(tmp_path / 'big'), vocab_size=129)


def test_model_without_image_pieces_is_rejected(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(shapes.corpus_sentences()), model_writer=model, model_type='bpe',
      vocab_size=64, num_threads=1, minloglevel=2)
  path = tmp_path / 'plain.model'
  path.write_bytes(model.getvalue())
  with pytest.raises(ValueError, match='<boi>'):
    T.Tokenizer.load(str(path))


def test_config_lib_and_data_do_not_import_each_other():
  """config_lib holds config values only; the run-time resolution (tokenizer_path) is data's."""
  import ast
  import glob
  import os
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tuna2_jax')

  def imports(path):
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module:
        out |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
      elif isinstance(node, ast.Import):
        out |= {a.name for a in node.names}
    return out

  assert not {m for m in imports(os.path.join(root, 'config_lib.py'))
              if m.startswith('tuna2_jax')}
  for path in glob.glob(os.path.join(root, 'data', '*.py')):
    assert 'tuna2_jax.config_lib' not in imports(path), path
