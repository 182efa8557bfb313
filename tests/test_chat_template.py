"""The tokenizer's own chat template lays out conversations (tokenizer_config.json
`chat_template`, or chat_template.jinja); only replies and the token that ends them are trained;
ChatML is the fallback for a tokenizer without a template; a template that cannot be used is
named in the error."""

import json

import numpy as np
import pytest

from tuna2_jax.data import chat_template, shapes, tasks
from tuna2_jax.data import tokenizer as T

tokenizers = pytest.importorskip('tokenizers')

SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|start_header_id|>',
           '<|end_header_id|>', '<|eot_id|>']
# A ChatML template that adds a default system prompt, as Qwen2.5-Instruct's does.
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
          "assistant.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
TURNS = [('user', 'what colour is the circle?'), ('assistant', 'red.'),
         ('user', 'how many objects are there?'), ('assistant', 'two.')]


def _folder(path, template=None, jinja_file=None):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=SPECIAL)
  tok.train_from_iterator(shapes.corpus_sentences(), trainer)
  tok.save(str(path / 'tokenizer.json'))
  config = {'bos_token': None, 'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}
  if template is not None:
    config['chat_template'] = template
  (path / 'tokenizer_config.json').write_text(json.dumps(config))
  if jinja_file is not None:
    (path / T.CHAT_TEMPLATE_FILE).write_text(jinja_file)
  return T.Tokenizer.load(str(path))


def _trained_text(tok, pieces):
  return [tok._decode_ids(list(p.ids)) for p in pieces if p.train]


def _all_text(tok, pieces):
  return tok._decode_ids([i for p in pieces for i in p.ids])


def test_the_tokenizers_template_lays_out_the_conversation(tmp_path):
  tok = _folder(tmp_path, CHATML)
  assert tok.chat_template == CHATML
  pieces = tasks.chat_pieces(TURNS, tok)
  # The whole text is the template's; its default system prompt is there, untrained.
  assert _all_text(tok, pieces) == chat_template.render(tok, TURNS)
  assert _all_text(tok, pieces).startswith('<|im_start|>system\nYou are a helpful assistant.')
  assert _trained_text(tok, pieces) == ['red.<|im_end|>', 'two.<|im_end|>']
  assert tasks.reply_end_id(tok) == tok._tok.token_to_id('<|im_end|>')
  # The prompt a decoder continues ends with the template's generation prompt.
  image = np.zeros((32, 32, 3), np.uint8)
  prompt = tasks.understanding_prompt(image, 'what colour is the circle?', tok, 16)
  text = tok._decode_ids([int(i) for i in prompt['tokens'] if i < tok.text_vocab_size])
  assert text.endswith('<|im_start|>user\nwhat colour is the circle?<|im_end|>\n'
                       '<|im_start|>assistant\n')


def test_training_masks_cover_the_replies_and_their_end_only(tmp_path):
  tok = _folder(tmp_path, CHATML)
  image = np.zeros((32, 32, 3), np.uint8)
  s = tasks.format_example({'task': 'mmu', 'image': image, 'turns': TURNS}, tok, 16)
  trained = s['targets'][s['loss_mask'] > 0]
  assert tok._decode_ids(list(trained)) == 'red.<|im_end|>two.<|im_end|>'
  qa = tasks.format_example({'task': 'mmu', 'image': image, 'question': 'what colour?',
                             'answer': 'red.'}, tok, 16)  # a question and answer as a chat
  assert tok._decode_ids(list(qa['targets'][qa['loss_mask'] > 0])) == 'red.<|im_end|>'


def test_chat_template_file_wins_and_other_end_tokens_are_found(tmp_path):
  tok = _folder(tmp_path, CHATML, jinja_file=LLAMA3)
  assert tok.chat_template == LLAMA3
  pieces = tasks.chat_pieces(TURNS, tok)
  assert _trained_text(tok, pieces) == ['red.<|eot_id|>', 'two.<|eot_id|>']
  assert tasks.reply_end_id(tok) == tok._tok.token_to_id('<|eot_id|>')
  assert _all_text(tok, pieces).startswith('<|start_header_id|>user')  # BOS is the format's


def test_a_template_without_an_end_token_gets_eos_after_each_reply(tmp_path):
  tok = _folder(tmp_path, PLAIN)
  pieces = tasks.chat_pieces(TURNS[:2], tok)
  assert _trained_text(tok, pieces) == ['red.<|im_end|>']  # the tokenizer's EOS
  assert tasks.reply_end_id(tok) == tok.eos_id
  assert _all_text(tok, pieces) == 'user: what colour is the circle?\nassistant: red.<|im_end|>\n'


def test_without_a_template_chatml_is_the_fallback(tmp_path):
  tok = _folder(tmp_path)
  assert tok.chat_template is None and T.Tokenizer.load().chat_template is None
  pieces = tasks.chat_pieces(TURNS[:2], tok)
  assert _all_text(tok, pieces) == ('<|im_start|>user\nwhat colour is the circle?<|im_end|>\n'
                                    '<|im_start|>assistant\nred.<|im_end|>\n')
  assert _trained_text(tok, pieces) == ['red.<|im_end|>']


@pytest.mark.parametrize('template, match', [
    ('{% for m in messages %}', 'not valid Jinja'),
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
     "{% endfor %}", 'does not write assistant reply 0'),
    ("{{ raise_exception('only user turns') }}", 'only user turns'),
])
def test_a_template_that_cannot_be_used_is_named(tmp_path, template, match):
  tok = _folder(tmp_path, template)
  with pytest.raises(ValueError, match=match):
    tasks.chat_pieces(TURNS, tok)


def test_a_list_of_named_templates_uses_the_default_one(tmp_path):
  tok = _folder(tmp_path, [{'name': 'tool_use', 'template': PLAIN},
                           {'name': 'default', 'template': CHATML}])
  assert tok.chat_template == CHATML
  with pytest.raises(ValueError, match='expected one named "default"'):
    _folder(tmp_path, [{'name': 'tool_use', 'template': PLAIN}])
