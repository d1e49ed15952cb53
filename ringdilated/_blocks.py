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

import jax
import jax.numpy as jnp

Array = jax.Array

_F32 = jnp.float32


def visibility(kv_valid: Array | None, q_seg: Array | None,
               kv_seg: Array | None, diagonal: bool,
               num_queries: int, num_keys: int) -> Array | None:
  """Which key each query may see, or ``None`` when it sees all of them.

  Args:
    kv_valid: shape [X, S, K] bool, False for padding keys.
    q_seg: shape [X, T, K] int, segment id of each query.
    kv_seg: shape [X, S, K] int, segment id of each key.
    diagonal: query ``t`` sees only keys ``s <= t`` (a causal diagonal block;
      query and key chunks hold the same positions).
    num_queries: T.
    num_keys: S.

  Returns:
    shape [X, K, 1, T, S] bool (broadcast over G), or None.
  """
  mask = None

  def _and(a, b):
    return b if a is None else a & b

  if kv_valid is not None:
    mask = _and(mask, jnp.moveaxis(kv_valid, 1, 2)[:, :, None, None, :])
  if q_seg is not None:
    same = (jnp.moveaxis(q_seg, 1, 2)[:, :, :, None]
            == jnp.moveaxis(kv_seg, 1, 2)[:, :, None, :])
    mask = _and(mask, same[:, :, None])
  if diagonal:
    tril = jnp.tril(jnp.ones((num_queries, num_keys), bool))
    mask = _and(mask, tril[None, None, None])
  return mask


def _dropout_keep(dropout, shape) -> Array | None:
  """Keep mask for attention-probability dropout; ``dropout=(rate, key)``."""
  if dropout is None:
    return None
  rate, key = dropout
  return jax.random.bernoulli(key, 1.0 - rate, shape)


def _scores(q, k, scale, mask):
  s = jnp.einsum("XTKGD,XSKD->XKGTS", q, k, preferred_element_type=_F32) * scale
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return s


def block_forward(q: Array, k: Array, v: Array, mask: Array | None, *,
                  scale: float, dropout=None) -> tuple[Array, Array]:
  """One block of attention.

  Args:
    q: shape [X, T, K, G, D].
    k: shape [X, S, K, D].
    v: shape [X, S, K, D].
    mask: shape broadcastable to [X, K, G, T, S] bool, or None.
    scale: logit scale.
    dropout: ``(rate, key)`` to drop attention probabilities, or None.

  Returns:
    ``out`` shape [X, T, K, G, D] float32 (0 for a row with no visible key)
    and ``lse`` shape [X, T, K, G] float32 (``-inf`` for such a row).
  """
  s = _scores(q, k, scale, mask)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1)
  keep = _dropout_keep(dropout, p.shape)
  if keep is not None:
    p = jnp.where(keep, p / (1.0 - dropout[0]), 0.0)
  o = jnp.einsum("XKGTS,XSKD->XTKGD", p.astype(v.dtype), v,
                 preferred_element_type=_F32)
  seen = denom > 0
  inv = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)
  o = o * jnp.moveaxis(inv, -1, 1)[..., None]
  lse = jnp.where(seen, m[..., 0] + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
  return o, jnp.moveaxis(lse, -1, 1)


def block_backward(q: Array, k: Array, v: Array, mask: Array | None,
                   dout: Array, lse: Array, delta: Array, *, scale: float,
                   dropout=None) -> tuple[Array, Array, Array]:
  """Gradients of one block given the **global** softmax statistics.

  Args:
    q, k, v, mask, scale, dropout: as in :func:`block_forward`.
    dout: shape [X, T, K, G, D], cotangent of the global output.
    lse: shape [X, T, K, G] float32, global log-sum-exp of the query rows.
    delta: shape [X, T, K, G] float32, ``rowsum(dout * out)`` of the global
      output.

  Returns:
    ``dq`` [X, T, K, G, D], ``dk`` and ``dv`` [X, S, K, D], all float32.
  """
  s = _scores(q, k, scale, mask)
  lse_t = jnp.moveaxis(lse, 1, -1)[..., None]
  p = jnp.exp(s - jnp.where(jnp.isfinite(lse_t), lse_t, 0.0))
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = jnp.einsum("XTKGD,XSKD->XKGTS", dout, v, preferred_element_type=_F32)
  keep = _dropout_keep(dropout, p.shape)
  if keep is None:
    p_drop = p
  else:
    p_drop = jnp.where(keep, p / (1.0 - dropout[0]), 0.0)
    dp = jnp.where(keep, dp / (1.0 - dropout[0]), 0.0)
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
