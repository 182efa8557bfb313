"""One tokenizer interface, two implementations: SentencePiece and a Hugging Face tokenizer.json
(built here the way Qwen's is: byte-level BPE with added special tokens), with the special
tokens given the same way and ids / text round-tripping."""

import json

import pytest

from tuna2_jax.data import shapes
from tuna2_jax.data import tokenizer as T

tokenizers = pytest.importorskip('tokenizers')

TEXTS = ['a red circle at the top.', 'Über naïve café — 3.14 × 2 = 6.28 ✓',
         '  spaces\tand\nlines ', 'What colour is the square? It is blue.', '']


def _qwen_like(folder, model_rows=None):
  """A byte-level BPE tokenizer.json with Qwen's kind of added tokens, and its configs."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'])
  tok.train_from_iterator(shapes.corpus_sentences() + TEXTS, trainer)
  tok.save(str(folder / 'tokenizer.json'))
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': None, 'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}))
  if model_rows:
    (folder / 'config.json').write_text(json.dumps({'vocab_size': model_rows}))
  return tok


@pytest.fixture
def hf(tmp_path):
  base = _qwen_like(tmp_path, model_rows=512)
  return T.Tokenizer.load(str(tmp_path)), base


def test_load_picks_the_implementation(tmp_path, hf):
  tok, _ = hf
  assert isinstance(tok, T.HFTokenizer) and isinstance(tok, T.Tokenizer)
  assert isinstance(T.Tokenizer.load(str(tmp_path / 'tokenizer.json')), T.HFTokenizer)
  assert isinstance(T.Tokenizer.load(), T.SentencePieceTokenizer)
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    T.Tokenizer.load(str(tmp_path / 'nothing_here' / 'tokenizer.json'))


def test_special_tokens_are_named_or_appended_after_the_model_rows(hf):
  tok, base = hf
  assert tok.eos_id == base.token_to_id('<|im_end|>')
  assert tok.pad_id == base.token_to_id('<|endoftext|>')
  # No bos in Qwen's config: it and the image markers come after the model's 512 embedding rows.
  assert [tok.bos_id, tok.boi_id, tok.eoi_id, tok.img_id] == [512, 513, 514, 515]
  assert tok.vocab_size == 516
  assert tok.pieces()[513:] == ['<boi>', '<eoi>', '<img>']


def test_both_implementations_round_trip_ids_and_text(hf):
  for tok in (hf[0], T.Tokenizer.load()):
    texts = TEXTS if isinstance(tok, T.HFTokenizer) else shapes.corpus_sentences()[:50]
    for text in texts:
      ids = tok.encode(text)
      assert tok.decode(ids) == text
      assert tok.encode(tok.decode(ids)) == ids
      assert all(0 <= i < tok.vocab_size for i in ids)


def test_text_cannot_produce_the_markers(hf):
  for tok in (hf[0], T.Tokenizer.load()):
    ids = set(tok.encode('a <boi> red <img> circle <eoi> <bos> <pad> at the top.'))
    assert not ids & {tok.bos_id, tok.boi_id, tok.eoi_id, tok.img_id}


def test_decode_stops_at_eos_and_skips_specials(hf):
  for tok in (hf[0], T.Tokenizer.load()):
    ids = tok.encode('a red circle at the top.')
    noisy = [tok.bos_id, tok.boi_id, tok.img_id, tok.eoi_id, tok.pad_id, 100000] + ids
    assert tok.decode(noisy + [tok.eos_id] + tok.encode('more')) == 'a red circle at the top.'


def test_without_model_config_markers_follow_the_tokenizer(tmp_path):
  base = _qwen_like(tmp_path)
  tok = T.Tokenizer.load(str(tmp_path))
  n = base.get_vocab_size(with_added_tokens=True)
  assert [tok.bos_id, tok.boi_id, tok.eoi_id, tok.img_id] == [n, n + 1, n + 2, n + 3]


def test_a_named_special_token_that_does_not_exist_is_refused(tmp_path):
  _qwen_like(tmp_path)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<|nope|>'}))
  with pytest.raises(ValueError, match='<\\|nope\\|>'):
    T.Tokenizer.load(str(tmp_path))


def test_chatml_tokenizers_lay_conversations_out_in_chatml(hf):
  from tuna2_jax.data import tasks
  tok, base = hf
  start, end = base.token_to_id('<|im_start|>'), base.token_to_id('<|im_end|>')
  assert tok.chatml_ids() == (start, end) and T.Tokenizer.load().chatml_ids() is None
  turns = [('system', 'Be brief.'), ('user', 'What colour is it?'), ('assistant', 'Blue.'),
           ('user', 'And the shape?'), ('assistant', 'A circle.')]
  s = tasks.format_example({'task': 'text', 'turns': turns}, tok, 16)
  nl = tok.encode('\n')
  want = [tok.bos_id]
  for role, text in turns:
    want += [start] + tok.encode(f'{role}\n') + tok.encode(text) + [end] + nl
  assert list(s['tokens']) == want
  trained = list(s['targets'][s['loss_mask'] > 0])
  assert trained == tok.encode('Blue.') + [end] + tok.encode('A circle.') + [end]
  assert tasks.reply_end_id(tok) == end


def test_chatml_question_prompt_is_the_training_layout_up_to_the_answer(hf):
  import numpy as np
  from tuna2_jax.data import tasks
  tok, base = hf
  image = np.zeros((32, 32, 3), np.uint8)
  prompt = tasks.understanding_prompt(image, 'What colour is it?', tok, 16)
  full = tasks.format_example({'task': 'mmu', 'image': image, 'question': 'What colour is it?',
                               'answer': 'Blue.'}, tok, 16)
  n = len(prompt['tokens'])
  assert list(full['tokens'][:n]) == list(prompt['tokens'])
  assert list(prompt['tokens'][n - 1 - len(tok.encode('assistant\n')):]) == (
      [base.token_to_id('<|im_start|>')] + tok.encode('assistant\n'))
  assert list(full['targets'][full['loss_mask'] > 0]) == (
      tok.encode('Blue.') + [base.token_to_id('<|im_end|>')])
