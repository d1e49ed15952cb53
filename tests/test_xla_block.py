"""The portable XLA block, tiled: exact against a dense block, bounded memory.

The block (``ringdilated._backends.xla``) runs an online softmax over
(query tile, key tile) pairs forward and recomputes each pair backward from
the global log-sum-exp. Here it is compared, forward and backward, with a
dense float64 numpy block written from the definition (dropout through the
whole-block ``keep_mask``), with tile sizes that divide the block, that
don't, and that exceed it; then through ``rd.dilated_attention`` (one
device and a zigzag ring) against the dense reference; then its compiled
temporary memory is shown to grow linearly in the block length, where the
untiled block (tiles as long as the block) grows quadratically.

Shape legend: X batch-like, T query tokens, S key tokens, K kv heads,
G query heads per kv head, D head dim.
"""

from __future__ import annotations

import doctest
import functools
from typing import NamedTuple

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import ringdilated as rd
from ringdilated._backends import Dropout, Visibility, xla
from ringdilated._backends.base import keep_mask
from ringdilated.reference import dilated_attention_reference

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # max abs error vs float64


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


class Case(NamedTuple):
  t: int
  s: int
  tiles: tuple[int, int]       # (query_tile, key_tile)
  kg: tuple[int, int] = (2, 2)  # (K, G)
  valid: bool = False          # key padding
  seg: bool = False            # segment ids (one query's id no key has)
  diagonal: bool = False
  rate: float = 0.0            # dropout
  dtype: type = jnp.float32


CASES = {
    "tiles_divide": Case(32, 32, (8, 8)),
    "ragged": Case(20, 37, (8, 16), kg=(1, 4), valid=True),
    "ragged_unmasked": Case(13, 22, (8, 8), kg=(2, 1)),
    "shorter_than_tile": Case(6, 6, (8, 8), valid=True, seg=True),
    "segments": Case(24, 24, (8, 8), kg=(2, 1), valid=True, seg=True),
    "causal": Case(30, 30, (8, 8), valid=True, seg=True, diagonal=True),
    "causal_uneven_tiles": Case(32, 32, (16, 4), kg=(1, 1), diagonal=True),
    "dropout": Case(21, 21, (8, 8), valid=True, seg=True, rate=0.3),
    "causal_dropout": Case(32, 32, (8, 16), diagonal=True, rate=0.5),
    "bf16": Case(24, 40, (8, 16), valid=True, diagonal=False, dtype=jnp.bfloat16),
}


def _case_inputs(c: Case, seed: int = 0):
  """q, k, v, dout, Visibility, Dropout (or None) of a block."""
  rng = np.random.default_rng(seed)
  x, (kh, g), d = 2, c.kg, 8
  q = jnp.asarray(rng.standard_normal((x, c.t, kh, g, d)), c.dtype)
  k, v = (jnp.asarray(rng.standard_normal((x, c.s, kh, d)), c.dtype) for _ in "kv")
  dout = jnp.asarray(rng.standard_normal((x, c.t, kh, g, d)), c.dtype)
  valid = q_seg = kv_seg = None
  if c.valid:
    valid = jnp.asarray(rng.random((x, c.s, kh)) > 0.3)
  if c.seg:
    q_seg = np.sort(rng.integers(0, 3, (x, c.t, kh)), axis=1)
    kv_seg = np.sort(rng.integers(0, 3, (x, c.s, kh)), axis=1)
    q_seg[0, 1, 0] = 7  # a query that sees no key
    q_seg, kv_seg = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
  drop = None
  if c.rate:
    offset = 5 * c.t  # global positions: anything, as long as shared by q and k
    pos_q = jnp.broadcast_to(offset + jnp.arange(c.t)[None, :, None], (x, c.t, kh))
    pos_k = pos_q if c.diagonal else jnp.broadcast_to(
        jnp.arange(c.s)[None, :, None] * 3, (x, c.s, kh))
    drop = Dropout(c.rate, jnp.uint32(1234), np.arange(kh * g).reshape(kh, g), pos_q,
                   pos_k)
  return q, k, v, dout, Visibility(valid, q_seg, kv_seg, c.diagonal), drop


def _dense(q, k, v, dout, vis: Visibility, drop: Dropout | None, scale: float):
  """(out, lse, dq, dk, dv) of the block in float64 numpy, untiled, from the
  definition: masked softmax, dropout by the whole block's ``keep_mask``,
  gradients of ``sum(out * dout)``."""
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
  q, k, v, dout = map(f64, (q, k, v, dout))
  x, t, kh, g, _ = q.shape
  s_len = k.shape[1]
  mask = np.ones((x, kh, 1, t, s_len), bool)
  if vis.kv_valid is not None:
    mask &= np.moveaxis(np.asarray(vis.kv_valid), 1, 2)[:, :, None, None, :]
  if vis.q_seg is not None:
    qs, ks = (np.moveaxis(np.asarray(a), 1, 2) for a in (vis.q_seg, vis.kv_seg))
    mask &= (qs[..., :, None] == ks[..., None, :])[:, :, None]
  if vis.diagonal:
    mask &= np.tril(np.ones((t, s_len), bool))
  s = np.einsum("XTKGD,XSKD->XKGTS", q, k) * scale
  s = np.where(mask, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(s - m)
  l = e.sum(-1, keepdims=True)
  p = e / np.where(l > 0, l, 1.0)
  lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l > 0, l, 1.0))[..., 0], -np.inf)
  keep, rate = np.ones(p.shape, bool), 0.0
  if drop is not None:
    keep, rate = np.asarray(keep_mask(drop)), drop.rate
  pd = np.where(keep, p / (1 - rate), 0.0)
  out = np.einsum("XKGTS,XSKD->XTKGD", pd, v)
  dv = np.einsum("XKGTS,XTKGD->XSKD", pd, dout)
  dp = np.where(keep, np.einsum("XTKGD,XSKD->XKGTS", dout, v) / (1 - rate), 0.0)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True))
  dq = np.einsum("XKGTS,XSKD->XTKGD", ds, k) * scale
  dk = np.einsum("XKGTS,XTKGD->XSKD", ds, q) * scale
  return out, np.moveaxis(lse, 3, 1), dq, dk, dv


def _block(q, k, v, dout, vis, drop, *, tiles, scale):
  """(out, lse, dq, dk, dv) of the tiled block, backward fed its own out/lse."""
  rate, drop = (None, None) if drop is None else (drop.rate, drop[1:])
  return _block_jit(q, k, v, dout, vis[:3], drop, diagonal=vis.diagonal, rate=rate,
                    tiles=tiles, scale=scale)


@functools.partial(jax.jit, static_argnames=("diagonal", "rate", "tiles", "scale"))
def _block_jit(q, k, v, dout, masks, drop, *, diagonal, rate, tiles, scale):
  vis = Visibility(*masks, diagonal)
  drop = None if drop is None else Dropout(rate, *drop)
  backend = xla.XLA(query_tile=tiles[0], key_tile=tiles[1])
  out, lse = backend.forward(q, k, v, vis, scale=scale, dropout=drop)
  grads = backend.backward(q, k, v, vis, dout, out, lse, scale=scale, dropout=drop)
  return (out, lse, *grads)


@pytest.mark.parametrize("name", CASES)
def test_block_matches_dense_float64(name):
  c = CASES[name]
  q, k, v, dout, vis, drop = _case_inputs(c)
  scale = 0.4
  got = _block(q, k, v, dout, vis, drop, tiles=c.tiles, scale=scale)
  want = _dense(q, k, v, dout, vis, drop, scale)
  for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    assert a.dtype == jnp.float32, what
    a = np.asarray(a, np.float64)
    assert a.shape == b.shape, what
    assert np.array_equal(np.isneginf(a), np.isneginf(b)), what
    assert np.all(np.isfinite(a) | np.isneginf(b)), what
    a, b = (np.where(np.isneginf(b), 0.0, y) for y in (a, b))
    err = np.max(np.abs(a - b))
    assert err <= TOL[c.dtype] * max(1.0, np.max(np.abs(b))), (what, err)
  if c.seg:  # the query that sees no key: out 0, lse -inf, zero gradient
    out, lse, dq = (np.asarray(x) for x in got[:3])
    assert np.all(out[0, 1, 0] == 0) and np.all(np.isneginf(lse[0, 1, 0]))
    assert np.all(dq[0, 1, 0] == 0)


def test_dropout_keeps_the_same_weights_whatever_the_tiles():
  """Dropout bits come from global positions only: tiles of 4, 8 or the
  whole block drop the same weights (outputs agree to rounding), and a
  different seed does not."""
  c = CASES["causal_dropout"]
  q, k, v, dout, vis, drop = _case_inputs(c)
  runs = [_block(q, k, v, dout, vis, drop, tiles=t, scale=0.4)
          for t in ((4, 4), (8, 16), (32, 32))]
  for run in runs[1:]:
    for a, b in zip(run, runs[0]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  other = _block(q, k, v, dout, vis, drop._replace(seed=jnp.uint32(99)), tiles=(4, 4),
                 scale=0.4)
  assert np.max(np.abs(np.asarray(other[0]) - np.asarray(runs[0][0]))) > 0.1


def test_causal_block_skips_tiles_above_the_diagonal():
  grid = xla._grid(32, 32, 8, 8, True)
  assert len(grid.pairs[0]) == 4 * 5 // 2
  assert all(j <= i for i, j in zip(*grid.pairs))
  assert len(xla._grid(32, 32, 8, 8, False).pairs[0]) == 16
  # Uneven lengths get equal tiles, padded by less than one token per tile.
  assert xla._grid(37, 37, 16, 16, False)[:4] == (13, 13, 39, 39)
  assert xla._grid(6, 6, 8, 8, True).pairs == ((0,), (0,))


def test_module_example_runs():
  result = doctest.testmod(xla, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize("tile", [0, -1, 2.5, True])
def test_bad_tile_raises(tile):
  with pytest.raises(ValueError, match=r"key_tile=.* must be a positive int"):
    xla.XLA(key_tile=tile)


# ----------------------------------------------------------------------------
# Through the library: small tiles, so every block is many tiles.
# ----------------------------------------------------------------------------

SMALL = xla.XLA(query_tile=3, key_tile=2)  # padded query tiles, uneven pairs
KW = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 2), causal=True)


def _attend(backend, axis_name=None, layout="contiguous"):
  def f(q, k, v, kpm, seg):
    return rd.dilated_attention(q, k, v, key_padding_mask=kpm, segment_ids=seg,
                                backend=backend, axis_name=axis_name, layout=layout, **KW)
  return f


def _reference(q, k, v, kpm, seg):
  return dilated_attention_reference(q, k, v, key_padding_mask=kpm, segment_ids=seg, **KW)


def test_small_tiles_match_reference_single_device():
  args = harness.inputs(2, 32, 4, 2, 8, seed=3)
  got = harness.out_and_grads(_attend(SMALL), *args)
  want = harness.out_and_grads(_reference, *args)
  errs = harness.max_errs(got, want)
  assert max(errs) <= 2e-5, errs


def test_small_tiles_on_a_zigzag_ring_match_reference():
  """Tiled blocks under shard_map: local blocks, the ring's own chunk and its
  zigzag half-blocks at ring steps (inside the ring's scan and conds)."""
  p = 2
  args = harness.inputs(1, 32, 4, 2, 8, seed=4)
  ring = jax.shard_map(_attend(SMALL, "sp", "zigzag"), mesh=harness.mesh(p),
                       in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))

  def f(*xs):
    return rd.from_layout(ring(*(rd.to_layout(x, "zigzag", p) for x in xs)), "zigzag", p)

  got = harness.out_and_grads(f, *args)
  want = harness.out_and_grads(_reference, *args)
  errs = harness.max_errs(got, want)
  assert max(errs) <= 2e-5, errs


# ----------------------------------------------------------------------------
# Memory: compiled temporaries of one block's forward + backward.
# ----------------------------------------------------------------------------


def _temp_bytes(s: int, tile: int) -> int:
  """Compiled temp bytes of forward + backward of one non-causal [S, S] block."""
  q = jax.ShapeDtypeStruct((1, s, 1, 2, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, s, 1, 16), jnp.float32)
  vis = Visibility(None, None, None, False)

  def f(q, k, v, dout):
    out, lse = xla.forward(q, k, v, vis, scale=0.25, query_tile=tile, key_tile=tile)
    return xla.backward(q, k, v, vis, dout, out, lse, scale=0.25, query_tile=tile,
                        key_tile=tile)

  mem = jax.jit(f).lower(q, kv, kv, q).compile().memory_analysis()
  return mem.temp_size_in_bytes


def test_temp_memory_is_linear_in_block_length():
  sizes = (2048, 4096, 8192)
  temp = [_temp_bytes(s, 512) for s in sizes]
  for small, big in zip(temp, temp[1:]):
    assert big / small < 2.2, temp
  # Far below one [S, S] float32 score matrix.
  assert temp[-1] < sizes[-1] ** 2 * 4 / 8, temp


def test_negative_control_untiled_block_is_quadratic():
  """Tiles as long as the block (the old untiled block) quadruple per doubling."""
  temp = [_temp_bytes(s, s) for s in (2048, 4096)]
  assert temp[1] / temp[0] > 3.5, temp
