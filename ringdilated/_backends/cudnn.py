"""cuDNN fused attention blocks (GPU, bfloat16/float16, causal or no mask).

jax's public ``dot_product_attention`` returns its log-sum-exp in the input
dtype and without gradient, so the block calls jax's internal cuDNN rules:
the forward gives float32 statistics, and the backward is fed the merged
*global* output and log-sum-exp. Internal APIs can change between jax
releases: :func:`internal_api_problem` checks them (at trace time, never at
import) and selection then passes this backend over, saying why.

Shape legend: X batch-like (batch times segments), T query tokens,
S key tokens, K kv heads, G query heads per kv head, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp

from .base import Backend, Capabilities, Request, Visibility

Array = jax.Array

_EMPTY_ARGS = 7  # bias, q/kv seqlen, q/kv offsets, page tables k/v: unused


def _fused_attention():
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  return fa


@functools.lru_cache(maxsize=None)
def internal_api_problem() -> str | None:
  """Why jax's internal cuDNN rules can't be used, or None. Cached: pure."""
  try:
    fa = _fused_attention()
  except ImportError as e:
    return f"cannot import jax's cuDNN attention ({e})"
  want = {
      "_dot_product_attention_fwd_rule": (
          "query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets",
          "kv_offsets", "page_table_k", "page_table_v", "scale", "seed",
          "dropout_rate", "variadic_args", "mask_type", "layout",
          "sliding_window_length", "cudnn_version", "return_residual"),
      "_dot_product_attention_bwd_rule": (
          "scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout",
          "sliding_window_length", "is_training", "return_residual", "res",
          "grad_output"),
  }
  for name, params in want.items():
    fn = getattr(fa, name, None)
    if fn is None:
      return f"jax {jax.__version__} has no {name}"
    if tuple(inspect.signature(fn).parameters) != params:
      return f"jax {jax.__version__} changed the signature of {name}"
  for name in ("MaskType", "AttentionLayout", "check_cudnn_version"):
    if not hasattr(fa, name):
      return f"jax {jax.__version__} has no {name}"
  return None


def _static(vis: Visibility, scale: float) -> dict:
  fa = _fused_attention()
  if vis.has_arrays:
    raise ValueError("the cuDNN block supports causal masking only")
  mask = fa.MaskType.CAUSAL if vis.diagonal else fa.MaskType.NO_MASK
  return dict(scale=scale, seed=0, dropout_rate=0.0, variadic_args=(False, False),
              mask_type=mask, layout=fa.AttentionLayout.BTNH.value,
              sliding_window_length=None)


@dataclasses.dataclass(frozen=True)
class CuDNN(Backend):
  """cuDNN flash attention blocks; block outputs and gradients in the input
  dtype (the ring accumulates them in float32)."""

  name = "cudnn"
  capabilities = Capabilities(platforms=("gpu",))

  def problem(self, request: Request) -> str | None:
    if jnp.dtype(request.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return f"dtype {jnp.dtype(request.dtype).name} (cuDNN needs bfloat16 or float16)"
    if request.head_dim % 8 or request.head_dim > 128:
      return f"head dim {request.head_dim} (cuDNN needs a multiple of 8, at most 128)"
    return internal_api_problem()

  def forward(self, q, k, v, vis, *, scale, dropout=None):
    del dropout  # not in the capabilities
    fa = _fused_attention()
    x, t, kh, g, d = q.shape
    empty = jnp.zeros((0,), q.dtype)
    (out, stat), _ = fa._dot_product_attention_fwd_rule(  # pylint: disable=protected-access
        q.reshape(x, t, kh * g, d), k, v, *(empty,) * _EMPTY_ARGS,
        cudnn_version=fa.check_cudnn_version(), return_residual=True,
        **_static(vis, scale))
    lse = jnp.moveaxis(stat.astype(jnp.float32), 1, 2).reshape(x, t, kh, g)
    return out.reshape(q.shape), lse

  def backward(self, q, k, v, vis, dout, out, lse, *, scale, dropout=None):
    del dropout
    fa = _fused_attention()
    x, t, kh, g, d = q.shape
    empty = jnp.zeros((0,), q.dtype)
    heads = lambda a: a.reshape(x, t, kh * g, d).astype(q.dtype)  # noqa: E731
    stat = jnp.moveaxis(lse.reshape(x, t, kh * g), 1, 2)
    res = (heads(q), k, v, *(empty,) * _EMPTY_ARGS, stat, heads(out))
    dq, dk, dv, *_ = fa._dot_product_attention_bwd_rule(  # pylint: disable=protected-access
        is_training=True, return_residual=False, res=res, grad_output=heads(dout),
        **_static(vis, scale))
    return dq.reshape(q.shape), dk, dv
