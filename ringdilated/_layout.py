"""Where the tokens of a global sequence lie on the devices of a ring.

``"contiguous"``: device ``d`` of ``P`` holds tokens ``[d L, (d+1) L)``.
``"zigzag"``: the sequence is cut into ``2P`` half-chunks and device ``d``
holds half-chunks ``d`` and ``2P - 1 - d``, so under a causal mask every
device has the same work at every ring step. A model runs in one layout from
the embedding to the loss: permute token ids, positions and targets once with
:func:`to_layout`, and results back with :func:`from_layout` if needed.

Every layout question is answered here: which segment lengths a layout can
run (:func:`check_segments`), how a branch's segments lie on the devices
(:func:`placement`), and the global position of each local token
(:func:`global_positions`).

Shape legend: B batch, N global sequence length, P devices on the ring axis,
L = N / P local length, C = N / (2P) half-chunk length.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._validate import one_of, positive_int

Array = jax.Array

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> None:
  """Raises unless ``layout`` is one of :data:`LAYOUTS`."""
  one_of("layout", layout, LAYOUTS)


def half_chunk_order(layout: str, axis_size: int) -> np.ndarray:
  """Half-chunk ``j`` of the laid-out sequence is half-chunk ``order[j]``."""
  check_layout(layout)
  axis_size = positive_int("axis_size", axis_size)
  if layout == "contiguous":
    return np.arange(2 * axis_size)
  d = np.arange(axis_size)
  return np.stack([d, 2 * axis_size - 1 - d], axis=1).reshape(-1)


# ----------------------------------------------------------------------------
# Which segments a layout can run, and how they lie on the devices.
# ----------------------------------------------------------------------------


def check_segments(segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                   seq_len: int, num_shards: int, layout: str) -> None:
  """Raises a ``ValueError`` naming the branch a ring of ``num_shards``
  devices in ``layout`` cannot run (segments must be local or span whole
  devices; kept positions must be the same on every device)."""
  local = seq_len // num_shards
  for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
    if seq_len % w:
      raise ValueError(f"sequence length {seq_len} must be divisible by "
                       f"segment_lengths[{i}]={w}")
    if num_shards == 1:
      continue
    if layout == "zigzag":
      _check_zigzag(i, w, r, seq_len, num_shards)
      continue
    if local % r:
      raise ValueError(
          f"local sequence length {local} (= {seq_len} / {num_shards} devices) "
          f"must be divisible by dilation_rates[{i}]={r}")
    if w <= local and local % w:
      raise ValueError(
          f"segment_lengths[{i}]={w} must divide the local sequence length "
          f"{local} (= {seq_len} / {num_shards} devices) or be a multiple of it")
    if w > local and (w % local or num_shards % (w // local)):
      raise ValueError(
          f"segment_lengths[{i}]={w} must be a multiple of the local sequence "
          f"length {local} spanning a divisor of the {num_shards} devices")


def _check_zigzag(i: int, w: int, r: int, seq_len: int, num_shards: int) -> None:
  """Branch ``i`` on the zigzag layout: device d holds half-chunks d, 2P-1-d."""
  where = f"(= {seq_len} / (2 * {num_shards} devices)) of layout='zigzag'"
  if seq_len % (2 * num_shards):
    raise ValueError(f"sequence length {seq_len} must be divisible by 2 * "
                     f"{num_shards} devices for layout='zigzag'")
  chunk = seq_len // (2 * num_shards)
  if w <= chunk:
    if chunk % w:
      raise ValueError(f"segment_lengths[{i}]={w} must divide the half-chunk "
                       f"length {chunk} {where} or be a multiple of it")
    return
  if w % chunk:
    raise ValueError(f"segment_lengths[{i}]={w} must be a multiple of the "
                     f"half-chunk length {chunk} {where}")
  if num_shards % (w // chunk) and w != seq_len:
    raise ValueError(
        f"segment_lengths[{i}]={w} spans {w // chunk} half-chunks {where}: "
        f"segments of a divisor of {num_shards} half-chunks lie on a sub-ring "
        "in mirrored pairs, a segment of the whole sequence on the whole ring; "
        "other segments mix sub-rings of different sizes")
  if chunk % r:
    raise ValueError(f"the half-chunk length {chunk} {where} must be divisible "
                     f"by dilation_rates[{i}]={r}")


def placement(w: int, seq_len: int, num_shards: int, layout: str) -> tuple[int, int, str]:
  """``(piece, ring_size, schedule)`` of a branch of segment length ``w``.

  ``piece``: local tokens per segment piece; ``ring_size``: devices per
  segment; ``schedule``: how the chunks of a segment lie on its sub-ring
  (``"contiguous"``, ``"mirror"`` or ``"zigzag"``; see ``_plan.Branch``).
  """
  local = seq_len // num_shards
  if num_shards == 1 or layout == "contiguous" or w <= local // 2:
    return min(w, local), max(1, w // local), "contiguous"
  if w == seq_len:
    return local, num_shards, "zigzag"
  return local // 2, w // (local // 2), "mirror"


def global_positions(layout: str, num_shards: int, axis_name: Hashable | None,
                     batch: int, length: int) -> Array:
  """shape [B, L] int32: the global position of each local token.

  Inside ``shard_map``/``pmap`` over ``axis_name`` (``num_shards`` devices),
  device ``d`` holds the tokens ``layout`` assigns it; on one device the
  positions are ``0 .. L - 1``.
  """
  local = jnp.arange(length, dtype=jnp.int32)
  if axis_name is not None:
    d = jax.lax.axis_index(axis_name)
    if layout == "zigzag" and num_shards > 1:
      # This device's two half-chunks, in the order of to_layout.
      order = half_chunk_order(layout, num_shards).reshape(-1, 2)
      half = length // 2
      local = jnp.asarray(order, jnp.int32)[d, local // half] * half + local % half
    else:
      local = d * length + local
  return jnp.broadcast_to(local, (batch, length))


# ----------------------------------------------------------------------------
# Public permutations of a global sequence.
# ----------------------------------------------------------------------------


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
  """Inverse of :func:`to_layout`: back to the natural token order.

  Example:
    >>> import numpy as np, ringdilated as rd
    >>> rd.from_layout(rd.to_layout(np.arange(8)[None], "zigzag", 2), "zigzag", 2)
    array([[0, 1, 2, 3, 4, 5, 6, 7]])
  """
  return _permute(x, np.argsort(half_chunk_order(layout, axis_size)), axis,
                  "from_layout")
