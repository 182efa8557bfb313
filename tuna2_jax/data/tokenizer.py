"""The SentencePiece tokenizer, with the image markers the unified sequence needs.

Regenerate the shipped model (deterministic, under a second):

  python -m tuna2_jax.data.tokenizer --out tuna2_jax/data/assets/shapes_sp
"""

import argparse
import io
import os

import sentencepiece as spm

from tuna2_jax.data import shapes

SHIPPED_MODEL = os.path.join(os.path.dirname(__file__), 'assets', 'shapes_sp.model')
PAD, UNK, BOS, EOS = 0, 1, 2, 3
# Control symbols: they get ids but SentencePiece never produces them from text, so a prompt
# that spells '<img>' cannot forge an image position.
BOI, EOI, IMG = '<boi>', '<eoi>', '<img>'


class Tokenizer:
  """Text <-> ids. Ids: pad 0, unk 1, bos 2, eos 3, then <boi>, <eoi>, <img>, then text pieces."""

  def __init__(self, processor: spm.SentencePieceProcessor, name: str = '<memory>'):
    self._sp = processor
    for piece in (BOI, EOI, IMG):
      if processor.piece_to_id(piece) == processor.unk_id() or not processor.is_control(
          processor.piece_to_id(piece)):
        raise ValueError(f'tokenizer {name!r} lacks the control piece {piece!r}')
    for what, got, want in (('pad', processor.pad_id(), PAD), ('unk', processor.unk_id(), UNK),
                            ('bos', processor.bos_id(), BOS), ('eos', processor.eos_id(), EOS)):
      if got != want:
        raise ValueError(f'tokenizer {name!r} has {what} id {got}: expected {want}')
    self._boi, self._eoi, self._img = (processor.piece_to_id(p) for p in (BOI, EOI, IMG))
    self._skip = {PAD, BOS, self._boi, self._eoi, self._img}

  @classmethod
  def load(cls, path: str | None = None) -> 'Tokenizer':
    """Loads a .model file; None or '' is the shipped shapes model."""
    path = path or SHIPPED_MODEL
    if not os.path.isfile(path):
      raise FileNotFoundError(f'tokenizer model {path!r} not found')
    return cls(spm.SentencePieceProcessor(model_file=path), path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return PAD

  @property
  def bos_id(self) -> int:
    return BOS

  @property
  def eos_id(self) -> int:
    return EOS

  @property
  def boi_id(self) -> int:
    return self._boi

  @property
  def eoi_id(self) -> int:
    return self._eoi

  @property
  def img_id(self) -> int:
    return self._img

  def pieces(self) -> list[str]:
    return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

  def encode(self, text: str) -> list[int]:
    """Text pieces only; the caller adds BOS / EOS where the sequence format wants them."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids) -> str:
    """Text up to the first EOS, without pad, bos or image tokens."""
    kept = []
    for i in map(int, ids):
      if i == EOS:
        break
      # The model's vocabulary may be larger than this tokenizer's; such ids carry no text.
      if i not in self._skip and 0 <= i < self.vocab_size:
        kept.append(i)
    return self._sp.decode(kept)


def train_shapes_tokenizer(out_prefix: str, vocab_size: int = 128) -> str:
  """Trains on every sentence form of the shapes grammar; returns the written .model path."""
  if vocab_size > 128:
    raise ValueError(f'vocab_size {vocab_size}: expected <= 128, the small configs\' vocabulary')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(shapes.corpus_sentences()),
      model_writer=model,
      model_type='bpe',
      vocab_size=vocab_size,
      character_coverage=1.0,  # the grammar's every character, so no text maps to unk
      normalization_rule_name='identity',
      pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
      control_symbols=[BOI, EOI, IMG],
      num_threads=1,  # the merge order must not depend on thread timing
      minloglevel=2)
  path = out_prefix + '.model'
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'wb') as f:
    f.write(model.getvalue())
  return path


def main():
  parser = argparse.ArgumentParser(description='Train the shapes SentencePiece model.')
  parser.add_argument('--out', required=True, help='output prefix; writes PREFIX.model')
  parser.add_argument('--vocab_size', type=int, default=128)
  args = parser.parse_args()
  path = train_shapes_tokenizer(args.out, args.vocab_size)
  print(f'wrote {path} ({Tokenizer.load(path).vocab_size} pieces)')


if __name__ == '__main__':
  main()
