"""Where the tokens of a global sequence lie on the devices of a ring.

``"contiguous"``: device ``d`` of ``P`` holds tokens ``[d L, (d+1) L)``.
``"zigzag"``: the sequence is cut into ``2P`` half-chunks and device ``d``
holds half-chunks ``d`` and ``2P - 1 - d``, so under a causal mask every
device has the same work at every ring step. A model runs in one layout from
the embedding to the loss: permute token ids, positions and targets once with
:func:`to_layout`, and results back with :func:`from_layout` if needed.
"""

from __future__ import annotations

import operator

import jax
import numpy as np

from ._plan import check_layout, positive_int


def half_chunk_order(layout: str, axis_size: int) -> np.ndarray:
  """Half-chunk ``j`` of the laid-out sequence is half-chunk ``order[j]``."""
  check_layout(layout)
  axis_size = positive_int("axis_size", axis_size)
  if layout == "contiguous":
    return np.arange(2 * axis_size)
  d = np.arange(axis_size)
  return np.stack([d, 2 * axis_size - 1 - d], axis=1).reshape(-1)


def _permute(x, order: np.ndarray, axis: int, name: str):
  if not hasattr(x, "shape") or not hasattr(x, "ndim"):
    raise TypeError(f"x must be an array, got {type(x).__name__}")
  try:
    axis = operator.index(axis)
  except TypeError:
    raise TypeError(f"axis={axis!r} must be an int") from None
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis={axis} is out of range for x of shape {x.shape}")
  axis %= x.ndim
  n = x.shape[axis]
  if n % len(order):
    raise ValueError(f"{name}: x.shape[{axis}]={n} must be divisible by "
                     f"{len(order)} (2 * axis_size half-chunks)")
  if np.array_equal(order, np.arange(len(order))):
    return x
  chunk = n // len(order)
  tokens = (order[:, None] * chunk + np.arange(chunk)).reshape(-1)
  if isinstance(x, np.ndarray):
    return np.take(x, tokens, axis=axis)
  index = (slice(None),) * axis + (tokens,)
  sharding = jax.typeof(x).sharding
  if jax.sharding.AxisType.Explicit in getattr(sharding.mesh, "axis_types", ()):
    # A sequence sharded over an explicit mesh axis: keep its sharding (the
    # gather moves tokens between devices).
    return x.at[index].get(out_sharding=sharding)
  return x[index]


def to_layout(x, layout: str, axis_size: int, axis: int = 1):
  """Permutes a global sequence into ``layout`` over ``axis_size`` devices.

  Split the result evenly over the devices (``P("…", "sp")`` sharding of
  ``axis``): device ``d`` then holds the tokens ``layout`` assigns to it.

  Args:
    x: an array (numpy or jax) with the sequence on ``axis``.
    layout: ``"contiguous"`` (the identity) or ``"zigzag"``.
    axis_size: ``P``, the devices on the ring's mesh axis.
    axis: the sequence axis (default 1, as in ``[B, N, ...]``).

  Returns:
    ``x`` with its sequence permuted; same shape and type.

  Example:
    >>> import numpy as np, ringdilated as rd
    >>> rd.to_layout(np.arange(8)[None], "zigzag", 2)
    array([[0, 1, 6, 7, 2, 3, 4, 5]])
  """
  return _permute(x, half_chunk_order(layout, axis_size), axis, "to_layout")


def from_layout(x, layout: str, axis_size: int, axis: int = 1):
  """Inverse of :func:`to_layout`: back to the natural token order."""
  return _permute(x, np.argsort(half_chunk_order(layout, axis_size)), axis,
                  "from_layout")
