"""Qwen2 import: our decoder's logits equal transformers' after the import, with and without the
KV cache; the full Qwen2.5-7B-Instruct tensor list maps one-to-one onto the 7B config; bad
folders fail with one error naming the tensor or key, and nothing is written."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_experiment
from tuna2_jax import train_state
from tuna2_jax.convert import hf_folder, qwen2
from tuna2_jax.convert.hf_folder import ConversionError
from tuna2_jax.layout import text_info

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 96
SHAPES = {  # GQA ratios (query heads per key/value head) and tied or untied heads
    'gqa2_untied': dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    'mha_tied': dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    'gqa4_untied': dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
}


def save_tiny_qwen2(path, seed=0, **overrides):
  """A randomly initialised Qwen2ForCausalLM saved as safetensors; returns the torch model."""
  kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_parameters={'rope_type': 'default', 'rope_theta': 500.0},
            tie_word_embeddings=False)
  kw.update(overrides)
  config = transformers.Qwen2Config(**kw)
  config._attn_implementation = 'eager'
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():  # move every tensor (biases and norms too) off its initial value
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def load_ours(path, vocab_size=VOCAB):
  folder = hf_folder.HFFolder(str(path))
  cfg = qwen2.decoder_config(folder.config)
  graphdef, abstract = qwen2.abstract_decoder(cfg, vocab_size)
  loaded = qwen2.load(str(path), hf_folder.flat_paths(abstract))
  assert set(loaded) == set(hf_folder.flat_paths(abstract))  # every parameter comes from Qwen2
  params = jax.tree_util.tree_map_with_path(
      lambda p, _: loaded[hf_folder.path_name(p)], abstract)
  return nnx.merge(graphdef, params)


def _info(b, t, offset=0):
  return text_info(jnp.ones((b, t), jnp.int32),
                   jnp.broadcast_to(jnp.arange(offset, offset + t, dtype=jnp.int32), (b, t)))


@pytest.mark.parametrize('shape', sorted(SHAPES))
def test_logits_match_transformers_with_and_without_cache(tmp_path, shape):
  ref_model = save_tiny_qwen2(tmp_path, **SHAPES[shape])
  dec = load_ours(tmp_path)
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 10))
  with torch.no_grad():
    ref = ref_model(torch.tensor(ids)).logits.numpy()

  hidden, _ = dec(dec.embed(jnp.asarray(ids)), _info(2, 10))
  full = np.asarray(dec.logits(hidden))
  np.testing.assert_allclose(full, ref, rtol=0, atol=1e-4)

  # Prefill 4 tokens into a 10-slot cache, then one token at a time.
  c = dec.cfg
  cache = {'k': jnp.zeros((c.num_layers, 2, 10, c.num_kv_heads, c.head_dim)),
           'v': jnp.zeros((c.num_layers, 2, 10, c.num_kv_heads, c.head_dim)),
           'index': jnp.zeros((), jnp.int32)}
  slots = _info(2, 10)  # unwritten slots lie in the future, so causality hides them
  hidden, cache = dec(dec.embed(jnp.asarray(ids[:, :4])), _info(2, 4), slots, cache)
  steps = [np.asarray(dec.logits(hidden))]
  for t in range(4, 10):
    cache = dict(cache, index=jnp.asarray(t, jnp.int32))
    hidden, cache = dec(dec.embed(jnp.asarray(ids[:, t:t + 1])), _info(2, 1, t), slots, cache)
    steps.append(np.asarray(dec.logits(hidden)))
  cached = np.concatenate(steps, axis=1)
  np.testing.assert_allclose(cached, ref, rtol=0, atol=1e-4)
  print(f'\n  {shape}: max |logits - transformers| = {np.abs(full - ref).max():.2e} (full), '
        f'{np.abs(cached - ref).max():.2e} (KV cache)')


def test_added_token_rows_start_at_the_mean(tmp_path):
  ref_model = save_tiny_qwen2(tmp_path)
  dec = load_ours(tmp_path, vocab_size=VOCAB + 3)
  embed = ref_model.model.embed_tokens.weight.detach().numpy()
  head = ref_model.lm_head.weight.detach().numpy()
  ours_embed = np.asarray(dec.embed.embedding[...])
  np.testing.assert_array_equal(ours_embed[:VOCAB], embed)
  np.testing.assert_allclose(ours_embed[VOCAB:], np.repeat(embed.mean(0, keepdims=True), 3, 0),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(dec.lm_head.kernel[...])[:, VOCAB:],
                             np.repeat(head.mean(0)[:, None], 3, 1), atol=1e-6)


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
  """Published Qwen2.5 weights are bfloat16: they widen to float32 without rounding."""
  ref_model = save_tiny_qwen2(tmp_path / 'f32').to(torch.bfloat16)
  ref_model.save_pretrained(str(tmp_path / 'bf16'))
  dec = load_ours(tmp_path / 'bf16')
  for ours, theirs in ((dec.blocks.mlp.down_proj.kernel[...][1], ref_model.model.layers[1].mlp
                        .down_proj.weight.T), (dec.embed.embedding[...],
                                              ref_model.model.embed_tokens.weight)):
    np.testing.assert_array_equal(np.asarray(ours), theirs.float().detach().numpy())


def test_load_places_each_parameter_in_its_sharding(tmp_path):
  save_tiny_qwen2(tmp_path)
  cfg = qwen2.decoder_config(hf_folder.HFFolder(str(tmp_path)).config)
  _, abstract = qwen2.abstract_decoder(cfg, VOCAB)
  flat = hf_folder.flat_paths(abstract)
  shardings = _fsdp_shardings(flat)
  sharded = qwen2.load(str(tmp_path), flat, shardings)
  plain = qwen2.load(str(tmp_path), flat)
  for k in flat:
    assert sharded[k].sharding == shardings[k]
    np.testing.assert_array_equal(np.asarray(sharded[k]), np.asarray(plain[k]))


def _fsdp_shardings(flat):
  """Layers replicated, the next axis split: each device reads its slice of every layer."""
  mesh = jax.make_mesh((len(jax.devices()),), ('fsdp',))
  P = jax.sharding.PartitionSpec
  return {k: jax.sharding.NamedSharding(mesh, P(None, 'fsdp') if len(v.shape) == 3 else P())
          for k, v in flat.items()}


def test_load_streams_tensor_by_tensor_into_each_devices_shard(tmp_path, monkeypatch):
  """Read by byte range, as from a cloud folder: every tensor is read once, in one read no larger
  than itself; the host keeps at most one parameter's source tensors; every placement callback
  returns just its device's shard. The result equals the memory-mapped load."""
  save_tiny_qwen2(tmp_path)
  folder = hf_folder.HFFolder(str(tmp_path))
  cfg = qwen2.decoder_config(folder.config)
  flat = hf_folder.flat_paths(qwen2.abstract_decoder(cfg, VOCAB)[1])
  shardings = _fsdp_shardings(flat)
  plain = qwen2.load(str(tmp_path), flat, shardings)  # memory-mapped

  reads, kept = [], []
  read_range, release = hf_folder._read_range, hf_folder.HFFolder.release
  make_array = jax.make_array_from_callback

  def recorded_read(file, offset, size):
    if offset > 8:  # not the header's length (at 0) or the header (at 8)
      reads.append(size)
    return read_range(file, offset, size)

  def recorded_release(self):
    kept.append(sum(t.nbytes for t in self._read.values()))
    release(self)

  def recorded_make_array(shape, sharding, callback):
    got = []

    def shard(index):
      out = callback(index)
      assert out.shape == sharding.shard_shape(shape)
      got.append(str(tuple(index)))
      return out
    result = make_array(shape, sharding, shard)
    # One callback per distinct shard (devices holding a replica share it), none other.
    want = {str(tuple(i)) for i in sharding.addressable_devices_indices_map(shape).values()}
    assert sorted(got) == sorted(want)
    return result

  monkeypatch.setattr(hf_folder, 'is_local', lambda path: False)
  monkeypatch.setattr(hf_folder, '_read_range', recorded_read)
  monkeypatch.setattr(hf_folder.HFFolder, 'release', recorded_release)
  monkeypatch.setattr(jax, 'make_array_from_callback', recorded_make_array)
  monkeypatch.setattr(np, 'memmap', None)  # the ranged path must not memory-map
  ranged = qwen2.load(str(tmp_path), flat, shardings)

  sizes = sorted(int(np.prod(s)) * 4 for s in folder.shapes.values())
  assert sorted(reads) == sizes  # each tensor once, whole
  largest_param = max(int(np.prod(v.shape)) * 4 for v in flat.values())
  assert len(kept) == len(flat) and max(kept) <= largest_param < sum(sizes) // 4
  for k in flat:
    assert ranged[k].sharding == shardings[k]
    np.testing.assert_array_equal(np.asarray(ranged[k]), np.asarray(plain[k]))


def test_cloud_urls_are_kept_as_urls(tmp_path, monkeypatch):
  assert hf_folder.absolute('gs://bucket/Qwen2.5-7B') == 'gs://bucket/Qwen2.5-7B'
  assert not hf_folder.is_local('gs://bucket/Qwen2.5-7B')
  monkeypatch.chdir(tmp_path)
  assert hf_folder.absolute('qwen') == str(tmp_path / 'qwen')


# --- the 7B mapping, from the published tensor list (names and shapes only) ---

QWEN2_5_7B_CONFIG = {
    'architectures': ['Qwen2ForCausalLM'], 'model_type': 'qwen2', 'hidden_act': 'silu',
    'hidden_size': 3584, 'intermediate_size': 18944, 'num_attention_heads': 28,
    'num_hidden_layers': 28, 'num_key_value_heads': 4, 'max_position_embeddings': 32768,
    'max_window_layers': 28, 'rms_norm_eps': 1e-06, 'rope_theta': 1000000.0,
    'sliding_window': 131072, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
    'use_cache': True, 'use_sliding_window': False, 'vocab_size': 152064}
QWEN2_5_7B_GLOBAL = {'model.embed_tokens.weight': (152064, 3584), 'model.norm.weight': (3584,),
                     'lm_head.weight': (152064, 3584)}
QWEN2_5_7B_LAYER = {  # model.layers.{0..27}.<name>
    'input_layernorm.weight': (3584,), 'post_attention_layernorm.weight': (3584,),
    'self_attn.q_proj.weight': (3584, 3584), 'self_attn.q_proj.bias': (3584,),
    'self_attn.k_proj.weight': (512, 3584), 'self_attn.k_proj.bias': (512,),
    'self_attn.v_proj.weight': (512, 3584), 'self_attn.v_proj.bias': (512,),
    'self_attn.o_proj.weight': (3584, 3584), 'mlp.gate_proj.weight': (18944, 3584),
    'mlp.up_proj.weight': (18944, 3584), 'mlp.down_proj.weight': (3584, 18944)}


def qwen2_5_7b_tensors():
  out = dict(QWEN2_5_7B_GLOBAL)
  for i in range(28):
    out.update({f'model.layers.{i}.{k}': v for k, v in QWEN2_5_7B_LAYER.items()})
  return out


def test_qwen2_5_7b_maps_one_to_one_onto_the_7b_config():
  tensors = qwen2_5_7b_tensors()
  assert len(tensors) == 339
  config = load_experiment('tuna2_7b')
  _, params = train_state.abstract_model(config)  # eval_shape: nothing allocated
  ours = {k: v for k, v in hf_folder.flat_paths(params).items() if k.startswith('decoder/')}
  _, plan = qwen2.checked_plan(tensors, QWEN2_5_7B_CONFIG, config.model.vocab_size, 'qwen2.5-7b',
                               target=config.model.decoder)
  assert {f'decoder/{k}' for k in plan} == set(ours)
  used = [name for m in plan.values() for name in m.names]
  assert len(used) == len(set(used)) and set(used) == set(tensors)
  for path, mapping in plan.items():
    assert mapping.target_shape(tensors) == tuple(ours[f'decoder/{path}'].shape), path


# --- bad input ---


@pytest.fixture(scope='module')
def good_folder(tmp_path_factory):
  path = tmp_path_factory.mktemp('qwen2_good')
  save_tiny_qwen2(path)
  return path


def _copy(good_folder, tmp_path, **config_changes):
  path = tmp_path / 'bad'
  shutil.copytree(good_folder, path)
  with open(path / 'config.json') as f:
    config = json.load(f)
  config.update(config_changes)
  with open(path / 'config.json', 'w') as f:
    json.dump(config, f)
  return path


@pytest.mark.parametrize('changes, match', [
    (dict(hidden_size=64), 'model.embed_tokens.weight'),
    (dict(num_hidden_layers=3), 'model.layers.2.'),
    (dict(num_hidden_layers=1), 'unexpected tensor .model.layers.1.'),
    (dict(intermediate_size=40), 'model.layers.0.mlp.gate_proj.weight'),
    (dict(architectures=['LlamaForCausalLM'], model_type='llama'), 'LlamaForCausalLM'),
])
def test_bad_checkpoint_is_refused_and_nothing_written(good_folder, tmp_path, changes, match):
  path = _copy(good_folder, tmp_path, **changes)
  out = tmp_path / 'out'
  with pytest.raises(ConversionError, match=match):
    qwen2.convert(str(path), str(out))
  assert not out.exists()


def test_missing_files_are_named(good_folder, tmp_path):
  path = _copy(good_folder, tmp_path)
  os.remove(path / 'model.safetensors')
  with pytest.raises(FileNotFoundError, match='no \\*.safetensors'):
    qwen2.convert(str(path), str(tmp_path / 'out'))
  (path / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(ConversionError, match='pickled'):
    qwen2.convert(str(path), str(tmp_path / 'out'))
  shutil.copy(good_folder / 'model.safetensors', path / 'model-00001-of-00002.safetensors')
  (path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {
      'model.norm.weight': 'model-00002-of-00002.safetensors'}}))
  with pytest.raises(FileNotFoundError, match='model-00002-of-00002.safetensors'):
    qwen2.convert(str(path), str(tmp_path / 'out'))
  os.remove(path / 'config.json')
  with pytest.raises(FileNotFoundError, match='config.json'):
    qwen2.convert(str(path), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_target_config_mismatch_names_the_key(good_folder):
  cfg = qwen2.decoder_config(hf_folder.HFFolder(str(good_folder)).config)
  target = cfg.copy_and_resolve_references()
  target.rope_theta = 1e6
  _, abstract = qwen2.abstract_decoder(cfg, VOCAB)
  with pytest.raises(ConversionError, match='rope_theta'):
    qwen2.load(str(good_folder), hf_folder.flat_paths(abstract), target=target)


def test_command_line_writes_a_checkpoint_and_reports_errors_in_one_line(good_folder, tmp_path):
  import subprocess
  import sys
  from conftest import REPO_ROOT
  out = tmp_path / 'out'
  run = lambda: subprocess.run(
      [sys.executable, '-m', 'tuna2_jax.convert.qwen2', f'--hf_dir={good_folder}',
       f'--output={out}', f'--vocab_size={VOCAB + 4}'],
      capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
  done = run()
  assert done.returncode == 0, done.stderr
  config = json.loads((out / qwen2.DECODER_CONFIG_FILE).read_text())
  assert config['vocab_size'] == VOCAB + 4 and config['decoder']['num_kv_heads'] == 2
  assert (out / qwen2.PARAMS_DIR).is_dir()
  again = run()
  assert again.returncode == 2 and again.stderr.startswith('error: ')
  assert 'already exists' in again.stderr and 'Traceback' not in again.stderr
