r"""Trained parameters -> a Hugging Face folder: the decoder as Qwen2ForCausalLM, the rest apart.

  python -m tuna2_jax.convert.export --workdir=DIR --output=OUT [--use_ema=false]

OUT then holds what `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads, the decoder
(embedding, blocks, final norm, LM head) as a Qwen2 language model:
  config.json                      a Qwen2Config of the run's model.decoder (vocab_size = the
                                   model's rows, added special tokens included; their ids under
                                   'tuna2_jax')
  model-0000i-of-0000N.safetensors Qwen2 tensor names ('model.layers.3.self_attn.q_proj.weight'),
  model.safetensors.index.json     the reverse of convert/qwen2.py's mapping: kernels [out, in],
                                   one tensor per layer
  tokenizer.json, ...              the run's Hugging Face tokenizer files, when it uses one
and, in OUT/tuna/, everything else of the model (patch embedding or vision encoder, time
embedding, flow head) under our parameter paths with dots ('head.blocks.attn.q_proj.kernel',
per-layer parameters stacked on a leading axis) in tuna-0000i-of-0000M.safetensors +
tuna.safetensors.index.json, with the run's config as OUT/tuna/config.json. Files are at most
--shard_gb each.

Only the exported parameters (the EMA, or the raw ones) are restored from the latest checkpoint,
fsdp-sharded over every device; the optimizer state is never read. Files are written tensor by
tensor, each parameter gathered to the host once, so a host holds at most one parameter at a
time. A decoder Qwen2 cannot express (no q/k/v biases) is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import flags

from tuna2_jax import sharding
from tuna2_jax.convert import hf_folder
from tuna2_jax.convert import qwen2
from tuna2_jax.convert.hf_folder import ConversionError

DECODER_PREFIX = 'decoder/'
QWEN2_FILES = 'model'  # model-0000i-of-0000N.safetensors, model.safetensors.index.json
OTHER_DIR = 'tuna'  # the non-decoder parameters under our names, and the run's config
OTHER_FILES = 'tuna'
_CODES = {np.dtype(v): k for k, v in hf_folder.DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor of an exported file: its name, shape and dtype, and how to fetch its values."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  fetch: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * self.dtype.itemsize


class _Gathered:
  """Host copies of parameters, one at a time: tensors cut from one parameter (its layers) are
  fetched in a row, so each parameter is gathered once and only the last one is kept."""

  def __init__(self, flat: dict[str, object]):
    self._flat, self._path, self._value = flat, None, None

  def __call__(self, path: str) -> np.ndarray:
    if path != self._path:
      self._path, self._value = None, None  # release the previous parameter first
      self._value = sharding.to_host(self._flat[path])
      self._path = path
    return self._value


def qwen2_tensors(flat: dict[str, object], decoder: ml_collections.ConfigDict,
                  vocab_size: int) -> list[Tensor]:
  """The decoder's parameters ({'decoder/...': array}) as Qwen2 tensors, in parameter order.

  The inverse of convert/qwen2.py's plan: each stacked [L, ...] parameter is cut into its L
  per-layer tensors, [in, out] kernels go back to [out, in], and the embedding keeps every row.
  """
  if not decoder.qkv_bias:
    raise ConversionError('model.decoder.qkv_bias=False: Qwen2 has q/k/v biases, so this '
                          'decoder cannot be exported as Qwen2ForCausalLM')
  gathered = _Gathered(flat)
  out = []
  for path, m in qwen2.plan(decoder, vocab_size).items():
    full = DECODER_PREFIX + path
    if full not in flat:
      raise ConversionError(f'the decoder has no parameter {full!r}, which Qwen2 needs as '
                            f'{m.names[0]!r}')
    x = flat[full]
    shape = tuple(x.shape[1:] if m.stacked else x.shape)
    shape = shape[::-1] if m.transpose else shape
    for i, name in enumerate(m.names):
      def fetch(full=full, i=i, m=m):
        value = gathered(full)
        value = value[i] if m.stacked else value
        return value.T if m.transpose else value
      out.append(Tensor(name, shape, np.dtype(x.dtype), fetch))
  hf_folder.check_shapes(qwen2.hf_shapes(decoder, vocab_size), {t.name: t.shape for t in out},
                         'export')
  return out


def other_tensors(flat: dict[str, object]) -> list[Tensor]:
  """Every non-decoder parameter under its path with dots."""
  gathered = _Gathered(flat)
  return [Tensor(path.replace('/', '.'), tuple(x.shape), np.dtype(x.dtype),
                 lambda path=path: gathered(path))
          for path, x in flat.items() if not path.startswith(DECODER_PREFIX)]


def _write_safetensors(path: str | None, tensors: list[Tensor], metadata: dict[str, str]) -> None:
  """A safetensors file whose tensors are fetched and written one at a time. With path None
  (the processes that do not write) the tensors are only fetched: every process takes part in
  the gathers."""
  if path is None:
    for t in tensors:
      t.fetch()
    return
  header, offset = {'__metadata__': metadata}, 0
  for t in tensors:
    header[t.name] = {'dtype': _CODES[t.dtype], 'shape': list(t.shape),
                      'data_offsets': [offset, offset + t.nbytes]}
    offset += t.nbytes
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)  # the data starts 8-byte aligned
  with open(path, 'wb') as f:
    f.write(len(text).to_bytes(8, 'little') + text)
    for t in tensors:
      value = np.ascontiguousarray(t.fetch(), t.dtype)
      if value.shape != t.shape:
        raise ConversionError(f'tensor {t.name!r} came out {value.shape}; expected {t.shape}')
      f.write(value.tobytes())


def write_sharded(output: str, prefix: str, tensors: list[Tensor], shard_bytes: int,
                  metadata: dict[str, str], write: bool = True) -> list[str]:
  """PREFIX-0000i-of-0000N.safetensors (at most shard_bytes each unless one tensor is larger)
  and PREFIX.safetensors.index.json in output; returns the file names."""
  groups, size = [[]], 0
  for t in tensors:
    if groups[-1] and size + t.nbytes > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(t)
    size += t.nbytes
  names, weight_map = [], {}
  for i, group in enumerate(groups):
    name = f'{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors'
    _write_safetensors(os.path.join(output, name) if write else None, group, metadata)
    weight_map.update({t.name: name for t in group})
    names.append(name)
  if write:
    total = sum(t.nbytes for t in tensors)
    with open(os.path.join(output, f'{prefix}.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=1)
  return names


def special_token_ids(tok) -> dict[str, int]:
  return {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id, 'pad_token_id': tok.pad_id,
          'boi_token_id': tok.boi_id, 'eoi_token_id': tok.eoi_id, 'img_token_id': tok.img_id}


def qwen2_config(config: ml_collections.ConfigDict, token_ids: dict[str, int]) -> dict:
  """A transformers Qwen2Config (as config.json's dict) of the run's decoder."""
  d = config.model.decoder
  return {
      'architectures': list(qwen2.ARCHITECTURES), 'model_type': 'qwen2', 'hidden_act': 'silu',
      'hidden_size': d.width, 'intermediate_size': d.mlp_dim, 'num_hidden_layers': d.num_layers,
      'num_attention_heads': d.num_heads, 'num_key_value_heads': d.num_kv_heads,
      'head_dim': d.head_dim, 'rms_norm_eps': d.norm_eps, 'vocab_size': config.model.vocab_size,
      'tie_word_embeddings': bool(d.tie_embeddings),
      'rope_parameters': {'rope_type': 'default', 'rope_theta': float(d.rope_theta)},
      'rope_theta': float(d.rope_theta),  # where transformers 4 reads it
      # RoPE has no length limit; this is the longest row the model was trained on.
      'max_position_embeddings': int(config.seq_len),
      'use_sliding_window': False, 'attention_dropout': 0.0, 'use_cache': True,
      'dtype': config.model.param_dtype,
      'bos_token_id': token_ids['bos_token_id'], 'eos_token_id': token_ids['eos_token_id'],
      'pad_token_id': token_ids['pad_token_id'],
      # The ids the sequence format adds, for code that builds Tuna-2 sequences around the model.
      'tuna2_jax': {k: v for k, v in token_ids.items() if k.split('_')[0] in ('boi', 'eoi', 'img')},
  }


def tokenizer_files(tokenizer_path: str) -> list[str]:
  """The Hugging Face tokenizer files of a run's tokenizer (none for SentencePiece)."""
  from tuna2_jax.data.tokenizer import HF_TOKENIZER_FILE, HF_TOKENIZER_FILES
  if not tokenizer_path:
    return []
  folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
  if not os.path.isfile(os.path.join(folder, HF_TOKENIZER_FILE)):
    return []
  return [os.path.join(folder, name) for name in HF_TOKENIZER_FILES
          if os.path.isfile(os.path.join(folder, name))]


def export(params, config: ml_collections.ConfigDict, output: str,
           shard_bytes: int = 2 << 30) -> list[str]:
  """Writes params (an nnx.State, nested dict or {path: array} of the model config describes)
  as described in the module docstring; returns the written safetensors file names."""
  from tuna2_jax.data.tokenizer import Tokenizer, tokenizer_path
  hf_folder.check_new_output(output)
  flat = hf_folder.flat_paths(params)
  decoder = qwen2_tensors(flat, config.model.decoder, config.model.vocab_size)
  others = other_tensors(flat)
  tok = Tokenizer.for_config(config)
  lead = jax.process_index() == 0
  if lead:
    os.makedirs(output)
  names = write_sharded(output, QWEN2_FILES, decoder, shard_bytes, {'format': 'pt'}, lead)
  rest = os.path.join(output, OTHER_DIR)
  if lead:
    os.makedirs(rest)
  if others:
    names += write_sharded(rest, OTHER_FILES, others, shard_bytes, {'format': 'tuna2_jax'}, lead)
  if lead:
    with open(os.path.join(output, 'config.json'), 'w') as f:
      json.dump(qwen2_config(config, special_token_ids(tok)), f, indent=2)
    with open(os.path.join(rest, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    for path in tokenizer_files(tokenizer_path(config)):
      shutil.copy(path, os.path.join(output, os.path.basename(path)))
  return names


def _fsdp_shardings(params, rules):
  """The parameters' shardings over all devices on the fsdp axis: the largest fsdp size that
  divides the dimensions the rules split (the rest of the devices replicate)."""
  n = jax.device_count()
  for fsdp in (d for d in range(n, 0, -1) if n % d == 0):
    try:
      return sharding.tree_shardings(params, sharding.mesh_from_sizes(data=n // fsdp, fsdp=fsdp),
                                     rules)
    except ValueError:
      if fsdp == 1:
        raise


def restore_params(workdir: str, use_ema: bool = True) -> tuple[dict, ml_collections.ConfigDict,
                                                                  int]:
  """({parameter path: array}, config, step): the EMA (or raw) parameters of a workdir's latest
  checkpoint, fsdp-sharded over the devices; nothing else of the state is read."""
  from tuna2_jax import train_state
  from tuna2_jax.convert import init_from
  config = train_state.load_config(workdir)
  _, params = train_state.abstract_model(config)
  shardings = _fsdp_shardings(params, config.sharding_rules)
  flat, step = init_from.workdir_params(
      workdir, hf_folder.flat_paths(params), hf_folder.flat_paths(shardings),
      item='ema' if use_ema else 'params', where='--workdir')
  return flat, config, step


def main(argv):
  del argv
  output = flags.FLAGS.output
  hf_folder.check_new_output(output)
  params, config, step = restore_params(flags.FLAGS.workdir, use_ema=flags.FLAGS.use_ema)
  files = export(params, config, output, int(flags.FLAGS.shard_gb * (1 << 30)))
  print(f'wrote {len(files)} safetensors files of step {step} to {output}')


if __name__ == '__main__':
  from tuna2_jax import cli
  flags.DEFINE_string('workdir', None, 'Training workdir to export.', required=True)
  flags.DEFINE_string('output', None, 'Directory to write (must not exist).', required=True)
  flags.DEFINE_bool('use_ema', True, 'Export the EMA parameters (else the raw ones).')
  flags.DEFINE_float('shard_gb', 2.0, 'Largest safetensors file, in GiB.')
  cli.run(main)
