"""Dense O(N^2) reference for dilated (LongNet-style) attention.

This module is the oracle the rest of the package is tested against, and users
can test their own models against it too. It is written directly from the
definition below, with no tricks: it builds the full ``[H, N, N]`` table of
which query sees which key, the full ``[B, H, N, N]`` logits, and takes one
softmax per query row. It shares no code with the rest of ``ringdilated`` (it
imports only numpy and jax), so a bug there cannot hide here.

Definition. A configuration is a list of branches ``(w_i, r_i)`` (segment
length, dilation rate). For branch ``i`` and a head using offset ``o``: the
sequence is cut into segments of ``w_i`` tokens; in each segment the positions
``o, o + r_i, o + 2 r_i, ...`` (relative to the segment start) are kept; kept
queries attend to kept keys of the same segment only (and, when causal, only to
keys at positions ``<=`` their own). Positions that are not kept get nothing
from the branch.

* ``"mix"``: every head uses every branch, with offset ``kv(h) mod r_i``.
  All branches of a head share one softmax over the concatenation of their key
  lists, so a key reached by two branches counts twice.
* ``"partition"``: the heads are split into as many contiguous groups as there
  are branches (the first ``H mod k`` groups get one extra head); group ``i``
  uses branch ``i`` only, with offset ``i mod r_i``.

With ``C[h, p, k]`` the number of branches letting query ``p`` of head ``h``
see key ``k``, the output is ``sum_k C exp(s_pk) v_k / sum_k C exp(s_pk)``,
i.e. a softmax over ``logits + log(C)``. A query that sees no key gets 0.

Shape legend:
  B batch, N sequence length, H query heads, K kv heads, D head dim.
  Query head ``h`` uses kv head ``kv(h) = h // (H // K)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dense_mask", "dilated_attention_reference"]

_MODES = ("mix", "partition")


def _check_config(
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Refuses nonsense arguments with a ValueError naming them."""
  ws = tuple(int(w) for w in segment_lengths)
  rs = tuple(int(r) for r in dilation_rates)
  if len(ws) != len(rs):
    raise ValueError(
        f"segment_lengths={ws} and dilation_rates={rs} must have the same "
        "length"
    )
  if not ws:
    raise ValueError("segment_lengths must name at least one branch, got ()")
  if mode not in _MODES:
    raise ValueError(f"mode={mode!r} must be one of {_MODES}")
  if seq_len <= 0:
    raise ValueError(f"seq_len={seq_len} must be positive")
  if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
    raise ValueError(
        f"num_heads={num_heads} must be a positive multiple of "
        f"num_kv_heads={num_kv_heads}"
    )
  for i, (w, r) in enumerate(zip(ws, rs)):
    if w <= 0:
      raise ValueError(f"segment_lengths[{i}]={w} must be positive")
    if r <= 0:
      raise ValueError(f"dilation_rates[{i}]={r} must be positive")
    if seq_len % w != 0:
      raise ValueError(
          f"segment_lengths[{i}]={w} must divide the sequence length {seq_len}"
      )
    if w % r != 0:
      raise ValueError(
          f"dilation_rates[{i}]={r} must divide segment_lengths[{i}]={w}"
      )
  if mode == "partition" and len(ws) > num_heads:
    raise ValueError(
        f"mode='partition' needs at least one head per branch: "
        f"{len(ws)} branches but num_heads={num_heads}"
    )
  return ws, rs


def _branch_mask(seq_len: int, w: int, r: int, o: int, causal: bool) -> np.ndarray:
  """Bool [N, N]: query p sees key k in the branch (w, r) at offset o."""
  pos = np.arange(seq_len)
  seg = pos // w
  kept = (pos % w) % r == o
  mask = (
      kept[:, None]
      & kept[None, :]
      & (seg[:, None] == seg[None, :])
  )
  if causal:
    mask &= pos[None, :] <= pos[:, None]
  return mask


def _partition_groups(num_heads: int, num_branches: int) -> list[int]:
  """Branch index of every head in partition mode (contiguous groups)."""
  base, extra = divmod(num_heads, num_branches)
  branch_of_head = []
  for i in range(num_branches):
    size = base + (1 if i < extra else 0)
    branch_of_head.extend([i] * size)
  return branch_of_head


def dense_mask(
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "mix",
    causal: bool = False,
) -> np.ndarray:
  """Counts how many branches let each query see each key.

  Args:
    seq_len: N, the sequence length.
    num_heads: H, the number of query heads.
    num_kv_heads: K, the number of key/value heads (``H % K == 0``).
    segment_lengths: ``w_i`` for every branch; each must divide N.
    dilation_rates: ``r_i`` for every branch; each must divide its ``w_i``.
    mode: ``"mix"`` or ``"partition"``.
    causal: whether query ``p`` sees only keys ``<= p``.

  Returns:
    ``C``: int32 numpy array ``[H, N, N]``; ``C[h, p, k]`` is the number of
    branches in which query ``p`` of head ``h`` sees key ``k`` (before any
    padding or segment-id masks).

  Raises:
    ValueError: on inconsistent arguments.
  """
  ws, rs = _check_config(
      seq_len, num_heads, num_kv_heads, segment_lengths, dilation_rates, mode
  )
  group = num_heads // num_kv_heads
  counts = np.zeros((num_heads, seq_len, seq_len), dtype=np.int32)
  if mode == "mix":
    for h in range(num_heads):
      kv_head = h // group
      for w, r in zip(ws, rs):
        o = kv_head % r
        counts[h] += _branch_mask(seq_len, w, r, o, causal)
  else:
    branch_of_head = _partition_groups(num_heads, len(ws))
    for h in range(num_heads):
      i = branch_of_head[h]
      w, r = ws[i], rs[i]
      o = i % r
      counts[h] += _branch_mask(seq_len, w, r, o, causal)
  return counts


def dilated_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "mix",
    causal: bool = False,
    key_padding_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    softmax_scale: float | None = None,
) -> jax.Array:
  """Dense O(N^2) dilated attention, straight from the definition.

  Computes in float32, or in float64 when jax x64 is enabled and the inputs
  are float64. Differentiable with ``jax.grad``; a query row that sees no key
  gets output 0 and gradient 0 (never NaN). Works under ``jax.jit`` (the
  configuration must be static).

  Args:
    q: queries ``[B, N, H, D]``.
    k: keys ``[B, N, K, D]``.
    v: values ``[B, N, K, D]``.
    segment_lengths: ``w_i`` for every branch; each must divide N.
    dilation_rates: ``r_i`` for every branch; each must divide its ``w_i``.
    mode: ``"mix"`` or ``"partition"``.
    causal: whether query ``p`` sees only keys ``<= p``.
    key_padding_mask: optional bool ``[B, N]``; True marks a real token. A
      False key is seen by no query.
    segment_ids: optional int ``[B, N]``; query ``p`` sees key ``k`` only if
      ``segment_ids[p] == segment_ids[k]``.
    softmax_scale: multiplier of ``q . k``; defaults to ``1 / sqrt(D)``.

  Returns:
    ``[B, N, H, D]`` in ``q.dtype``.

  Raises:
    ValueError: on inconsistent arguments or shapes.
  """
  q = jnp.asarray(q)
  k = jnp.asarray(k)
  v = jnp.asarray(v)
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"q, k, v must be [B, N, H, D]; got shapes {q.shape}, {k.shape}, "
        f"{v.shape}"
    )
  batch, seq_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  if k.shape != (batch, seq_len, num_kv_heads, head_dim) or v.shape != k.shape:
    raise ValueError(
        f"k and v must be [B, N, K, D] matching q={q.shape}; got "
        f"k={k.shape}, v={v.shape}"
    )
  counts = dense_mask(
      seq_len,
      num_heads,
      num_kv_heads,
      segment_lengths=segment_lengths,
      dilation_rates=dilation_rates,
      mode=mode,
      causal=causal,
  )

  use_f64 = jax.config.jax_enable_x64 and all(
      x.dtype == jnp.float64 for x in (q, k, v)
  )
  dtype = jnp.float64 if use_f64 else jnp.float32
  if softmax_scale is None:
    softmax_scale = 1.0 / np.sqrt(head_dim)

  # Expand kv heads to query heads: query head h uses kv head h // group.
  group = num_heads // num_kv_heads
  qf = q.astype(dtype)
  kf = jnp.repeat(k.astype(dtype), group, axis=2)
  vf = jnp.repeat(v.astype(dtype), group, axis=2)

  hi = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=hi)
  logits = logits * jnp.asarray(softmax_scale, dtype)

  # C as [B, H, N, N], with padded keys and cross-segment pairs set to 0.
  c = jnp.asarray(counts)[None, :, :, :]
  if key_padding_mask is not None:
    kpm = jnp.asarray(key_padding_mask)
    if kpm.shape != (batch, seq_len):
      raise ValueError(
          f"key_padding_mask has shape {kpm.shape}, expected "
          f"{(batch, seq_len)}"
      )
    c = jnp.where(kpm.astype(bool)[:, None, None, :], c, 0)
  if segment_ids is not None:
    sid = jnp.asarray(segment_ids)
    if sid.shape != (batch, seq_len):
      raise ValueError(
          f"segment_ids has shape {sid.shape}, expected {(batch, seq_len)}"
      )
    same = sid[:, :, None] == sid[:, None, :]
    c = jnp.where(same[:, None, :, :], c, 0)
  c = jnp.broadcast_to(c, logits.shape)
  visible = c > 0

  # Softmax over logits + log(C). Every masked entry goes through a `where`
  # before any exp/log, so no inf or NaN ever reaches the gradient.
  log_c = jnp.log(jnp.where(visible, c, 1).astype(dtype))
  z = jnp.where(visible, logits + log_c, -jnp.inf)
  row_max = jnp.max(z, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  row_max = jax.lax.stop_gradient(row_max)
  z_safe = jnp.where(visible, logits + log_c, 0.0)
  e = jnp.where(visible, jnp.exp(z_safe - row_max), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / jnp.where(denom > 0, denom, 1.0)

  out = jnp.einsum("bhqk,bkhd->bqhd", probs, vf, precision=hi)
  return out.astype(q.dtype)
