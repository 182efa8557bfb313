r"""Qwen2 / Qwen2.5 checkpoints (a Hugging Face folder) -> the decoder's parameters.

  python -m tuna2_jax.convert.qwen2 --hf_dir=DIR --output=CKPT [--vocab_size=152128]

writes CKPT/params (an orbax checkpoint of {'decoder': ...}) and CKPT/decoder_config.json; a
training config starts from it (or straight from DIR) with --config.init.decoder_from=CKPT.
DIR's tokenizer.json is copied along (with tokenizer_config.json and config.json, which fix its
special tokens' ids, and chat_template.jinja, where newer folders keep the chat template), so
that a run with an empty data.tokenizer uses it from CKPT as it would from DIR
(data/tokenizer.py tokenizer_path).

Every tensor has one place: q/k/v (with bias, GQA), o, the SwiGLU MLP, both RMSNorms, the final
norm, the embedding and, when untied, the LM head; per-layer tensors fill the stacked [L, ...]
parameters. RoPE theta and RMSNorm eps come from config.json. The embedding (and head) are
widened to the target vocabulary for the added special tokens; new rows start at the mean row.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import flags
from etils import epath
from flax import nnx

from tuna2_jax import config_lib
from tuna2_jax.convert import hf_folder
from tuna2_jax.convert.hf_folder import ConversionError, Mapping

ARCHITECTURES = ('Qwen2ForCausalLM',)
DECODER_CONFIG_FILE = 'decoder_config.json'
PARAMS_DIR = 'params'
# Copied from the Hugging Face folder when it has a tokenizer.json: HFTokenizer reads them all.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja',
                   'config.json')
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)
# Our decoder keys and the config.json keys they must equal.
_SAME = (('width', 'hidden_size'), ('num_layers', 'num_hidden_layers'),
         ('num_heads', 'num_attention_heads'), ('num_kv_heads', 'num_key_value_heads'),
         ('head_dim', 'head_dim'), ('mlp_dim', 'intermediate_size'), ('rope_theta', 'rope_theta'),
         ('norm_eps', 'rms_norm_eps'), ('tie_embeddings', 'tie_word_embeddings'))


def _require(hf: dict, key: str, where: str):
  if key not in hf:
    raise ConversionError(f'{where}: config.json has no {key!r}')
  return hf[key]


def decoder_config(hf: dict, where: str = 'config.json') -> ml_collections.ConfigDict:
  """Our decoder config for a Qwen2 config.json (as a dict); raises on what we cannot load."""
  archs = hf.get('architectures') or [hf.get('model_type', '?')]
  if not any(a in ARCHITECTURES for a in archs) and hf.get('model_type') != 'qwen2':
    raise ConversionError(f'{where}: architectures={archs} (model_type='
                          f'{hf.get("model_type")!r}); expected one of {ARCHITECTURES}')
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  if rope.get('rope_type', rope.get('type', 'default')) != 'default':
    raise ConversionError(f'{where}: rope scaling {rope!r} is not supported; expected plain RoPE')
  if hf.get('use_sliding_window'):
    raise ConversionError(f'{where}: use_sliding_window=true is not supported')
  width = _require(hf, 'hidden_size', where)
  heads = _require(hf, 'num_attention_heads', where)
  theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))
  return config_lib.decoder(
      _require(hf, 'num_hidden_layers', where), width, heads,
      hf.get('num_key_value_heads') or heads, hf.get('head_dim') or width // heads,
      _require(hf, 'intermediate_size', where), rope_theta=float(theta),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), qkv_bias=True,
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)))


def check_compatible(hf_cfg: ml_collections.ConfigDict, target: ml_collections.ConfigDict,
                     where: str) -> None:
  """Raises naming the first config.json key that differs from the target decoder config."""
  for ours, theirs in _SAME:
    if hf_cfg[ours] != target[ours]:
      raise ConversionError(f'{where}: config.json {theirs}={hf_cfg[ours]} but the target '
                            f'model.decoder.{ours}={target[ours]}')
  if not target.qkv_bias:
    raise ConversionError(f'{where}: Qwen2 has q/k/v biases but model.decoder.qkv_bias=False')


def hf_shapes(cfg: ml_collections.ConfigDict, hf_vocab: int) -> dict[str, tuple[int, ...]]:
  """Every tensor a Qwen2 checkpoint of this config holds, with its shape."""
  d, q, kv = cfg.width, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  layer = {'input_layernorm.weight': (d,), 'post_attention_layernorm.weight': (d,),
           'self_attn.q_proj.weight': (q, d), 'self_attn.q_proj.bias': (q,),
           'self_attn.k_proj.weight': (kv, d), 'self_attn.k_proj.bias': (kv,),
           'self_attn.v_proj.weight': (kv, d), 'self_attn.v_proj.bias': (kv,),
           'self_attn.o_proj.weight': (d, q), 'mlp.gate_proj.weight': (cfg.mlp_dim, d),
           'mlp.up_proj.weight': (cfg.mlp_dim, d), 'mlp.down_proj.weight': (d, cfg.mlp_dim)}
  out = {'model.embed_tokens.weight': (hf_vocab, d), 'model.norm.weight': (d,)}
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = (hf_vocab, d)
  for i in range(cfg.num_layers):
    out.update({f'model.layers.{i}.{k}': v for k, v in layer.items()})
  return out


def plan(cfg: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Mapping]:
  """{decoder parameter path: Mapping} for a checkpoint of config cfg."""
  per_layer = lambda key: tuple(f'model.layers.{i}.{key}' for i in range(cfg.num_layers))
  out = {'embed/embedding': Mapping(('model.embed_tokens.weight',), rows=vocab_size),
         'norm/scale': Mapping(('model.norm.weight',)),
         'blocks/input_norm/scale': Mapping(per_layer('input_layernorm.weight'), stacked=True),
         'blocks/post_attn_norm/scale': Mapping(per_layer('post_attention_layernorm.weight'),
                                                stacked=True)}
  for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    out[f'blocks/attn/{name}/kernel'] = Mapping(per_layer(f'self_attn.{name}.weight'),
                                                transpose=True, stacked=True)
    if name != 'o_proj':
      out[f'blocks/attn/{name}/bias'] = Mapping(per_layer(f'self_attn.{name}.bias'), stacked=True)
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    out[f'blocks/mlp/{name}/kernel'] = Mapping(per_layer(f'mlp.{name}.weight'), transpose=True,
                                               stacked=True)
  if not cfg.tie_embeddings:
    out['lm_head/kernel'] = Mapping(('lm_head.weight',), transpose=True, rows=vocab_size)
  return out


def checked_plan(shapes: dict[str, tuple[int, ...]], hf: dict, vocab_size: int,
                 where: str, target: ml_collections.ConfigDict | None = None
                 ) -> tuple[ml_collections.ConfigDict, dict[str, Mapping]]:
  """(decoder config, plan) after checking every tensor's name and shape; reads no values."""
  cfg = decoder_config(hf, where)
  if target is not None:
    check_compatible(cfg, target, where)
  hf_vocab = _require(hf, 'vocab_size', where)
  if vocab_size < hf_vocab:
    raise ConversionError(f'{where}: config.json vocab_size={hf_vocab} exceeds the target '
                          f'vocabulary {vocab_size}')
  expected = hf_shapes(cfg, hf_vocab)
  # A tied checkpoint may still store a copy of the embedding as the head.
  ignored = lambda n: n.endswith(_IGNORED_SUFFIXES) or (cfg.tie_embeddings and
                                                        n == 'lm_head.weight')
  hf_folder.check_shapes(expected, shapes, where, ignored)
  return cfg, plan(cfg, vocab_size)


def load(hf_dir: str, abstract: dict[str, jax.ShapeDtypeStruct],
         shardings: dict[str, jax.sharding.Sharding] | None = None,
         target: ml_collections.ConfigDict | None = None) -> dict[str, jax.Array]:
  """{decoder parameter path: array} of a Qwen2 folder, in the given shardings.

  abstract: the decoder's parameters by path ('embed/embedding', 'blocks/attn/q_proj/kernel',
  ...), whose embedding sets the target vocabulary; target: the decoder config to check against.
  """
  folder = hf_folder.HFFolder(hf_dir)
  vocab = abstract['embed/embedding'].shape[0]
  _, mapping = checked_plan(folder.shapes, folder.config, vocab, hf_dir, target)
  return hf_folder.load(mapping, folder, abstract, shardings)


def abstract_decoder(cfg: ml_collections.ConfigDict, vocab_size: int):
  """(graphdef, abstract parameter state) of a standalone float32 decoder."""
  from tuna2_jax.models.decoder import Decoder
  with nnx.use_eager_sharding(False):  # logical axes as metadata, as train_state keeps them
    model = nnx.eval_shape(lambda: Decoder(cfg, vocab_size, impl='dense', remat='none',
                                           rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param)


def convert(hf_dir: str, output: str, vocab_size: int = 0) -> str:
  """Writes output/params ({'decoder': ...}) and output/decoder_config.json; returns output."""
  import orbax.checkpoint as ocp
  folder = hf_folder.HFFolder(hf_dir)
  vocab_size = vocab_size or _require(folder.config, 'vocab_size', hf_dir)
  cfg, mapping = checked_plan(folder.shapes, folder.config, vocab_size, hf_dir)
  hf_folder.check_new_output(output)
  _, abstract = abstract_decoder(cfg, vocab_size)
  params = hf_folder.load(mapping, folder, hf_folder.flat_paths(abstract))
  tree = hf_folder.unflatten(params)
  os.makedirs(output)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(os.path.abspath(output), PARAMS_DIR), {'decoder': tree})
  with open(os.path.join(output, DECODER_CONFIG_FILE), 'w') as f:
    json.dump({'decoder': cfg.to_dict(), 'vocab_size': vocab_size, 'source': hf_dir}, f, indent=2)
  source = epath.Path(hf_dir)
  if (source / TOKENIZER_FILES[0]).exists():
    for name in TOKENIZER_FILES:
      if (source / name).exists():
        (source / name).copy(epath.Path(output) / name)
  return output


def main(argv):
  del argv
  out = convert(flags.FLAGS.hf_dir, flags.FLAGS.output, flags.FLAGS.vocab_size)
  print(f'wrote {out}')


if __name__ == '__main__':
  from tuna2_jax import cli
  hf_folder.define_import_flags()
  flags.DEFINE_integer('vocab_size', 0, 'Target vocabulary (embedding rows) including added '
                       'special tokens; 0 keeps the checkpoint\'s.')
  cli.run(main)
