"""Tile-level visibility and dropout, shared by every kernel family.

Inside a kernel a tile is ``[bq, bk]`` logits of query tokens against key
tokens. Which of them are visible (causal diagonal, key padding, segment
ids) and which dropout drops are functions of per-token vectors that travel
with the tensors, so a masked or dropped weight is the same whichever
backend, tiling, ring or layout computes it. The dropout hashes are
:func:`.base.hash32` computed on int32 bit patterns (logical shifts,
wrapping multiplies): bit-identical to the uint32 version of the XLA block
(:func:`.base.keep_mask`), and free of unsigned integer support in kernel
languages. Rows and keys are hashed once per tile; a weight costs one
multiply (:func:`kept`).

Tile skipping: a key tile whose segment ids (over its valid keys) cannot
meet a query tile's ids is dead; :func:`span` turns per-tile liveness into
the loop range ``[lo, hi)`` that covers every live tile, so dead tiles at
the ends (other documents, trailing padding) cost nothing. For packed
documents with non-decreasing ids the live tiles are exactly that range.
When every tile of that range holds valid keys of the query tile's one id
(:func:`uniform`), no token mask can hide anything: the Triton kernels run
their unmasked loop there, and so do the Hopper kernels (a second loop
nest, chosen once per program).

Shape legend: bq query tile, bk key tile, n tiles of a segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .base import KEY_SALT, MIX, Dropout, keep_threshold

Array = jax.Array

BIG = 2**30  # id bound of an empty tile: min over no tokens / -max


def _i32(x: int) -> int:
  """An uint32 constant as the int32 with the same bits."""
  return x - 2**32 if x >= 2**31 else x


def hash32(h: Array) -> Array:
  """:func:`.base.hash32` on int32 bit patterns, elementwise."""
  srl = jax.lax.shift_right_logical
  h = (h ^ srl(h, jnp.int32(16))) * jnp.int32(_i32(0x7FEB352D))
  h = (h ^ srl(h, jnp.int32(15))) * jnp.int32(_i32(0x846CA68B))
  return h ^ srl(h, jnp.int32(16))


def row_hash(seed: Array, head, q_pos: Array) -> Array:
  """[bq] int32: the dropout hash of query head ``head`` and the query rows
  at global positions ``q_pos`` (``seed``: int32 bits of the uint32 seed)."""
  h = hash32(seed ^ jnp.asarray(head, jnp.int32))
  return hash32(h ^ q_pos.astype(jnp.int32))


def col_hash(seed: Array, k_pos: Array) -> Array:
  """[bk] int32: the dropout hash of the keys at global positions ``k_pos``."""
  return hash32(hash32(seed ^ jnp.int32(_i32(KEY_SALT))) ^ k_pos.astype(jnp.int32))


def keep(rows: Array, cols: Array, rate: float) -> Array:
  """[bq, bk] bool: weights kept by dropout of ``rate``; ``rows`` from
  :func:`row_hash`, ``cols`` from :func:`col_hash`."""
  return kept(rows[:, None] ^ cols[None, :], rate)


def kept(x: Array, rate: float) -> Array:
  """Whether dropout of ``rate`` keeps the weights of ``x = row hash ^ col
  hash`` (int32, elementwise): one multiply, a shift and a compare."""
  half = jax.lax.shift_right_logical(x * jnp.int32(_i32(MIX)), jnp.int32(1))  # uint32 // 2
  return half < jnp.int32(keep_threshold(rate) // 2)


def hash_key(dropout: Dropout) -> tuple[Array, int]:
  """(int32 bits of the uint32 seed, global query head of the kernel's head
  0) of ``dropout``, whose heads must be consecutive."""
  heads = np.asarray(dropout.heads).reshape(-1)
  if not np.array_equal(heads, heads[0] + np.arange(heads.size)):
    raise ValueError(f"dropout heads {heads} must be consecutive")
  seed = jax.lax.bitcast_convert_type(jnp.asarray(dropout.seed).astype(jnp.uint32), jnp.int32)
  return seed, int(heads[0])


def visible(shape: tuple[int, int], *, diagonal: bool, q0=0, k0=0,
            q_seg: Array | None = None, k_seg: Array | None = None,
            k_valid: Array | None = None) -> Array | None:
  """[bq, bk] bool visibility of queries ``q0 + i`` against keys ``k0 + j``
  of one segment, or None when everything is visible.

  Args:
    shape: ``(bq, bk)``.
    diagonal: keys after their query are invisible (a causal diagonal tile).
    q0, k0: positions of the tile's first query and key within the segment.
    q_seg: [bq] segment ids of the queries (None: no segment ids).
    k_seg: [bk] segment ids of the keys.
    k_valid: [bk] nonzero for real keys (None: no padding).
  """
  vis = None

  def both(a, b):
    return b if a is None else a & b

  if diagonal:
    vis = (q0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
           >= k0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1))
  if k_valid is not None:
    vis = both(vis, jnp.broadcast_to(k_valid[None, :] != 0, shape))
  if q_seg is not None:
    vis = both(vis, q_seg[:, None] == k_seg[None, :])
  return vis


def id_range(seg: Array | None, valid: Array | None) -> tuple[Array, Array]:
  """(min, max) segment id over the tokens of a tile that are valid
  (``(BIG, -BIG)`` if none; ids 0 without segment ids)."""
  ids = jnp.zeros(valid.shape, jnp.int32) if seg is None else seg.astype(jnp.int32)
  if valid is not None:
    lo = jnp.min(jnp.where(valid != 0, ids, BIG))
    return lo, jnp.max(jnp.where(valid != 0, ids, -BIG))
  return jnp.min(ids), jnp.max(ids)


def uniform(lo: Array, hi: Array, full: Array, start, stop, q_lo: Array,
            q_hi: Array) -> Array:
  """Whether every tile in ``[start, stop)`` (of [n] per-tile id ranges
  ``lo, hi`` and all-valid flags ``full``) holds only valid tokens of the one
  id ``q_lo == q_hi`` of the other side: then no token mask can hide a weight
  and a kernel may skip the masks (a document well inside a segment)."""
  idx = jax.lax.broadcasted_iota(jnp.int32, lo.shape, 0)
  inside = (idx >= start) & (idx < stop)
  same = (full != 0) & (lo == q_lo) & (hi == q_lo)
  return (q_lo == q_hi) & (jnp.min(jnp.where(inside & ~same, 0, 1)) == 1)


def live(lo: Array, hi: Array, other_lo: Array, other_hi: Array) -> Array:
  """Tiles with id ranges ``[lo, hi]`` that can meet ids in ``[other_lo, other_hi]``."""
  return (lo <= other_hi) & (hi >= other_lo)


def span(alive: Array) -> tuple[Array, Array]:
  """``[lo, hi)``: the smallest tile range holding every live tile of the
  [n] bool vector ``alive`` (``lo >= hi`` when none is live)."""
  n = alive.shape[0]
  idx = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
  lo = jnp.min(jnp.where(alive, idx, n))
  hi = jnp.max(jnp.where(alive, idx + 1, 0))
  return lo, hi
