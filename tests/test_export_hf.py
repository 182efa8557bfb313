"""Hugging Face export: transformers loads the exported folder as Qwen2ForCausalLM and its logits
equal our decoder's on a tiny random model (untied and tied heads); convert.qwen2 imports it back
exactly (the one name mapping, both ways); the rest of the model is kept apart; a decoder Qwen2
cannot express is refused before anything is written."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_experiment, perturbed_params
from tuna2_jax import train_state
from tuna2_jax.convert import export, hf_folder, qwen2
from tuna2_jax.convert.hf_folder import ConversionError
from tuna2_jax.layout import text_info

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _model(tied: bool):
  config = load_experiment('shapes', 'runlocal=True')
  config.model.decoder.tie_embeddings = tied
  return perturbed_params(train_state.build_model(config), seed=1), config


def _our_logits(model, ids_BT):
  b, t = ids_BT.shape
  info = text_info(jnp.ones((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t)))
  dec = model.decoder
  hidden, _ = dec(dec.embed(jnp.asarray(ids_BT)), info)
  return np.asarray(dec.logits(hidden))


@pytest.mark.parametrize('tied', [False, True])
def test_transformers_loads_the_export_and_its_logits_match(tmp_path, tied):
  model, config = _model(tied)
  out = tmp_path / 'hf'
  files = export.export(nnx.state(model, nnx.Param), config, str(out), shard_bytes=200_000)
  assert len([f for f in files if f.startswith('model-')]) > 1  # sharded, listed in the index
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation='eager')
  assert type(ref).__name__ == 'Qwen2ForCausalLM' and ref.config.tie_word_embeddings == tied
  ids = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 12))
  with torch.no_grad():
    theirs = ref(torch.tensor(ids)).logits.float().numpy()
  ours = _our_logits(model, ids)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  print(f'\n  tied={tied}: max |logits - transformers| = {np.abs(ours - theirs).max():.2e}')


def test_export_imports_back_exactly_and_keeps_the_rest_apart(tmp_path):
  model, config = _model(False)
  params = hf_folder.flat_paths(nnx.state(model, nnx.Param))
  out = tmp_path / 'hf'
  export.export(params, config, str(out))
  # The decoder folder is a plain Qwen2 folder: convert.qwen2's import reads it back exactly.
  folder = hf_folder.HFFolder(str(out))
  cfg = qwen2.decoder_config(folder.config)
  qwen2.check_compatible(cfg, config.model.decoder, str(out))
  _, abstract = qwen2.abstract_decoder(cfg, config.model.vocab_size)
  back = qwen2.load(str(out), hf_folder.flat_paths(abstract), target=config.model.decoder)
  for path, value in back.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(params[f'decoder/{path}']))
  # Everything else, under our names, in tuna/ with the run's config.
  rest = hf_folder.HFFolder(str(out / export.OTHER_DIR))
  want = {k.replace('/', '.'): v for k, v in params.items() if not k.startswith('decoder/')}
  assert set(rest.shapes) == set(want) and any(k.startswith('head.') for k in want)
  for name, value in want.items():
    np.testing.assert_array_equal(np.asarray(rest.tensor(name)), np.asarray(value))
  assert rest.config['model']['decoder']['width'] == config.model.decoder.width
  hf = json.loads((out / 'config.json').read_text())
  assert hf['vocab_size'] == config.model.vocab_size
  assert set(hf['tuna2_jax']) == {'boi_token_id', 'eoi_token_id', 'img_token_id'}
  with pytest.raises(ConversionError, match='already exists'):
    export.export(params, config, str(out))


def test_decoder_without_qkv_bias_is_refused_and_nothing_written(tmp_path):
  config = load_experiment('shapes', 'runlocal=True')
  config.model.decoder.qkv_bias = False
  _, params = train_state.abstract_model(config)
  with pytest.raises(ConversionError, match='qkv_bias=False'):
    export.export(params, config, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_the_runs_tokenizer_and_its_chat_template_travel_with_the_export(tmp_path):
  """transformers loads the exported tokenizer, and its apply_chat_template writes the text our
  chat layout trains on (data/chat_template.py)."""
  from test_chat_template import CHATML, TURNS, _folder
  from tuna2_jax.data import chat_template
  (tmp_path / 'tok').mkdir()
  ours = _folder(tmp_path / 'tok', CHATML)
  model, config = _model(False)
  config.data.tokenizer = str(tmp_path / 'tok')
  out = tmp_path / 'hf'
  export.export(nnx.state(model, nnx.Param), config, str(out))
  hf = json.loads((out / 'config.json').read_text())
  assert (hf['eos_token_id'], hf['pad_token_id']) == (ours.eos_id, ours.pad_id)
  theirs = transformers.AutoTokenizer.from_pretrained(str(out))
  messages = [{'role': r, 'content': t} for r, t in TURNS]
  assert theirs.apply_chat_template(messages, tokenize=False) == chat_template.render(ours, TURNS)
  assert theirs.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
      chat_template.render(ours, TURNS[:1], add_generation_prompt=True))
  text = chat_template.render(ours, TURNS)
  assert theirs(text, add_special_tokens=False)['input_ids'] == ours.encode(text)
