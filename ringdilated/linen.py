"""Flax Linen modules: projections around :func:`ringdilated.dilated_attention`.

The modules hold only configuration (Linen modules are frozen dataclasses) and
parameters; all attention math, validation of the attention pattern, and ring
execution live in the function. Conventions follow
``flax.linen.MultiHeadDotProductAttention``: the attention configuration is in
module fields, data in the call, projections are ``nn.DenseGeneral`` with
``features=(heads, head_dim)``.

Shape legend: B batch, T tokens (the local shard ``T = N / P`` under
``axis_name``), E input features, F output features, H query heads,
K kv heads, D head dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from ._attention import dilated_attention
from ._plan import MODES, check_bool, check_layout

Array = jax.Array

__all__ = ["DilatedAttention", "MultiHeadDilatedAttention"]


def _xavier_normal(gain: float) -> Initializer:
  """Xavier (Glorot) normal with ``gain``, as ``torch.nn.init.xavier_normal_``.

  ``std = gain * sqrt(2 / (fan_in + fan_out))``, untruncated.
  """
  return nn.initializers.variance_scaling(gain**2, "fan_avg", "normal")


def _stacked_init(inits: Sequence[Initializer], widths: Sequence[int]) -> Initializer:
  """A kernel initializer for side-by-side projections (the fused QKV kernel).

  Piece ``i`` (``widths[i]`` output columns of the flattened ``[E, columns]``
  kernel, in order) is drawn by ``inits[i]`` with its own shape, so the fused
  kernel has the same distribution as separate projections (fans are those
  of each piece, not of the fused matrix).
  """

  def init(rng, shape, dtype=jnp.float32):
    fan_in = math.prod(shape) // sum(widths)
    rngs = jax.random.split(rng, len(inits))
    pieces = [f(r, (fan_in, w), dtype) for f, r, w in zip(inits, rngs, widths)]
    # Boxed initializers (``nn.with_partitioning``) keep their metadata.
    kernel = jnp.concatenate([nn.meta.unbox(x) for x in pieces], axis=-1).reshape(shape)
    return nn.meta.replace_boxed(pieces[0], kernel)

  return init


def _check_dropout_rate(rate) -> None:
  # Checked by the modules because a deterministic call never passes the
  # rate on to the function (which would check it).
  if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
    raise ValueError(f"dropout_rate={rate!r} must be in [0, 1)")


def _is_positive_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _head_layout(num_heads, num_kv_heads, qkv_features, out_features, mode,
                 gamma_init, in_features: int) -> tuple[int, int, int, int]:
  """Validates the multi-head fields (Linen and NNX); returns ``(H, K, D, F)``."""
  if not _is_positive_int(num_heads):
    raise ValueError(f"num_heads={num_heads!r} must be a positive int")
  kv = num_heads if num_kv_heads is None else num_kv_heads
  if not _is_positive_int(kv):
    raise ValueError(f"num_kv_heads={num_kv_heads!r} must be a positive int")
  if num_heads % kv:
    raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={kv}")
  for name, value in (("qkv_features", qkv_features), ("out_features", out_features)):
    if value is not None and not _is_positive_int(value):
      raise ValueError(f"{name}={value!r} must be a positive int or None")
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} must be one of {MODES}")
  if not (isinstance(gamma_init, (int, float)) and math.isfinite(gamma_init)
          and gamma_init > 0):
    raise ValueError(f"gamma_init={gamma_init!r} must be a positive finite number")
  qkv_features = qkv_features or in_features
  if qkv_features % num_heads:
    raise ValueError(f"qkv_features={qkv_features} must be divisible by "
                     f"num_heads={num_heads}")
  return num_heads, kv, qkv_features // num_heads, out_features or in_features


def _attend(m, q: Array, k: Array, v: Array, key_padding_mask: Array | None,
           segment_ids: Array | None, dropout_rng: Array | None) -> Array:
  """:func:`ringdilated.dilated_attention` with the attention fields of ``m``.

  Shared by the Linen and NNX ``DilatedAttention``; dropout applies iff a
  ``dropout_rng`` is given.
  """
  return dilated_attention(
      q, k, v,
      segment_lengths=m.segment_lengths,
      dilation_rates=m.dilation_rates,
      mode=m.mode,
      causal=m.causal,
      key_padding_mask=key_padding_mask,
      segment_ids=segment_ids,
      softmax_scale=m.softmax_scale,
      dropout_rate=m.dropout_rate if dropout_rng is not None else 0.0,
      dropout_rng=dropout_rng,
      axis_name=m.axis_name,
      layout=m.layout,
      backend=m.backend,
      detach_weights=m.detach_weights,
  )


class DilatedAttention(nn.Module):
  """Dilated attention as a parameter-free module, called like the function.

  A Linen wrapper of :func:`ringdilated.dilated_attention` that takes the
  dropout key from the ``"dropout"`` RNG stream.

  Attributes:
    segment_lengths: ``w_i``, tokens per segment of branch ``i`` (global).
    dilation_rates: ``r_i``, keep every ``r_i``-th token of a segment.
    mode: ``"mix"`` (one softmax over all branches) or ``"partition"``
      (contiguous head groups, one branch each).
    causal: a query sees only keys at positions ``<=`` its own.
    softmax_scale: logit scale, default ``1 / sqrt(D)``.
    dropout_rate: probability of dropping an attention weight.
    axis_name: mesh axis the sequence is sharded over (ring execution inside
      ``jax.shard_map`` / ``jax.pmap``), or None for one device.
    layout: how the sequence lies on the ring's devices, ``"contiguous"`` or
      ``"zigzag"`` (balanced causal rings; see :func:`ringdilated.to_layout`).
    detach_weights: ``"mix"``: branch weights are constants in the gradient
      (as LongNet's torchscale implementation).
    backend: attention block implementation, ``"auto"``, ``"xla"``,
      ``"cudnn"`` or ``"pallas"`` (see :func:`ringdilated.dilated_attention`).

  Example:
    >>> import jax, jax.numpy as jnp, ringdilated as rd
    >>> attn = rd.DilatedAttention(segment_lengths=(4, 8), dilation_rates=(1, 2))
    >>> q = k = v = jnp.ones((1, 16, 2, 8))
    >>> attn.apply({}, q, k, v).shape
    (1, 16, 2, 8)
  """

  segment_lengths: Sequence[int]
  dilation_rates: Sequence[int]
  mode: str = "mix"
  causal: bool = False
  softmax_scale: float | None = None
  dropout_rate: float = 0.0
  axis_name: Hashable | None = None
  layout: str = "contiguous"
  detach_weights: bool = False
  backend: str = "auto"

  def __call__(
      self,
      q: Array,
      k: Array,
      v: Array,
      *,
      key_padding_mask: Array | None = None,
      segment_ids: Array | None = None,
      deterministic: bool | None = None,
  ) -> Array:
    """Attends ``q`` to ``k, v`` with the module's dilation pattern.

    Args:
      q: shape [B, T, H, D] queries.
      k: shape [B, T, K, D] keys, ``H % K == 0``.
      v: shape [B, T, K, D] values.
      key_padding_mask: shape [B, T] bool, True for real tokens.
      segment_ids: shape [B, T] int; tokens attend only within equal ids.
      deterministic: no dropout if True. Required when ``dropout_rate > 0``;
        if False, the key comes from ``self.make_rng("dropout")``.

    Returns:
      shape [B, T, H, D] in ``q.dtype``.

    Raises:
      ValueError: ``deterministic`` missing while ``dropout_rate > 0``, or
        any error of :func:`ringdilated.dilated_attention`.
    """
    _check_dropout_rate(self.dropout_rate)
    check_layout(self.layout)
    check_bool("detach_weights", self.detach_weights)
    dropout_rng = None
    if self.dropout_rate > 0:
      if deterministic is None:
        raise ValueError(
            f"deterministic=None: pass deterministic=True or False when "
            f"dropout_rate={self.dropout_rate} > 0")
      if not deterministic:
        dropout_rng = self.make_rng("dropout")
    return _attend(self, q, k, v, key_padding_mask, segment_ids, dropout_rng)


class MultiHeadDilatedAttention(nn.Module):
  """Multi-head self-attention with dilated (LongNet-style) attention.

  ``x -> q, k, v`` projections (``nn.DenseGeneral`` named ``query``, ``key``,
  ``value``, or one ``qkv`` when ``fused_qkv``), then
  :func:`ringdilated.dilated_attention`, an optional LayerNorm over the
  ``[H, D]`` features of the attention output (``sub_ln``; MAGNETO /
  LongNet), and the output projection ``out``. Self-attention only: dilated
  attention needs queries and keys of the same length.

  Initialization follows ``dilated-attention-pytorch``: all kernels are
  Xavier-normal, query/key with gain 1, value/output with gain ``gamma_init``;
  biases from ``bias_init`` (zeros).

  Attributes:
    num_heads: ``H``, query heads.
    segment_lengths: ``w_i``, tokens per segment of branch ``i`` (global).
    dilation_rates: ``r_i``, keep every ``r_i``-th token of a segment.
    mode: ``"mix"`` or ``"partition"``, see the function.
    causal: a query sees only keys at positions ``<=`` its own.
    num_kv_heads: ``K``, key/value heads (grouped-query attention); default
      ``num_heads``. Must divide ``num_heads``.
    qkv_features: ``H * D``, default ``E``. Must be divisible by ``num_heads``.
    out_features: ``F``, default ``E``.
    use_bias: biases on all projections.
    fused_qkv: one projection producing q, k and v (kernel ``[E, H + 2K, D]``,
      query heads first, then key, then value heads); same function and same
      initial distribution as three projections.
    sub_layer_norm: LayerNorm over the ``[H, D]`` attention output before
      ``out`` (Flax's epsilon 1e-6; PyTorch's default is 1e-5).
    gamma_init: Xavier-normal gain of the value and output kernels.
    kernel_init: if given, initializes all four kernels (``gamma_init`` then
      does not apply).
    bias_init: initializer of all biases.
    softmax_scale: logit scale, default ``1 / sqrt(D)``.
    dropout_rate: probability of dropping an attention weight.
    dtype: computation dtype of every submodule (default: inferred from
      inputs and params). The output has this dtype.
    param_dtype: dtype of every parameter.
    axis_name: mesh axis the sequence is sharded over (ring execution inside
      ``jax.shard_map`` / ``jax.pmap``), or None for one device.
    layout: how the sequence lies on the ring's devices, ``"contiguous"`` or
      ``"zigzag"`` (balanced causal rings; see :func:`ringdilated.to_layout`).
    detach_weights: ``"mix"``: branch weights are constants in the gradient
      (as LongNet's torchscale implementation).
    backend: attention block implementation, ``"auto"``, ``"xla"``,
      ``"cudnn"`` or ``"pallas"`` (see :func:`ringdilated.dilated_attention`).
    deterministic: default of the call argument (merged as in Flax).

  Example:
    >>> import jax, jax.numpy as jnp, ringdilated as rd
    >>> mha = rd.MultiHeadDilatedAttention(
    ...     num_heads=2, segment_lengths=(4, 8), dilation_rates=(1, 2))
    >>> x = jnp.ones((1, 16, 16))
    >>> params = mha.init(jax.random.key(0), x)
    >>> mha.apply(params, x).shape
    (1, 16, 16)
  """

  num_heads: int
  segment_lengths: Sequence[int]
  dilation_rates: Sequence[int]
  mode: str = "mix"
  causal: bool = False
  num_kv_heads: int | None = None
  qkv_features: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  fused_qkv: bool = False
  sub_layer_norm: bool = False
  gamma_init: float = 1.0
  kernel_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros
  softmax_scale: float | None = None
  dropout_rate: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  axis_name: Hashable | None = None
  layout: str = "contiguous"
  detach_weights: bool = False
  backend: str = "auto"
  deterministic: bool | None = None

  def _check_fields(self, x: Array) -> tuple[int, int, int, int]:
    """Validates fields against ``x``; returns ``(H, K, D, F)``."""
    _check_dropout_rate(self.dropout_rate)
    check_layout(self.layout)
    check_bool("detach_weights", self.detach_weights)
    if getattr(x, "ndim", None) != 3:
      raise ValueError(f"x must have shape [B, T, E], got shape {getattr(x, 'shape', x)}")
    return _head_layout(self.num_heads, self.num_kv_heads, self.qkv_features,
                        self.out_features, self.mode, self.gamma_init, x.shape[-1])

  @nn.compact
  def __call__(
      self,
      x: Array,
      *,
      key_padding_mask: Array | None = None,
      segment_ids: Array | None = None,
      deterministic: bool | None = None,
  ) -> Array:
    """Dilated multi-head self-attention of ``x``.

    Args:
      x: shape [B, T, E] inputs.
      key_padding_mask: shape [B, T] bool, True for real tokens.
      segment_ids: shape [B, T] int; tokens attend only within equal ids.
      deterministic: no dropout if True; merged with the field of the same
        name (needed only when ``dropout_rate > 0``). If False, the dropout
        key comes from the ``"dropout"`` RNG stream.

    Returns:
      shape [B, T, F] (``F = out_features or E``).

    Raises:
      ValueError: naming the field and value for an invalid configuration,
        or any error of :func:`ringdilated.dilated_attention`.
    """
    h, kv, d, features = self._check_fields(x)
    if self.dropout_rate > 0:
      deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    else:
      deterministic = True
    if self.kernel_init is None:
      qk_init, vo_init = _xavier_normal(1.0), _xavier_normal(self.gamma_init)
    else:
      qk_init = vo_init = self.kernel_init
    dense = functools.partial(
        nn.DenseGeneral, axis=-1, use_bias=self.use_bias, bias_init=self.bias_init,
        dtype=self.dtype, param_dtype=self.param_dtype)

    if self.fused_qkv:
      # [B, T, H + 2K, D]: query heads, then key heads, then value heads.
      qkv = dense(features=(h + 2 * kv, d), name="qkv",
                  kernel_init=_stacked_init((qk_init, qk_init, vo_init),
                                            (h * d, kv * d, kv * d)))(x)
      q, k, v = jnp.split(qkv, (h, h + kv), axis=-2)
    else:
      q = dense(features=(h, d), kernel_init=qk_init, name="query")(x)
      k = dense(features=(kv, d), kernel_init=qk_init, name="key")(x)
      v = dense(features=(kv, d), kernel_init=vo_init, name="value")(x)

    y = DilatedAttention(
        segment_lengths=self.segment_lengths,
        dilation_rates=self.dilation_rates,
        mode=self.mode,
        causal=self.causal,
        softmax_scale=self.softmax_scale,
        dropout_rate=self.dropout_rate,
        axis_name=self.axis_name,
        layout=self.layout,
        detach_weights=self.detach_weights,
        backend=self.backend,
        name="attention",
    )(q, k, v, key_padding_mask=key_padding_mask, segment_ids=segment_ids,
      deterministic=deterministic)  # [B, T, H, D]

    if self.sub_layer_norm:
      y = nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1),
                       dtype=self.dtype, param_dtype=self.param_dtype, name="sub_ln")(y)
    return dense(features=features, axis=(-2, -1), kernel_init=vo_init, name="out")(y)
