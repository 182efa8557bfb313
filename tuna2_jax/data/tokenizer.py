"""Tokenizers: one interface, two implementations, the same special tokens in both.

  SentencePieceTokenizer  a .model file: the shipped shapes model (the default) and
                          SentencePiece models built with the image markers as control symbols
  HFTokenizer             a Hugging Face tokenizer.json (Qwen2 / Qwen2.5 and the like)

Every tokenizer gives the ids the sequence format needs: pad, bos, eos and the image markers
<boi>, <eoi>, <img>. None of them can be produced from text: SentencePiece control symbols are
never emitted by encode, and the Hugging Face tokenizer gets the ones it lacks appended after its
vocabulary (and after the model's embedding rows, read from config.json beside it), outside
anything its pre-tokenizer can match. `Tokenizer.load(path)` picks the implementation. A Hugging
Face tokenizer's own chat template (tokenizer_config.json `chat_template`, or chat_template.jinja
beside it) lays out conversations when it has one (data/chat_template.py).

Regenerate the shipped model (deterministic, under a second):

  python -m tuna2_jax.data.tokenizer --out tuna2_jax/data/assets/shapes_sp
"""

import abc
import argparse
import io
import json
import os

import ml_collections
import sentencepiece as spm
from etils import epath

from tuna2_jax.data import shapes

SHIPPED_MODEL = os.path.join(os.path.dirname(__file__), 'assets', 'shapes_sp.model')
PAD, UNK, BOS, EOS = 0, 1, 2, 3
# Control symbols: they get ids but SentencePiece never produces them from text, so a prompt
# that spells '<img>' cannot forge an image position.
BOI, EOI, IMG = '<boi>', '<eoi>', '<img>'
HF_TOKENIZER_FILE = 'tokenizer.json'
CHAT_TEMPLATE_FILE = 'chat_template.jinja'  # where transformers >= 4.43 saves the template
# The files of a Hugging Face tokenizer folder HFTokenizer reads (config.json aside).
HF_TOKENIZER_FILES = (HF_TOKENIZER_FILE, 'tokenizer_config.json', CHAT_TEMPLATE_FILE)
CHATML_MARKERS = ('<|im_start|>', '<|im_end|>')


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """The tokenizer a run uses: data.tokenizer when set; else, when the decoder starts from
  pretrained weights (init.decoder_from), that folder if it holds a tokenizer.json (a Hugging Face
  folder, or `convert.qwen2`'s output, which copies it); else, for a run that starts from a
  previous stage (init_from), the tokenizer that stage used; else '' (the shipped shapes model).

  Raises ValueError for init.decoder_from without a tokenizer.json and no data.tokenizer: the
  shipped 128-piece model would feed the pretrained decoder ids it was never trained on.
  """
  if config.data.tokenizer:
    return config.data.tokenizer
  source = (config.get('init') or {}).get('decoder_from')
  if source:
    if (epath.Path(source) / HF_TOKENIZER_FILE).exists():
      return source
    raise ValueError(f'init.decoder_from={source!r} has no {HF_TOKENIZER_FILE} and '
                     'data.tokenizer is empty: set --config.data.tokenizer to the pretrained '
                     'model\'s tokenizer (its Hugging Face folder or tokenizer.json)')
  if config.get('init_from'):
    from tuna2_jax import checkpoint  # orbax, slow to import: only stage configs need it
    previous = checkpoint.read_config(config.init_from)
    if previous is not None:
      return tokenizer_path(ml_collections.ConfigDict(json.loads(previous)))
  return ''


class Tokenizer(abc.ABC):
  """Text <-> ids, with the special ids of the sequence format (see the module docstring)."""

  pad_id: int
  bos_id: int
  eos_id: int
  boi_id: int
  eoi_id: int
  img_id: int

  @staticmethod
  def load(path: str | None = None, special: dict | None = None) -> 'Tokenizer':
    """'' or None: the shipped model; a .model file: SentencePiece; a tokenizer.json or a folder
    holding one: Hugging Face. special: {role: token} naming the tokens of roles bos, eos, pad,
    boi, eoi, img ('' = the tokenizer's own, or an appended one); Hugging Face only."""
    path = path or SHIPPED_MODEL
    named = {k: v for k, v in (special or {}).items() if v}
    if path.endswith('.json') or epath.Path(path).is_dir():
      return HFTokenizer.load(path, **named)
    if named:
      raise ValueError(f'data.special_tokens {named} name tokens, which only a Hugging Face '
                       f'tokenizer supports; {path!r} is a SentencePiece model')
    return SentencePieceTokenizer.load(path)

  @staticmethod
  def for_config(config) -> 'Tokenizer':
    """The tokenizer a run's config names (`tokenizer_path`: data.tokenizer, else the
    pretrained decoder's or the previous stage's, else the shipped model)."""
    return Tokenizer.load(tokenizer_path(config) or None,
                          dict(config.data.get('special_tokens') or {}))

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Ids in the tokenizer, special tokens included."""

  @abc.abstractmethod
  def pieces(self) -> list[str]:
    """The text of every id, in id order."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Text pieces only; the caller adds BOS / EOS where the sequence format wants them."""

  @abc.abstractmethod
  def _decode_ids(self, ids: list[int]) -> str:
    """Text of ids that are all text tokens."""

  def decode(self, ids) -> str:
    """Text up to the first EOS, without pad, bos or image tokens."""
    skip = {self.pad_id, self.bos_id, self.boi_id, self.eoi_id, self.img_id}
    kept = []
    for i in map(int, ids):
      if i == self.eos_id:
        break
      # The model's vocabulary may be larger than this tokenizer's; such ids carry no text.
      if i not in skip and 0 <= i < self.text_vocab_size:
        kept.append(i)
    return self._decode_ids(kept)

  @property
  def text_vocab_size(self) -> int:
    """Ids below this may carry text."""
    return self.vocab_size

  def chatml_ids(self) -> tuple[int, int] | None:
    """(<|im_start|>, <|im_end|>) when the tokenizer has ChatML's turn markers (Qwen's), which
    conversations use when it has no chat template of its own (data/tasks.py:chat_pieces);
    None otherwise."""
    return None

  @property
  def chat_template(self) -> str | None:
    """The tokenizer's own Jinja chat template, which conversations then follow
    (data/chat_template.py); None when it has none."""
    return None

  def template_tokens(self) -> dict[str, str]:
    """The special tokens' text a chat template may use (bos_token, eos_token, ...)."""
    return {}

  def added_token_at(self, text: str) -> tuple[str, int] | None:
    """(token text, id) of the longest special token `text` starts with, or None."""
    return None


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model whose ids are pad 0, unk 1, bos 2, eos 3, then <boi>, <eoi>, <img>
  as control symbols, then text pieces (how train_shapes_tokenizer builds one)."""

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

  @classmethod
  def load(cls, path: str | None = None) -> 'SentencePieceTokenizer':
    """Loads a .model file; None or '' is the shipped shapes model."""
    path = path or SHIPPED_MODEL
    if not epath.Path(path).is_file():
      raise FileNotFoundError(f'tokenizer model {path!r} not found')
    return cls(spm.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes()), path)

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

  def _decode_ids(self, ids: list[int]) -> str:
    return self._sp.decode(ids)


def _token_name(value) -> str | None:
  """A tokenizer_config.json special-token entry: a string, {'content': ...} or null."""
  return value.get('content') if isinstance(value, dict) else value


def _default_template(value, where) -> str | None:
  """tokenizer_config.json's chat_template: a string, or a list of {'name', 'template'} whose
  'default' entry is the conversation template."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {t.get('name'): t.get('template') for t in value if isinstance(t, dict)}
    if 'default' in named:
      return named['default']
    raise ValueError(f'{os.fspath(where)}: chat_template lists {sorted(map(str, named))}; '
                     'expected one named "default"')
  raise ValueError(f'{os.fspath(where)}: chat_template is a {type(value).__name__}; expected '
                   'a string or a list of {"name", "template"}')


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` tokenizer (tokenizer.json).

  bos / eos / pad are the named tokens when the tokenizer has them (tokenizer_config.json beside
  it names them); every special token it lacks, and the image markers, get ids after its
  vocabulary, from first_added_id on when that is larger (the model's embedding rows), in the
  order bos, eos, pad, <boi>, <eoi>, <img>. boi / eoi / img may name tokens too; `appended`
  names tokens the tokenizer lacks that are added right after its vocabulary, as the official
  Tuna-2 tokenizer adds its [PAD].
  """

  def __init__(self, tokenizer, *, bos: str | None = None, eos: str | None = None,
               pad: str | None = None, boi: str | None = None, eoi: str | None = None,
               img: str | None = None, appended: tuple[str, ...] = (), first_added_id: int = 0,
               name: str = '<memory>', chat_template: str | None = None):
    self._tok = tokenizer
    self._chat_template = chat_template or None
    self._template_tokens = {f'{role}_token': token or '' for role, token in
                             (('bos', bos), ('eos', eos), ('pad', pad))}
    self._base = tokenizer.get_vocab_size(with_added_tokens=True)
    self._added: dict[int, str] = {}
    own = {t: self._base + i for i, t in enumerate(appended)}
    self._added.update({i: t for t, i in own.items()})
    next_id = self._base + len(own)
    ids = {}
    for role, token in (('bos', bos), ('eos', eos), ('pad', pad), ('boi', boi), ('eoi', eoi),
                        ('img', img)):
      if token is not None:
        ids[role] = own.get(token, tokenizer.token_to_id(token))
        if ids[role] is None:
          raise ValueError(f'tokenizer {name!r} has no token {token!r} (its {role} token)')
      else:
        next_id = max(next_id, first_added_id)
        ids[role] = next_id
        self._added[next_id] = {'boi': BOI, 'eoi': EOI, 'img': IMG}.get(role, f'<{role}>')
        next_id += 1
    self._vocab = next_id
    markers = tuple(tokenizer.token_to_id(t) for t in CHATML_MARKERS)
    self._chatml = None if None in markers else markers
    self.pad_id, self.bos_id, self.eos_id = ids['pad'], ids['bos'], ids['eos']
    self.boi_id, self.eoi_id, self.img_id = ids['boi'], ids['eoi'], ids['img']

  @classmethod
  def load(cls, path: str, **named: str) -> 'HFTokenizer':
    """A tokenizer.json, or a folder holding one (with tokenizer_config.json, config.json).

    named: {role: token} overriding tokenizer_config.json's; a named token the tokenizer lacks
    is appended right after its vocabulary.
    """
    import tokenizers
    given = epath.Path(path)
    folder, file = (given, given / HF_TOKENIZER_FILE) if given.is_dir() else (given.parent, given)
    if not file.is_file():
      raise FileNotFoundError(f'tokenizer {os.fspath(file)!r} not found')
    special, template = {}, None
    if (folder / 'tokenizer_config.json').is_file():
      config = json.loads((folder / 'tokenizer_config.json').read_text())
      special = {role: _token_name(config.get(f'{role}_token')) for role in ('bos', 'eos', 'pad')}
      template = _default_template(config.get('chat_template'), folder / 'tokenizer_config.json')
    if (folder / CHAT_TEMPLATE_FILE).is_file():  # transformers reads this one first
      template = (folder / CHAT_TEMPLATE_FILE).read_text()
    rows = 0
    if (folder / 'config.json').is_file():
      rows = int(json.loads((folder / 'config.json').read_text()).get('vocab_size') or 0)
    tok = tokenizers.Tokenizer.from_str(file.read_text())
    special.update(named)
    appended = tuple(dict.fromkeys(t for t in named.values() if tok.token_to_id(t) is None))
    return cls(tok, first_added_id=rows, name=os.fspath(file), appended=appended,
               chat_template=template, **special)

  @property
  def vocab_size(self) -> int:
    return self._vocab

  @property
  def text_vocab_size(self) -> int:
    return self._base

  def chatml_ids(self) -> tuple[int, int] | None:
    return self._chatml

  @property
  def chat_template(self) -> str | None:
    return self._chat_template

  def template_tokens(self) -> dict[str, str]:
    return dict(self._template_tokens)

  def added_token_at(self, text: str) -> tuple[str, int] | None:
    found = [(t.content, i) for i, t in self._tok.get_added_tokens_decoder().items()
             if t.content and text.startswith(t.content)]
    return max(found, key=lambda x: len(x[0])) if found else None

  def pieces(self) -> list[str]:
    return [self._added.get(i) or self._tok.id_to_token(i) or '' for i in range(self._vocab)]

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def _decode_ids(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)


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
