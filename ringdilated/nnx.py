"""Flax NNX modules: projections around :func:`ringdilated.dilated_attention`.

The NNX counterparts of :mod:`ringdilated.linen`, with the same
configuration, parameter shapes and names (``query``, ``key``, ``value`` or
``qkv``, ``sub_ln``, ``out``) and the same computation; all attention math is
in the function. Conventions follow ``flax.nnx.MultiHeadAttention``: the
constructor takes ``in_features`` and ``rngs``, dropout keys come from a
stream forked at construction (or from ``rngs`` passed to the call), and
``deterministic`` is an attribute that ``module.eval()`` / ``module.train()``
set and the call argument overrides.

Shape legend: B batch, L tokens (the local shard ``L = N / P`` under
``axis_name``), E input features, F output features, H query heads,
K kv heads, D head dim.

Example:
  >>> from flax import nnx
  >>> from ringdilated import nnx as rdnnx
  >>> mha = rdnnx.MultiHeadDilatedAttention(
  ...     2, 16, segment_lengths=(4, 8), dilation_rates=(1, 2), rngs=nnx.Rngs(0))
  >>> mha.query.kernel.shape
  (16, 2, 8)
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from . import _modules
from ._attention import attend
from ._config import DilatedConfig

Array = jax.Array

__all__ = ["DilatedAttention", "MultiHeadDilatedAttention"]


class DilatedAttention(nnx.Module):
  """Dilated attention as a parameter-free NNX module, called like the function.

  Args (constructor):
    segment_lengths: ``w_i``, tokens per segment of branch ``i`` (global).
    dilation_rates: ``r_i``, keep every ``r_i``-th token of a segment.
    mode: ``"mix"`` or ``"partition"``, see the function.
    causal: a query sees only keys at positions ``<=`` its own.
    softmax_scale: logit scale, default ``1 / sqrt(D)``.
    dropout_rate: probability of dropping an attention weight.
    deterministic: default of the call argument; set by ``eval()`` /
      ``train()``.
    axis_name: mesh axis the sequence is sharded over, or None.
    layout: ``"contiguous"`` or ``"zigzag"`` (see :func:`ringdilated.to_layout`).
    detach_weights: ``"mix"``: branch weights are constants in the gradient.
    backend: ``"auto"``, ``"xla"``, ``"cudnn"``, ``"pallas"`` or ``"mosaic"``.
    rngs: its ``dropout`` stream (or default stream) is forked and kept
      when ``dropout_rate > 0``; may be None if keys are passed at call.

  Raises:
    ValueError: an invalid pattern or ``dropout_rate``, at construction.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ringdilated import nnx as rdnnx
    >>> attn = rdnnx.DilatedAttention(segment_lengths=(4, 8), dilation_rates=(1, 2))
    >>> q = k = v = jnp.ones((1, 16, 2, 8))
    >>> jax.jit(attn)(q, k, v).shape
    (1, 16, 2, 8)
  """

  def __init__(
      self,
      segment_lengths: Sequence[int],
      dilation_rates: Sequence[int],
      *,
      mode: str = "mix",
      causal: bool = False,
      softmax_scale: float | None = None,
      dropout_rate: float = 0.0,
      deterministic: bool | None = None,
      axis_name: Hashable | None = None,
      layout: str = "contiguous",
      detach_weights: bool = False,
      backend: str = "auto",
      rngs: nnx.Rngs | None = None,
  ):
    self.config = DilatedConfig(
        segment_lengths, dilation_rates, mode, causal, layout=layout, backend=backend,
        detach_weights=detach_weights, softmax_scale=softmax_scale,
        dropout_rate=dropout_rate, axis_name=axis_name)  # validates
    self.deterministic = deterministic
    self.rngs = (rngs.dropout.fork() if rngs is not None and self.config.dropout_rate > 0
                 else nnx.data(None))

  def __call__(
      self,
      q: Array,
      k: Array,
      v: Array,
      *,
      key_padding_mask: Array | None = None,
      segment_ids: Array | None = None,
      deterministic: bool | None = None,
      rngs: nnx.Rngs | nnx.RngStream | None = None,
  ) -> Array:
    """Attends ``q`` to ``k, v`` with the module's dilation pattern.

    Args:
      q: shape [B, L, H, D] queries.
      k: shape [B, L, K, D] keys, ``H % K == 0``.
      v: shape [B, L, K, D] values.
      key_padding_mask: shape [B, L] bool, True for real tokens.
      segment_ids: shape [B, L] int; tokens attend only within equal ids.
      deterministic: no dropout if True; overrides the attribute. One of
        them is required when ``dropout_rate > 0``.
      rngs: dropout keys (its ``dropout`` stream); default the stream kept
        at construction.

    Returns:
      shape [B, L, H, D] in ``q.dtype``.

    Raises:
      ValueError: ``deterministic`` missing or no dropout key while
        ``dropout_rate > 0``, or any error of
        :func:`ringdilated.dilated_attention`.
    """
    if deterministic is None:
      deterministic = self.deterministic
    deterministic = _modules.need_deterministic(
        deterministic, self.config.dropout_rate, "(call or constructor) ")
    dropout_rng = None
    if not deterministic:
      stream = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
      if stream is None:
        stream = self.rngs
      if stream is None:
        raise ValueError(
            "deterministic=False needs dropout keys: pass rngs to the "
            "constructor or to the call")
      dropout_rng = stream()
    return attend(self.config, q, k, v, key_padding_mask, segment_ids, dropout_rng)


class MultiHeadDilatedAttention(nnx.Module):
  """Multi-head self-attention with dilated (LongNet-style) attention, in NNX.

  The same model as :class:`ringdilated.MultiHeadDilatedAttention` (Linen),
  with the same parameters: ``nnx.LinearGeneral`` projections ``query``
  ``[E, H, D]``, ``key`` and ``value`` ``[E, K, D]`` (or ``qkv``
  ``[E, H + 2K, D]``, query heads first, when ``fused_qkv``), an optional
  ``sub_ln`` LayerNorm over ``[H, D]`` (scale and bias ``[H, D]``), ``out``
  ``[H, D, F]``, and the parameter-free ``attention``
  (:class:`DilatedAttention`). Initialization as in Linen: Xavier-normal,
  gain 1 on query/key and ``gamma_init`` on value/out, unless
  ``kernel_init``.

  Args (constructor):
    num_heads: ``H``, query heads.
    in_features: ``E``.
    segment_lengths, dilation_rates, mode, causal: the pattern, see
      :func:`ringdilated.dilated_attention`.
    num_kv_heads: ``K`` (grouped-query attention), default ``num_heads``.
    qkv_features: ``H * D``, default ``E``.
    out_features: ``F``, default ``E``.
    use_bias, fused_qkv, sub_layer_norm, gamma_init, kernel_init, bias_init,
      softmax_scale, dropout_rate, dtype, param_dtype, axis_name, layout,
      detach_weights, backend:
      as in the Linen module.
    deterministic: default of the call argument; set by ``eval()`` /
      ``train()``.
    rngs: ``params`` keys for initialization; the ``dropout`` stream is
      forked and kept when ``dropout_rate > 0``.

  Raises:
    ValueError: naming the argument and value, at construction.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from ringdilated import nnx as rdnnx
    >>> mha = rdnnx.MultiHeadDilatedAttention(
    ...     4, 32, segment_lengths=(4, 8), dilation_rates=(1, 2),
    ...     num_kv_heads=2, fused_qkv=True, rngs=nnx.Rngs(0))
    >>> mha.qkv.kernel.shape, mha.out.kernel.shape
    ((32, 8, 8), (4, 8, 32))
    >>> forward = nnx.jit(lambda mha, x: mha(x))
    >>> forward(mha, jnp.ones((2, 16, 32))).shape
    (2, 16, 32)
  """

  def __init__(
      self,
      num_heads: int,
      in_features: int,
      *,
      segment_lengths: Sequence[int],
      dilation_rates: Sequence[int],
      mode: str = "mix",
      causal: bool = False,
      num_kv_heads: int | None = None,
      qkv_features: int | None = None,
      out_features: int | None = None,
      use_bias: bool = True,
      fused_qkv: bool = False,
      sub_layer_norm: bool = False,
      gamma_init: float = 1.0,
      kernel_init: Initializer | None = None,
      bias_init: Initializer = nnx.initializers.zeros,
      softmax_scale: float | None = None,
      dropout_rate: float = 0.0,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      axis_name: Hashable | None = None,
      layout: str = "contiguous",
      detach_weights: bool = False,
      backend: str = "auto",
      deterministic: bool | None = None,
      rngs: nnx.Rngs,
  ):
    heads = _modules.head_layout(num_heads, num_kv_heads, qkv_features, out_features,
                                 gamma_init, in_features)
    h, kv, d = heads.num_heads, heads.num_kv_heads, heads.head_dim
    self.heads = heads
    self.in_features, self.out_features = in_features, heads.out_features
    self.fused_qkv, self.sub_layer_norm = fused_qkv, sub_layer_norm
    self.dtype, self.param_dtype = dtype, param_dtype

    # Built first so that an invalid pattern raises before any initialization.
    self.attention = DilatedAttention(
        segment_lengths, dilation_rates, mode=mode, causal=causal,
        softmax_scale=softmax_scale, dropout_rate=dropout_rate,
        deterministic=deterministic, axis_name=axis_name, layout=layout,
        detach_weights=detach_weights, backend=backend, rngs=rngs)

    qk_init, vo_init = _modules.projection_inits(kernel_init, gamma_init)
    dense = functools.partial(
        nnx.LinearGeneral, use_bias=use_bias, bias_init=bias_init, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    if fused_qkv:
      self.qkv = dense(in_features, (h + 2 * kv, d),
                       kernel_init=_modules.fused_qkv_init(qk_init, vo_init, heads))
    else:
      self.query = dense(in_features, (h, d), kernel_init=qk_init)
      self.key = dense(in_features, (kv, d), kernel_init=qk_init)
      self.value = dense(in_features, (kv, d), kernel_init=vo_init)
    if sub_layer_norm:
      ln = nnx.LayerNorm(h * d, reduction_axes=(-2, -1), feature_axes=(-2, -1),
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      # nnx.LayerNorm stores [H * D] and reshapes at call; keep Linen's [H, D].
      ln.scale = nnx.Param(ln.scale[...].reshape(h, d))
      ln.bias = nnx.Param(ln.bias[...].reshape(h, d))
      self.sub_ln = ln
    self.out = dense((h, d), heads.out_features, axis=(-2, -1), kernel_init=vo_init)

  def __call__(
      self,
      x: Array,
      *,
      key_padding_mask: Array | None = None,
      segment_ids: Array | None = None,
      deterministic: bool | None = None,
      rngs: nnx.Rngs | nnx.RngStream | None = None,
  ) -> Array:
    """Dilated multi-head self-attention of ``x``.

    Args:
      x: shape [B, L, E] inputs.
      key_padding_mask: shape [B, L] bool, True for real tokens.
      segment_ids: shape [B, L] int; tokens attend only within equal ids.
      deterministic: no dropout if True; overrides the attribute (needed
        from one of them only when ``dropout_rate > 0``).
      rngs: dropout keys; default the stream kept at construction.

    Returns:
      shape [B, L, F].

    Raises:
      ValueError: ``x`` not [B, T, E], or any error of
        :meth:`DilatedAttention.__call__`.
    """
    if getattr(x, "ndim", None) != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must have shape [B, T, E={self.in_features}], got shape "
                       f"{getattr(x, 'shape', x)}")
    if self.fused_qkv:
      q, k, v = _modules.split_qkv(self.qkv(x), self.heads)
    else:
      q, k, v = self.query(x), self.key(x), self.value(x)
    y = self.attention(q, k, v, key_padding_mask=key_padding_mask,
                       segment_ids=segment_ids, deterministic=deterministic,
                       rngs=rngs)  # [B, L, H, D]
    if self.sub_layer_norm:
      y = self.sub_ln(y)
    return self.out(y)
