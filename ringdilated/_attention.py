"""The public function: validate, plan, select a backend, run the ring.

Shape legend: B batch, N global sequence length, P devices on ``axis_name``,
L = N / P local length (``L = N`` on one device), H query heads, K kv heads,
D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _backends, _ring
from ._config import DilatedConfig
from ._plan import make_plan

Array = jax.Array


def _check_qkv(q, k, v) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must have shape [B, N, heads, D], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  b, n, h, d = q.shape
  if (k.shape[0], k.shape[1], k.shape[3]) != (b, n, d):
    raise ValueError(f"k shape {k.shape} does not match q shape {q.shape}: "
                     "batch, sequence length and head dim must agree")
  if h % k.shape[2]:
    raise ValueError(f"query heads {h} (q shape {q.shape}) must be divisible by "
                     f"kv heads {k.shape[2]} (k shape {k.shape})")


def _check_token_array(name: str, x, q, kind) -> None:
  if x is None:
    return
  if not hasattr(x, "shape"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if x.shape != q.shape[:2]:
    raise ValueError(f"{name} must have shape [B, N]={q.shape[:2]}, got {x.shape}")
  if not jnp.issubdtype(x.dtype, kind):
    raise TypeError(f"{name} must have a {np.dtype(kind).name if kind is bool else 'integer'} "
                    f"dtype, got {x.dtype}")


def _axis_size(axis_name: Hashable | None) -> int:
  if axis_name is None:
    return 1
  try:
    return jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound: call dilated_attention inside "
        "jax.shard_map or jax.pmap over that mesh axis, or pass axis_name=None"
    ) from None


def attend(config: DilatedConfig, q: Array, k: Array, v: Array,
           key_padding_mask: Array | None = None, segment_ids: Array | None = None,
           dropout_rng: Array | None = None) -> Array:
  """Dilated attention with settings ``config``; dropout iff ``dropout_rng``.

  The one entry point below the public function and the modules: checks the
  arrays, plans (memoized), selects the backend, runs the ring.

  Args:
    config: the settings.
    q: shape [B, L, H, D].
    k, v: shape [B, L, K, D].
    key_padding_mask: shape [B, L] bool, or None.
    segment_ids: shape [B, L] int, or None.
    dropout_rng: key of the dropout masks, or None for no dropout.

  Returns:
    shape [B, L, H, D] in ``q.dtype``.
  """
  _check_qkv(q, k, v)
  _check_token_array("key_padding_mask", key_padding_mask, q, bool)
  _check_token_array("segment_ids", segment_ids, q, jnp.integer)
  num_shards = _axis_size(config.axis_name)
  b, local_len, h, d = q.shape
  plan = make_plan(config, local_len * num_shards, h, k.shape[2], num_shards)
  rng = dropout_rng if config.dropout_rate > 0 else None
  request = _backends.Request(
      platform=jax.default_backend(), dtype=q.dtype, head_dim=d,
      masks=key_padding_mask is not None or segment_ids is not None,
      dropout=rng is not None,
      dense=len(config.branches) == 1 and config.branches[0][1] == 1)
  scale = config.softmax_scale or 1.0 / math.sqrt(d)
  static = _ring.Static(plan, scale, config.dropout_rate, config.axis_name,
                        _backends.select(config.backend, request), config.detach_weights)
  return _ring.attention(static, q, k, v, key_padding_mask, segment_ids, rng)


def dilated_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "mix",
    causal: bool = False,
    key_padding_mask: Array | None = None,
    segment_ids: Array | None = None,
    softmax_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    axis_name: Hashable | None = None,
    layout: str = "contiguous",
    backend: str | _backends.Backend = "auto",
    detach_weights: bool = False,
) -> Array:
  """Exact dilated (LongNet-style) attention, on one device or as a ring.

  Branch ``i`` cuts the sequence into segments of ``segment_lengths[i]``
  tokens, keeps every ``dilation_rates[i]``-th token of each segment (from a
  per-head offset) and attends among the kept tokens of a segment. In
  ``"mix"`` mode every head uses every branch and all branches form one
  softmax; in ``"partition"`` mode contiguous head groups use one branch each.
  Memory is linear in ``N`` for fixed segment lengths; no ``N x N`` matrix is
  formed unless a branch has ``segment_length = N, rate = 1``.

  Inside ``jax.shard_map`` or ``jax.pmap`` with ``axis_name`` set, ``q, k, v``
  (and the masks) are the local shards of a sequence laid out over ``P``
  devices as ``layout`` says, ``segment_lengths`` refer to the global
  sequence, and the result is the local shard of the single-device result.
  Segments longer than a shard are computed by passing compacted K/V around
  the devices of the segment with ``jax.lax.ppermute``.

  Args:
    q: shape [B, L, H, D] queries (``L = N`` on one device).
    k: shape [B, L, K, D] keys, ``H % K == 0`` (grouped-query attention).
    v: shape [B, L, K, D] values.
    segment_lengths: ``w_i``; ``N % w_i == 0``.
    dilation_rates: ``r_i``; ``w_i % r_i == 0``.
    mode: ``"mix"`` or ``"partition"``.
    causal: a query sees only keys at positions ``<=`` its own.
    key_padding_mask: shape [B, L] bool, True for real tokens.
    segment_ids: shape [B, L] int; tokens attend only within equal ids.
    softmax_scale: logit scale, default ``1 / sqrt(D)``.
    dropout_rate: probability of dropping an attention weight.
    dropout_rng: PRNG key, required when ``dropout_rate > 0``.
    axis_name: mesh axis the sequence is sharded over, or None.
    layout: ``"contiguous"`` (device ``d`` holds tokens ``[d L, (d+1) L)``)
      or ``"zigzag"`` (the order of :func:`ringdilated.to_layout`: device
      ``d`` holds half-chunks ``d`` and ``2P - 1 - d``). Zigzag balances the
      work of causal rings; on one device both are the same.
    backend: block implementation, a name of ``ringdilated.backends.REGISTRY``
      or a backend object: ``"xla"`` (portable einsums), ``"cudnn"`` (fused
      GPU attention; bfloat16/float16 without masks or dropout),
      ``"pallas"`` (Triton kernels that read each local branch's strided
      positions in place and accumulate into the outputs and gradients: the
      least memory), ``"mosaic"`` (the same for Hopper GPUs through Mosaic
      GPU: the fastest and leanest there) or ``"auto"`` (the fastest that
      can run the call, decided at trace time).
    detach_weights: ``"mix"`` only: treat the weights that combine the
      branches (softmax over their log-sum-exps) as constants in the
      gradient, as LongNet's reference implementation (torchscale) does.
      The output is unchanged; the backward recomputes each branch's output.

  Returns:
    shape [B, L, H, D] in ``q.dtype``. A query that sees no key gets 0.

  Raises:
    ValueError / TypeError: naming the argument and value, before any device
      work, for an invalid configuration or inputs, or a layout the ring
      cannot run.

  Example:
    >>> import jax, ringdilated as rd
    >>> q = k = v = jax.numpy.ones((1, 16, 2, 8))
    >>> rd.dilated_attention(q, k, v, segment_lengths=(4, 8),
    ...                      dilation_rates=(1, 2)).shape
    (1, 16, 2, 8)
  """
  _check_qkv(q, k, v)
  config = DilatedConfig(
      segment_lengths, dilation_rates, mode, causal, layout=layout, backend=backend,
      detach_weights=detach_weights, softmax_scale=softmax_scale,
      dropout_rate=dropout_rate, axis_name=axis_name)
  if config.dropout_rate > 0 and dropout_rng is None:
    raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng")
  return attend(config, q, k, v, key_padding_mask, segment_ids, dropout_rng)
