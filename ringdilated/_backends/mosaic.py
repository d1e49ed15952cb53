"""Mosaic GPU (Hopper) flash-attention kernels that read a dilated branch in place.

The same in-place scheme as :mod:`.pallas` (a branch of rate ``r`` is the
strided window ``[:, :, offset, h, :]`` of the free ``[B, L / r, r, H, D]``
view), written for Hopper's own instructions through Pallas' Mosaic GPU
backend: tensor-memory-accelerator (TMA) bulk copies of the strided tiles
into swizzled shared memory, ``wgmma`` matrix products (from shared
memory, or from registers for a program's own rows that every step reads:
the forward's Q in causal programs, ``dq``'s Q and dO), and warp
specialization: one *memory* warpgroup streams key/value (or query) tiles
through a ring of shared-memory slots guarded by barriers while two
*compute* warpgroups each own a query (or key) tile, FlashAttention-3
style (the forward also alternates the two on the tensor cores with a
schedule barrier).

Three kernels, as the Triton family:

* forward: grid (query heads, query-tile pairs, B); merges its block into
  the running ``(out, lse)`` (it reads the old tile, so no per-branch copy);
* ``dq``: the same grid; adds into ``dq`` with a TMA reduce-add, and
  writes ``delta = rowsum(dout * out)`` of its rows for ``dk, dv`` (instead
  of an XLA pass over ``dout`` and ``out``: on the H200 LongNet partition
  1M fwd+bwd 38.0 against 39.3 ms, mix 1M unchanged), or reads the
  ``delta`` an earlier branch formed for every row
  (:func:`forms_every_row`), so ``out`` can go after that branch;
* ``dk, dv``: grid (kv heads, key-tile pairs, B), streaming every query
  head of the group, so each key tile is written by one program; TMA
  reduce-add into ``dk, dv``.

Row statistics (``lse``, ``delta``) travel as ``[B, H, r, L / r]`` float32,
so a tile's rows are contiguous for the TMA; the launchers transpose them
from and to the ``[B, L, H]`` rows the ring keeps (``B L H`` floats, small
next to the attention).

Key padding and segment ids travel as token vectors beside the tiles (one
per offset of a branch read in place, one per kv head of a ring block); each
program reads the range of streamed tiles its ids can meet and, where all of
them hold its one document, runs a loop nest without token masks (chosen
once per program; the other programs read the token vectors and mask).
Dropout: each query row's hash (seed, head, position; as a row statistic)
and each key's hash travel likewise, and a weight costs one multiply
(:func:`.tile_masks.kept`). Ring blocks write fresh outputs. Shapes these
kernels don't take go to the Triton kernels (:class:`Mosaic`).

Each warpgroup's phases are named scopes (``fwd_begin``, ``fwd_step``,
``fwd_end``, likewise ``dq_*`` and ``dkv_*``, and ``memory_begin``; within
them the waits for a program's own rows, ``*_own``, and for a step's
streamed tiles, ``dq_wait`` and ``dkv_wait``, ``dq_delta`` and the final
stores, ``*_store``): ranges of Mosaic GPU's on-device profiler where
``benchmarks/profile_mosaic.py`` turns it on, nothing otherwise.

Shape legend: B batch, L local length, H query heads, K kv heads, G = H / K,
D head dim, r rate, M = L / r, T kept tokens per segment, bq / bk query /
key tile, S pipeline slots.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
from collections.abc import Callable, Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._merge import merge
from . import pallas
from . import tile_masks as tm
from .base import Capabilities, Dropout, Request, StridedBranch, Visibility
from .pallas import _like, _view  # pylint: disable=protected-access

Array = jax.Array

_F32 = jnp.float32
_LOG2E = math.log2(math.e)
_COMPUTE = 2  # compute warpgroups; the memory warpgroup is number 2


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
  """Tiles and pipeline depth of the Mosaic GPU kernels; every compute
  warpgroup owns 64 rows (a wgmma accumulator), the tiles below are those
  the memory warpgroup streams.

  Attributes:
    fwd_k: key tile of the forward.
    dq_k: key tile of ``dq``.
    dkv_q: query tile of ``dk, dv``.
    stages: shared-memory slots of the streamed tiles.
  """

  fwd_k: int = 128
  dq_k: int = 64
  dkv_q: int = 64
  stages: int = 2

  @property
  def multiple(self) -> int:
    """Kept tokens per segment must be a multiple of this."""
    return max(_COMPUTE * _BQ, self.fwd_k, self.dq_k, self.dkv_q)


_BQ = 64  # rows of a wgmma accumulator per warpgroup

# The tiles per head dim (the head dims the kernels take), chosen on an H200
# with ``benchmarks/mosaic_probe.py`` (dense causal 32K, fwd+bwd; the sweeps
# are in benchmarks/results/mosaic_tiles_h200.json).
TUNED: Mapping[int, MosaicTiles] = types.MappingProxyType(
    {64: MosaicTiles(fwd_k=128, dq_k=128, dkv_q=128), 128: MosaicTiles()})


def _modules():
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  return pl, plgpu


def _smem(shape, dtype):
  """A shared-memory tile of ``wgmma`` and the TMA, in 128-byte swizzled rows."""
  _, plgpu = _modules()
  columns = 128 // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, columns)),
                                              plgpu.SwizzleTransform(128)))


def _rows(x: Array, rate: int) -> Array:
  """[B, L, H] -> [B, H, r, M]: the rows of one head and offset contiguous."""
  b, length, h = x.shape
  return x.reshape(b, length // rate, rate, h).transpose(0, 3, 2, 1)


def _unrows(x: Array) -> Array:
  """Inverse of :func:`_rows`."""
  b, h, r, m = x.shape
  return x.transpose(0, 3, 2, 1).reshape(b, m * r, h)


@dataclasses.dataclass(frozen=True)
class _Launch:
  """What one kernel launch knows statically (hashable).

  Attributes:
    geo: the branch (or block: rate 1).
    bq: query rows of a compute warpgroup (forward, dq) or streamed (dk, dv).
    bk: key rows streamed (forward, dq) or of a compute warpgroup (dk, dv).
    stages: pipeline slots of the streamed tiles.
    dtype, d: of q, k, v.
    masks: token vectors (segment ids, key validity) travel with the tiles.
    fresh: the outputs are written, not merged or added into (new outputs,
      or an ``alone`` branch's: see :func:`_clear`).
    rate: dropout rate, 0 without dropout (then the row hashes ``rh`` and
      key hashes ``kh`` travel with the tiles).
    per_kv: the token vectors (and key hashes, spans) are one per kv head, as
      a ring block's ([X, K, T]), not one per offset ([B, r, M]).
  """

  geo: StridedBranch
  bq: int
  bk: int
  stages: int
  dtype: jnp.dtype
  d: int
  masks: bool = False
  fresh: bool = False
  rate: float = 0.0
  per_kv: bool = False

  def off(self, kv):
    return lax.rem(kv, jnp.int32(self.geo.rate)) if self.geo.offset is None else self.geo.offset

  def tok(self, kv):
    """Where the token vectors of kv head ``kv``'s programs are (axis 1)."""
    return kv if self.per_kv else self.off(kv)

  @property
  def reduction(self) -> str | None:
    """How a gradient tile reaches memory: added into it, or written."""
    return None if self.fresh else "add"

  @property
  def log2_scale(self) -> float:
    return self.geo.scale * _LOG2E

  @property
  def clears(self) -> bool:
    """Programs write 0 (-inf) to their rows' other offsets (:func:`_clear`)."""
    return self.geo.alone and self.geo.rate > 1


def _clear(c: _Launch, off, copies) -> None:
  """An ``alone`` branch writes every row of its heads: its result at its
  own offset ``off``, and at the view rows of a program's tile ``copies =
  [(smem tile of 0 or -inf, offset -> gmem tile)]`` at every other offset,
  so no output or gradient is zeroed before the kernels run (LongNet
  partition 1M on the H200: that pass took 3.7 ms; fwd+bwd 39.3 against
  42.3 ms, peak 28.5 against 32.2 GiB)."""
  if not c.clears:
    return
  pl, plgpu = _modules()
  for o in range(c.geo.rate):
    def copy(o=o):
      for src, dst in copies:
        plgpu.copy_smem_to_gmem(src, dst(o))
    if isinstance(off, int):
      if o != off:
        copy()
    else:
      pl.when(off != o)(copy)


def _clear_gradients(c: _Launch, z_s, off, tiles) -> None:
  """:func:`_clear` for the gradient kernels: the zero tile ``z_s`` (rows,
  D, which only launches that clear have) filled once, then stored to the
  other offsets of each ``tiles`` (offset -> gmem tile)."""
  _, plgpu = _modules()
  z_s[...] = _zeros(z_s.shape, plgpu.Layout.WGMMA).astype(c.dtype)
  plgpu.commit_smem()
  _clear(c, off, [(z_s, tile) for tile in tiles])


def _cdiv(a, b: int):
  return lax.div(a + (b - 1), jnp.int32(b))


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def _slot(c: _Launch, j, lo=None):
  """The pipeline slot of streamed step ``j`` of a stream starting at ``lo``
  (None: at 0)."""
  return lax.rem(j if lo is None else j - lo, jnp.int32(c.stages))


def _schedule(barrier) -> None:
  _, plgpu = _modules()
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


def _mmas(*products) -> tuple[Array, ...]:
  """``acc + a @ b`` (or ``a @ b`` where ``acc`` is None) of each product
  ``(acc, a, b, shape)``, issued together on the tensor cores and awaited
  once, float32."""
  pl, plgpu = _modules()

  def issue(refs):
    for ref, (_, a, b, _) in zip(refs, products):
      plgpu.wgmma(ref, a, b)
  accs = tuple(plgpu.ACC.init(_zeros(shape, plgpu.Layout.WGMMA) if acc is None else acc)
               for acc, _, _, shape in products)
  return pl.run_state(issue)(accs)


def _mma(acc: Array | None, a, b, shape) -> Array:
  """``acc + a @ b`` (or ``a @ b``, in a fresh accumulator with no zero
  fill) on the tensor cores, float32."""
  if acc is not None:
    return _mmas((acc, a, b, shape))[0]
  pl, plgpu = _modules()

  def product(ref):
    plgpu.wgmma(ref, a, b)
    return ref[...]
  return pl.run_scoped(product, plgpu.ACC(shape, _F32))


def _zeros(shape, layout) -> Array:
  _, plgpu = _modules()
  return plgpu.layout_cast(jnp.zeros(shape, _F32), layout)


def _load(ref, layout) -> Array:
  """All of ``ref`` in registers, laid out as ``layout`` (jax 0.10 asks for
  the index ``()``; 0.11 deprecates passing it, 0.12 takes none)."""
  _, plgpu = _modules()
  idx = inspect.signature(plgpu.load).parameters.get("idx")
  if idx is not None and idx.default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _vector(ref, axis: int) -> Array:
  """A per-token vector from shared memory, laid out along ``axis`` of a
  wgmma accumulator (0: one per row, 1: one per column)."""
  _, plgpu = _modules()
  return _load(ref, plgpu.Layout.WGMMA.reduce(1 - axis))


def _visible(shape, *, diagonal: bool, q0=None, k0=None, rows_are_queries: bool,
             tokens: tuple | None = None) -> Array | None:
  """[rows, cols] bool of the visible (query, key) pairs of a tile: causal
  (``diagonal``: query ``q0 + i`` sees key ``k0 + j <= q0 + i``) and, with
  ``tokens = (row ids, column ids, key validity)``, same segment id and a
  valid key. None when everything is visible."""
  _, plgpu = _modules()
  vis = None
  if diagonal:
    layout = plgpu.Layout.WGMMA
    r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout)
    c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=layout)
    vis = (r + q0 >= c + k0) if rows_are_queries else (c + q0 >= r + k0)
  if tokens is not None:
    row_ids, col_ids, valid = tokens
    same = (lax.broadcast_in_dim(row_ids, shape, [0])
            == lax.broadcast_in_dim(col_ids, shape, [1]))
    ok = lax.broadcast_in_dim(valid, shape, [1 if rows_are_queries else 0]) != 0
    vis = (same & ok) if vis is None else (vis & same & ok)
  return vis


def _hide(s: Array, vis: Array | None, fill: float) -> Array:
  return s if vis is None else jnp.where(vis, s, fill)


def _keep(shape, rows: Array, cols: Array, *, rows_are_queries: bool,
          rate: float) -> Array:
  """[rows, cols] bool: the weights dropout keeps, from the queries' row
  hashes ``rows`` and the keys' ``cols`` (:func:`.tile_masks.kept`)."""
  q_axis, k_axis = (0, 1) if rows_are_queries else (1, 0)
  return tm.kept(lax.broadcast_in_dim(rows, shape, [q_axis])
                 ^ lax.broadcast_in_dim(cols, shape, [k_axis]), rate)


def _own_hashes(scr, wg, c: _Launch) -> Array | None:
  """The dropout hashes of the warpgroup's query rows (one per row)."""
  if not c.rate:
    return None
  _, plgpu = _modules()
  plgpu.barrier_wait(scr["rh_bar"].at[wg])
  return _vector(scr["rh"].at[wg], 0)


def _span(span_ref, b, off, cta, causal_lo, causal_hi, masks: bool):
  """(lo, hi, pure, impure) of a program: the streamed tiles ``[lo, hi)``
  it runs (causal bounds within the live range of the token vectors), the
  tiles ``pure = (plo, phi)`` among them that need no token mask, and
  whether any tile does (a traced bool, or False without masks)."""
  if not masks:
    return causal_lo, causal_hi, (causal_lo, causal_hi), False
  lo = jnp.maximum(span_ref[b, off, cta, 0], causal_lo)
  hi = jnp.maximum(jnp.minimum(span_ref[b, off, cta, 1], causal_hi), lo)
  plo = _clip(span_ref[b, off, cta, 2], lo, hi)
  phi = _clip(span_ref[b, off, cta, 3], plo, hi)
  return lo, hi, (plo, phi), (plo > lo) | (phi < hi)


def _token_hide(x: Array, masked: bool, tokens, *, rows_are_queries: bool, fill: float
                ) -> Array:
  """``x`` [rows, cols] with the pairs of different segment ids or an invalid
  key set to ``fill`` in the loop nest of programs that need token masks
  (``masked``); ``tokens()`` reads (row ids, column ids, key validity)."""
  if not masked:
    return x
  return _hide(x, _visible(x.shape, diagonal=False, rows_are_queries=rows_are_queries,
                           tokens=tokens()), fill)


def _masked_tile(pure, j):
  """Whether streamed tile ``j`` of a program whose tiles ``pure = (plo,
  phi)`` need no token mask needs one."""
  return (j < pure[0]) | (j >= pure[1])


def _per_program(impure, pure, loops, carry):
  """``loops(carry, by_masks)``, the loop nest of a program, whose runs
  ``by_masks(run, lo, hi, carry)`` call ``run(lo, hi, masked, carry)`` over
  tiles ``[lo, hi)``. One branch per program (``impure``: a traced bool, or
  False without masks), none per tile (with one in the tile loop, never
  taken there, LongNet mix 1M fwd+bwd with 64K-token documents was 0.9%
  slower on the H200, session 5 log): a program whose tiles need no token
  mask runs each range whole without; the others cut it in three, with
  masks before and after their ``pure`` tiles and without inside (a
  document that starts or ends inside a tile needs masks in that tile
  only). Measured on the H200 against the whole-program form (interleaved
  A/B, session 28 log): dense causal 128K over documents of varied length
  39.79 -> 35.31 ms fwd+bwd, LongNet mix 1M over them 133.5 -> 130.1 ms;
  with 8K- and 64K-token documents, where no program needs a mask, 1.4%
  and 0.5% slower, about one round's spread. Cutting the ranges of every
  program, pure ones too, cost 2.2% with 8K-token documents (session 27)."""
  def whole(run, lo, hi, carry):
    return run(lo, hi, False, carry)

  def cut(run, lo, hi, carry):
    plo, phi = pure
    carry = run(lo, jnp.minimum(hi, plo), True, carry)
    carry = run(jnp.maximum(lo, plo), jnp.minimum(hi, phi), False, carry)
    return run(jnp.maximum(lo, phi), hi, True, carry)

  if impure is False:
    return loops(carry, whole)
  return lax.cond(impure, functools.partial(loops, by_masks=cut),
                  functools.partial(loops, by_masks=whole), carry)


def _heavy_first(i, per_segment: int, causal: bool):
  """The query-tile pair that program ``i`` of the grid runs: under a causal
  mask each segment's pairs run last-first (most key tiles first), so the
  light ones fill the last wave; segments keep their order, so the programs
  of one segment still run together and share its keys in L2."""
  if not causal:
    return i
  return i + (per_segment - 1) - 2 * lax.rem(i, jnp.int32(per_segment))


def _query_program(ins, c: _Launch) -> tuple:
  """Where a program of the query-tile grid (forward, dq) stands: batch,
  warpgroup, query head, kv head, offset, first view row of its pair of
  query tiles, of their segment, the pair's position in the segment, and
  the streamed key tiles ``[lo, n_kv)`` with those that need no token
  mask and whether any does (:func:`_span`)."""
  geo, bq, bk, t = c.geo, c.bq, c.bk, c.geo.kept
  b, wg = lax.axis_index("batch"), lax.axis_index("wg")
  hq = geo.heads[0] + lax.axis_index("heads")
  kv = lax.div(hq, jnp.int32(geo.group))
  off = c.off(kv)
  pair = _heavy_first(lax.axis_index("q_seq"), t // (_COMPUTE * bq), geo.causal)
  m_pair = pair * (_COMPUTE * bq)  # first row, view units
  seg = lax.div(m_pair, jnp.int32(t)) * t  # first row of the segment
  t_pair = m_pair - seg  # position of the pair within the segment
  lo, n_kv, pure, impure = _span(ins.get("span"), b, c.tok(kv), pair, 0,
                                 _cdiv(t_pair + _COMPUTE * bq, bk) if geo.causal else t // bk,
                                 c.masks)
  return b, wg, hq, kv, off, m_pair, seg, t_pair, lo, n_kv, pure, impure


def _wait_own_ids(scr, wg, impure, names: tuple[str, ...] = ("qid",)) -> None:
  """Waits for the copies of the warpgroup's own token vectors ``names``,
  which only programs that need token masks (``impure``) start."""
  pl, plgpu = _modules()

  @pl.when(impure)
  def _():
    for name in names:
      plgpu.barrier_wait(scr[f"{name}_bar"].at[wg])


def _query_tokens(scr, wg, slot) -> tuple[Array, Array, Array]:
  """(own query ids, streamed key ids, their validity) of a query-tile
  warpgroup (forward, dq) and the key tiles of ``slot``."""
  _, plgpu = _modules()
  plgpu.barrier_wait(scr["kid_bar"].at[slot])
  plgpu.barrier_wait(scr["kval_bar"].at[slot])
  return (_vector(scr["qid"].at[wg], 0), _vector(scr["kid"].at[slot], 1),
          _vector(scr["kval"].at[slot], 1))


def _key_tokens(scr, wg, slot) -> tuple[Array, Array, Array]:
  """(own key ids, streamed query ids, own key validity) of a key-tile
  warpgroup (dk, dv) and the query tiles of ``slot``."""
  _, plgpu = _modules()
  plgpu.barrier_wait(scr["qid_bar"].at[slot])
  return (_vector(scr["kid"].at[wg], 0), _vector(scr["qid"].at[slot], 1),
          _vector(scr["kval"].at[wg], 0))


def _loop(step, first=None, **kind):
  """A loop over steps ``[first + a, first + z)`` of ``step(n, carry,
  masked=..., **kind)``, as :func:`_per_program`'s ``by_masks`` runs one."""
  if first is None:
    return lambda a, z, masked, carry: lax.fori_loop(
        a, z, functools.partial(step, masked=masked, **kind), carry)
  return lambda a, z, masked, carry: lax.fori_loop(
      first + a, first + z, functools.partial(step, masked=masked, **kind), carry)


def _query_loops(step, lo, full, steps, causal: bool, carry, by_masks):
  """The key tiles of a query-tile warpgroup (forward, dq): ``[lo, full)``
  off the causal diagonal, then ``[full, steps)`` on it, each run through
  ``by_masks`` (:func:`_per_program`)."""
  carry = by_masks(_loop(step, diagonal=False), lo, full, carry)
  if causal:
    carry = by_masks(_loop(step, diagonal=True), full, steps, carry)
  return carry


def _own_steps(c: _Launch, t0, lo, n_kv):
  """(end, first diagonal) key tiles of the query tile at ``t0``: it runs
  ``[lo, full)`` unmasked, ``[full, end)`` on the causal diagonal and
  releases ``[end, n_kv)`` unread."""
  if not c.geo.causal:
    return n_kv, n_kv
  steps = jnp.maximum(jnp.minimum(_cdiv(t0 + c.bq, c.bk), n_kv), lo)
  return steps, _clip(lax.div(t0, jnp.int32(c.bk)), lo, steps)


# ----------------------------------------------------------------------------
# Forward: merges the branch into (out, lse).
# ----------------------------------------------------------------------------


def _forward_kernel(ins, accs, scr, *, c: _Launch):
  pl, plgpu = _modules()
  o_ref, l_ref = accs
  bq, bk = c.bq, c.bk
  geo = c.geo
  b, wg, hq, kv, off, m_pair, seg, t_pair, lo, n_kv, pure, impure = _query_program(ins, c)
  k_bar, v_bar, k_done, v_done, sched = (scr[x] for x in ("k_bar", "v_bar", "k_done", "v_done",
                                                            "sched"))

  slot_of = lambda j: _slot(c, j, lo)  # noqa: E731

  @pl.when(wg < _COMPUTE)
  def _compute():
    q_s, o_s, l_s = scr["q"].at[wg], scr["o"].at[wg], scr["l"].at[wg]
    t0, m0 = t_pair + wg * bq, m_pair + wg * bq
    rows = (b, pl.ds(m0, bq), off, hq)
    stats = (b, hq, off, pl.ds(m0, bq))
    plgpu.copy_gmem_to_smem(ins["q"].at[rows], q_s, scr["q_bar"].at[wg])
    if not c.fresh:  # the running (out, lse) arrive while the loop runs
      plgpu.copy_gmem_to_smem(o_ref.at[rows], o_s, scr["o_bar"].at[wg])
      plgpu.copy_gmem_to_smem(l_ref.at[stats], l_s, scr["l_bar"].at[wg])
    _own_rows(ins, scr, c, wg, b, c.tok(kv), m0, stats, impure)
    # (the own rows' copies start before the registers grow, in all three
    # kernels: their latency overlaps the wait for the memory warpgroup)
    with jax.named_scope("fwd_begin"):
      plgpu.set_max_registers(232, action="increase")
    wgmma = plgpu.Layout.WGMMA
    if c.clears:  # (o_s, l_s hold nothing else until the end)
      o_s[...] = _zeros((bq, c.d), wgmma).astype(c.dtype)
      l_s[...] = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, _F32), wgmma.reduce(1))
      plgpu.commit_smem()
      _clear(c, off, [(o_s, lambda o: o_ref.at[b, pl.ds(m0, bq), o, hq]),
                      (l_s, lambda o: l_ref.at[b, hq, o, pl.ds(m0, bq)])])
    with jax.named_scope("fwd_own"):
      plgpu.barrier_wait(scr["q_bar"].at[wg])
    # Q K^T takes Q from registers, loaded once, not from shared memory each
    # step (at the power cap, fewer bytes through shared memory is time: H200,
    # kept 2048 forward 4.93 -> 4.88 ms, dense causal 32K 7.52 -> 7.39 ms).
    # Causal programs only: in non-causal ones the outputs were wrong
    # (relative error 0.75; also with Q in the loop carry and with an opaque
    # loop bound, so not the loop's form; cause unknown, session 18 log), and
    # their forward gained 0-0.9% from it.
    q_a = _load(q_s, wgmma) if geo.causal else q_s
    steps, full = _own_steps(c, t0, lo, n_kv)
    q_hash = _own_hashes(scr, wg, c)

    @pl.when(steps > lo)
    def _():
      plgpu.barrier_wait(k_bar.at[0])

    pl.when(wg == 1)(functools.partial(_schedule, sched))

    _wait_own_ids(scr, wg, impure)

    def step(j, carry, diagonal: bool, masked: bool):
      acc, m_i, l_i = carry
      slot = slot_of(j)

      def qk(ref):
        plgpu.wgmma(ref, q_a, scr["k"].at[slot].transpose((1, 0)))
        _schedule(sched)
        return ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((bq, bk), _F32))
      plgpu.barrier_arrive(k_done.at[slot])
      vis = _visible(s.shape, diagonal=diagonal, q0=t0, k0=j * bk, rows_are_queries=True)
      # the running max m is of the unscaled logits; the scale (log2 units:
      # exp2 is exp of the scaled logits) rides in exp2's argument, one fma
      # instead of a multiply of every logit (forward 4.83 -> 4.77 ms)
      s = _token_hide(_hide(s, vis, -jnp.inf), masked,
                      functools.partial(_query_tokens, scr, wg, slot), rows_are_queries=True,
                      fill=-jnp.inf)
      m_new = jnp.maximum(m_i, s.max(axis=1))
      # with masks a row may have seen no key yet: its m_new is -inf
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2((m_i - m_use) * c.log2_scale)
      p = jnp.exp2(s * c.log2_scale - lax.broadcast_in_dim(m_use * c.log2_scale, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_i = l_i * alpha + p.sum(axis=1)
      if c.rate:  # (1 / (1 - rate) at the end)
        p = _hide(p, _keep(p.shape, q_hash, _streamed_key_hashes(scr, slot, 1),
                           rows_are_queries=True, rate=c.rate), 0.0)
      p16 = p.astype(c.dtype)
      acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
      plgpu.barrier_arrive(sched)  # softmax done
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_wait(sched)  # tensor cores free

      def pv(ref):
        plgpu.wgmma(ref, p16, scr["v"].at[slot])
        nxt = j + 1

        @pl.when(nxt < steps)
        def _():
          plgpu.barrier_wait(k_bar.at[slot_of(nxt)])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_done.at[slot])
      return acc, m_new, l_i

    def drain(j, _):  # tiles the other warpgroup needs and this one doesn't
      slot = slot_of(j)
      plgpu.barrier_arrive(k_done.at[slot])
      plgpu.barrier_arrive(v_done.at[slot])
      _schedule(sched)
      _schedule(sched)

    step = _scoped("fwd_step", step)
    carry = (_zeros((bq, c.d), wgmma),
             plgpu.layout_cast(jnp.full((bq,), -jnp.inf, _F32), wgmma.reduce(1)),
             plgpu.layout_cast(jnp.full((bq,), 0.0, _F32), wgmma.reduce(1)))
    carry = _per_program(impure, pure, functools.partial(
        _query_loops, step, lo, full, steps, geo.causal), carry)
    with jax.named_scope("fwd_end"):
      if geo.causal or c.masks:
        lax.fori_loop(steps, n_kv, drain, None)
      acc, m_i, l_i = carry
      pl.when(wg == 0)(functools.partial(_schedule, sched))

      # Without masks every query sees a key, so l_i > 0; with them a row
      # that saw none gets out 0, lse -inf (it keeps a running (out, lse)).
      seen = l_i > 0
      l_safe = jnp.where(seen, l_i, 1.0) if c.masks else l_i
      lse_b = (m_i * c.log2_scale + jnp.log2(l_safe)) / _LOG2E
      out_b = acc / lax.broadcast_in_dim(l_safe * (1.0 - c.rate), acc.shape, [0])
      if c.masks:
        lse_b = jnp.where(seen, lse_b, -jnp.inf)
      if not c.fresh:
        plgpu.barrier_wait(scr["o_bar"].at[wg])
        plgpu.barrier_wait(scr["l_bar"].at[wg])
        out_b, lse_b = merge(_load(o_s, wgmma).astype(_F32), _vector(l_s, 0),
                             out_b, lse_b, seen if c.masks else True)
      if c.clears:  # the TMA has read the tiles of _clear
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      o_s[...] = out_b.astype(c.dtype)
      l_s[...] = lse_b
      plgpu.commit_smem()
      with jax.named_scope("fwd_store"):
        plgpu.copy_smem_to_gmem(o_s, o_ref.at[rows])
        plgpu.copy_smem_to_gmem(l_s, l_ref.at[stats])
        plgpu.wait_smem_to_gmem(0)

  pl.when(wg == _COMPUTE)(functools.partial(
      _stream, ins, scr, c, lo, n_kv, pure, lambda j: (seg + j * bk, kv), ("k", "v"),
      ("k_done", "v_done"), bk, b, off, c.tok(kv)))


def _stream(ins, scr, c: _Launch, lo, hi, pure, source, names, dones, rows: int, b, off,
            tok):
  """The memory warpgroup: tiles ``j`` in ``[lo, hi)`` of the inputs
  ``names`` at offset ``off`` (first row and head of each from
  ``source(j)``; with masks also the token vectors ``kid``, ``kval`` of
  those rows, at ``tok``, for tiles outside ``pure``; with dropout their
  hashes ``kh``) into
  slot ``(j - lo) mod stages``, once the compute warpgroups released it
  (``dones``)."""
  pl, plgpu = _modules()
  with jax.named_scope("memory_begin"):
    plgpu.set_max_registers(40, action="decrease")

  @pl.loop(lo, hi)
  def _(j):
    slot = _slot(c, j, lo)

    @pl.when(j - lo >= c.stages)
    def _():
      for done in dones:
        plgpu.barrier_wait(scr[done].at[slot])

    first, head = source(j)
    for name in names:
      plgpu.copy_gmem_to_smem(ins[name].at[b, pl.ds(first, rows), off, head],
                              scr[name].at[slot], scr[f"{name}_bar"].at[slot])
    for name, vec in (("kid", "k_ids"), ("kval", "valid")) * c.masks:
      def copy(name=name, vec=vec):
        plgpu.copy_gmem_to_smem(ins[vec].at[b, tok, pl.ds(first, rows)], scr[name].at[slot],
                                scr[f"{name}_bar"].at[slot])
      pl.when(_masked_tile(pure, j))(copy)
    if c.rate:
      plgpu.copy_gmem_to_smem(ins["kh"].at[b, tok, pl.ds(first, rows)], scr["kh"].at[slot],
                              scr["kh_bar"].at[slot])


def _streamed_key_hashes(scr, slot, axis: int) -> Array:
  """The dropout hashes of the streamed keys of ``slot``, along ``axis``."""
  _, plgpu = _modules()
  plgpu.barrier_wait(scr["kh_bar"].at[slot])
  return _vector(scr["kh"].at[slot], axis)


def _own_rows(ins, scr, c: _Launch, wg, b, tok, m0, stats, impure) -> None:
  """Starts the copies of the token vectors of a query-tile warpgroup's own
  rows (at ``tok``: :meth:`_Launch.tok`): segment ids (programs that need
  token masks) and dropout row hashes."""
  pl, plgpu = _modules()
  pl.when(impure)(lambda: plgpu.copy_gmem_to_smem(
      ins["q_ids"].at[b, tok, pl.ds(m0, c.bq)], scr["qid"].at[wg], scr["qid_bar"].at[wg]))
  if c.rate:
    plgpu.copy_gmem_to_smem(ins["rh"].at[stats], scr["rh"].at[wg], scr["rh_bar"].at[wg])


def _compiler_params():
  """Of every launch (benchmarks/profile_mosaic.py wraps it to add Mosaic
  GPU's on-device profiler, whose ranges are the kernels' named scopes)."""
  _, plgpu = _modules()
  return plgpu.CompilerParams(approx_math=True)


def _scoped(name: str, fn: Callable) -> Callable:
  """``fn`` traced under the named scope ``name``: a range of the on-device
  profiler when it is on (see :func:`_compiler_params`), nothing otherwise."""
  def run(*args, **kwargs):
    with jax.named_scope(name):
      return fn(*args, **kwargs)
  return run


def _launcher():
  """jax's kernel launcher with ``input_output_aliases`` (private: ``pl.kernel``
  takes none, and in-place accumulators passed as Refs through
  ``pl.run_state`` are refused inside ``jax.shard_map(check_vma=True)`` by
  jax 0.11.2: "mpmd_map does not support Refs with varying manual axis
  types"; aliased arrays are not)."""
  from jax._src.pallas import mpmd  # pylint: disable=g-import-not-at-top
  return mpmd._mpmd_map  # pylint: disable=protected-access


@functools.lru_cache(maxsize=None)
def launcher_problem() -> str | None:
  """Why :func:`_launcher` can't be used with this jax, or None. Cached: pure."""
  try:
    params = inspect.signature(_launcher()).parameters
  except (ImportError, AttributeError) as e:
    return f"cannot import jax's Pallas kernel launcher ({e})"
  if "input_output_aliases" not in params:
    return "jax's Pallas kernel launcher takes no input_output_aliases"
  return None


def _launch(body, grid, names, scratch: dict, inputs: dict, accs: tuple, name: str):
  """Runs ``body(ins, accs, scratch)`` (dicts and a tuple of refs) over
  ``grid`` with two compute warpgroups and a memory one. ``accs`` are arrays
  updated in place (each aliased to its output), or ``jax.ShapeDtypeStruct``
  of fresh outputs (never aliased: XLA may fold equal fresh zeros into one
  buffer), which vary over mesh axes as ``q`` does inside ``jax.shard_map``."""
  pl, plgpu = _modules()
  keys = tuple(inputs)
  fresh = all(isinstance(a, jax.ShapeDtypeStruct) for a in accs)
  first_out = len(keys) + (0 if fresh else len(accs))  # refs: inputs, accs, outputs

  def entry(*refs):
    ins = dict(zip(keys, refs))
    pl.run_scoped(lambda scr: body(ins, refs[first_out:], scr), scratch,
                  collective_axes="wg")

  types_ = tuple(_like(inputs["q"], a.shape, a.dtype) for a in accs)
  mesh = plgpu.Mesh(grid=grid, grid_names=names, num_threads=_COMPUTE + 1, thread_name="wg")
  kernel = _launcher()(
      [(mesh, entry)], types_, name=name, compiler_params=_compiler_params(),
      input_output_aliases={} if fresh else {len(keys) + i: i for i in range(len(accs))})
  return kernel(*inputs.values(), *(() if fresh else accs))


# ----------------------------------------------------------------------------
# Token vectors: per-offset rows for the TMA, and each program's live range.
# ----------------------------------------------------------------------------


def _tokens(x: Array, rate: int) -> Array:
  """A token vector as [B, R, M] int32, one row per offset or kv head:
  [B, L] (shared by the kv heads) -> [B, r, M], one offset's tokens
  contiguous; [X, T, K] (a ring block's, one per kv head; r = 1) ->
  [X, K, T]."""
  if x.ndim == 2:  # [B, M, r]
    x = x.reshape(x.shape[0], x.shape[1] // rate, rate)
  return x.astype(jnp.int32).transpose(0, 2, 1)


def _per_kv(vis: Visibility | None, dropout: Dropout | None) -> bool:
  """Whether a launch's token vectors come one per kv head (a ring block's
  [X, T, K]: :attr:`_Launch.per_kv`)."""
  vectors = ((vis.kv_valid, vis.q_seg, vis.kv_seg) if vis is not None else ()) + (
      (dropout.q_pos,) if dropout is not None else ())
  return any(x is not None and x.ndim == 3 for x in vectors)


def _tile_ids(ids: Array, valid: Array, n: int, keys: bool):
  """Per tile of ``n`` tokens of [B, r, M] vectors: min and max id (over
  valid tokens if ``keys``) and whether all of them are valid."""
  b, r, m = ids.shape
  x = ids.reshape(b, r, m // n, n)
  if not keys:
    return x.min(-1), x.max(-1), jnp.ones(x.shape[:-1], bool)
  ok = valid.reshape(x.shape) != 0
  return (jnp.where(ok, x, tm.BIG).min(-1), jnp.where(ok, x, -tm.BIG).max(-1), ok.all(-1))


def _spans(q_ids: Array, k_ids: Array, valid: Array, t: int, own: int, tile: int,
           own_keys: bool) -> Array:
  """[B, R, M / own, 4] int32 (lo, hi, plo, phi): for each program owning
  ``own`` rows (keys if ``own_keys``, else queries), the streamed tiles of
  ``tile`` rows ``[lo, hi)`` (within its segment of ``t``) whose ids may
  meet its own, and the run ``[plo, phi)`` among them (empty, ``plo = phi
  = t / tile``, if none) of tiles that hold only valid keys of the
  program's one id (no token mask needed): the first such tile and those
  right after it. Ids [B, R, M] of the queries and the keys, key validity
  ``valid`` alike."""
  b, r, m = q_ids.shape
  own_ids, other_ids = (k_ids, q_ids) if own_keys else (q_ids, k_ids)
  o_lo, o_hi, o_full = _tile_ids(own_ids, valid, own, own_keys)
  s_lo, s_hi, s_full = _tile_ids(other_ids, valid, tile, not own_keys)
  seg = (b, r, m // t)
  o_lo, o_hi, o_full = (x.reshape(*seg, t // own, 1) for x in (o_lo, o_hi, o_full))
  s_lo, s_hi, s_full = (x.reshape(*seg, 1, t // tile) for x in (s_lo, s_hi, s_full))
  live = (s_lo <= o_hi) & (s_hi >= o_lo)
  idx = jnp.arange(t // tile, dtype=jnp.int32)
  hi = jnp.where(live, idx + 1, 0).max(-1)
  lo = jnp.minimum(jnp.where(live, idx, t // tile).min(-1), hi)
  inside = (idx >= lo[..., None]) & (idx < hi[..., None])
  pure = (s_lo == o_lo) & (s_hi == o_lo) & s_full & (o_lo == o_hi) & o_full & inside
  plo = jnp.where(pure, idx, t // tile).min(-1)
  phi = jnp.where((idx >= plo[..., None]) & ~pure, idx, t // tile).min(-1)
  return jnp.stack([lo, hi, plo, phi], -1).reshape(b, r, m // own, 4)


def _mask_inputs(vis: Visibility | None, rate: int, t: int, own: int, tile: int,
                 own_keys: bool) -> dict:
  """The token inputs of a launch (:func:`_tokens`): the queries' and keys'
  segment ids ``q_ids``, ``k_ids`` and key validity ``valid`` [B, R, M],
  and the programs' ``span``; none without masks."""
  if vis is None or not vis.has_arrays:
    return {}
  ref = vis.q_seg if vis.q_seg is not None else vis.kv_valid
  q_ids = _tokens(vis.q_seg if vis.q_seg is not None else jnp.zeros_like(ref, jnp.int32), rate)
  k_ids = q_ids if vis.kv_seg is None or vis.kv_seg is vis.q_seg else _tokens(vis.kv_seg, rate)
  valid = _tokens(vis.kv_valid if vis.kv_valid is not None else jnp.ones_like(ref, jnp.int32),
                  rate)
  return dict(q_ids=q_ids, k_ids=k_ids, valid=valid,
              span=_spans(q_ids, k_ids, valid, t, own, tile, own_keys))


def _bars(n: int, arrivals: int = 1):
  _, plgpu = _modules()
  return plgpu.Barrier(num_arrivals=arrivals, num_barriers=n)


def _token_scratch(c: _Launch, own: int, streamed: int, queries_own: bool) -> dict:
  """Shared memory and barriers of the int32 token vectors: the program's
  own rows (``own`` of them; query rows if ``queries_own``) and those
  streamed with each tile (``streamed``): segment ids and key validity
  with masks, dropout row and key hashes with dropout (the dk/dv
  kernel streams row hashes as a row statistic instead)."""
  _, plgpu = _modules()
  q_side = ("qid",) * c.masks + ("rh",) * bool(c.rate)
  k_side = ("kid", "kval") * c.masks + ("kh",) * bool(c.rate)
  mine, theirs = (q_side, k_side) if queries_own else (k_side, ("qid",) * c.masks)
  vec = lambda n, rows: plgpu.SMEM((n, rows), jnp.int32)  # noqa: E731
  scratch = {x: vec(_COMPUTE, own) for x in mine}
  scratch.update({f"{x}_bar": _bars(_COMPUTE) for x in mine})
  scratch.update({x: vec(c.stages, streamed) for x in theirs})
  scratch.update({f"{x}_bar": _bars(c.stages) for x in theirs})
  return scratch


def _dropout_inputs(dropout: Dropout | None, geo: StridedBranch, heads: int) -> dict:
  """The dropout inputs of a launch: ``rh`` [B, H, r, M] int32, the hash of
  each query head and row (:func:`.tile_masks.row_hash`; rows as ``lse``),
  and ``kh`` [B, R, M], the keys' (:func:`.tile_masks.col_hash`; as
  :func:`_tokens`); none without dropout."""
  if dropout is None:
    return {}
  seed, head0 = tm.hash_key(dropout)
  pos = _tokens(dropout.q_pos, geo.rate)
  # a ring block's positions are per kv head: each query head takes its own
  pos = pos[:, np.arange(heads) // geo.group, None] if dropout.q_pos.ndim == 3 else pos[:, None]
  # every head of q (rows as lse); the branch's heads start at head0
  hs = head0 - geo.heads[0] + jnp.arange(heads, dtype=jnp.int32)
  return dict(rh=tm.row_hash(seed, hs[None, :, None, None], pos),
              kh=tm.col_hash(seed, _tokens(dropout.k_pos, geo.rate)))


def forward(geo: StridedBranch, tiles: MosaicTiles, q: Array, k: Array, v: Array,
            out: Array | None = None, lse: Array | None = None,
            vis: Visibility | None = None, dropout: Dropout | None = None
            ) -> tuple[Array, Array]:
  """Merges the branch into ``(out, lse)`` in place, or returns its own.

  Args:
    geo: the branch.
    tiles: tiles and stages.
    q: shape [B, L, H, D].
    k, v: shape [B, L, K, D].
    out: shape [B, L, H, D], the running output, or None for new ones (a
      block's, or an ``alone`` branch's whose other heads are left unset).
    lse: shape [B, L, H] float32, running log-sum-exp (``-inf`` where
      nothing merged yet), or None.
    vis: key validity and segment ids, each [B, L] (or [X, T, K] for a
      ring block: one per kv head), or None.
    dropout: dropout with positions shaped like the token vectors, or None.
  """
  _, plgpu = _modules()
  b, length, h, d = q.shape
  r = geo.rate
  masks = _mask_inputs(vis, r, geo.kept, _COMPUTE * _BQ, tiles.fwd_k, own_keys=False)
  c = _Launch(geo, _BQ, tiles.fwd_k, tiles.stages, q.dtype, d, bool(masks),
              out is None or geo.alone, 0.0 if dropout is None else float(dropout.rate),
              _per_kv(vis, dropout))
  tile = lambda n, rows: _smem((n, rows, d), q.dtype)  # noqa: E731
  scratch = dict(q=tile(_COMPUTE, c.bq), o=tile(_COMPUTE, c.bq), k=tile(c.stages, c.bk),
                 v=tile(c.stages, c.bk), l=plgpu.SMEM((_COMPUTE, c.bq), _F32),
                 k_bar=_bars(c.stages), v_bar=_bars(c.stages), q_bar=_bars(_COMPUTE),
                 o_bar=_bars(_COMPUTE), l_bar=_bars(_COMPUTE),
                 k_done=_bars(c.stages, _COMPUTE), v_done=_bars(c.stages, _COMPUTE),
                 sched=plgpu.Barrier(num_arrivals=_COMPUTE),
                 **_token_scratch(c, c.bq, c.bk, queries_own=True))
  grid = (geo.heads[1] - geo.heads[0], length // r // (_COMPUTE * c.bq), b)
  if out is None:
    accs = (jax.ShapeDtypeStruct(_view(q, r).shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, r, length // r), _F32))
  else:
    accs = (_view(out, r), _rows(lse, r))
  o5, l4 = _launch(functools.partial(_forward_kernel, c=c), grid, ("heads", "q_seq", "batch"),
                   scratch, dict(q=_view(q, r), k=_view(k, r), v=_view(v, r), **masks,
                                 **_dropout_inputs(dropout, geo, h)),
                   accs, _name("fwd", c))
  return o5.reshape(q.shape), _unrows(l4)


def _name(kernel: str, c: _Launch) -> str:
  """The kernel's name in profiles: its branch and variant."""
  flags = "_m" * c.masks + "_p" * bool(c.rate) + "_f" * c.fresh
  return f"ringdilated_mgpu_{kernel}_r{c.geo.rate}_t{c.geo.kept}{flags}"


# ----------------------------------------------------------------------------
# Backward: dq (grid as the forward) and dk, dv (grid over key-tile pairs and
# kv heads, streaming every query head of the group); both add into their
# accumulators with a TMA reduce-add.
# ----------------------------------------------------------------------------


def _row_lse(ref, axis: int) -> Array:
  """The global log-sum-exp in log2 units along ``axis``. A row that sees
  no key (``-inf``) gets weights ``inf`` that a mask replaces by 0 (where,
  not multiply: no NaN): only programs that need token masks hold one."""
  return _vector(ref, axis) * _LOG2E


def _dq_kernel(ins, accs, scr, *, c: _Launch):
  pl, plgpu = _modules()
  forms_delta = "o" in ins  # else it reads delta's rows ("d")
  dq_ref, *delta_ref = accs
  bq, bk, geo = c.bq, c.bk, c.geo
  b, wg, hq, kv, off, m_pair, seg, t_pair, lo, n_kv, pure, impure = _query_program(ins, c)
  own = ("q", "do", "o" if forms_delta else "d", "l")

  slot_of = lambda j: _slot(c, j, lo)  # noqa: E731

  @pl.when(wg < _COMPUTE)
  def _compute():
    q_s, do_s, l_s, d_s = (scr[x].at[wg] for x in ("q", "do", "l", "d"))
    t0, m0 = t_pair + wg * bq, m_pair + wg * bq
    rows = (b, pl.ds(m0, bq), off, hq)
    stats = (b, hq, off, pl.ds(m0, bq))
    for name in own:
      idx = stats if name in ("l", "d") else rows
      plgpu.copy_gmem_to_smem(ins[name].at[idx], scr[name].at[wg], scr[f"{name}_bar"].at[wg])
    _own_rows(ins, scr, c, wg, b, c.tok(kv), m0, stats, impure)
    with jax.named_scope("dq_begin"):
      plgpu.set_max_registers(232, action="increase")
    if c.clears:
      _clear_gradients(c, scr["z"].at[wg], off, [lambda o: dq_ref.at[b, pl.ds(m0, bq), o, hq]])
    with jax.named_scope("dq_own"):
      for name in own:
        plgpu.barrier_wait(scr[f"{name}_bar"].at[wg])
    with jax.named_scope("dq_delta"):
      lse = _row_lse(l_s, 0)
      wgmma = plgpu.Layout.WGMMA
      # Q and dO from registers in the step's two products (dO is loaded for
      # delta anyway): backward -0.8% at kept 2048 and dense 32K (H200)
      do_a = _load(do_s, wgmma)
      if forms_delta:
        delta = (do_a.astype(_F32)
                 * _load(scr["o"].at[wg], wgmma).astype(_F32)).sum(axis=1)
        d_s[...] = delta  # for dk, dv
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(d_s, delta_ref[0].at[stats])
      else:
        delta = _vector(d_s, 0)
      q_a = _load(q_s, wgmma)
    q_hash = _own_hashes(scr, wg, c)
    steps, full = _own_steps(c, t0, lo, n_kv)

    _wait_own_ids(scr, wg, impure)

    def step(j, dq, diagonal: bool, masked: bool):
      slot = slot_of(j)
      k_s, v_s = scr["k"].at[slot], scr["v"].at[slot]
      with jax.named_scope("dq_wait"):
        plgpu.barrier_wait(scr["k_bar"].at[slot])
        plgpu.barrier_wait(scr["v_bar"].at[slot])
      s, dp = _mmas((None, q_a, k_s.transpose((1, 0)), (bq, bk)),
                    (None, do_a, v_s.transpose((1, 0)), (bq, bk)))
      plgpu.barrier_arrive(scr["v_done"].at[slot])
      vis = _visible(s.shape, diagonal=diagonal, q0=t0, k0=j * bk, rows_are_queries=True)
      p = _hide(jnp.exp2(s * c.log2_scale - lax.broadcast_in_dim(lse, s.shape, [0])),
                vis, 0.0)
      p = _token_hide(p, masked, functools.partial(_query_tokens, scr, wg, slot),
                      rows_are_queries=True, fill=0.0)
      if c.rate:
        dp = _hide(dp, _keep(dp.shape, q_hash, _streamed_key_hashes(scr, slot, 1),
                             rows_are_queries=True, rate=c.rate), 0.0) * (1.0 / (1.0 - c.rate))
      ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
      dq = _mma(dq, ds.astype(c.dtype), k_s, (bq, c.d))
      plgpu.barrier_arrive(scr["k_done"].at[slot])
      return dq

    def drain(j, _):
      slot = slot_of(j)
      plgpu.barrier_arrive(scr["k_done"].at[slot])
      plgpu.barrier_arrive(scr["v_done"].at[slot])

    step = _scoped("dq_step", step)
    dq = _per_program(impure, pure, functools.partial(
        _query_loops, step, lo, full, steps, geo.causal), _zeros((bq, c.d), plgpu.Layout.WGMMA))
    with jax.named_scope("dq_end"):
      if geo.causal or c.masks:
        lax.fori_loop(steps, n_kv, drain, None)
      q_s[...] = (dq * geo.scale).astype(c.dtype)
      plgpu.commit_smem()
      with jax.named_scope("dq_store"):
        plgpu.copy_smem_to_gmem(q_s, dq_ref.at[rows], reduction_op=c.reduction)
        plgpu.wait_smem_to_gmem(0)

  pl.when(wg == _COMPUTE)(functools.partial(
      _stream, ins, scr, c, lo, n_kv, pure, lambda j: (seg + j * bk, kv), ("k", "v"),
      ("k_done", "v_done"), bk, b, off, c.tok(kv)))


# The order in which a dk, dv step lets go of its streamed inputs.
_RELEASED = ("l", "rh", "do", "d", "q")


def _dkv_kernel(ins, accs, scr, *, c: _Launch):
  pl, plgpu = _modules()
  dk_ref, dv_ref = accs
  geo, bq, bk, g = c.geo, c.bq, c.bk, c.geo.group
  t = geo.kept
  b, wg = lax.axis_index("batch"), lax.axis_index("wg")
  kv = geo.heads[0] // g + lax.axis_index("heads")
  off, tok = c.off(kv), c.tok(kv)
  pair = lax.axis_index("k_seq")
  m_pair = pair * (_COMPUTE * bk)
  seg = lax.div(m_pair, jnp.int32(t)) * t
  t_pair = m_pair - seg
  # query tiles [q_lo, q_hi) of every head: from the pair's diagonal on
  q_lo, q_hi, pure, impure = _span(ins.get("span"), b, tok, pair,
                                   lax.div(t_pair, jnp.int32(bq)) if geo.causal else 0, t // bq,
                                   c.masks)
  n_q = q_hi - q_lo
  streamed = ("q", "do", "l", "d") + ("rh",) * bool(c.rate)  # rh: as a row statistic
  dones = tuple(f"{x}_done" for x in streamed)

  def tile_of(n):
    """The query tile of streamed step ``n`` (every head runs ``[q_lo, q_hi)``)."""
    return q_lo + lax.rem(n, jnp.maximum(n_q, 1))

  def source(n):
    """(first row, query head) of streamed step ``n``."""
    return seg + tile_of(n) * bq, kv * g + lax.div(n, jnp.maximum(n_q, 1))

  slot_of = functools.partial(_slot, c)

  @pl.when(wg < _COMPUTE)
  def _compute():
    k_s, v_s = scr["k"].at[wg], scr["v"].at[wg]
    s0, m0 = t_pair + wg * bk, m_pair + wg * bk
    rows = (b, pl.ds(m0, bk), off, kv)
    plgpu.copy_gmem_to_smem(ins["k"].at[rows], k_s, scr["k_bar"].at[wg])
    plgpu.copy_gmem_to_smem(ins["v"].at[rows], v_s, scr["v_bar"].at[wg])

    def own(*names):  # token vectors of the own keys (ids, validity: only where impure)
      for name, vec in names:
        plgpu.copy_gmem_to_smem(ins[vec].at[b, tok, pl.ds(m0, bk)], scr[name].at[wg],
                                scr[f"{name}_bar"].at[wg])
    pl.when(impure)(functools.partial(own, ("kid", "k_ids"), ("kval", "valid")))
    if c.rate:
      own(("kh", "kh"))
    with jax.named_scope("dkv_begin"):
      plgpu.set_max_registers(232, action="increase")
    if c.clears:
      _clear_gradients(c, scr["z"].at[wg], off, [lambda o: dk_ref.at[b, pl.ds(m0, bk), o, kv],
                                                 lambda o: dv_ref.at[b, pl.ds(m0, bk), o, kv]])
    with jax.named_scope("dkv_own"):
      plgpu.barrier_wait(scr["k_bar"].at[wg])
      plgpu.barrier_wait(scr["v_bar"].at[wg])
    k_hash = None
    if c.rate:
      plgpu.barrier_wait(scr["kh_bar"].at[wg])
      k_hash = _vector(scr["kh"].at[wg], 0)

    _wait_own_ids(scr, wg, impure, ("kid", "kval"))

    def step(n, carry, mode: str, masked: bool):
      slot = slot_of(n)
      with jax.named_scope("dkv_wait"):
        for name in streamed:
          plgpu.barrier_wait(scr[f"{name}_bar"].at[slot])
      if mode == "skip":  # wholly above the diagonal: nothing to add
        if masked:  # (unread: no copy outlives the program)
          plgpu.barrier_wait(scr["qid_bar"].at[slot])
        for done in dones:
          plgpu.barrier_arrive(scr[done].at[slot])
        return carry
      dk, dv = carry
      q_s, do_s = scr["q"].at[slot], scr["do"].at[slot]
      s = _mma(None, k_s, q_s.transpose((1, 0)), (bk, bq))
      q0 = tile_of(n) * bq
      vis = _visible(s.shape, diagonal=mode == "diagonal", q0=q0, k0=s0,
                     rows_are_queries=False)
      lse = _row_lse(scr["l"].at[slot], 1)
      plgpu.barrier_arrive(scr["l_done"].at[slot])
      p = _hide(jnp.exp2(s * c.log2_scale - lax.broadcast_in_dim(lse, s.shape, [1])),
                vis, 0.0)
      p = _token_hide(p, masked, functools.partial(_key_tokens, scr, wg, slot),
                      rows_are_queries=False, fill=0.0)
      p_drop = p
      if c.rate:
        keep = _keep(p.shape, _vector(scr["rh"].at[slot], 1), k_hash, rows_are_queries=False,
                     rate=c.rate)
        plgpu.barrier_arrive(scr["rh_done"].at[slot])
        p_drop = _hide(p, keep, 0.0) * (1.0 / (1.0 - c.rate))
      # dV and dP^T together; dK alone (pairing it with dV, so the products
      # of S^T and dP^T go together, was 2% slower on the H200)
      dv, dp = _mmas((dv, p_drop.astype(c.dtype), do_s, (bk, c.d)),
                     (None, v_s, do_s.transpose((1, 0)), (bk, bq)))
      plgpu.barrier_arrive(scr["do_done"].at[slot])
      if c.rate:
        dp = _hide(dp, keep, 0.0) * (1.0 / (1.0 - c.rate))
      delta = _vector(scr["d"].at[slot], 1)
      plgpu.barrier_arrive(scr["d_done"].at[slot])
      ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [1]))
      dk = _mma(dk, ds.astype(c.dtype), q_s, (bk, c.d))
      plgpu.barrier_arrive(scr["q_done"].at[slot])
      return dk, dv

    step = _scoped("dkv_step", step)

    def head(h, carry, by_masks):
      base = h * n_q - q_lo  # step of query tile i is base + i

      def run_(lo, hi, mode, carry):  # query tiles [lo, hi)
        return by_masks(_loop(step, base, mode=mode), lo, hi, carry)

      if not geo.causal:
        return run_(q_lo, q_hi, "full", carry)
      first = _clip(lax.div(s0, jnp.int32(bq)), q_lo, q_hi)  # first tile reaching the keys
      clear = _clip(_cdiv(s0 + bk, bq), q_lo, q_hi)  # first wholly below the diagonal
      carry = run_(q_lo, first, "skip", carry)
      carry = run_(first, clear, "diagonal", carry)
      return run_(clear, q_hi, "full", carry)

    zeros = _zeros((bk, c.d), plgpu.Layout.WGMMA)
    dk, dv = _per_program(impure, pure, lambda carry, by_masks: lax.fori_loop(
        0, g, functools.partial(head, by_masks=by_masks), carry), (zeros, zeros))
    with jax.named_scope("dkv_end"):
      k_s[...] = (dk * geo.scale).astype(c.dtype)
      v_s[...] = dv.astype(c.dtype)
      plgpu.commit_smem()
      with jax.named_scope("dkv_store"):
        plgpu.copy_smem_to_gmem(k_s, dk_ref.at[rows], reduction_op=c.reduction)
        plgpu.copy_smem_to_gmem(v_s, dv_ref.at[rows], reduction_op=c.reduction)
        plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE)
  def _memory():
    with jax.named_scope("memory_begin"):
      plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, g * n_q)
    def _(n):
      slot = slot_of(n)

      first, h = source(n)
      rows, stats = (b, pl.ds(first, bq), off, h), (b, h, off, pl.ds(first, bq))
      where = dict(zip(streamed, (rows, rows, stats, stats, stats)))
      # each input refills its slot as soon as both compute warpgroups let
      # go of it, in the order they do (the query tile last, after dK),
      # not all of them after the last (LongNet partition 1M on the H200:
      # 38.10 / 37.82 against 38.42 / 38.09 ms, two interleaved rounds)
      for name in sorted(streamed, key=_RELEASED.index):
        @pl.when(n >= c.stages)
        def _(name=name):
          plgpu.barrier_wait(scr[f"{name}_done"].at[slot])
        plgpu.copy_gmem_to_smem(ins[name].at[where[name]], scr[name].at[slot],
                                scr[f"{name}_bar"].at[slot])
      if c.masks:
        @pl.when(_masked_tile(pure, tile_of(n)))
        def _():
          plgpu.copy_gmem_to_smem(ins["q_ids"].at[b, tok, pl.ds(first, bq)],
                                  scr["qid"].at[slot], scr["qid_bar"].at[slot])


def forms_every_row(geo: StridedBranch, heads: int) -> bool:
  """Whether the ``dq`` kernel of ``geo`` (of ``heads`` query heads) forms
  ``delta`` for every row and head: then later branches read it instead of
  ``out``, which the caller can let go (the Triton path forms it once in
  XLA; holding ``out`` to the last branch cost rings up to one local
  tensor more per GPU, ``benchmarks/HOPPER_KERNELS.md``, session 23)."""
  return geo.rate == 1 and geo.heads == (0, heads)


def backward(geo: StridedBranch, tiles: MosaicTiles, q: Array, k: Array, v: Array,
             dout: Array, lse: Array, out: Array,
             grads: tuple[Array, Array, Array] | None = None, vis: Visibility | None = None,
             dropout: Dropout | None = None, delta: Array | None = None
             ) -> tuple[tuple[Array, Array, Array], Array | None]:
  """Adds the branch's gradients into ``grads = (dq, dk, dv)`` in place, or
  returns its own.

  Args:
    geo, tiles, vis, dropout: as in :func:`forward`.
    q, dout: shape [B, L, H, D].
    k, v: shape [B, L, K, D].
    lse: shape [B, L, H] float32, the global log-sum-exp.
    out: shape [B, L, H, D], the global output: the ``dq`` kernel forms
      ``delta = rowsum(dout * out)`` of its rows and hands it to ``dk, dv``
      (unless ``delta`` is given: then ``out`` is not read).
    grads: accumulators shaped like ``q, k, v``, or None for new ones (as
      ``out`` in :func:`forward`).
    delta: shape [B, L, H] float32, ``rowsum(dout * out)`` if known (the
      ``dq`` kernel then reads it instead of ``out``), or None.

  Returns:
    ``(dq, dk, dv)`` and ``delta`` [B, L, H] float32: the given one, the
    one formed if the branch keeps every row of every head
    (:func:`forms_every_row`), else None.
  """
  _, plgpu = _modules()
  b, length, h, d = q.shape
  r, g, s = geo.rate, geo.group, tiles.stages
  fresh, rate = grads is None or geo.alone, 0.0 if dropout is None else float(dropout.rate)
  inputs = dict(q=_view(q, r), k=_view(k, r), v=_view(v, r), do=_view(dout, r),
                l=_rows(lse, r), **_dropout_inputs(dropout, geo, h))
  new = grads is None
  if new:
    grads = tuple(jax.ShapeDtypeStruct(_view(x, r).shape, x.dtype) for x in (q, k, v))
  else:
    grads = tuple(_view(x, r) for x in grads)
  heads = geo.heads[1] - geo.heads[0]
  tile = lambda n, rows: _smem((n, rows, d), q.dtype)  # noqa: E731
  stat = lambda n, rows, dtype=_F32: plgpu.SMEM((n, rows), dtype)  # noqa: E731

  masks = _mask_inputs(vis, r, geo.kept, _COMPUTE * _BQ, tiles.dq_k, own_keys=False)
  c = _Launch(geo, _BQ, tiles.dq_k, s, q.dtype, d, bool(masks), fresh, rate,
              _per_kv(vis, dropout))
  q_tile, row_stat = tile(_COMPUTE, c.bq), stat(_COMPUTE, c.bq)
  if delta is None:  # the kernel forms delta of its rows from O, in "d"
    own, forming = dict(q=q_tile, do=q_tile, o=q_tile, l=row_stat), dict(d=row_stat)
    # rows as lse's; beside an aliased dq, an aliased buffer (the kernel writes its rows)
    d_buffer = (jax.ShapeDtypeStruct(inputs["l"].shape, _F32) if new
                else jnp.zeros_like(inputs["l"]))
    accs, ins = (grads[0], d_buffer), dict(inputs, o=_view(out.astype(q.dtype), r), **masks)
  else:  # it reads delta's rows
    d_rows = _rows(delta, r)
    own, forming = dict(q=q_tile, do=q_tile, l=row_stat, d=row_stat), {}
    accs, ins = (grads[0],), dict(inputs, d=d_rows, **masks)
  zeros = dict(z=tile(_COMPUTE, _BQ)) if c.clears else {}
  scratch = dict(own, **zeros, **forming, k=tile(s, c.bk), v=tile(s, c.bk),
                 k_bar=_bars(s), v_bar=_bars(s), k_done=_bars(s, _COMPUTE),
                 v_done=_bars(s, _COMPUTE), **{f"{x}_bar": _bars(_COMPUTE) for x in own},
                 **_token_scratch(c, c.bq, c.bk, queries_own=True))
  dq5, *formed = _launch(functools.partial(_dq_kernel, c=c),
                         (heads, length // r // (_COMPUTE * c.bq), b),
                         ("heads", "q_seq", "batch"), scratch, ins, accs, _name("dq", c))
  if formed:
    d_rows, delta = formed[0], (_unrows(formed[0]) if forms_every_row(geo, h) else None)

  masks = _mask_inputs(vis, r, geo.kept, _COMPUTE * _BQ, tiles.dkv_q, own_keys=True)
  c = _Launch(geo, tiles.dkv_q, _BQ, s, q.dtype, d, bool(masks), fresh, rate,
              _per_kv(vis, dropout))
  streamed = dict(q=tile(s, c.bq), do=tile(s, c.bq), l=stat(s, c.bq), d=stat(s, c.bq))
  if rate:
    streamed["rh"] = stat(s, c.bq, jnp.int32)
  scratch = dict(streamed, **zeros, k=tile(_COMPUTE, c.bk), v=tile(_COMPUTE, c.bk),
                 k_bar=_bars(_COMPUTE), v_bar=_bars(_COMPUTE),
                 **{f"{x}_bar": _bars(s) for x in streamed},
                 **{f"{x}_done": _bars(s, _COMPUTE) for x in streamed},
                 **_token_scratch(c, c.bk, c.bq, queries_own=False))
  dk5, dv5 = _launch(functools.partial(_dkv_kernel, c=c),
                     (heads // g, length // r // (_COMPUTE * c.bk), b), ("heads", "k_seq", "batch"),
                     scratch, dict(inputs, d=d_rows, **masks), grads[1:], _name("dkv", c))
  return (dq5.reshape(q.shape), dk5.reshape(k.shape), dv5.reshape(v.shape)), delta


# ----------------------------------------------------------------------------
# The backend: these kernels where they apply, the Triton kernels elsewhere.
# ----------------------------------------------------------------------------


_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _hopper_problem() -> str | None:
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if cc != "9.0":
    return f"compute capability {cc} (the Mosaic GPU kernels need Hopper, 9.0)"
  return None


@dataclasses.dataclass(frozen=True)
class Mosaic(pallas.Pallas):
  """Hopper kernels (Mosaic GPU) reading branches in place.

  Calls whose segments hold a multiple of 128 kept tokens, head dim 64 or
  128, in bf16 or f16, run the Mosaic GPU kernels (with key padding,
  segment ids and dropout, on branches read in place and on ring blocks),
  inside ``jax.shard_map`` with either ``check_vma``; every other call runs
  the Triton kernels of :class:`~.pallas.Pallas` (other shapes), so this
  backend takes everything that one does.

  Attributes:
    mosaic: tiles and pipeline depth of the Mosaic GPU kernels, or None for
      those tuned for the head dim (:data:`TUNED`).
  """

  name = "mosaic"
  capabilities = Capabilities(platforms=("gpu",), interpret=True, in_place=True,
                              masks=True, dropout=True, whole_heads=True)
  dtypes: ClassVar[tuple[jnp.dtype, ...]] = _DTYPES  # of q, k, v the kernels take
  mosaic: MosaicTiles | None = None

  def mosaic_tiles(self, head_dim: int) -> MosaicTiles:
    """The tiles of calls with this head dim (one of :data:`TUNED`)."""
    return self.mosaic or TUNED[head_dim]

  def problem(self, request: Request) -> str | None:
    why = super().problem(request)
    if why is None and request.platform == "gpu":
      why = _hopper_problem() or launcher_problem()
    return why

  def auto_problem(self, request: Request, runs: Callable[[str], bool]) -> str | None:
    if request.dense and not (request.masks or request.dropout) and runs("cudnn"):
      return ("plain dense attention: cuDNN's fused kernel is faster there (H200, 32K "
              "causal fwd+bwd: 28.4 ms against 30.2 ms; benchmarks/results/h200.json)")
    return None

  def _takes(self, kept: int, x: Array) -> bool:
    """Whether the Mosaic GPU kernels run this call."""
    return (not self.interpret and x.dtype in self.dtypes and x.shape[-1] in TUNED
            and kept % self.mosaic_tiles(x.shape[-1]).multiple == 0)

  def _block_forward(self, geo, q, k, v, vis, dropout):
    if not self._takes(geo.kept, q):
      return super()._block_forward(geo, q, k, v, vis, dropout)
    return forward(geo, self.mosaic_tiles(q.shape[-1]), q, k, v, vis=vis, dropout=dropout)

  def _block_backward(self, geo, q, k, v, vis, dropout, dout, lse, out):
    if not self._takes(geo.kept, q):
      return super()._block_backward(geo, q, k, v, vis, dropout, dout, lse, out)
    return backward(geo, self.mosaic_tiles(q.shape[-1]), q, k, v, dout, lse, out, vis=vis,
                    dropout=dropout)[0]

  def branch_forward(self, branch, q, k, v, vis, dropout, out, lse):
    if not self._takes(branch.kept, q):
      return super().branch_forward(branch, q, k, v, vis, dropout, out, lse)
    return forward(branch, self.mosaic_tiles(q.shape[-1]), q, k, v, out, lse, vis, dropout)

  def branch_backward(self, branch, q, k, v, vis, dropout, dout, lse, out, grads, delta=None):
    if not self._takes(branch.kept, q):
      return super().branch_backward(branch, q, k, v, vis, dropout, dout, lse, out, grads,
                                     delta)
    tiles = self.mosaic_tiles(q.shape[-1])
    return backward(branch, tiles, q, k, v, dout, lse, out, grads, vis, dropout, delta)
