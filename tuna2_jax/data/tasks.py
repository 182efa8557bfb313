"""Task formatting: raw examples of each task stream -> the pieces of one token sequence.

Raw examples are plain dicts (as data/shapes.py and the file sources produce):
  t2i  {'prompt', 'image'}             mmu  {'image', 'question', 'answer'} or {'image', 'turns'}
  edit {'source', 'instruction', 'target'}   text {'text'} or {'turns'}
Prompts (captions, instructions) condition and are never trained on; answers and text-only
data are. Dropping a prompt leaves the null prompt used for classifier-free guidance.
`turns` is a conversation [(role, text)] with role in {'system', 'user', 'assistant'}, laid out
by `chat_pieces`; only assistant turns are trained.
"""

from __future__ import annotations

import numpy as np

from tuna2_jax import layout
from tuna2_jax.data import chat_template
from tuna2_jax.data import sequence as seq
from tuna2_jax.data.tokenizer import Tokenizer


def chat_pieces(turns, tok: Tokenizer) -> list[seq.Piece]:
  """The chat template; only the assistant's replies and their end marker are trained (the
  marker is where a reply stops), never the role markers or other turns.

  A tokenizer with its own chat template follows it (data/chat_template.py). Otherwise, with
  ChatML markers in the tokenizer (Qwen's, the format Qwen2.5-Instruct was tuned on) a turn is
  `<|im_start|>role\ntext<|im_end|>\n`; else it is 'role: text' on its own line with an
  assistant reply ending in EOS.
  """
  if tok.chat_template:
    return chat_template.chat_pieces(turns, tok)
  markers = tok.chatml_ids()
  pieces = []
  for role, text in turns:
    if markers:
      start, end = markers
      head = [start] + tok.encode(f'{role}\n')
      if role == 'assistant':
        pieces += [seq.Text(head), seq.Text(tok.encode(text) + [end], train=True),
                   seq.Text(tok.encode('\n'))]
      else:
        pieces.append(seq.Text(head + tok.encode(text) + [end] + tok.encode('\n')))
    elif role == 'assistant':
      pieces.append(seq.Text(tok.encode('assistant:')))
      pieces.append(seq.Text(tok.encode(text) + [tok.eos_id], train=True))
    else:
      pieces.append(seq.Text(tok.encode(f'{role}: {text}')))
  return pieces


def reply_end_id(tok: Tokenizer) -> int:
  """The token that ends a reply: the chat template's (chat_template.reply_end), <|im_end|>
  under ChatML, else EOS."""
  if tok.chat_template:
    return chat_template.reply_end(tok)[1]
  markers = tok.chatml_ids()
  return markers[1] if markers else tok.eos_id


def to_pieces(ex: dict, tok: Tokenizer, *, drop_prompt: bool = False) -> list[seq.Piece]:
  task = ex['task']
  prompt_ids = lambda text: [] if drop_prompt else tok.encode(text)
  if task == 't2i':
    return [seq.Text([tok.bos_id] + prompt_ids(ex['prompt']) + [tok.boi_id]),
            seq.Image(ex['image'], generate=True), seq.Text([tok.eoi_id, tok.eos_id])]
  if task == 'mmu' and 'turns' in ex:
    return [seq.Text([tok.bos_id, tok.boi_id]), seq.Image(ex['image']),
            seq.Text([tok.eoi_id])] + chat_pieces(ex['turns'], tok)
  if task == 'text' and 'turns' in ex:
    return [seq.Text([tok.bos_id])] + chat_pieces(ex['turns'], tok)
  if task == 'mmu' and (tok.chat_template or tok.chatml_ids()):  # a question + answer as a chat
    return [seq.Text([tok.bos_id, tok.boi_id]), seq.Image(ex['image']), seq.Text([tok.eoi_id])
            ] + chat_pieces([('user', ex['question']), ('assistant', ex['answer'])], tok)
  if task == 'mmu':
    return [seq.Text([tok.bos_id, tok.boi_id]), seq.Image(ex['image']),
            seq.Text([tok.eoi_id] + tok.encode(ex['question'])),
            seq.Text(tok.encode(ex['answer']) + [tok.eos_id], train=True)]
  if task == 'edit':
    return [seq.Text([tok.bos_id, tok.boi_id]), seq.Image(ex['source']),
            seq.Text([tok.eoi_id] + prompt_ids(ex['instruction']) + [tok.boi_id]),
            seq.Image(ex['target'], generate=True), seq.Text([tok.eoi_id, tok.eos_id])]
  if task == 'text':
    return [seq.Text([tok.bos_id]), seq.Text(tok.encode(ex['text']) + [tok.eos_id], train=True)]
  raise ValueError(f'task {task!r}: expected one of {tuple(layout.TASK_IDS)}')


def format_example(ex: dict, tok: Tokenizer, patch_size: int, *, drop_prompt: bool = False,
                   pixel_layout: str = 'exact') -> dict:
  """A training sample; pixel_layout 'official' lays its spans out as official training does
  (data/sequence.py)."""
  return seq.assemble(to_pieces(ex, tok, drop_prompt=drop_prompt), ex['task'],
                      img_id=tok.img_id, patch_size=patch_size, pixel_layout=pixel_layout)


def generation_prompt(prompt: str, tok: Tokenizer, image_hw: tuple[int, int], patch_size: int,
                      source: np.ndarray | None = None) -> dict:
  """The sequence a sampler fills in: text->image, or editing when a source image is given.

  The target span holds zeros; the sampler replaces its pixels. Ends at the target span (what
  follows it cannot influence the image under the causal mask).
  """
  blank = np.zeros((*image_hw, 3), np.uint8)
  if source is None:
    ex = {'task': 't2i', 'prompt': prompt, 'image': blank}
  else:
    ex = {'task': 'edit', 'source': source, 'instruction': prompt, 'target': blank}
  pieces = to_pieces(ex, tok)[:-1]
  return seq.assemble(pieces, ex['task'], img_id=tok.img_id, patch_size=patch_size)


def understanding_prompt(image: np.ndarray, question: str, tok: Tokenizer,
                         patch_size: int) -> dict:
  """[BOS] [BOI] image [EOI] question (as a user turn under ChatML): the prefix a text decoder
  continues with the answer, which ends with reply_end_id."""
  ex = {'task': 'mmu', 'image': image, 'question': question, 'answer': ''}
  if tok.chat_template:  # the template's own generation prompt
    pieces = to_pieces(ex, tok)[:3] + chat_template.prompt_pieces([('user', question)], tok)
    return seq.assemble(pieces, 'mmu', img_id=tok.img_id, patch_size=patch_size)
  # The training layout without the trained reply (and, under ChatML, the newline after it).
  pieces = to_pieces(ex, tok)[:-2 if tok.chatml_ids() else -1]
  return seq.assemble(pieces, 'mmu', img_id=tok.img_id, patch_size=patch_size)
