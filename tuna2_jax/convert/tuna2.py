r"""Official Tuna-2 / Tuna-R checkpoints (facebookresearch/tuna-2) <-> this project's parameters.

Import (a workdir-shaped DIR that `init_from`, `generate` and `understand` take):

  python -m tuna2_jax.convert.tuna2 --checkpoint=foundation_ckpt.pt \
      --config=experiments/tuna2_7b_restore.py --output=DIR [--tokenizer=QWEN_DIR]

Export (a model trained here, under the official names, for the official code):

  python -m tuna2_jax.convert.tuna2 --export --workdir=RUN --output=model.safetensors|model.pt

The checkpoint is a `.safetensors` file, a folder of them, or a `.pt` file read only with
`torch.load(weights_only=True)` (a pickle that needs anything but tensors is refused; nothing
else unpickles). Names are the official inner model's (`tuna.model.*`, `vision_encoder.*`,
`time_embed.*`, `diffusion_head_a.*`, `diffusion_head_b.*`, `mask_token`; Tuna-R
`vision_model.*`, `siglip_proj.*`), optionally under one `tuna_model.` / `module.` prefix.
Every one maps one-to-one onto a parameter (`plan`); an unknown, missing or mis-shaped tensor,
a checkpoint of the other variant or a config without the official structure (one shared
timestep embedder) stops the import with the list of them before anything is written. Tensors
are then streamed into the target shardings one at a time (convert/hf_folder.py).

DIR holds config.json (the given config, its init sources cleared) and checkpoints/0 with the
parameters only; a restore run starts from it with --config.init_from=DIR. The config should
carry the official conventions (config_lib.OFFICIAL_*), or the model computes something else
from the same weights; differences are listed as a warning.

Tuna-R: the official model has no mask token on its encoder; ours keeps its initial value.
Export writes safetensors tensor by tensor (a host holds one at a time); `.pt` export builds
the state dict in host memory (torch.save needs it whole).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import ml_dtypes
import numpy as np
from absl import flags
from etils import epath

from tuna2_jax import config_lib
from tuna2_jax.convert import hf_folder
from tuna2_jax.convert.hf_folder import ConversionError

KINDS = ('copy', 'linear', 'conv', 'token')
PREFIXES = ('tuna_model.', 'module.')
# A name that only one variant's checkpoint holds, by config model.vision.
MARKERS = {'patch': 'vision_encoder.patch_embedding.weight',
           'encoder': 'vision_model.embeddings.patch_embedding.weight'}
VARIANT_NAMES = {'patch': 'Tuna-2', 'encoder': 'Tuna-R'}
_MAX_LISTED = 12
# Our parameters that official checkpoints lack, with their initialisers: the official Tuna-R
# encoder has no mask token (models/patch_embed.py mask_token's N(0, 1) / sqrt(width)).
NOT_OFFICIAL = {'vision/mask_token': lambda key, shape, dtype: (
    jax.random.normal(key, shape, dtype) * shape[-1] ** -0.5)}


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one of our parameters comes from: official tensors and how they are laid out.

  kind: 'copy' (same layout), 'linear' (torch [out, in] -> our [in, out]), 'conv' (Conv2d
  [out, C, p, p] -> our [(row, col, C), out]) or 'token' ([1, 1, D] -> [D]); stacked: one name
  per layer, stacked on a leading layers axis.
  """
  names: tuple[str, ...]
  kind: str = 'copy'
  stacked: bool = False


def to_ours(kind: str, t: np.ndarray) -> np.ndarray:
  """An official tensor in our layout."""
  if kind == 'linear':
    return t.T
  if kind == 'conv':
    return t.transpose(2, 3, 1, 0).reshape(-1, t.shape[0])
  if kind == 'token':
    return t.reshape(-1)
  return t


def to_official(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Our parameter in the official layout `shape` (the inverse of `to_ours`)."""
  if kind == 'linear':
    return x.T
  if kind == 'conv':
    out, c, p, _ = shape
    return x.reshape(p, p, c, out).transpose(3, 2, 0, 1)
  return x.reshape(shape)


def official_shape(kind: str, ours: tuple[int, ...], channels: int = 3) -> tuple[int, ...]:
  """The official tensor's shape for our (unstacked) parameter shape."""
  if kind == 'linear':
    return tuple(ours[::-1])
  if kind == 'conv':
    p = int(round((ours[0] // channels) ** 0.5))
    return (ours[1], channels, p, p)
  if kind == 'token':
    return (1, 1, ours[0])
  return tuple(ours)


def _layers(prefix: str, n: int, key: str) -> tuple[str, ...]:
  return tuple(f'{prefix}.{i}.{key}' for i in range(n))


def plan(model: ml_collections.ConfigDict) -> dict[str, Source]:
  """{our parameter path: Source} for every parameter an official checkpoint provides."""
  dec, head = model.decoder, model.head
  out: dict[str, Source] = {}

  def block(ours: str, theirs: str, n: int, pairs) -> None:
    for our_key, their_key, kind in pairs:
      out[f'{ours}/{our_key}'] = Source(_layers(theirs, n, their_key), kind, stacked=True)

  out['decoder/embed/embedding'] = Source(('tuna.model.embed_tokens.weight',))
  out['decoder/norm/scale'] = Source(('tuna.model.norm.weight',))
  if not dec.tie_embeddings:
    out['decoder/lm_head/kernel'] = Source(('tuna.lm_head.weight',), 'linear')
  attn = [(f'attn/{n}/kernel', f'self_attn.{n}.weight', 'linear')
          for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')]
  mlp = [(f'mlp/{n}/kernel', f'mlp.{n}.weight', 'linear')
         for n in ('gate_proj', 'up_proj', 'down_proj')]
  block('decoder/blocks', 'tuna.model.layers', dec.num_layers,
        [('input_norm/scale', 'input_layernorm.weight', 'copy'),
         ('post_attn_norm/scale', 'post_attention_layernorm.weight', 'copy')] + attn + mlp +
        ([(f'attn/{n}/bias', f'self_attn.{n}.bias', 'copy') for n in ('q_proj', 'k_proj', 'v_proj')]
         if dec.qkv_bias else []))
  for fc, index in (('fc1', 0), ('fc2', 2)):
    out[f'time_token/{fc}/kernel'] = Source((f'time_embed.mlp.{index}.weight',), 'linear')
    out[f'time_token/{fc}/bias'] = Source((f'time_embed.mlp.{index}.bias',))
  block('head/blocks', 'diffusion_head_a', head.num_layers,
        [('norm1/scale', 'input_layernorm.weight', 'copy'),
         ('norm2/scale', 'post_attention_layernorm.weight', 'copy'),
         ('attn/q_norm/scale', 'self_attn.q_norm.weight', 'copy'),
         ('attn/k_norm/scale', 'self_attn.k_norm.weight', 'copy'),
         ('ada/kernel', 'adaLN_modulation.1.weight', 'linear'),
         ('ada/bias', 'adaLN_modulation.1.bias', 'copy')] + attn + mlp)
  out['head/final_norm/scale'] = Source(('diffusion_head_b.norm_final.weight',))
  out['head/final_ada/kernel'] = Source(('diffusion_head_b.adaLN_modulation.1.weight',), 'linear')
  out['head/final_ada/bias'] = Source(('diffusion_head_b.adaLN_modulation.1.bias',))
  out['head/out/kernel'] = Source(('diffusion_head_b.linear.weight',), 'linear')
  out['head/out/bias'] = Source(('diffusion_head_b.linear.bias',))
  if model.vision == 'patch':
    out['vision/proj/kernel'] = Source(('vision_encoder.patch_embedding.weight',), 'conv')
    out['vision/proj/bias'] = Source(('vision_encoder.patch_embedding.bias',))
    out['vision/norm/scale'] = Source(('vision_encoder.norm.weight',))
    out['vision/mask_token'] = Source(('mask_token',), 'token')
    return out
  enc = model.encoder
  v = 'vision_model'
  out['vision/patch/kernel'] = Source((f'{v}.embeddings.patch_embedding.weight',), 'conv')
  out['vision/patch/bias'] = Source((f'{v}.embeddings.patch_embedding.bias',))
  out['vision/pos_embed'] = Source((f'{v}.embeddings.position_embedding.weight',))
  pairs = [(f'{ours}/{w}', f'{theirs}.{t}', 'copy') for ours, theirs in
           (('norm1', 'layer_norm1'), ('norm2', 'layer_norm2'))
           for w, t in (('scale', 'weight'), ('bias', 'bias'))]
  for ours, theirs in (('attn/q_proj', 'self_attn.q_proj'), ('attn/k_proj', 'self_attn.k_proj'),
                       ('attn/v_proj', 'self_attn.v_proj'), ('attn/o_proj', 'self_attn.out_proj'),
                       ('fc1', 'mlp.fc1'), ('fc2', 'mlp.fc2')):
    pairs += [(f'{ours}/kernel', f'{theirs}.weight', 'linear'),
              (f'{ours}/bias', f'{theirs}.bias', 'copy')]
  block('vision/blocks', f'{v}.encoder.layers', enc.num_layers, pairs)
  out['vision/connector_norm/scale'] = Source(('siglip_proj.0.weight',))
  for ours, index in (('connector_fc1', 1), ('connector_fc2', 3)):
    out[f'vision/{ours}/kernel'] = Source((f'siglip_proj.{index}.weight',), 'linear')
    out[f'vision/{ours}/bias'] = Source((f'siglip_proj.{index}.bias',))
  return out


def expected_shapes(sources: dict[str, Source],
                    abstract: dict[str, jax.ShapeDtypeStruct]) -> dict[str, tuple[int, ...]]:
  """{official name: shape} that a checkpoint for these target parameters must hold."""
  out = {}
  for path, src in sources.items():
    shape = tuple(abstract[path].shape)[1 if src.stacked else 0:]
    for name in src.names:
      out[name] = official_shape(src.kind, shape)
  return out


def _listed(title: str, items: list[str]) -> str:
  more = len(items) - _MAX_LISTED
  return f'{len(items)} {title}:\n    ' + '\n    '.join(
      items[:_MAX_LISTED] + ([f'... and {more} more'] if more > 0 else []))


def check_names(where: str, found: dict[str, tuple[int, ...]],
                expected: dict[str, tuple[int, ...]]) -> None:
  """Raises one ConversionError listing every unknown, missing and mis-shaped tensor."""
  missing = sorted(n for n in expected if n not in found)
  unknown = sorted(n for n in found if n not in expected)
  shaped = sorted(f'{n}: {tuple(found[n])} in the checkpoint, {expected[n]} for the config'
                  for n in expected if n in found and tuple(found[n]) != expected[n])
  problems = [_listed(title, items) for title, items in (
      ('missing tensors', missing), ('unknown tensors', unknown),
      ('tensors of another shape (the checkpoint has other dimensions than the config)', shaped))
      if items]
  if problems:
    raise ConversionError(f'{where} does not match the config:\n  ' + '\n  '.join(problems) +
                          '\nNothing was written.')


def check_variant(where: str, found, model: ml_collections.ConfigDict) -> None:
  """Raises when the checkpoint is of the other variant than model.vision builds."""
  other = 'encoder' if model.vision == 'patch' else 'patch'
  if MARKERS[other] in found and MARKERS[model.vision] not in found:
    raise ConversionError(
        f'{where} is an official {VARIANT_NAMES[other]} checkpoint (it holds {MARKERS[other]!r}), '
        f'but the config builds {VARIANT_NAMES[model.vision]} (model.vision={model.vision!r}); '
        f'use the {VARIANT_NAMES[other]} config. Nothing was written.')
  if not model.time_embed_shared:
    raise ConversionError(
        f'{where}: official checkpoints hold one timestep embedder (time_embed.*), but the '
        'config has two (model.time_embed_shared=False); use the official conventions '
        '(config_lib.OFFICIAL_MODEL). Nothing was written.')


def convention_differences(config: ml_collections.ConfigDict) -> list[str]:
  """The config keys whose values differ from the official Tuna-2 conventions."""
  out = []
  for where, values in (('model', config_lib.OFFICIAL_MODEL), ('model.head',
                                                               config_lib.OFFICIAL_HEAD),
                        ('sampling', config_lib.OFFICIAL_SAMPLING)):
    node = config
    for key in where.split('.'):
      node = node[key]
    for key, want in values.items():
      have = node[key]
      if isinstance(want, dict):
        have, want = dict(have), dict(want)
      elif isinstance(want, tuple):
        have = tuple(have)
      if have != want:
        out.append(f'{where}.{key}={have!r} (official {want!r})')
  return out


class Checkpoint:
  """An official checkpoint's tensors by name: .safetensors file(s), or a .pt state dict."""

  def __init__(self, path: str):
    self.path = path
    self._prefix = ''
    p = epath.Path(path)
    if p.is_dir():
      files = sorted(str(f) for f in p.iterdir() if f.name.endswith('.safetensors'))
      if not files:
        raise FileNotFoundError(f'--checkpoint={path!r}: the folder holds no *.safetensors')
      self._open_safetensors(files)
    elif not p.exists():
      raise FileNotFoundError(f'--checkpoint={path!r}: no such file')
    elif path.endswith('.safetensors'):
      self._open_safetensors([path])
    elif path.endswith(hf_folder.PICKLED_SUFFIXES):
      self._open_torch(path)
    else:
      raise ConversionError(f'--checkpoint={path!r}: expected a .safetensors or .pt file')
    names = list(self._shapes)
    for prefix in PREFIXES:  # the official training wrapper's (or DDP's) prefix
      if names and all(n.startswith(prefix) for n in names):
        self._prefix = prefix
        break
    self.shapes = {n[len(self._prefix):]: s for n, s in self._shapes.items()}

  def _open_safetensors(self, files: list[str]) -> None:
    self._kind, self._entries, self._shapes = 'safetensors', {}, {}
    for file in files:
      header, base = hf_folder._read_header(file)
      for name, info in header.items():
        if name == '__metadata__':
          continue
        if info['dtype'] not in hf_folder.DTYPES:
          raise ConversionError(f'{file}: tensor {name!r} has dtype {info["dtype"]}; expected '
                                f'one of {sorted(hf_folder.DTYPES)}')
        dtype = np.dtype(hf_folder.DTYPES[info['dtype']])
        self._entries[name] = (file, dtype, tuple(info['shape']), base + info['data_offsets'][0])
        self._shapes[name] = tuple(info['shape'])

  def _open_torch(self, path: str) -> None:
    try:
      import torch
    except ImportError:
      raise ConversionError(f'{path}: reading .pt checkpoints needs torch (pip install torch); '
                            'or convert the checkpoint to .safetensors') from None
    try:
      state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses any pickled object that is not a tensor
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConversionError(f'{path}: torch.load(weights_only=True) refused the file ({first}); '
                            'only plain tensor state dicts are read. Nothing was written.'
                            ) from None
    for key in ('state_dict', 'model', 'module'):
      if isinstance(state, dict) and set(state) == {key} and isinstance(state[key], dict):
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
      raise ConversionError(f'{path}: expected a state dict of tensors, got '
                            f'{type(state).__name__}. Nothing was written.')
    self._kind, self._torch = 'torch', state
    self._shapes = {n: tuple(t.shape) for n, t in state.items()}

  def tensor(self, name: str) -> np.ndarray:
    """One tensor as numpy (memory-mapped where the format allows)."""
    full = self._prefix + name
    if self._kind == 'safetensors':
      file, dtype, shape, offset = self._entries[full]
      if hf_folder.is_local(file):
        return np.memmap(file, dtype=dtype, mode='r', offset=offset, shape=shape)
      data = hf_folder._read_range(file, offset, int(np.prod(shape)) * dtype.itemsize)
      return np.frombuffer(data, dtype).reshape(shape)
    import torch
    t = self._torch[full]
    if t.dtype == torch.bfloat16:
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _reader(src: Source, ckpt: Checkpoint):
  def read(index):
    index = tuple(index)
    if not src.stacked:
      return to_ours(src.kind, ckpt.tensor(src.names[0]))[index]
    return np.stack([to_ours(src.kind, ckpt.tensor(n))[index[1:]]
                     for n in src.names[index[0]]])
  return read


def load(checkpoint: str, config: ml_collections.ConfigDict,
         abstract: dict[str, jax.ShapeDtypeStruct],
         shardings: dict[str, jax.sharding.Sharding] | None = None) -> dict[str, jax.Array]:
  """{our parameter path: array} of an official checkpoint, each placed in its sharding.

  Checks variant, names and shapes against the config first (one error listing all problems).
  """
  ckpt = Checkpoint(checkpoint)
  check_variant(checkpoint, ckpt.shapes, config.model)
  sources = plan(config.model)
  check_names(checkpoint, ckpt.shapes, expected_shapes(sources, abstract))
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return {path: hf_folder.place(_reader(src, ckpt), abstract[path],
                                default if shardings is None else shardings[path])
          for path, src in sources.items()}


def _abstract_and_shardings(config: ml_collections.ConfigDict):
  from tuna2_jax import sharding, train_state
  _, params = train_state.abstract_model(config)
  mesh = sharding.make_mesh(config.mesh)
  shardings = sharding.tree_shardings(params, mesh, config.sharding_rules)
  return params, hf_folder.flat_paths(params), hf_folder.flat_paths(shardings)


def import_checkpoint(checkpoint: str, config: ml_collections.ConfigDict, output: str,
                      tokenizer: str = '') -> str:
  """Writes `output` (config.json + checkpoints/0 with the parameters); returns output."""
  from tuna2_jax import checkpoint as ckpt_lib
  hf_folder.check_new_output(output)
  differences = convention_differences(config)
  if differences:
    logging.warning('the config differs from the official conventions, so the imported model '
                    'will not compute what the official one does:\n  %s',
                    '\n  '.join(differences))
  params, flat_abstract, flat_shardings = _abstract_and_shardings(config)
  loaded = load(checkpoint, config, flat_abstract, flat_shardings)
  for path in sorted(set(flat_abstract) - set(loaded)):
    if path not in NOT_OFFICIAL:
      raise ConversionError(f'{checkpoint}: no official tensor maps to parameter {path!r}')
    a = flat_abstract[path]
    logging.info('%s is not in official checkpoints; initialised as in a new run', path)
    value = NOT_OFFICIAL[path](jax.random.key(config.seed), a.shape, a.dtype)
    loaded[path] = jax.device_put(value, flat_shardings[path])
  tree = jax.tree_util.tree_map_with_path(lambda p, _: loaded[hf_folder.path_name(p)], params)
  stored = ml_collections.ConfigDict(config.to_dict())
  stored.init_from = ''
  stored.init.update(decoder_from='', encoder_from='', required=False)
  if tokenizer:
    stored.data.tokenizer = tokenizer
  os.makedirs(output)
  ckpt_lib.write_config(output, stored.to_json_best_effort(indent=2))
  with ckpt_lib.Checkpointer(output, keep=1, save_every=1, async_save=False) as ckpt:
    ckpt.save(0, {'params': tree}, force=True)
  return output


def official_tensors(flat: dict[str, jax.Array], model: ml_collections.ConfigDict):
  """(name, shape, fetch) of every official tensor, fetch() giving it as numpy float32."""
  for path, src in plan(model).items():
    x = flat[path]
    shape = tuple(x.shape)[1 if src.stacked else 0:]
    theirs = official_shape(src.kind, shape)
    for i, name in enumerate(src.names):
      yield name, theirs, (lambda x=x, i=i, src=src, theirs=theirs: np.ascontiguousarray(
          to_official(src.kind, np.array(jax.device_get(x[i] if src.stacked else x),
                                         np.float32), theirs)))


def _write_safetensors(path: str, tensors) -> None:
  """A float32 safetensors file whose tensors are fetched and written one at a time."""
  tensors = list(tensors)
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, shape, _ in tensors:
    nbytes = int(np.prod(shape)) * 4
    header[name] = {'dtype': 'F32', 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  with open(path, 'wb') as f:
    f.write(len(text).to_bytes(8, 'little') + text)
    for _, _, fetch in tensors:
      f.write(np.ascontiguousarray(fetch(), np.float32).tobytes())


def export(flat: dict[str, jax.Array], model: ml_collections.ConfigDict, output: str) -> str:
  """Writes our parameters under the official names to output (.safetensors or .pt)."""
  if not output.endswith(('.safetensors', '.pt')):
    raise ConversionError(f'--output={output!r}: expected a .safetensors or .pt file name')
  hf_folder.check_new_output(output)
  if not model.time_embed_shared:
    raise ConversionError('the model has two timestep embedders (model.time_embed_shared='
                          'False); the official model has one, so it cannot be exported')
  tensors = official_tensors(flat, model)
  if output.endswith('.safetensors'):
    _write_safetensors(output, tensors)
  else:
    import torch
    torch.save({name: torch.from_numpy(fetch()) for name, _, fetch in tensors}, output)
  return output


def export_workdir(workdir: str, output: str, use_ema: bool = True) -> str:
  """Exports a training workdir's latest EMA (or raw) parameters; see `export`. A workdir
  without an EMA (an import) exports its parameters."""
  from tuna2_jax import train_state
  from tuna2_jax.convert import init_from
  config = train_state.load_config(workdir)
  differences = convention_differences(config)
  if differences:
    logging.warning('the run differs from the official conventions, so the official code will '
                    'not compute what it does:\n  %s', '\n  '.join(differences))
  _, flat_abstract, flat_shardings = _abstract_and_shardings(config)
  flat, _ = init_from.workdir_params(workdir, flat_abstract, flat_shardings,
                                     item='ema' if use_ema and train_state.has_ema(workdir)
                                     else 'params', where='--workdir')
  return export(flat, config.model, output)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.export:
    if not f.workdir:
      raise ConversionError('--export needs --workdir (the run to export)')
    print(f'wrote {export_workdir(f.workdir, f.output, f.use_ema)}')
    return
  if not f.checkpoint or f.config is None:
    raise ConversionError('an import needs --checkpoint and --config')
  print(f'wrote {import_checkpoint(f.checkpoint, f.config, f.output, f.tokenizer)}')


if __name__ == '__main__':
  from ml_collections import config_flags

  from tuna2_jax import cli
  flags.DEFINE_string('checkpoint', None, 'Official checkpoint: .safetensors (file or folder) '
                      'or .pt (read with weights_only=True).')
  config_flags.DEFINE_config_file('config', None, 'Target config, e.g. '
                                  'experiments/tuna2_7b_restore.py.', lock_config=False)
  flags.DEFINE_string('output', None, 'Import: the directory to write; export: the '
                      '.safetensors or .pt file. Must not exist.', required=True)
  flags.DEFINE_string('tokenizer', '', 'Import: data.tokenizer of the written config.')
  flags.DEFINE_bool('export', False, 'Export --workdir to the official names instead.')
  flags.DEFINE_string('workdir', '', 'Export: the training workdir.')
  flags.DEFINE_bool('use_ema', True, 'Export the EMA parameters (else the raw ones).')
  cli.run(main)
