"""Mosaic GPU (Hopper) flash-attention kernels that read a dilated branch in place.

The same in-place scheme as :mod:`.pallas` (a branch of rate ``r`` is the
strided window ``[:, :, offset, h, :]`` of the free ``[B, L / r, r, H, D]``
view), written for Hopper's own instructions through Pallas' Mosaic GPU
backend: tensor-memory-accelerator (TMA) bulk copies of the strided tiles
into swizzled shared memory, ``wgmma`` matrix products from shared memory,
and warp specialization: one *memory* warpgroup streams key/value (or
query) tiles through a ring of shared-memory slots guarded by barriers while
two *compute* warpgroups each own a query (or key) tile, FlashAttention-3
style (the forward also alternates the two on the tensor cores with a
schedule barrier).

Three kernels, as the Triton family:

* forward: grid (query heads, query-tile pairs, B); merges its block into
  the running ``(out, lse)`` (it reads the old tile, so no per-branch copy);
* ``dq``: the same grid; adds into ``dq`` with a TMA reduce-add;
* ``dk, dv``: grid (kv heads, key-tile pairs, B), streaming every query
  head of the group, so each key tile is written by one program; TMA
  reduce-add into ``dk, dv``.

Row statistics (``lse``, ``delta``) travel as ``[B, H, r, L / r]`` float32,
so a tile's rows are contiguous for the TMA; the launchers transpose them
from and to the ``[B, L, H]`` rows the ring keeps (``B L H`` floats, small
next to the attention).

Masks and dropout are not here: :class:`Mosaic` hands those calls (and any
shape these kernels don't take) to the Triton kernels, whose tile-level
helper (:mod:`.tile_masks`) stays the one place for them.

Shape legend: B batch, L local length, H query heads, K kv heads, G = H / K,
D head dim, r rate, M = L / r, T kept tokens per segment, bq / bk query /
key tile, S pipeline slots.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .._merge import row_delta
from . import pallas
from .base import Capabilities, Request, StridedBranch

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


def _modules():
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  return pl, plgpu


def _smem(shape, dtype):
  """A swizzled shared-memory tile operand of ``wgmma`` and the TMA."""
  _, plgpu = _modules()
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def _rows(x: Array, rate: int) -> Array:
  """[B, L, H] -> [B, H, r, M]: the rows of one head and offset contiguous."""
  b, length, h = x.shape
  return x.reshape(b, length // rate, rate, h).transpose(0, 3, 2, 1)


def _unrows(x: Array) -> Array:
  """Inverse of :func:`_rows`."""
  b, h, r, m = x.shape
  return x.transpose(0, 3, 2, 1).reshape(b, m * r, h)


def _view(x: Array, rate: int) -> Array:
  return x.reshape(x.shape[0], x.shape[1] // rate, rate, *x.shape[2:])


@dataclasses.dataclass(frozen=True)
class _Launch:
  """What one kernel launch knows statically (hashable)."""

  geo: StridedBranch
  bq: int  # query tile per compute warpgroup (fwd, dq) / streamed (dkv)
  bk: int  # key tile streamed (fwd, dq) / per compute warpgroup (dkv)
  stages: int
  dtype: jnp.dtype
  d: int

  def off(self, kv):
    return lax.rem(kv, jnp.int32(self.geo.rate)) if self.geo.offset is None else self.geo.offset

  @property
  def log2_scale(self) -> float:
    return self.geo.scale * _LOG2E


def _cdiv(a, b: int):
  return lax.div(a + (b - 1), jnp.int32(b))


def _schedule(barrier) -> None:
  _, plgpu = _modules()
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


def _mma(acc: Array | None, a, b, shape) -> Array:
  """``acc + a @ b`` (or ``a @ b``) on the tensor cores, float32."""
  pl, plgpu = _modules()
  if acc is None:
    def product(ref):
      plgpu.wgmma(ref, a, b)
      return ref[...]
    return pl.run_scoped(product, plgpu.ACC(shape, _F32))

  def add(ref):
    plgpu.wgmma(ref, a, b)
  return pl.run_state(add)(plgpu.ACC.init(acc))


def _zeros(shape, layout) -> Array:
  _, plgpu = _modules()
  return plgpu.layout_cast(jnp.zeros(shape, _F32), layout)


def _causal_mask(s: Array, q0, k0, rows_are_queries: bool) -> Array:
  """``s`` with ``-inf`` where key > query; rows are queries (or keys)."""
  _, plgpu = _modules()
  layout = plgpu.Layout.WGMMA
  r = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=layout)
  c = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=layout)
  seen = (r + q0 >= c + k0) if rows_are_queries else (c + q0 >= r + k0)
  return jnp.where(seen, s, -jnp.inf)


# ----------------------------------------------------------------------------
# Forward: merges the branch into (out, lse).
# ----------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, l_ref, scratch, *, c: _Launch):
  pl, plgpu = _modules()
  (q_s2, o_s2, k_s, v_s, l_s2), (k_bar, v_bar, q_bar, o_bar, l_bar), (k_done, v_done), sched = scratch
  geo, bq, bk, stages = c.geo, c.bq, c.bk, c.stages
  t = geo.kept
  b, wg = lax.axis_index("batch"), lax.axis_index("wg")
  hq = geo.heads[0] + lax.axis_index("heads")
  kv = lax.div(hq, jnp.int32(geo.group))
  off = c.off(kv)
  m_pair = lax.axis_index("q_seq") * (_COMPUTE * bq)  # first row, view units
  seg = lax.div(m_pair, jnp.int32(t)) * t  # first row of the segment
  t_pair = m_pair - seg  # position of the pair within the segment
  n_kv = _cdiv(t_pair + _COMPUTE * bq, bk) if geo.causal else t // bk

  @pl.when(wg < _COMPUTE)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    q_s, o_s, l_s = q_s2.at[wg], o_s2.at[wg], l_s2.at[wg]
    t0, m0 = t_pair + wg * bq, m_pair + wg * bq
    rows = (b, pl.ds(m0, bq), off, hq)
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_s, q_bar.at[wg])
    # The running (out, lse) arrive while the loop runs.
    plgpu.copy_gmem_to_smem(o_ref.at[rows], o_s, o_bar.at[wg])
    plgpu.copy_gmem_to_smem(l_ref.at[b, hq, off, pl.ds(m0, bq)], l_s, l_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])
    steps = _cdiv(t0 + bq, bk) if geo.causal else n_kv
    wgmma = plgpu.Layout.WGMMA
    m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, _F32), wgmma.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, _F32), wgmma.reduce(1))
    acc = _zeros((bq, c.d), wgmma)
    plgpu.barrier_wait(k_bar.at[0])
    pl.when(wg == 1)(functools.partial(_schedule, sched))

    def step(j, carry, masked: bool):
      acc, m_i, l_i = carry
      slot = lax.rem(j, jnp.int32(stages))

      def qk(ref):
        plgpu.wgmma(ref, q_s, plgpu.transpose_ref(k_s.at[slot], (1, 0)))
        _schedule(sched)
        return ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((bq, bk), _F32))
      plgpu.barrier_arrive(k_done.at[slot])
      if masked:
        s = _causal_mask(s, t0, j * bk, rows_are_queries=True)
      s = s * c.log2_scale  # log2 units: exp2 below is exp of the scaled logits
      m_new = jnp.maximum(m_i, s.max(axis=1))
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_i = l_i * alpha + p.sum(axis=1)
      p16 = p.astype(c.dtype)
      acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
      plgpu.barrier_arrive(sched)  # softmax done
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_wait(sched)  # tensor cores free

      def pv(ref):
        plgpu.wgmma(ref, p16, v_s.at[slot])
        nxt = j + 1

        @pl.when(nxt < steps)
        def _():
          plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_done.at[slot])
      return acc, m_new, l_i

    carry = (acc, m_i, l_i)
    if geo.causal:
      full = lax.div(t0, jnp.int32(bk))  # key tiles wholly below the diagonal
      carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
      carry = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)

      def drain(j, _):  # tiles the other warpgroup needs and this one doesn't
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_arrive(k_done.at[slot])
        plgpu.barrier_arrive(v_done.at[slot])
        _schedule(sched)
        _schedule(sched)

      lax.fori_loop(steps, n_kv, drain, None)
    else:
      carry = lax.fori_loop(0, n_kv, functools.partial(step, masked=False), carry)
    acc, m_i, l_i = carry
    pl.when(wg == 0)(functools.partial(_schedule, sched))

    # Merge into the running (out, lse); every query sees a key here, so
    # l_i > 0 and lse_b is finite.
    lse_b = (m_i + jnp.log2(l_i)) / _LOG2E
    out_b = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
    plgpu.barrier_wait(o_bar.at[wg])
    plgpu.barrier_wait(l_bar.at[wg])
    lse = plgpu.load(l_s, (), layout=wgmma.reduce(1))
    out = plgpu.load(o_s, (), layout=wgmma).astype(_F32)
    top = jnp.maximum(lse, lse_b)
    new = top + jnp.log(jnp.exp(lse - top) + jnp.exp(lse_b - top))
    weight = jnp.exp(lse_b - new)
    out = out + lax.broadcast_in_dim(weight, out.shape, [0]) * (out_b - out)
    o_s[...] = out.astype(c.dtype)
    l_s[...] = new
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_ref.at[rows])
    plgpu.copy_smem_to_gmem(l_s, l_ref.at[b, hq, off, pl.ds(m0, bq)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def load(j, slot):
      keys = (b, pl.ds(seg + j * bk, bk), off, kv)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_s.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_s.at[slot], v_bar.at[slot])

    for i in range(stages):
      pl.when(i < n_kv)(functools.partial(load, i, i))

    @pl.loop(0, jnp.maximum(n_kv - stages, 0))
    def _(j):
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_done.at[slot])
      plgpu.barrier_wait(v_done.at[slot])
      load(j + stages, slot)


def _launch(body, c: _Launch, grid, names, scratch, inputs, accs, name):
  """Runs ``body(*inputs, *accs, scratch)`` (refs) over ``grid`` with one
  memory and two compute warpgroups; ``accs`` are updated in place."""
  pl, plgpu = _modules()

  def stateful(refs):
    def entry(*args):
      n = len(inputs) + len(refs)
      pl.run_scoped(functools.partial(body, *args[:n]), scratch, collective_axes="wg")

    mesh = plgpu.Mesh(grid=grid, grid_names=names, num_threads=_COMPUTE + 1,
                      thread_name="wg")
    pl.kernel(entry, out_type=(), mesh=mesh, name=name,
              compiler_params=plgpu.CompilerParams(approx_math=True))(*inputs, *refs)

  del c
  return pl.run_state(stateful)(tuple(accs))


def forward(geo: StridedBranch, tiles: MosaicTiles, q: Array, k: Array, v: Array,
            out: Array, lse: Array) -> tuple[Array, Array]:
  """Merges the branch into ``(out, lse)`` in place.

  Args:
    geo: the branch.
    tiles: tiles and stages.
    q, out: shape [B, L, H, D].
    k, v: shape [B, L, K, D].
    lse: shape [B, L, H] float32, running log-sum-exp (``-inf`` where
      nothing merged yet).
  """
  _, plgpu = _modules()
  b, length, _, d = q.shape
  r = geo.rate
  c = _Launch(geo, _BQ, tiles.fwd_k, tiles.stages, q.dtype, d)
  scratch = ((_smem((_COMPUTE, c.bq, d), q.dtype), _smem((_COMPUTE, c.bq, d), q.dtype),
              _smem((c.stages, c.bk, d), q.dtype), _smem((c.stages, c.bk, d), q.dtype),
              plgpu.SMEM((_COMPUTE, c.bq), _F32)),
             (plgpu.Barrier(num_barriers=c.stages), plgpu.Barrier(num_barriers=c.stages),
              *(plgpu.Barrier(num_barriers=_COMPUTE),) * 3),
             (plgpu.Barrier(num_arrivals=_COMPUTE, num_barriers=c.stages),) * 2,
             plgpu.Barrier(num_arrivals=_COMPUTE))
  grid = (geo.heads[1] - geo.heads[0], length // r // (_COMPUTE * c.bq), b)
  o5, l4 = _launch(functools.partial(_forward_kernel, c=c), c, grid,
                   ("heads", "q_seq", "batch"), scratch,
                   (_view(q, r), _view(k, r), _view(v, r)),
                   (_view(out, r), _rows(lse, r)), f"ringdilated_mgpu_fwd_r{r}_t{geo.kept}")
  return o5.reshape(out.shape), _unrows(l4)


# ----------------------------------------------------------------------------
# Backward: dq (grid as the forward) and dk, dv (grid over key-tile pairs and
# kv heads); both add into their accumulators with a TMA reduce-add.
# ----------------------------------------------------------------------------


def _row_load(ref, axis: int) -> Array:
  """A float32 row statistic from shared memory, laid out along ``axis`` of
  a wgmma accumulator (0: one per row, 1: one per column)."""
  _, plgpu = _modules()
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - axis))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, l_ref, d_ref, dq_ref, scratch, *, c: _Launch):
  pl, plgpu = _modules()
  (q_s2, do_s2, k_s, v_s, l_s2, d_s2), bars, (k_done, v_done) = scratch
  q_bar, do_bar, l_bar, d_bar, k_bar, v_bar = bars
  geo, bq, bk, stages = c.geo, c.bq, c.bk, c.stages
  t = geo.kept
  b, wg = lax.axis_index("batch"), lax.axis_index("wg")
  hq = geo.heads[0] + lax.axis_index("heads")
  kv = lax.div(hq, jnp.int32(geo.group))
  off = c.off(kv)
  m_pair = lax.axis_index("q_seq") * (_COMPUTE * bq)
  seg = lax.div(m_pair, jnp.int32(t)) * t
  t_pair = m_pair - seg
  n_kv = _cdiv(t_pair + _COMPUTE * bq, bk) if geo.causal else t // bk

  @pl.when(wg < _COMPUTE)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    q_s, do_s, l_s, d_s = q_s2.at[wg], do_s2.at[wg], l_s2.at[wg], d_s2.at[wg]
    t0, m0 = t_pair + wg * bq, m_pair + wg * bq
    rows = (b, pl.ds(m0, bq), off, hq)
    stats = (b, hq, off, pl.ds(m0, bq))
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_s, q_bar.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[rows], do_s, do_bar.at[wg])
    plgpu.copy_gmem_to_smem(l_ref.at[stats], l_s, l_bar.at[wg])
    plgpu.copy_gmem_to_smem(d_ref.at[stats], d_s, d_bar.at[wg])
    for bar in (q_bar, do_bar, l_bar, d_bar):
      plgpu.barrier_wait(bar.at[wg])
    lse = _row_load(l_s, 0) * _LOG2E
    delta = _row_load(d_s, 0)
    steps = _cdiv(t0 + bq, bk) if geo.causal else n_kv

    def step(j, dq, masked: bool):
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_bar.at[slot])
      s = _mma(None, q_s, plgpu.transpose_ref(k_s.at[slot], (1, 0)), (bq, bk))
      if masked:
        s = _causal_mask(s, t0, j * bk, rows_are_queries=True)
      p = jnp.exp2(s * c.log2_scale - lax.broadcast_in_dim(lse, s.shape, [0]))
      plgpu.barrier_wait(v_bar.at[slot])
      dp = _mma(None, do_s, plgpu.transpose_ref(v_s.at[slot], (1, 0)), (bq, bk))
      plgpu.barrier_arrive(v_done.at[slot])
      ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
      dq = _mma(dq, ds.astype(c.dtype), k_s.at[slot], (bq, c.d))
      plgpu.barrier_arrive(k_done.at[slot])
      return dq

    dq = _zeros((bq, c.d), plgpu.Layout.WGMMA)
    if geo.causal:
      full = lax.div(t0, jnp.int32(bk))
      dq = lax.fori_loop(0, full, functools.partial(step, masked=False), dq)
      dq = lax.fori_loop(full, steps, functools.partial(step, masked=True), dq)

      def drain(j, _):
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_arrive(k_done.at[slot])
        plgpu.barrier_arrive(v_done.at[slot])

      lax.fori_loop(steps, n_kv, drain, None)
    else:
      dq = lax.fori_loop(0, n_kv, functools.partial(step, masked=False), dq)
    q_s[...] = (dq * geo.scale).astype(c.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_s, dq_ref.at[rows], reduction_op="add")
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, n_kv)
    def _(j):
      slot = lax.rem(j, jnp.int32(stages))

      @pl.when(j >= stages)
      def _():
        plgpu.barrier_wait(k_done.at[slot])
        plgpu.barrier_wait(v_done.at[slot])

      keys = (b, pl.ds(seg + j * bk, bk), off, kv)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_s.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_s.at[slot], v_bar.at[slot])


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, l_ref, d_ref, dk_ref, dv_ref, scratch, *,
                c: _Launch):
  pl, plgpu = _modules()
  (k_s2, v_s2, q_s, do_s, l_s, d_s), (k_bar, v_bar), bars, dones = scratch
  geo, bq, bk, stages, g = c.geo, c.bq, c.bk, c.stages, c.geo.group
  t = geo.kept
  b, wg = lax.axis_index("batch"), lax.axis_index("wg")
  kv = geo.heads[0] // g + lax.axis_index("heads")
  off = c.off(kv)
  m_pair = lax.axis_index("k_seq") * (_COMPUTE * bk)
  seg = lax.div(m_pair, jnp.int32(t)) * t
  t_pair = m_pair - seg
  q_start = lax.div(t_pair, jnp.int32(bq)) if geo.causal else 0  # first query tile
  n_q = t // bq - q_start  # query tiles per head
  total = g * n_q

  def source(n):
    """(query head, first row) of streamed step ``n``."""
    return kv * g + lax.div(n, n_q), seg + (q_start + lax.rem(n, n_q)) * bq

  @pl.when(wg < _COMPUTE)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    k_s, v_s = k_s2.at[wg], v_s2.at[wg]
    s0, m0 = t_pair + wg * bk, m_pair + wg * bk
    rows = (b, pl.ds(m0, bk), off, kv)
    plgpu.copy_gmem_to_smem(k_ref.at[rows], k_s, k_bar.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], v_s, v_bar.at[wg])
    plgpu.barrier_wait(k_bar.at[wg])
    plgpu.barrier_wait(v_bar.at[wg])

    def step(n, carry, mode: str):
      slot = lax.rem(n, jnp.int32(stages))
      for bar in bars:
        plgpu.barrier_wait(bar.at[slot])
      if mode == "skip":  # wholly above the diagonal: nothing to add
        for done in dones:
          plgpu.barrier_arrive(done.at[slot])
        return carry
      q_done, do_done, l_done, d_done = dones
      dk, dv = carry
      s = _mma(None, k_s, plgpu.transpose_ref(q_s.at[slot], (1, 0)), (bk, bq))
      if mode == "masked":
        q0 = (q_start + lax.rem(n, n_q)) * bq
        s = _causal_mask(s, q0, s0, rows_are_queries=False)
      lse = _row_load(l_s.at[slot], 1) * _LOG2E
      plgpu.barrier_arrive(l_done.at[slot])
      p = jnp.exp2(s * c.log2_scale - lax.broadcast_in_dim(lse, s.shape, [1]))
      dv = _mma(dv, p.astype(c.dtype), do_s.at[slot], (bk, c.d))
      dp = _mma(None, v_s, plgpu.transpose_ref(do_s.at[slot], (1, 0)), (bk, bq))
      plgpu.barrier_arrive(do_done.at[slot])
      delta = _row_load(d_s.at[slot], 1)
      plgpu.barrier_arrive(d_done.at[slot])
      ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [1]))
      dk = _mma(dk, ds.astype(c.dtype), q_s.at[slot], (bk, c.d))
      plgpu.barrier_arrive(q_done.at[slot])
      return dk, dv

    def head(h, carry):
      base = h * n_q - q_start  # step of query tile i is base + i
      run = lambda lo, hi, mode, carry: lax.fori_loop(  # noqa: E731
          base + lo, base + hi, functools.partial(step, mode=mode), carry)
      if not geo.causal:
        return run(0, n_q, "full", carry)
      first = lax.div(s0, jnp.int32(bq))  # first query tile reaching the keys
      clear = _cdiv(s0 + bk, bq)  # first one wholly below the diagonal
      carry = run(q_start, first, "skip", carry)
      carry = run(first, clear, "masked", carry)
      return run(clear, q_start + n_q, "full", carry)

    zeros = _zeros((bk, c.d), plgpu.Layout.WGMMA)
    dk, dv = lax.fori_loop(0, g, head, (zeros, zeros))
    k_s[...] = (dk * geo.scale).astype(c.dtype)
    v_s[...] = dv.astype(c.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_s, dk_ref.at[rows], reduction_op="add")
    plgpu.copy_smem_to_gmem(v_s, dv_ref.at[rows], reduction_op="add")
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, total)
    def _(n):
      slot = lax.rem(n, jnp.int32(stages))

      @pl.when(n >= stages)
      def _():
        for done in dones:
          plgpu.barrier_wait(done.at[slot])

      h, m = source(n)
      rows, stats = (b, pl.ds(m, bq), off, h), (b, h, off, pl.ds(m, bq))
      for ref, buf, bar, idx in zip((q_ref, do_ref, l_ref, d_ref), (q_s, do_s, l_s, d_s),
                                    bars, (rows, rows, stats, stats)):
        plgpu.copy_gmem_to_smem(ref.at[idx], buf.at[slot], bar.at[slot])


def backward(geo: StridedBranch, tiles: MosaicTiles, q: Array, k: Array, v: Array,
             dout: Array, lse: Array, delta: Array,
             grads: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
  """Adds the branch's gradients into ``grads = (dq, dk, dv)`` in place.

  Args:
    geo, tiles: as in :func:`forward`.
    q, dout: shape [B, L, H, D].
    k, v: shape [B, L, K, D].
    lse: shape [B, L, H] float32, the global log-sum-exp.
    delta: shape [B, L, H] float32, ``rowsum(dout * out)`` of the global out.
    grads: accumulators shaped like ``q, k, v``.
  """
  _, plgpu = _modules()
  b, length, _, d = q.shape
  r, g, s = geo.rate, geo.group, tiles.stages
  dq, dk, dv = grads
  views = tuple(_view(x, r) for x in (q, k, v, dout))
  stats = (_rows(lse, r), _rows(delta, r))
  inputs = (*views[:3], views[3], *stats)
  heads = geo.heads[1] - geo.heads[0]
  tile = lambda n, rows: _smem((n, rows, d), q.dtype)  # noqa: E731
  bar = lambda n, arrivals=1: plgpu.Barrier(num_arrivals=arrivals, num_barriers=n)  # noqa: E731

  c = _Launch(geo, _BQ, tiles.dq_k, s, q.dtype, d)
  scratch = ((tile(_COMPUTE, c.bq), tile(_COMPUTE, c.bq), tile(s, c.bk), tile(s, c.bk),
              plgpu.SMEM((_COMPUTE, c.bq), _F32), plgpu.SMEM((_COMPUTE, c.bq), _F32)),
             (bar(_COMPUTE),) * 4 + (bar(s),) * 2, (bar(s, _COMPUTE),) * 2)
  (dq5,) = _launch(functools.partial(_dq_kernel, c=c), c,
                   (heads, length // r // (_COMPUTE * c.bq), b), ("heads", "q_seq", "batch"),
                   scratch, inputs, (_view(dq, r),), f"ringdilated_mgpu_dq_r{r}_t{geo.kept}")

  c = _Launch(geo, tiles.dkv_q, _BQ, s, q.dtype, d)
  scratch = ((tile(_COMPUTE, c.bk), tile(_COMPUTE, c.bk), tile(s, c.bq), tile(s, c.bq),
              plgpu.SMEM((s, c.bq), _F32), plgpu.SMEM((s, c.bq), _F32)),
             (bar(_COMPUTE),) * 2, (bar(s),) * 4, (bar(s, _COMPUTE),) * 4)
  dk5, dv5 = _launch(functools.partial(_dkv_kernel, c=c), c,
                     (heads // g, length // r // (_COMPUTE * c.bk), b),
                     ("heads", "k_seq", "batch"), scratch, inputs,
                     (_view(dk, r), _view(dv, r)), f"ringdilated_mgpu_dkv_r{r}_t{geo.kept}")
  return dq5.reshape(dq.shape), dk5.reshape(dk.shape), dv5.reshape(dv.shape)


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

  Unmasked calls without dropout whose segments hold a multiple of 128 kept
  tokens, head dim 64 or 128, in bf16 or f16, run the Mosaic GPU kernels;
  every other call runs the Triton kernels of :class:`~.pallas.Pallas`
  (masks, dropout, other shapes), so this backend takes everything that one
  does.

  Attributes:
    mosaic: tiles and pipeline depth of the Mosaic GPU kernels.
  """

  name = "mosaic"
  capabilities = Capabilities(platforms=("gpu",), interpret=True, in_place=True,
                              masks=True, dropout=True)
  mosaic: MosaicTiles = MosaicTiles()

  def problem(self, request: Request) -> str | None:
    why = super().problem(request)
    if why is None and request.platform == "gpu":
      why = _hopper_problem()
    return why

  def _takes(self, kept: int, x: Array, vis, dropout) -> bool:
    """Whether the Mosaic GPU kernels run this call."""
    return (not self.interpret and not vis.has_arrays and dropout is None
            and x.dtype in _DTYPES and x.shape[-1] in (64, 128) and kept % self.mosaic.multiple == 0)

  def forward(self, q, k, v, vis, *, scale, dropout=None):
    x, t, kh, g, d = q.shape
    if not self._takes(t, q, vis, dropout):
      return super().forward(q, k, v, vis, scale=scale, dropout=dropout)
    q4 = q.reshape(x, t, kh * g, d)
    out, lse = forward(pallas.block_geometry(q, vis, scale), self.mosaic, q4, k, v,
                       jnp.zeros_like(q4), jnp.full(q4.shape[:3], -jnp.inf, _F32))
    return out.reshape(q.shape), lse.reshape(x, t, kh, g)

  def backward(self, q, k, v, vis, dout, out, lse, *, scale, dropout=None):
    x, t, kh, g, d = q.shape
    if not self._takes(t, q, vis, dropout):
      return super().backward(q, k, v, vis, dout, out, lse, scale=scale, dropout=dropout)
    heads = lambda a: a.reshape(x, t, kh * g, *a.shape[4:]).astype(q.dtype)  # noqa: E731
    rows = lambda a: a.reshape(x, t, kh * g)  # noqa: E731
    q4 = heads(q)
    grads = (jnp.zeros_like(q4), jnp.zeros_like(k), jnp.zeros_like(v))
    dq, dk, dv = backward(pallas.block_geometry(q, vis, scale), self.mosaic, q4, k, v,
                          heads(dout), rows(lse), rows(row_delta(dout, out)), grads)
    return dq.reshape(q.shape), dk, dv

  def branch_forward(self, branch, q, k, v, vis, dropout, out, lse):
    if not self._takes(branch.kept, q, vis, dropout):
      return super().branch_forward(branch, q, k, v, vis, dropout, out, lse)
    return forward(branch, self.mosaic, q, k, v, out, lse)

  def branch_backward(self, branch, q, k, v, vis, dropout, dout, lse, delta, grads):
    if not self._takes(branch.kept, q, vis, dropout):
      return super().branch_backward(branch, q, k, v, vis, dropout, dout, lse, delta, grads)
    return backward(branch, self.mosaic, q, k, v, dout, lse, delta, grads)
