"""Flax Linen modules: projections around :func:`ringdilated.dilated_attention`.

The modules hold only configuration (Linen modules are frozen dataclasses) and
parameters. Their attention fields are validated into one
:class:`ringdilated.DilatedConfig` when the module is built; all attention
math and ring execution live below the function. Conventions follow
``flax.linen.MultiHeadDotProductAttention``: the attention configuration is in
module fields, data in the call, projections are ``nn.DenseGeneral`` with
``features=(heads, head_dim)``.

Shape legend: B batch, L tokens (the local shard ``L = N / P`` under
``axis_name``), E input features, F output features, H query heads,
K kv heads, D head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from . import _modules
from ._attention import attend

Array = jax.Array

__all__ = ["DilatedAttention", "MultiHeadDilatedAttention"]


class DilatedAttention(nn.Module):
  """Dilated attention as a parameter-free module, called like the function.

  A Linen wrapper of :func:`ringdilated.dilated_attention` that takes the
  dropout key from the ``"dropout"`` RNG stream. Invalid fields raise when the
  module is built.

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
    backend: attention block implementation (see
      :func:`ringdilated.dilated_attention`).

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

  def __post_init__(self):
    object.__setattr__(self, "config", _modules.config_of(self))  # validates
    super().__post_init__()

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
      q: shape [B, L, H, D] queries.
      k: shape [B, L, K, D] keys, ``H % K == 0``.
      v: shape [B, L, K, D] values.
      key_padding_mask: shape [B, L] bool, True for real tokens.
      segment_ids: shape [B, L] int; tokens attend only within equal ids.
      deterministic: no dropout if True. Required when ``dropout_rate > 0``;
        if False, the key comes from ``self.make_rng("dropout")``.

    Returns:
      shape [B, L, H, D] in ``q.dtype``.

    Raises:
      ValueError: ``deterministic`` missing while ``dropout_rate > 0``, or
        any error of :func:`ringdilated.dilated_attention`.
    """
    deterministic = _modules.need_deterministic(deterministic, self.config.dropout_rate, "")
    rng = None if deterministic else self.make_rng("dropout")
    return attend(self.config, q, k, v, key_padding_mask, segment_ids, rng)


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
    backend: attention block implementation (see
      :func:`ringdilated.dilated_attention`).
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

  def __post_init__(self):
    _modules.config_of(self)  # validates the attention fields
    _modules.check_heads(self.num_heads, self.num_kv_heads, self.qkv_features,
                         self.out_features, self.gamma_init)
    super().__post_init__()

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
      x: shape [B, L, E] inputs.
      key_padding_mask: shape [B, L] bool, True for real tokens.
      segment_ids: shape [B, L] int; tokens attend only within equal ids.
      deterministic: no dropout if True; merged with the field of the same
        name (needed only when ``dropout_rate > 0``). If False, the dropout
        key comes from the ``"dropout"`` RNG stream.

    Returns:
      shape [B, L, F] (``F = out_features or E``).

    Raises:
      ValueError: naming the field and value for an invalid configuration,
        or any error of :func:`ringdilated.dilated_attention`.
    """
    if getattr(x, "ndim", None) != 3:
      raise ValueError(f"x must have shape [B, T, E], got shape {getattr(x, 'shape', x)}")
    heads = _modules.head_layout(self.num_heads, self.num_kv_heads, self.qkv_features,
                                 self.out_features, self.gamma_init, x.shape[-1])
    if self.dropout_rate > 0:
      deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    qk_init, vo_init = _modules.projection_inits(self.kernel_init, self.gamma_init)
    dense = functools.partial(
        nn.DenseGeneral, axis=-1, use_bias=self.use_bias, bias_init=self.bias_init,
        dtype=self.dtype, param_dtype=self.param_dtype)
    h, kv, d = heads.num_heads, heads.num_kv_heads, heads.head_dim

    if self.fused_qkv:
      qkv = dense(features=(h + 2 * kv, d), name="qkv",
                  kernel_init=_modules.fused_qkv_init(qk_init, vo_init, heads))(x)
      q, k, v = _modules.split_qkv(qkv, heads)
    else:
      q = dense(features=(h, d), kernel_init=qk_init, name="query")(x)
      k = dense(features=(kv, d), kernel_init=qk_init, name="key")(x)
      v = dense(features=(kv, d), kernel_init=vo_init, name="value")(x)

    y = DilatedAttention(**_modules.attention_fields(self), name="attention")(
        q, k, v, key_padding_mask=key_padding_mask, segment_ids=segment_ids,
        deterministic=deterministic)  # [B, L, H, D]

    if self.sub_layer_norm:
      y = nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1),
                       dtype=self.dtype, param_dtype=self.param_dtype, name="sub_ln")(y)
    return dense(features=heads.out_features, axis=(-2, -1), kernel_init=vo_init,
                 name="out")(y)
