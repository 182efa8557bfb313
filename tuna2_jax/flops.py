"""Analytic FLOPs of a packed batch: model FLOPs (what MFU, the training log and eval history
count) and hardware FLOPs (what the step executes).

Model FLOPs count the multiply-adds the model needs (2 per multiply-add), not what a particular
implementation executes: attention counts, for every query, only the keys its mask lets it see
(causal for text, all of its image span for image tokens, nothing across packed segments), so
an image span counts as bidirectional attention and text as causal; the LM head counts only at
text-target tokens; the AdaLN modulations and time embeddings, which depend only on each image's
t, count once per image span; the output layer counts at generation-target patches. Padding
counts nothing; recomputation under remat counts nothing. A training step is 3 forward passes
(the backward pass costs twice the forward). A step that trains only some parameters
(optim.trainable) counts, per part of the model (PARTS), the forward, the weight gradients of
the trained parts, and the input gradients only of parts that a trained part feeds: an
alignment step that trains the connector alone runs no backward pass through the frozen ViT in
front of it and no weight gradients behind it.

Hardware FLOPs add what the implementation runs beyond that, as MaxText reports both: every
layer at every slot of the row (padding included), the LM head at whole chunks of gathered
targets (objectives.TEXT_CHUNK), the modulations and time embeddings at every row of the
per-span tables (model.max_spans + 1 per row: models/flow_head.py computes them per span, not
per token) and the one-hot contractions that gather them per token, the output layer at every
token, and the forward work remat recomputes in the backward pass (REMAT_RECOMPUTE). Attention
counts the keys each query reaches at the true head_dim, not the kernels' block granularity or
the zero-padded width a GPU kernel runs (SigLIP's 72 as 128: 1.2% of a Tuna-R 1.5B step of 8k
tokens).

Everything is computed on the host from the batch's layout arrays (numpy), so the count of a
step is exact for that step's packing.
"""

from __future__ import annotations

import math
import re

import ml_collections
import numpy as np

from tuna2_jax import layout
from tuna2_jax.models import attention as attn_lib
from tuna2_jax.models.tuna import MAX_SPANS
from tuna2_jax.objectives import TEXT_CHUNK

TRAIN_PASSES = 3  # forward + backward (2 x forward)


# Forward work each remat policy (models/transformer.py) runs again in the backward pass. Only
# what the backward pass reads is rerun: the decoder's and encoder's output projections
# (attention out, MLP down) never, as nothing reads their results backwards; the flow head's
# ('head_out') are read by the gradient of their AdaLN-Zero gates. 'full' saves nothing else;
# the dots policies keep every matmul, dots_no_batch not the per-span gathers (batched
# einsums); save_qkv_attn keeps attention's inputs and output. Every policy but 'full' keeps
# the attention kernels' output and log-sum-exp (kernels.RESIDUALS); dense and cuDNN attention
# have none to keep, and rerun under every policy but 'none' (_attention_reruns).
REMAT_RECOMPUTE = {
    'none': (),
    'full': ('qkv', 'attention', 'mlp_in', 'modulation', 'head_out', 'span_gather'),
    'dots': (),
    'dots_no_batch': ('span_gather',),
    'save_qkv_attn': ('mlp_in', 'modulation', 'head_out', 'span_gather'),
}


def _attention_projections(width: int, heads: int, kv_heads: int,
                           head_dim: int) -> tuple[int, int]:
  """FLOPs per token of (the q, k, v projections, the output projection)."""
  return 2 * width * (heads + 2 * kv_heads) * head_dim, 2 * heads * head_dim * width


def _timestep_embedder(width: int, freqs: int) -> int:
  return 2 * (freqs * width + width * width)


STACKS = attn_lib.STACKS


def _stack_parts(model: ml_collections.ConfigDict, n_tok: float, keys: float,
                 n_mod: float, n_patch: float, span_keys: float,
                 gathers: float = 0.0, stacks=STACKS) -> dict[str, float]:
  """FLOPs of the layer stacks (decoder, flow head, vision encoder) by part, for n_tok tokens,
  `keys` attended (query, key) pairs, n_mod modulated positions (AdaLN inputs), and for the
  vision encoder n_patch patches with span_keys attended pairs. gathers: (token, table row)
  pairs of the per-span tables' one-hot contractions (models/flow_head.per_token), which the
  implementation runs and model FLOPs leave out. stacks: the stacks counted (all by default)."""
  dec, head, d = model.decoder, model.head, model.decoder.width
  ld = dec.num_layers if 'decoder' in stacks else 0
  lh = head.num_layers if 'head' in stacks else 0
  dec_qkv, dec_out = _attention_projections(d, dec.num_heads, dec.num_kv_heads, dec.head_dim)
  head_qkv, head_out = _attention_projections(d, head.num_heads, head.num_kv_heads,
                                              head.head_dim)
  parts = {
      'qkv': n_tok * (ld * dec_qkv + lh * head_qkv),
      'out_proj': n_tok * ld * dec_out,
      'mlp_in': n_tok * 4 * d * (ld * dec.mlp_dim + lh * head.mlp_dim),
      'mlp_out': n_tok * 2 * d * ld * dec.mlp_dim,
      'head_out': n_tok * lh * (head_out + 2 * d * head.mlp_dim),
      'attention': 4 * keys * (ld * dec.num_heads * dec.head_dim
                               + lh * head.num_heads * head.head_dim),
      'modulation': n_mod * lh * 2 * d * 6 * d,  # AdaLN: 6 vectors per block
      'span_gather': gathers * lh * 6 * 2 * d,
  }
  if model.vision == 'encoder' and 'encoder' in stacks:
    enc = model.encoder
    we, le = enc.width, enc.num_layers
    enc_qkv, enc_out = _attention_projections(we, enc.num_heads, enc.num_heads,
                                              we // enc.num_heads)
    parts['qkv'] += n_patch * le * enc_qkv
    parts['out_proj'] += n_patch * le * enc_out
    parts['mlp_in'] += n_patch * le * 2 * we * enc.mlp_dim
    parts['mlp_out'] += n_patch * le * 2 * we * enc.mlp_dim
    parts['attention'] += 4 * span_keys * le * we
  return parts


# The parts of the forward pass for a step that trains some of them: the parameter paths each
# owns (the first prefix that matches wins) and the parts whose outputs it reads.
PARTS = {
    'connector': (('vision/connector',), ('vision',)),
    'vision': (('vision/',), ()),
    'time': (('time_token/', 'head/time_embed/'), ()),
    'embed': (('decoder/embed/',), ()),
    'decoder': (('decoder/blocks/', 'decoder/norm/'), ('vision', 'connector', 'time', 'embed')),
    'lm_head': (('decoder/lm_head/',), ('decoder',)),
    'head': (('head/',), ('decoder', 'time')),
}


def part_of(path: str, tied_embeddings: bool = False) -> str:
  """The PARTS name of a parameter path ('vision/connector_fc1/kernel' -> 'connector')."""
  if tied_embeddings and path.startswith('decoder/embed/'):
    return 'embed'  # also the LM head's weight; trained_parts adds lm_head
  for name, (prefixes, _) in PARTS.items():
    if path.startswith(prefixes):
      return name
  raise ValueError(f'parameter {path!r} belongs to none of the parts {sorted(PARTS)}')


def trained_parts(paths, model: ml_collections.ConfigDict, pattern: str) -> frozenset | None:
  """The parts with a parameter the optim.trainable regex trains; None when every parameter
  trains (the step is then counted as 3 forward passes, as without a pattern)."""
  if not pattern:
    return None
  regex = re.compile(pattern)
  paths = list(paths)
  if all(regex.search(p) for p in paths):
    return None
  tied = bool(model.decoder.get('tie_embeddings', False))
  parts = {part_of(p, tied) for p in paths if regex.search(p)}
  if tied and 'embed' in parts:
    parts.add('lm_head')
  return frozenset(parts)


def _feeds(part: str, trained: frozenset) -> bool:
  """Whether a trained part lies upstream of `part` (its input gradient is then needed)."""
  todo, seen = list(PARTS[part][1]), set()
  while todo:
    p = todo.pop()
    if p in trained:
      return True
    if p not in seen:
      seen.add(p)
      todo.extend(PARTS[p][1])
  return False


def _layout(batch: layout.Batch) -> dict[str, float]:
  """The token, target and attended-pair counts the FLOP formulas use."""
  seg = np.asarray(batch.segment_ids_BT)
  valid = seg > 0
  span = np.asarray(batch.span_ids_BT)
  is_patch = np.asarray(batch.is_patch_BT) & valid
  starts = (span > 0) & valid
  starts[:, 1:] &= (span[:, 1:] != span[:, :-1]) | (seg[:, 1:] != seg[:, :-1])
  patch_spans = np.where(np.asarray(batch.is_patch_BT), span, 0)
  return {
      'rows': float(seg.shape[0]), 'slots': float(seg.size), 'tokens': float(valid.sum()),
      'patches': float(is_patch.sum()),
      'spans': float(starts.sum()),
      'text_targets': float(((np.asarray(batch.loss_mask_BT) > 0) & valid).sum()),
      'gen_patches': float((np.asarray(layout.flow_targets_BT(batch)) & valid).sum()),
      'keys': float(layout.attended_keys_BT(seg, span).sum()),
      'span_keys': float(layout.attended_keys_BT(seg, patch_spans, 'span').sum()),
  }


def _vision_input(model: ml_collections.ConfigDict, n: float) -> float:
  """The patch embedding (Tuna-2) or the encoder's embedding and connector (Tuna-R) at n tokens."""
  d, pdim = model.decoder.width, model.patch_size ** 2 * 3
  if model.vision == 'patch':
    return n * 2 * pdim * d
  we = model.encoder.width
  return n * (2 * pdim * we + 2 * we * d + 2 * d * d)


def _conditioning(model: ml_collections.ConfigDict, n: float) -> float:
  """The time embeddings (one embedder when model.time_embed_shared, else the time token's and
  the head's) and the final layer's modulation."""
  d = model.decoder.width
  embedders = 1 if model.get('time_embed_shared') else 2
  return n * (embedders * _timestep_embedder(d, model.time_embed_freqs) + 2 * d * 2 * d)


def _table_width(model: ml_collections.ConfigDict) -> int:
  """Rows of the per-span conditioning tables per batch row (models/tuna.span_times)."""
  return model.get('max_spans', MAX_SPANS) + 1


def _span_table_rows(model: ml_collections.ConfigDict, n: dict) -> float:
  return n['rows'] * _table_width(model)


def _executed_stack_parts(model: ml_collections.ConfigDict, n: dict,
                          stacks=STACKS) -> dict[str, float]:
  """_stack_parts as the implementation runs them: every slot, the per-span tables."""
  gathers = n['slots'] * _table_width(model)
  return _stack_parts(model, n['slots'], n['keys'], _span_table_rows(model, n), n['slots'],
                      n['span_keys'], gathers, stacks)


def forward_flops(model: ml_collections.ConfigDict, batch: layout.Batch) -> float:
  """Model FLOPs of one forward pass over `batch` (host arrays): forward_flops_by_part summed."""
  return sum(forward_flops_by_part(model, batch).values())


def hardware_forward_flops(model: ml_collections.ConfigDict, batch: layout.Batch,
                           text_chunk: int = TEXT_CHUNK) -> float:
  """FLOPs one forward pass executes: every slot, the LM head at whole chunks of targets."""
  n = _layout(batch)
  d, pdim = model.decoder.width, model.patch_size ** 2 * 3
  parts = _executed_stack_parts(model, n)
  chunk = min(text_chunk, n['slots'])
  lm_rows = math.ceil(n['text_targets'] / chunk) * chunk
  # Outside the stacks, three tables are gathered per token: the time tokens' embedding and
  # the final layer's shift and scale.
  gathers = 3 * n['slots'] * _table_width(model) * 2 * d
  return (sum(parts.values()) + lm_rows * 2 * d * model.vocab_size
          + _conditioning(model, _span_table_rows(model, n)) + gathers
          + n['slots'] * 2 * d * pdim + _vision_input(model, n['slots']))


def _attention_reruns(model: ml_collections.ConfigDict, remat: str,
                      backend: str | None) -> tuple[str, ...]:
  """The stacks whose attention forward the backward pass reruns under `remat`."""
  if remat in ('none', 'full'):
    return ()  # REMAT_RECOMPUTE holds full's
  return tuple(s for s in attn_lib.model_stacks(model)
               if attn_lib.stack_impl(model, s, backend) not in attn_lib.BLOCKWISE)


def remat_recompute_flops(model: ml_collections.ConfigDict, batch: layout.Batch,
                          remat: str | None = None, backend: str | None = None) -> float:
  """Forward FLOPs the backward pass reruns under `remat` (default: model.remat), with the
  attention kernels model.attention picks on `backend` (default: the step's target)."""
  remat = model.remat if remat is None else remat
  if remat not in REMAT_RECOMPUTE:
    raise ValueError(f'remat {remat!r}: expected one of {sorted(REMAT_RECOMPUTE)}')
  n = _layout(batch)
  parts = _executed_stack_parts(model, n)
  attention = sum(_executed_stack_parts(model, n, (s,))['attention']
                  for s in _attention_reruns(model, remat, backend))
  return sum(parts[p] for p in REMAT_RECOMPUTE[remat]) + attention


def forward_flops_by_part(model: ml_collections.ConfigDict, batch: layout.Batch
                          ) -> dict[str, float]:
  """Model FLOPs of one forward pass over `batch`, split over PARTS."""
  n = _layout(batch)
  d, pdim = model.decoder.width, model.patch_size ** 2 * 3
  args = (n['tokens'], n['keys'], n['spans'], n['patches'], n['span_keys'])
  stacks = {name: sum(_stack_parts(model, *args, stacks=(name,)).values()) for name in STACKS}
  out = dict.fromkeys(PARTS, 0.0)
  out['decoder'] = stacks['decoder']
  out['lm_head'] = n['text_targets'] * 2 * d * model.vocab_size
  embedders = 1 if model.get('time_embed_shared') else 2
  out['time'] = n['spans'] * embedders * _timestep_embedder(d, model.time_embed_freqs)
  out['head'] = stacks['head'] + n['spans'] * 2 * d * 2 * d + n['gen_patches'] * 2 * d * pdim
  if model.vision == 'patch':
    out['vision'] = _vision_input(model, n['patches'])
  else:
    we = model.encoder.width
    out['vision'] = stacks['encoder'] + n['patches'] * 2 * pdim * we
    out['connector'] = n['patches'] * (2 * we * d + 2 * d * d)
  return out


def train_step_flops(model: ml_collections.ConfigDict, batch: layout.Batch,
                     trained: frozenset | None = None) -> float:
  """Model FLOPs of a training step: what MFU divides by the peak.

  trained: the parts that train (trained_parts), None for all: 3 forward passes. Otherwise the
  forward, plus a forward's worth for the weight gradients of each trained part and another for
  the input gradients of each part a trained part feeds.
  """
  if trained is None:
    return TRAIN_PASSES * forward_flops(model, batch)
  unknown = set(trained) - set(PARTS)
  if unknown:
    raise ValueError(f'trained parts {sorted(unknown)}: expected some of {sorted(PARTS)}')
  return sum(f * (1 + (part in trained) + _feeds(part, trained))
             for part, f in forward_flops_by_part(model, batch).items())


def hardware_step_flops(model: ml_collections.ConfigDict, batch: layout.Batch) -> float:
  """FLOPs a training step executes: 3 executed forwards plus remat's recompute."""
  return (TRAIN_PASSES * hardware_forward_flops(model, batch)
          + remat_recompute_flops(model, batch))


# Dense bf16 peak FLOP/s per device, by jax device_kind (vendor data sheets); MFU is reported
# only for these. The first name contained in the device kind wins: v5p's devices report
# 'TPU v5', a prefix of v5e's 'TPU v5 lite', so the lite entries come first.
PEAK_BF16_FLOPS = (
    ('H100', 989e12), ('H200', 989e12), ('A100', 312e12),
    ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5p', 459e12), ('TPU v5', 459e12),
    ('TPU v6', 918e12), ('TPU v4', 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The dense bf16 peak of a device kind ('NVIDIA H100 80GB HBM3', 'TPU v5p', ...), or None."""
  for name, peak in PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None
