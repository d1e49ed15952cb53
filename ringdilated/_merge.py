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

Array = jax.Array


def merge(out: Array, lse: Array, out_b: Array, lse_b: Array) -> tuple[Array, Array]:
  """Merges block ``(out_b, lse_b)`` into the running ``(out, lse)``.

  Overflow-safe and exact for rows that no block has seen yet (``lse=-inf``):
  the new block's weight is ``exp(lse_b - lse_new) <= 1``, in float32.

  Args:
    out: shape [..., D] float32.
    lse: shape [...] float32.
    out_b: shape [..., D].
    lse_b: shape [...] float32.

  Returns:
    The merged ``(out, lse)``, float32.
  """
  new = jnp.logaddexp(lse, lse_b)
  weight = jnp.where(jnp.isneginf(new), 0.0, jnp.exp(lse_b - new))
  return out - weight[..., None] * (out - out_b), new


def row_delta(dout: Array, out: Array) -> Array:
  """``rowsum(dout * out)`` in float32 over the last axis: the ``delta`` of
  the flash-attention backward, from the *global* output."""
  return jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
