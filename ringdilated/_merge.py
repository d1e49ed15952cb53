"""The float32 log-sum-exp merge of attention blocks of one softmax.

Any number of blocks of the same query rows (branches of a ``"mix"``
configuration, visits of a ring to remote key chunks) form one softmax once
merged: ``lse = logsumexp_b lse_b``, ``out = sum_b exp(lse_b - lse) out_b``.
The backward of a block needs only the merged ``(out, lse)`` and
``delta = rowsum(dout * out)`` (:func:`row_delta`).

Shape legend: ``[..., D]`` rows of any leading shape, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def merge(out: Array, lse: Array, out_b: Array, lse_b: Array,
          seen: Array | bool | None = None) -> tuple[Array, Array]:
  """Merges block ``(out_b, lse_b)`` into the running ``(out, lse)``.

  One definition for every place that merges: between blocks in XLA and in
  the kernels' epilogues (a tile's rows), so it uses only elementwise
  operations and ``lax.broadcast_in_dim``. Shifted by the larger of the two
  log-sum-exps, so the new block's weight ``exp(lse_b - lse_new) <= 1``;
  exact for rows no block has seen yet (``lse = -inf``), float32.

  Args:
    out: shape [..., D] float32.
    lse: shape [...] float32.
    out_b: shape [..., D].
    lse_b: shape [...] float32.
    seen: shape [...] bool, the rows where the block saw a key; ``True``
      where every row did (a kernel without token masks: no test is made);
      None: the rows where ``lse_b > -inf``.

  Returns:
    The merged ``(out, lse)``, float32.
  """
  if seen is None:
    seen = lse_b > -jnp.inf
  top = jnp.maximum(lse, lse_b)
  if seen is not True:
    top = jnp.where(top == -jnp.inf, 0.0, top)
  new = top + jnp.log(jnp.exp(lse - top) + jnp.exp(lse_b - top))
  weight = jnp.exp(lse_b - new)
  if seen is not True:
    weight = jnp.where(seen, weight, 0.0)
  rows = tuple(range(weight.ndim))
  return out + lax.broadcast_in_dim(weight, out.shape, rows) * (out_b - out), new


def unmerged(q: Array, dtype=None) -> tuple[Array, Array]:
  """The running ``(out, lse)`` of rows no block has merged into yet: 0 (in
  ``dtype``, default ``q``'s) and ``-inf`` float32, shaped like ``q`` [..., D]
  and its rows. ``*_like``, so inside ``shard_map`` they vary over the mesh
  axes as ``q`` does."""
  return (jnp.zeros_like(q, dtype), jnp.full_like(q[..., 0], -jnp.inf, jnp.float32))


def row_delta(dout: Array, out: Array) -> Array:
  """``rowsum(dout * out)`` in float32 over the last axis: the ``delta`` of
  the flash-attention backward, from the *global* output."""
  return jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
