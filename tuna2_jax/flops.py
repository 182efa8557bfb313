"""Analytic model FLOPs of a packed batch: what the training log, MFU and eval history count.

Model FLOPs count the multiply-adds the model needs (2 per multiply-add), not what a particular
implementation executes: attention counts, for every query, only the keys its mask lets it see
(causal for text, all of its image span for image tokens, nothing across packed segments), so
an image span counts as bidirectional attention and text as causal. Padding counts nothing;
recomputation under remat counts nothing. A training step is 3 forward passes (the backward
pass costs twice the forward).

Everything is computed on the host from the batch's layout arrays (numpy), so the count of a
step is exact for that step's packing.
"""

from __future__ import annotations

import ml_collections
import numpy as np

TRAIN_PASSES = 3  # forward + backward (2 x forward)


def _run_bounds(key_BT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(first index, last index) of the run of equal values each token belongs to, per row."""
  b, t = key_BT.shape
  idx = np.broadcast_to(np.arange(t), (b, t))
  starts = np.ones((b, t), bool)
  starts[:, 1:] = key_BT[:, 1:] != key_BT[:, :-1]
  ends = np.ones((b, t), bool)
  ends[:, :-1] = starts[:, 1:]
  first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  last = np.minimum.accumulate(np.where(ends, idx, t)[:, ::-1], axis=1)[:, ::-1]
  return first, last


def attended_keys(segment_ids_BT: np.ndarray, span_ids_BT: np.ndarray,
                  kind: str = 'omni') -> np.ndarray:
  """Keys each query attends to under the omni ('omni') or per-image ('span') mask, [B, T].

  Packed rows keep every segment and every image span contiguous and in position order
  (data/sequence.py), which is what makes the count a difference of indices.
  """
  seg = np.asarray(segment_ids_BT, np.int64)
  span = np.asarray(span_ids_BT, np.int64)
  t = seg.shape[1]
  idx = np.arange(t)
  seg_first, _ = _run_bounds(seg)
  span_key = np.where(span > 0, seg * (t + 1) + span, -1 - idx)  # text tokens: runs of one
  span_first, span_last = _run_bounds(span_key)
  in_span = (span > 0) & (seg > 0)
  if kind == 'span':
    return np.where(in_span, span_last - span_first + 1, 0)
  if kind != 'omni':
    raise ValueError(f'attention kind {kind!r}: expected omni or span')
  causal = idx - seg_first + 1
  return np.where(seg > 0, causal + np.where(in_span, span_last - idx, 0), 0)


def _attention_layer(width: int, heads: int, kv_heads: int, head_dim: int) -> int:
  """FLOPs per token of the q, k, v and output projections."""
  return 2 * width * (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim * width


def _timestep_embedder(width: int, freqs: int) -> int:
  return 2 * (freqs * width + width * width)


def forward_flops(model: ml_collections.ConfigDict, batch: dict) -> float:
  """Model FLOPs of one forward pass over `batch` (host arrays of data/sequence.py's layout)."""
  seg = np.asarray(batch['segment_ids'])
  valid = seg > 0
  n_tok = float(valid.sum())
  n_patch = float((np.asarray(batch['is_patch']) & valid).sum())
  n_time = float((np.asarray(batch['is_time']) & valid).sum())
  keys = float(attended_keys(seg, batch['span_ids']).sum())
  dec, head = model.decoder, model.head
  d, pdim = dec.width, model.patch_size ** 2 * 3

  per_token = dec.num_layers * (_attention_layer(d, dec.num_heads, dec.num_kv_heads,
                                                 dec.head_dim) + 6 * d * dec.mlp_dim)
  per_token += 2 * d * model.vocab_size  # LM head (logits are computed at every token)
  per_token += _timestep_embedder(d, model.time_embed_freqs)  # the head's per-token t embedding
  per_token += head.num_layers * (
      _attention_layer(d, head.num_heads, head.num_kv_heads, head.head_dim)
      + 6 * d * head.mlp_dim + 2 * d * 6 * d)  # SwiGLU + AdaLN modulation
  per_token += 2 * d * 2 * d + 2 * d * pdim  # final modulation + output layer
  flops = n_tok * per_token
  flops += 4 * keys * (dec.num_layers * dec.num_heads * dec.head_dim
                       + head.num_layers * head.num_heads * head.head_dim)
  flops += n_time * _timestep_embedder(d, model.time_embed_freqs)

  if model.vision == 'patch':
    flops += n_patch * 2 * pdim * d
  else:
    enc = model.encoder
    we = enc.width
    span_keys = float(attended_keys(
        seg, np.where(np.asarray(batch['is_patch']), batch['span_ids'], 0), 'span').sum())
    flops += n_patch * (2 * pdim * we
                        + enc.num_layers * (_attention_layer(we, enc.num_heads, enc.num_heads,
                                                             we // enc.num_heads)
                                            + 4 * we * enc.mlp_dim)
                        + 2 * we * d + 2 * d * d)  # connector
    flops += 4 * span_keys * enc.num_layers * we
  return flops


def train_step_flops(model: ml_collections.ConfigDict, batch: dict) -> float:
  return TRAIN_PASSES * forward_flops(model, batch)


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
