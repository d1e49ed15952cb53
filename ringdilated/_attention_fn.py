"""Dilated attention as the ``attention_fn`` of Flax's multi-head attention.

``flax.linen.MultiHeadDotProductAttention(attention_fn=...)`` calls
``attention_fn(query, key, value, **kwargs)`` after the q/k/v projections,
passing only the keyword arguments that the function's signature names;
``flax.nnx.MultiHeadAttention`` passes a fixed set (with ``is_causal``).
:func:`make_attention_fn` returns such a function running
:func:`ringdilated.dilated_attention`, so an existing Flax model keeps its
parameters and gains dilated attention.

Shape legend (Flax's names in the signature): B batch, T query length,
S key length (``T = S``), N heads, H head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp

from . import _backends
from ._attention import attend
from ._config import DilatedConfig

Array = jax.Array

__all__ = ["make_attention_fn"]


def _key_padding_mask(mask, b: int, s: int) -> Array:
  """A Flax mask of shape [B or 1, 1, 1, S] as a [B, S] bool key padding mask."""
  shape = getattr(mask, "shape", None)
  if shape is None:
    raise TypeError(f"mask must be an array, got {type(mask).__name__}")
  if len(shape) != 4 or shape[0] not in (1, b) or shape[1:3] != (1, 1) or shape[3] != s:
    raise NotImplementedError(
        f"mask of shape {tuple(shape)} is not supported: only a key padding mask "
        f"of shape [B, 1, 1, S] or [1, 1, 1, S] (here [{b}, 1, 1, {s}]) is; "
        "express causality with make_attention_fn(causal=True)")
  # Flax masks may be float (``nn.make_attention_mask``); nonzero means attend.
  return jnp.broadcast_to(mask.reshape(shape[0], s).astype(bool), (b, s))


def make_attention_fn(
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "mix",
    causal: bool = False,
    axis_name: Hashable | None = None,
    layout: str = "contiguous",
    backend: str | _backends.Backend = "auto",
    detach_weights: bool = False,
) -> Callable[..., Array]:
  """Dilated attention with the signature Flax's ``attention_fn`` expects.

  The returned function takes the arguments of
  ``flax.linen.dot_product_attention`` and runs
  :func:`ringdilated.dilated_attention` with this dilation pattern. Arguments
  it cannot honour raise instead of being ignored:

  * ``bias`` (a dense [B, N, T, S] logit bias): ``NotImplementedError``.
  * ``mask``: only a key padding mask of shape [B, 1, 1, S] or [1, 1, 1, S]
    (True or nonzero for keys to attend to), else ``NotImplementedError``
    naming the shape. A causal mask is ``causal=True`` here instead.
  * ``broadcast_dropout=True`` (Flax's default) when dropout is applied:
    ``NotImplementedError``; the dropout mask is drawn per attention weight,
    so pass ``broadcast_dropout=False`` to the Flax module.
  * ``precision``, ``module`` (``sow_weights``; no attention matrix exists),
    ``einsum_dot_general``, ``qk_attn_weights_einsum`` and
    ``attn_weights_value_einsum``: ``NotImplementedError`` unless None.
  * ``force_fp32_for_softmax`` is accepted either way: the softmax
    statistics are always float32.
  * ``is_causal=True`` (passed by ``flax.nnx.MultiHeadAttention``) makes the
    attention causal, as ``causal=True`` does.

  Args:
    segment_lengths, dilation_rates, mode, causal, axis_name, layout, backend,
      detach_weights: the settings of :class:`ringdilated.DilatedConfig`
      (dropout comes from the Flax module's ``dropout_rate``).

  Returns:
    ``attention_fn(query, key, value, bias=None, mask=None, ...)`` with
    ``query`` shape [B, T, N, H] and ``key``, ``value`` shape [B, S, N, H],
    returning shape [B, T, N, H].

  Raises:
    ValueError / TypeError: invalid settings (checked here, before any call).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, ringdilated as rd
    >>> mha = nn.MultiHeadDotProductAttention(
    ...     num_heads=2, attention_fn=rd.make_attention_fn(
    ...         segment_lengths=(4, 8), dilation_rates=(1, 2)))
    >>> x = jnp.ones((1, 16, 8))
    >>> params = jax.jit(mha.init)(jax.random.key(0), x)
    >>> jax.jit(mha.apply)(params, x).shape
    (1, 16, 8)
  """
  config = DilatedConfig(segment_lengths, dilation_rates, mode, causal, layout=layout,
                         backend=backend, detach_weights=detach_weights,
                         axis_name=axis_name)  # validates

  def attention_fn(
      query: Array,
      key: Array,
      value: Array,
      bias: Array | None = None,
      mask: Array | None = None,
      broadcast_dropout: bool = True,
      dropout_rng: Array | None = None,
      dropout_rate: float = 0.0,
      deterministic: bool = False,
      dtype=None,
      precision=None,
      module=None,
      force_fp32_for_softmax: bool = False,
      einsum_dot_general=None,
      qk_attn_weights_einsum=None,
      attn_weights_value_einsum=None,
      is_causal: bool = False,
  ) -> Array:
    """Dilated attention of ``query`` [B, T, N, H] to ``key``, ``value`` [B, S, N, H]."""
    del force_fp32_for_softmax  # The softmax is always float32.
    if bias is not None:
      raise NotImplementedError(
          "bias is not supported by dilated attention (no dense [B, N, T, S] "
          "logits exist); pass bias=None")
    for name, arg in (("precision", precision), ("module", module),
                      ("einsum_dot_general", einsum_dot_general),
                      ("qk_attn_weights_einsum", qk_attn_weights_einsum),
                      ("attn_weights_value_einsum", attn_weights_value_einsum)):
      if arg is not None:
        raise NotImplementedError(
            f"{name}={arg!r} is not supported by dilated attention; it must be None"
            + (" (sow_weights needs the attention matrix, which is never formed)"
               if name == "module" else ""))
    for name, x in (("query", query), ("key", key), ("value", value)):
      if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name} must have shape [B, T, N, H], got shape "
                         f"{getattr(x, 'shape', x)}")
    if query.shape[1] != key.shape[1]:
      raise ValueError(
          f"query length T={query.shape[1]} must equal key length "
          f"S={key.shape[1]}: dilated attention is self-attention "
          f"(query shape {query.shape}, key shape {key.shape})")
    use_dropout = dropout_rate > 0 and not deterministic
    if use_dropout and broadcast_dropout:
      raise NotImplementedError(
          f"broadcast_dropout=True with dropout_rate={dropout_rate} is not "
          "supported: dilated attention drops each attention weight "
          "independently; pass broadcast_dropout=False")
    if use_dropout and dropout_rng is None:
      raise ValueError(f"dropout_rate={dropout_rate} with deterministic=False "
                       "needs a dropout_rng")
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    else:
      dt = jnp.result_type(query, key, value)
      query, key, value = (x.astype(dt) for x in (query, key, value))
    key_padding_mask = None
    if mask is not None:
      key_padding_mask = _key_padding_mask(mask, query.shape[0], key.shape[1])
    rate = dropout_rate if use_dropout else 0.0
    call = config.replace(causal=config.causal or bool(is_causal), dropout_rate=rate)
    return attend(call, query, key, value, key_padding_mask,
                  dropout_rng=dropout_rng if use_dropout else None)

  return attention_fn
