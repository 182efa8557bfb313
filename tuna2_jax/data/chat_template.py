"""Conversations laid out by the tokenizer's own chat template (its Jinja `chat_template`).

The template is rendered as transformers' `apply_chat_template` renders it (a sandboxed Jinja
environment with trim_blocks and lstrip_blocks; `messages`, `add_generation_prompt`, the special
tokens' text and `raise_exception` in scope), except that `bos_token` is empty: the sequence
format puts BOS (and an image) before the conversation itself.

Which tokens are trained: each assistant reply and the token that ends it. To find them the
conversation is rendered once with every reply replaced by a marker; the text between the
markers is the template's own (role headers, system prompt, separators) and is never trained.
The reply's end token is the special token the template writes right after a reply
(`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, ...); a template that writes no special
token there gets EOS appended to each reply instead, so that decoding still knows where a reply
stops.
"""

from __future__ import annotations

import functools

from tuna2_jax.data import sequence as seq

# A reply's stand-in while rendering: private-use code points (which text does not use; unlike
# control characters they are not whitespace, which a template's `| trim` would strip).
_MARKER = '\ue000REPLY{}\ue000'


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  import jinja2
  from jinja2 import sandbox

  def raise_exception(message):
    raise ValueError(f'chat template: {message}')

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=['jinja2.ext.loopcontrols'])
  env.globals['raise_exception'] = raise_exception
  try:
    return env.from_string(template)
  except jinja2.TemplateError as e:
    raise ValueError(f'the tokenizer\'s chat_template is not valid Jinja: {e}') from None


def render(tok, turns, *, add_generation_prompt: bool = False) -> str:
  """The template's text for turns [(role, text)]."""
  messages = [{'role': role, 'content': text} for role, text in turns]
  return _compiled(tok.chat_template).render(
      messages=messages, add_generation_prompt=add_generation_prompt,
      **dict(tok.template_tokens(), bos_token=''))


def _split(tok, turns) -> tuple[list[str], list[str]]:
  """(the template's text around the replies [len = replies + 1], the replies)."""
  replies, masked = [], []
  for role, text in turns:
    if role == 'assistant':
      masked.append((role, _MARKER.format(len(replies))))
      replies.append(text)
    else:
      masked.append((role, text))
  rest, around = render(tok, masked), []
  for i in range(len(replies)):
    head, found, rest = rest.partition(_MARKER.format(i))
    if not found:
      raise ValueError(f'the tokenizer\'s chat_template does not write assistant reply {i} of '
                       f'{len(replies)} as it is (roles {[r for r, _ in turns]}); expected '
                       'each reply once, unchanged')
    around.append(head)
  return around + [rest], replies


def reply_end(tok) -> tuple[str, int]:
  """(text, id) of the token that ends a reply: the special token the template writes right
  after one, else EOS (which the replies then get appended)."""
  around, _ = _split(tok, [('user', 'hi'), ('assistant', 'hello')])
  found = tok.added_token_at(around[1])
  return found if found else ('', tok.eos_id)


def chat_pieces(turns, tok) -> list[seq.Piece]:
  """Turns [(role, text)] as the template lays them out; only replies and their end are trained."""
  around, replies = _split(tok, turns)
  end_text, end_id = reply_end(tok)
  pieces = [seq.Text(tok.encode(around[0]))]
  for reply, after in zip(replies, around[1:]):
    pieces.append(seq.Text(tok.encode(reply) + [end_id], train=True))
    if end_text:
      after = after[len(end_text):]  # the template's own end token, trained just above
    pieces.append(seq.Text(tok.encode(after)))
  return [p for p in pieces if len(p.ids)]


def prompt_pieces(turns, tok) -> list[seq.Piece]:
  """Turns followed by the template's generation prompt: what a decoder continues with a reply."""
  return [seq.Text(tok.encode(render(tok, turns, add_generation_prompt=True)))]
