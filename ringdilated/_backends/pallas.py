"""Pallas (Triton) flash-attention kernels that read a dilated branch in place.

A branch of rate ``r`` keeps, for kv head ``k``, the positions ``p`` with
``p mod r == offset(k)``. Viewing ``[B, L, H, D]`` as ``[B, L / r, r, H, D]``
(a free reshape) puts those positions at ``[:, :, offset(k), h, :]``: a
strided window that a kernel's ``BlockSpec`` addresses directly. So the
kernels here read ``q, k, v`` and write ``out, lse, dq, dk, dv`` of the whole
sequence without the compacted copies of the generic path, and without
per-branch outputs: the forward merges its block into the running
``(out, lse)`` and the backward adds into ``(dq, dk, dv)``, all in place
(``input_output_aliases``). Peak memory is then ``q, k, v, out, dout`` plus
the gradients and two ``[B, L, H]`` float32 rows (``lse`` and
``rowsum(dout * out)``), whatever the number of branches.

The same kernels with ``r = 1`` are the block backend of the generic path
(ring steps, branches the fused path does not take).

Three kernels, flash-attention 2 style: the forward (grid over query tiles
and query heads, loop over key tiles), ``dq`` (the same grid) and ``dk, dv``
(grid over key tiles and kv heads, loop over query heads and query tiles), so
every output tile is written by exactly one program: no atomics.

Shape legend: B batch, L local sequence length, H query heads, K kv heads,
G = H / K, D head dim, M = L / r kept positions per offset, T kept tokens
per segment, r rate.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from .._merge import row_delta
from .base import Backend, Capabilities, Request, StridedBranch, Visibility

Array = jax.Array

_F32 = jnp.float32
_NEG = -1e30  # masked logits: finite, so a fully masked tile never makes NaN
_MIN_TILE = 16  # Triton's dot needs tiles of at least 16
_LOG2E = math.log2(math.e)  # the kernels use exp2: exp(x) = exp2(x log2 e)


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes (query, key) and Triton warps/stages of one kernel."""

  q: int
  k: int
  num_warps: int = 8
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class KernelTiles:
  """The tiles of the three kernels; ``benchmarks/tune_pallas.py`` sweeps them."""

  fwd: Tiles = Tiles(128, 64)
  dq: Tiles = Tiles(64, 64, 4)
  dkv: Tiles = Tiles(64, 64, 4)


def tile(length: int, want: int) -> int | None:
  """Largest power of 2 ``<= want`` dividing ``length``, or None below 16."""
  t = want
  while t >= _MIN_TILE:
    if length % t == 0:
      return t
    t //= 2
  return None


def tile_problem(kept: int) -> str | None:
  """Why a segment of ``kept`` tokens has no tile the kernels can use."""
  if tile(kept, 128) is None:
    return f"{kept} kept tokens per segment (the Pallas kernels need a multiple of 16)"
  return None


def _pl():
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  return pl


def _tiles_for(kernel: str, geo: StridedBranch, run: Pallas):
  """(query tile, key tile, compiler params) of ``kernel`` for ``geo``."""
  want = getattr(run.tiles, kernel)
  bq, bk = tile(geo.kept, want.q), tile(geo.kept, want.k)
  if run.interpret:
    return bq, bk, None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  return bq, bk, plgpu.CompilerParams(num_warps=want.num_warps,
                                      num_stages=want.num_stages)


def _view(x: Array, rate: int) -> Array:
  """[B, L, ...] -> [B, L / r, r, ...]: position p at [:, p // r, p % r]."""
  return x.reshape(x.shape[0], x.shape[1] // rate, rate, *x.shape[2:])


def _like(x: Array) -> jax.ShapeDtypeStruct:
  """The type of the accumulator ``x``, which an output aliases, including
  the mesh axes it varies over inside ``shard_map``."""
  mat = getattr(jax.typeof(x), "mat", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, manual_axis_type=mat)


def _in_place(kernel, name: str, interpret: bool, params, grid, in_specs, acc_specs,
              inputs: list[Array], accs: list[Array]) -> list[Array]:
  """Runs ``kernel(*input_refs, *acc_refs_in, *acc_refs_out)`` over ``grid``;
  the outputs are the accumulators ``accs``, updated in place (aliased)."""
  n = len(inputs)
  return _pl().pallas_call(
      kernel, grid=grid, in_specs=[*in_specs, *acc_specs], out_specs=list(acc_specs),
      out_shape=[_like(a) for a in accs],
      input_output_aliases={n + i: i for i in range(len(accs))},
      compiler_params=params, interpret=interpret, name=name,
  )(*inputs, *accs)


def _dot_t(a: Array, b: Array) -> Array:
  """``a @ b.T`` in float32: [m, d] x [n, d] -> [m, n]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dot(a: Array, b: Array) -> Array:
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _tdot(a: Array, b: Array) -> Array:
  """``a.T @ b`` in float32: [m, n] x [m, d] -> [n, d]."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _logits(q: Array, k: Array, geo: StridedBranch, q0, k0, masked: bool) -> Array:
  """[nq, nk] float32 logits in log2 units (``exp2`` of them is ``exp`` of the
  scaled logits) of queries ``q0 + i`` against keys ``k0 + j`` of a segment;
  ``masked``: keys after their query get ``_NEG`` (a tile on the causal
  diagonal)."""
  s = _dot_t(q, k) * (geo.scale * _LOG2E)
  if masked:
    shape = s.shape
    seen = (q0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
            >= k0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1))
    s = jnp.where(seen, s, _NEG)
  return s


def _tiles(body, carry, *, causal: bool, start, stop, diagonal):
  """Runs ``body(j, carry, masked)`` for tiles ``j`` in ``[start, stop)``.

  With ``causal``, tiles in ``diagonal = (lo, hi)`` straddle the causal
  diagonal and run masked; ``[start, stop)`` holds only visible tiles.
  """
  run = lambda a, b, c, masked: jax.lax.fori_loop(  # noqa: E731
      a, b, functools.partial(body, masked=masked), c)
  if not causal:
    return run(start, stop, carry, False)
  lo, hi = diagonal
  carry = run(start, lo, carry, False)
  carry = run(lo, hi, carry, True)
  return run(hi, stop, carry, False)


def _key_tiles(body, carry, geo: StridedBranch, t0, bq: int, bk: int):
  """Runs ``body(j, carry, masked)`` over the key tiles that the query tile
  at ``t0`` (within its segment) sees: all, or with ``causal`` those up to
  the diagonal."""
  hi = (t0 + bq + bk - 1) // bk  # key tiles up to the diagonal
  return _tiles(body, carry, causal=geo.causal, start=0,
                stop=hi if geo.causal else geo.kept // bk, diagonal=(t0 // bk, hi))


# ----------------------------------------------------------------------------
# Forward: grid (B, M / bq, heads); merges into the running (out, lse).
# ----------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, o_in, l_in, o_ref, l_ref, *,
                    geo: StridedBranch, bq: int, bk: int):
  pl = _pl()
  t0 = (pl.program_id(1) % (geo.kept // bq)) * bq  # query tile, within segment
  q = q_ref[...]

  def body(j, carry, masked):  # logits and m in log2 units
    acc, m, l = carry
    k = k_ref[pl.ds(j * bk, bk), :]
    s = _logits(q, k, geo, t0, j * bk, masked)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_new[:, None])
    corr = jnp.exp2(m - m_new)
    v = v_ref[pl.ds(j * bk, bk), :]
    acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l * corr + jnp.sum(p, axis=1)

  d = q.shape[-1]
  carry = (jnp.zeros((bq, d), _F32), jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32))
  acc, m, l = _key_tiles(body, carry, geo, t0, bq, bk)
  lse_b = (m + jnp.log2(l)) / _LOG2E  # every query sees itself: finite
  out_b = acc / l[:, None]
  lse = l_in[...]
  top = jnp.maximum(lse, lse_b)
  new = top + jnp.log(jnp.exp(lse - top) + jnp.exp(lse_b - top))
  weight = jnp.exp(lse_b - new)
  out = o_in[...].astype(_F32)
  o_ref[...] = (out + weight[:, None] * (out_b - out)).astype(o_ref.dtype)
  l_ref[...] = new


def _query_grid(geo: StridedBranch, shape, bq: int):
  """Grid (B, M / bq, query heads) and the BlockSpecs of the query-tile
  kernels: a query (or out, dout, dq) tile, its segment's K/V window, and
  the matching [bq] tile of a per-token row (lse, delta)."""
  pl = _pl()
  b, length, _, d = shape
  t, g, h0 = geo.kept, geo.group, geo.heads[0]

  def q_map(bi, i, hq):
    h = h0 + hq
    return bi, i, geo.off(h // g), h, 0

  def kv_map(bi, i, hq):
    kv = (h0 + hq) // g
    return bi, i // (t // bq), geo.off(kv), kv, 0

  return ((b, length // geo.rate // bq, geo.heads[1] - h0),
          pl.BlockSpec((None, bq, None, None, d), q_map),
          pl.BlockSpec((None, t, None, None, d), kv_map),
          pl.BlockSpec((None, bq, None, None), lambda *a: q_map(*a)[:4]))


def forward(geo: StridedBranch, run: Pallas, q: Array, k: Array, v: Array,
            out: Array, lse: Array) -> tuple[Array, Array]:
  """Merges the branch into ``(out, lse)`` in place.

  Args:
    geo: the branch.
    q: shape [B, L, H, D].
    k, v: shape [B, L, K, D].
    out: shape [B, L, H, D], running output (0 where nothing merged yet).
    lse: shape [B, L, H] float32, running log-sum-exp (``-inf`` likewise).

  Returns:
    The updated ``(out, lse)``; positions and heads the branch does not keep
    are unchanged.
  """
  bq, bk, params = _tiles_for("fwd", geo, run)
  grid, q_spec, kv_spec, l_spec = _query_grid(geo, q.shape, bq)
  o5, l4 = _view(out, geo.rate), _view(lse, geo.rate)
  o5, l4 = _in_place(
      functools.partial(_forward_kernel, geo=geo, bq=bq, bk=bk), "ringdilated_fwd",
      run.interpret, params, grid, [q_spec, kv_spec, kv_spec], [q_spec, l_spec],
      [_view(x, geo.rate) for x in (q, k, v)], [o5, l4])
  return o5.reshape(out.shape), l4.reshape(lse.shape)


# ----------------------------------------------------------------------------
# Backward: dq (grid as the forward) and dk, dv (grid over key tiles and kv
# heads); both add into their accumulators in place.
# ----------------------------------------------------------------------------


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, l_ref, dl_ref, dq_in, dq_ref, *,
               geo: StridedBranch, bq: int, bk: int):
  pl = _pl()
  t0 = (pl.program_id(1) % (geo.kept // bq)) * bq
  q, do = q_ref[...], do_ref[...]
  lse, delta = l_ref[...] * _LOG2E, dl_ref[...]

  def body(j, dq, masked):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    p = jnp.exp2(_logits(q, k, geo, t0, j * bk, masked) - lse[:, None])
    ds = p * (_dot_t(do, v) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _key_tiles(body, jnp.zeros(q.shape, _F32), geo, t0, bq, bk)
  dq_ref[...] = (dq_in[...].astype(_F32) + dq * geo.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, l_ref, dl_ref, dk_in, dv_in,
                dk_ref, dv_ref, *, geo: StridedBranch, bq: int, bk: int):
  pl = _pl()
  s0 = (pl.program_id(1) % (geo.kept // bk)) * bk  # key tile, within segment
  k, v = k_ref[...], v_ref[...]

  def body(i, carry, masked, head):
    dk, dv = carry
    q = q_ref[pl.ds(i * bq, bq), head, :]
    do = do_ref[pl.ds(i * bq, bq), head, :]
    s = _logits(q, k, geo, i * bq, s0, masked)
    p = jnp.exp2(s - _LOG2E * l_ref[pl.ds(i * bq, bq), head][:, None])
    dv = dv + _tdot(p.astype(do.dtype), do)
    ds = p * (_dot_t(do, v) - dl_ref[pl.ds(i * bq, bq), head][:, None])
    return dk + _tdot(ds.astype(q.dtype), q), dv

  carry = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
  for head in range(geo.group):  # query heads of this kv head
    lo = s0 // bq  # query tiles from the diagonal on
    carry = _tiles(functools.partial(body, head=head), carry, causal=geo.causal,
                   start=lo if geo.causal else 0, stop=geo.kept // bq,
                   diagonal=(lo, (s0 + bk + bq - 1) // bq))
  dk, dv = carry
  dk_ref[...] = (dk_in[...].astype(_F32) + dk * geo.scale).astype(dk_ref.dtype)
  dv_ref[...] = (dv_in[...].astype(_F32) + dv).astype(dv_ref.dtype)


def backward(geo: StridedBranch, run: Pallas, q: Array, k: Array, v: Array,
             dout: Array, lse: Array, delta: Array,
             grads: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
  """Adds the branch's gradients into ``grads = (dq, dk, dv)`` in place.

  Args:
    geo: the branch.
    q, dout: shape [B, L, H, D].
    k, v: shape [B, L, K, D].
    lse: shape [B, L, H] float32, the global log-sum-exp.
    delta: shape [B, L, H] float32, ``rowsum(dout * out)`` of the global out.
    grads: accumulators shaped like ``q, k, v``.
  """
  pl = _pl()
  b, length, _, d = q.shape
  t, r, g = geo.kept, geo.rate, geo.group
  h0, h1 = geo.heads
  m = length // r
  views = [_view(x, r) for x in (q, k, v, dout, lse, delta)]
  dq, dk, dv = (_view(x, r) for x in grads)

  # dq: a query tile against its segment's keys.
  bq, bk, params = _tiles_for("dq", geo, run)
  grid, q_spec, kv_spec, l_spec = _query_grid(geo, q.shape, bq)
  (dq,) = _in_place(
      functools.partial(_dq_kernel, geo=geo, bq=bq, bk=bk), "ringdilated_dq",
      run.interpret, params, grid, [q_spec, kv_spec, kv_spec, q_spec, l_spec, l_spec], [q_spec],
      views, [dq])

  # dk, dv: a key tile against its segment's queries of every head reading it.
  bq, bk, params = _tiles_for("dkv", geo, run)

  def k_map(bi, j, kh):
    kv = h0 // g + kh
    return bi, j, geo.off(kv), kv, 0

  def seg_map(bi, j, kh):
    kv = h0 // g + kh
    return bi, j // (t // bk), geo.off(kv), kv, 0

  k_spec = pl.BlockSpec((None, bk, None, None, d), k_map)
  qs_spec = pl.BlockSpec((None, t, None, g, d), seg_map)
  ls_spec = pl.BlockSpec((None, t, None, g), lambda *a: seg_map(*a)[:4])
  dk, dv = _in_place(
      functools.partial(_dkv_kernel, geo=geo, bq=bq, bk=bk), "ringdilated_dkv",
      run.interpret, params, (b, m // bk, (h1 - h0) // g),
      [qs_spec, k_spec, k_spec, qs_spec, ls_spec, ls_spec], [k_spec, k_spec],
      views, [dk, dv])
  return tuple(x.reshape(y.shape) for x, y in zip((dq, dk, dv), grads))


# ----------------------------------------------------------------------------
# The backend: the kernels on local branches in place, and with r = 1 as the
# blocks of the generic path (ring steps, branches not read in place).
# ----------------------------------------------------------------------------


def _block_geometry(q: Array, vis: Visibility, scale: float) -> StridedBranch:
  _, t, kh, g, _ = q.shape
  return StridedBranch(kept=t, rate=1, heads=(0, kh * g), group=g, offset=0,
                       causal=vis.diagonal, scale=scale)


@dataclasses.dataclass(frozen=True)
class Pallas(Backend):
  """Pallas (Triton) flash-attention kernels reading branches in place.

  Attributes:
    tiles: tile sizes of the three kernels.
  """

  name = "pallas"
  capabilities = Capabilities(platforms=("gpu",), interpret=True, in_place=True)
  tiles: KernelTiles = KernelTiles()

  def problem(self, request: Request) -> str | None:
    d = request.head_dim
    if d < _MIN_TILE or d & (d - 1) or d > 256:
      return f"head dim {d} (the Pallas kernels need a power of 2 in [16, 256])"
    if jnp.dtype(request.dtype) not in map(jnp.dtype, (jnp.bfloat16, jnp.float16, jnp.float32)):
      return f"dtype {jnp.dtype(request.dtype).name}"
    try:
      from jax.experimental import pallas  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      return f"cannot import jax.experimental.pallas ({e})"
    return None

  def block_problem(self, kept: int) -> str | None:
    return tile_problem(kept)

  def forward(self, q, k, v, vis, *, scale, dropout=None):
    del dropout  # not in the capabilities
    x, t, kh, g, d = q.shape
    out = jnp.zeros_like(q).reshape(x, t, kh * g, d)  # zeros_like: varies as q
    lse = jnp.full_like(out[..., 0], -jnp.inf, _F32)
    out, lse = forward(_block_geometry(q, vis, scale), self,
                       q.reshape(out.shape), k, v, out, lse)
    return out.reshape(q.shape), lse.reshape(x, t, kh, g)

  def backward(self, q, k, v, vis, dout, out, lse, *, scale, dropout=None):
    del dropout
    x, t, kh, g, d = q.shape
    heads = lambda a: a.reshape(x, t, kh * g, *a.shape[4:]).astype(q.dtype)  # noqa: E731
    delta = row_delta(dout, out).reshape(x, t, kh * g)
    grads = (jnp.zeros_like(q).reshape(x, t, kh * g, d), jnp.zeros_like(k),
             jnp.zeros_like(v))
    dq, dk, dv = backward(_block_geometry(q, vis, scale), self, heads(q), k, v,
                          heads(dout), lse.reshape(x, t, kh * g), delta, grads)
    return dq.reshape(q.shape), dk, dv

  def branch_forward(self, branch, q, k, v, out, lse):
    return forward(branch, self, q, k, v, out, lse)

  def branch_backward(self, branch, q, k, v, dout, lse, delta, grads):
    return backward(branch, self, q, k, v, dout, lse, delta, grads)
