"""Attention blocks and the log-sum-exp merge.

A *block* is dense attention of one query chunk against one key chunk. It
returns ``(out, lse)``: the chunk-normalized output and the log-sum-exp of its
logits. Any number of blocks of the same query rows -- branches of a ``"mix"``
configuration, or visits of a ring to remote key chunks -- form **one**
softmax once merged with :func:`merge`. The backward of a block needs only the
*global* ``(out, lse)`` of that softmax, never the block's own (the
flash-attention backward): ``dS = P * (dP - rowsum(dO * out))``,
``P = exp(S - lse)``.

Shape legend: X batch-like (batch times segments), T query tokens,
S key tokens, K kv heads, G query heads per kv head, D head dim.
All statistics are float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

_F32 = jnp.float32


class Visibility(NamedTuple):
  """Which key of a block each query may see.

  Attributes:
    kv_valid: shape [X, S, K] bool, False for padding keys, or None.
    q_seg: shape [X, T, K] int, segment id of each query, or None.
    kv_seg: shape [X, S, K] int, segment id of each key (None iff q_seg is).
    diagonal: query ``t`` sees only keys ``s <= t`` (a causal diagonal block:
      query and key chunks hold the same positions).
  """

  kv_valid: Array | None
  q_seg: Array | None
  kv_seg: Array | None
  diagonal: bool

  @property
  def has_arrays(self) -> bool:
    return self.kv_valid is not None or self.q_seg is not None


def _mask(vis: Visibility, num_queries: int, num_keys: int) -> Array | None:
  """shape [X, K, 1, T, S] bool (broadcast over G), or None when all visible."""
  mask = None

  def _and(a, b):
    return b if a is None else a & b

  if vis.kv_valid is not None:
    mask = _and(mask, jnp.moveaxis(vis.kv_valid, 1, 2)[:, :, None, None, :])
  if vis.q_seg is not None:
    same = (jnp.moveaxis(vis.q_seg, 1, 2)[:, :, :, None]
            == jnp.moveaxis(vis.kv_seg, 1, 2)[:, :, None, :])
    mask = _and(mask, same[:, :, None])
  if vis.diagonal:
    tril = jnp.tril(jnp.ones((num_queries, num_keys), bool))
    mask = _and(mask, tril[None, None, None])
  return mask


class Dropout(NamedTuple):
  """Attention dropout of a block, a function of global identities only.

  Whether the weight of (head, query position, key position) is dropped is a
  hash of those three numbers and ``seed``: the same in the forward and the
  backward, and the same whichever blocks (one device, any ring, any layout)
  the attention is cut into.

  Attributes:
    rate: probability of dropping a weight.
    seed: uint32 scalar.
    heads: shape [K, G] int, the global query head of each slot.
    q_pos: shape [X, T, K] int, global position of each query.
    k_pos: shape [X, S, K] int, global position of each key.
  """

  rate: float
  seed: Array
  heads: Array
  q_pos: Array
  k_pos: Array


def _mix(h: Array) -> Array:
  """A 32-bit integer hash finalizer (xor-shift-multiply), elementwise."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _dropout_keep(dropout: Dropout | None) -> Array | None:
  """shape [X, K, G, T, S] bool keep mask, or None without dropout."""
  if dropout is None:
    return None
  u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)  # noqa: E731
  h = _mix(u32(dropout.seed) ^ u32(dropout.heads)[None, :, :, None, None])
  h = _mix(h ^ u32(jnp.moveaxis(dropout.q_pos, 1, 2))[:, :, None, :, None])
  h = _mix(h ^ u32(jnp.moveaxis(dropout.k_pos, 1, 2))[:, :, None, None, :])
  return h < jnp.uint32(min(int((1.0 - dropout.rate) * 2.0**32), 2**32 - 1))


def _scores(q, k, scale, mask):
  s = jnp.einsum("XTKGD,XSKD->XKGTS", q, k, preferred_element_type=_F32) * scale
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return s


# ----------------------------------------------------------------------------
# The portable block: XLA einsums, float32 softmax. Any platform, any mask.
# ----------------------------------------------------------------------------


def xla_forward(q: Array, k: Array, v: Array, vis: Visibility, *,
                scale: float, dropout=None) -> tuple[Array, Array]:
  """One block of attention.

  Args:
    q: shape [X, T, K, G, D].
    k: shape [X, S, K, D].
    v: shape [X, S, K, D].
    vis: which keys each query sees.
    scale: logit scale.
    dropout: :class:`Dropout` of attention probabilities, or None.

  Returns:
    ``out`` shape [X, T, K, G, D] float32 (0 for a row with no visible key)
    and ``lse`` shape [X, T, K, G] float32 (``-inf`` for such a row).
  """
  mask = _mask(vis, q.shape[1], k.shape[1])
  s = _scores(q, k, scale, mask)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1)
  keep = _dropout_keep(dropout)
  if keep is not None:
    p = jnp.where(keep, p / (1.0 - dropout.rate), 0.0)
  o = jnp.einsum("XKGTS,XSKD->XTKGD", p.astype(v.dtype), v,
                 preferred_element_type=_F32)
  seen = denom > 0
  inv = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)
  o = o * jnp.moveaxis(inv, -1, 1)[..., None]
  lse = jnp.where(seen, m[..., 0] + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
  return o, jnp.moveaxis(lse, -1, 1)


def row_delta(dout: Array, out: Array) -> Array:
  """``rowsum(dout * out)`` in float32 over the last axis: the ``delta`` of the
  flash-attention backward, from the *global* output."""
  return jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)


def xla_backward(q: Array, k: Array, v: Array, vis: Visibility, dout: Array,
                 out: Array, lse: Array, *, scale: float,
                 dropout=None) -> tuple[Array, Array, Array]:
  """Gradients of one block given the **global** softmax statistics.

  Args:
    q, k, v, vis, scale, dropout: as in :func:`xla_forward`.
    dout: shape [X, T, K, G, D], cotangent of the global output.
    out: shape [X, T, K, G, D], the global output of the query rows.
    lse: shape [X, T, K, G] float32, global log-sum-exp of the query rows.

  Returns:
    ``dq`` [X, T, K, G, D], ``dk`` and ``dv`` [X, S, K, D], all float32.
  """
  mask = _mask(vis, q.shape[1], k.shape[1])
  delta = row_delta(dout, out)
  s = _scores(q, k, scale, mask)
  lse_t = jnp.moveaxis(lse, 1, -1)[..., None]
  p = jnp.exp(s - jnp.where(jnp.isfinite(lse_t), lse_t, 0.0))
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = jnp.einsum("XTKGD,XSKD->XKGTS", dout, v, preferred_element_type=_F32)
  keep = _dropout_keep(dropout)
  if keep is None:
    p_drop = p
  else:
    p_drop = jnp.where(keep, p / (1.0 - dropout.rate), 0.0)
    dp = jnp.where(keep, dp / (1.0 - dropout.rate), 0.0)
  dv = jnp.einsum("XKGTS,XTKGD->XSKD", p_drop.astype(dout.dtype), dout,
                  preferred_element_type=_F32)
  ds = p * (dp - jnp.moveaxis(delta, 1, -1)[..., None])
  ds = ds.astype(q.dtype)
  dq = jnp.einsum("XKGTS,XSKD->XTKGD", ds, k, preferred_element_type=_F32) * scale
  dk = jnp.einsum("XKGTS,XTKGD->XSKD", ds, q, preferred_element_type=_F32) * scale
  return dq, dk, dv


def merge(out: Array, lse: Array, out_b: Array, lse_b: Array) -> tuple[Array, Array]:
  """Merges block ``(out_b, lse_b)`` into the running ``(out, lse)``.

  Overflow-safe and exact for rows that no block has seen yet (``lse=-inf``):
  the new block's weight is ``exp(lse_b - lse_new) <= 1``, in float32.

  Args:
    out: shape [..., D] float32.
    lse: shape [...] float32.
    out_b: shape [..., D].
    lse_b: shape [...] float32.
  """
  new = jnp.logaddexp(lse, lse_b)
  weight = jnp.where(jnp.isneginf(new), 0.0, jnp.exp(lse_b - new))
  return out - weight[..., None] * (out - out_b), new


# ----------------------------------------------------------------------------
# cuDNN fused attention (GPU). jax's public ``dot_product_attention`` returns
# its log-sum-exp in the input dtype and without gradient, so the block calls
# jax's internal cuDNN rules: the forward gives float32 statistics, and the
# backward is fed the merged *global* output and log-sum-exp. Internal APIs
# can change between jax releases: `cudnn_unavailable` checks them (at trace
# time, never at import) and the caller falls back to the XLA block.
# ----------------------------------------------------------------------------

_EMPTY_ARGS = 7  # bias, q/kv seqlen, q/kv offsets, page tables k/v: unused


def _fused_attention():
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  return fa


@functools.lru_cache(maxsize=None)
def _internal_api_problem() -> str | None:
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


def cudnn_unavailable(dtype, head_dim: int, has_masks: bool, dropout: bool) -> str | None:
  """Why the cuDNN block can't run these blocks here, or None if it can."""
  if jax.default_backend() != "gpu":
    return f"backend is {jax.default_backend()!r}, not 'gpu'"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (cuDNN needs bfloat16 or float16)"
  if head_dim % 8 or head_dim > 128:
    return f"head dim {head_dim} (cuDNN needs a multiple of 8, at most 128)"
  if has_masks:
    return "key_padding_mask/segment_ids (cuDNN blocks support causal only)"
  if dropout:
    return "dropout (not reproducible between the cuDNN forward and backward)"
  return _internal_api_problem()


def _cudnn_static(vis: Visibility, scale: float):
  fa = _fused_attention()
  if vis.has_arrays:
    raise ValueError("the cuDNN block supports causal masking only")
  mask = fa.MaskType.CAUSAL if vis.diagonal else fa.MaskType.NO_MASK
  return dict(scale=scale, seed=0, dropout_rate=0.0, variadic_args=(False, False),
              mask_type=mask, layout=fa.AttentionLayout.BTNH.value,
              sliding_window_length=None)


def cudnn_forward(q: Array, k: Array, v: Array, vis: Visibility, *,
                  scale: float, dropout=None) -> tuple[Array, Array]:
  """:func:`xla_forward` through cuDNN flash attention (no masks, no dropout)."""
  del dropout  # excluded by `cudnn_unavailable`
  fa = _fused_attention()
  x, t, kh, g, d = q.shape
  empty = jnp.zeros((0,), q.dtype)
  (out, stat), _ = fa._dot_product_attention_fwd_rule(  # pylint: disable=protected-access
      q.reshape(x, t, kh * g, d), k, v, *(empty,) * _EMPTY_ARGS,
      cudnn_version=fa.check_cudnn_version(), return_residual=True,
      **_cudnn_static(vis, scale))
  lse = jnp.moveaxis(stat.astype(_F32), 1, 2).reshape(x, t, kh, g)
  return out.reshape(q.shape), lse


def cudnn_backward(q: Array, k: Array, v: Array, vis: Visibility, dout: Array,
                   out: Array, lse: Array, *, scale: float,
                   dropout=None) -> tuple[Array, Array, Array]:
  """:func:`xla_backward` through cuDNN, fed the global ``out`` and ``lse``.

  Returns the gradients in ``q.dtype`` (cuDNN's); callers accumulate them in
  float32.
  """
  del dropout
  fa = _fused_attention()
  x, t, kh, g, d = q.shape
  empty = jnp.zeros((0,), q.dtype)
  heads = lambda a: a.reshape(x, t, kh * g, d).astype(q.dtype)  # noqa: E731
  stat = jnp.moveaxis(lse.reshape(x, t, kh * g), 1, 2)
  res = (heads(q), k, v, *(empty,) * _EMPTY_ARGS, stat, heads(out))
  dq, dk, dv, *_ = fa._dot_product_attention_bwd_rule(  # pylint: disable=protected-access
      is_training=True, return_residual=False, res=res, grad_output=heads(dout),
      **_cudnn_static(vis, scale))
  return dq.reshape(q.shape), dk, dv


# ----------------------------------------------------------------------------
# Backend selection.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
  """A block implementation: ``forward -> (out, lse)``, ``backward -> grads``."""

  name: str
  forward: Callable[..., tuple[Array, Array]]
  backward: Callable[..., tuple[Array, Array, Array]]
  interpret: bool = False  # Pallas kernels in interpret mode (not on a GPU)


XLA = Backend("xla", xla_forward, xla_backward)
CUDNN = Backend("cudnn", cudnn_forward, cudnn_backward)
BACKENDS = ("auto", "xla", "cudnn", "pallas")


def select_backend(name: str, *, dtype, head_dim: int, has_masks: bool,
                   dropout: bool) -> Backend:
  """Resolves ``backend=`` at trace time.

  ``"auto"`` takes cuDNN where it can run these blocks and XLA elsewhere. An
  explicit ``"cudnn"`` or ``"pallas"`` that can't run falls back to XLA with a
  logged warning saying why (the results are the same; only speed and memory
  differ). ``"pallas"`` off a GPU runs its kernels in Pallas interpret mode:
  exact but slow, for tests.
  """
  if name not in BACKENDS:
    raise ValueError(f"backend={name!r} must be one of {BACKENDS}")
  if name == "xla":
    return XLA
  log = logging.getLogger("ringdilated")
  if name == "pallas":
    from . import _pallas  # pylint: disable=g-import-not-at-top
    problem = _pallas.unavailable(dtype, head_dim, has_masks, dropout)
    if problem is None:
      if jax.default_backend() == "gpu":
        return _pallas.PALLAS
      log.warning("backend='pallas' on %r runs in Pallas interpret mode (slow)",
                  jax.default_backend())
      return _pallas.PALLAS_INTERPRET
  else:
    problem = cudnn_unavailable(dtype, head_dim, has_masks, dropout)
    if problem is None:
      return CUDNN
  if name != "auto":
    log.warning("backend=%r unavailable (%s); using the XLA block", name, problem)
  return XLA
