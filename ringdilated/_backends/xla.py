"""The portable block: XLA einsums with a float32 softmax. Any platform, any
mask, dropout; the fallback of every other backend.

Shape legend: X batch-like (batch times segments), T query tokens,
S key tokens, K kv heads, G query heads per kv head, D head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._merge import row_delta
from .base import Backend, Capabilities, Dropout, Visibility, keep_mask

Array = jax.Array

_F32 = jnp.float32


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


def _scores(q: Array, k: Array, scale: float, mask: Array | None) -> Array:
  s = jnp.einsum("XTKGD,XSKD->XKGTS", q, k, preferred_element_type=_F32) * scale
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return s


def forward(q: Array, k: Array, v: Array, vis: Visibility, *, scale: float,
            dropout: Dropout | None = None) -> tuple[Array, Array]:
  """:meth:`Backend.forward` in XLA; ``out`` and ``lse`` float32."""
  mask = _mask(vis, q.shape[1], k.shape[1])
  s = _scores(q, k, scale, mask)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1)
  keep = keep_mask(dropout)
  if keep is not None:
    p = jnp.where(keep, p / (1.0 - dropout.rate), 0.0)
  o = jnp.einsum("XKGTS,XSKD->XTKGD", p.astype(v.dtype), v,
                 preferred_element_type=_F32)
  seen = denom > 0
  inv = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)
  o = o * jnp.moveaxis(inv, -1, 1)[..., None]
  lse = jnp.where(seen, m[..., 0] + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
  return o, jnp.moveaxis(lse, -1, 1)


def backward(q: Array, k: Array, v: Array, vis: Visibility, dout: Array,
             out: Array, lse: Array, *, scale: float,
             dropout: Dropout | None = None) -> tuple[Array, Array, Array]:
  """:meth:`Backend.backward` in XLA; gradients float32."""
  mask = _mask(vis, q.shape[1], k.shape[1])
  delta = row_delta(dout, out)
  s = _scores(q, k, scale, mask)
  lse_t = jnp.moveaxis(lse, 1, -1)[..., None]
  p = jnp.exp(s - jnp.where(jnp.isfinite(lse_t), lse_t, 0.0))
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = jnp.einsum("XTKGD,XSKD->XKGTS", dout, v, preferred_element_type=_F32)
  keep = keep_mask(dropout)
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


@dataclasses.dataclass(frozen=True)
class XLA(Backend):
  """The portable block (float32 softmax; masks, dropout; every platform)."""

  name = "xla"
  capabilities = Capabilities(masks=True, dropout=True)

  def forward(self, q, k, v, vis, *, scale, dropout=None):
    return forward(q, k, v, vis, scale=scale, dropout=dropout)

  def backward(self, q, k, v, vis, dout, out, lse, *, scale, dropout=None):
    return backward(q, k, v, vis, dout, out, lse, scale=scale, dropout=dropout)
