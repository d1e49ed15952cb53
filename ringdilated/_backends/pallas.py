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

Masks and dropout are per-token vectors (key validity, segment ids, global
positions) read tile by tile next to the tensors; :mod:`.tile_masks` turns
them into the tile's visibility and dropout keep bits, exactly as the XLA
block does. Key tiles (forward, dq) or query tiles (dk/dv) that no id of
the other side can meet are skipped: per-tile id ranges are computed once
per call from the token vectors (not per head), and each program loops only
over the range of live tiles.

Three kernels, flash-attention 2 style: the forward (grid over query tiles
and query heads, loop over key tiles), ``dq`` (the same grid) and ``dk, dv``
(grid over key tiles and kv heads, loop over query heads and query tiles), so
every output tile is written by exactly one program: no atomics.

Shape legend: B batch (or X, batched segments, for blocks), L local
sequence length, H query heads, K kv heads, G = H / K, D head dim,
M = L / r kept positions per offset, T kept tokens per segment, r rate,
bq / bk query / key tile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .._merge import merge, row_delta, unmerged
from . import tile_masks as tm
from .base import Backend, Capabilities, Dropout, Request, StridedBranch, Visibility

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


@dataclasses.dataclass(frozen=True)
class _Call:
  """What a kernel launch knows statically; hashable.

  Attributes:
    geo: the branch (or block, ``rate = 1``).
    bq, bk: query and key tiles.
    valid: key padding vectors are given.
    seg: segment id vectors are given.
    rate: dropout rate, 0 without dropout.
    head0: global query head of the kernel's head 0 (dropout hash).
    per_kv: token vectors have a kv-head axis (blocks) rather than one
      vector shared by all heads (branches read in place).
  """

  geo: StridedBranch
  bq: int
  bk: int
  valid: bool = False
  seg: bool = False
  rate: float = 0.0
  head0: int = 0
  per_kv: bool = False

  @property
  def masks(self) -> bool:
    return self.valid or self.seg

  def kvt(self, kv):
    """Index of kv head ``kv`` on the token vectors' last axis."""
    return kv if self.per_kv else 0

  def name(self, kernel: str) -> str:
    flags = "m" * self.masks + "d" * bool(self.rate)
    return f"ringdilated_{kernel}_r{self.geo.rate}_t{self.geo.kept}{'_' + flags if flags else ''}"


def _compiler_params(want: Tiles, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  return plgpu.CompilerParams(num_warps=want.num_warps, num_stages=want.num_stages)


def _view(x: Array, rate: int) -> Array:
  """[B, L, ...] -> [B, L / r, r, ...]: position p at [:, p // r, p % r]."""
  return x.reshape(x.shape[0], x.shape[1] // rate, rate, *x.shape[2:])


def _view_out(x: Array | jax.ShapeDtypeStruct, rate: int):
  """:func:`_view` of an accumulator, or of a fresh output's type."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((x.shape[0], x.shape[1] // rate, rate, *x.shape[2:]),
                                x.dtype, manual_axis_type=getattr(x, "manual_axis_type", None))
  return _view(x, rate)


def _like(x: Array, shape=None, dtype=None) -> jax.ShapeDtypeStruct:
  """The type of ``x`` (or of ``shape`` / ``dtype`` varying as ``x`` does),
  including the mesh axes it varies over inside ``shard_map``."""
  mat = getattr(jax.typeof(x), "mat", None)
  return jax.ShapeDtypeStruct(x.shape if shape is None else shape,
                              x.dtype if dtype is None else dtype, manual_axis_type=mat)


def _launch(kernel: Callable, name: str, interpret: bool, params, grid,
            inputs: dict[str, tuple[Array, object]], out_specs: list,
            outs: list[Array | jax.ShapeDtypeStruct]) -> list[Array]:
  """Runs ``kernel(refs, acc_in_refs, out_refs)`` over ``grid``, with
  ``refs`` the named ``inputs`` (array, BlockSpec).

  ``outs`` are arrays (accumulators: the outputs alias them, updated in place,
  and ``acc_in_refs`` reads them) or ``ShapeDtypeStruct`` (fresh outputs, no
  ``acc_in_refs``: the kernel writes every element of them).
  """
  names = tuple(inputs)
  n = len(names)
  accumulate = not isinstance(outs[0], jax.ShapeDtypeStruct)
  accs = list(outs) if accumulate else []

  def body(*refs):
    kernel(dict(zip(names, refs[:n])), refs[n:n + len(accs)], refs[n + len(accs):])

  return _pl().pallas_call(
      body, grid=grid, in_specs=[spec for _, spec in inputs.values()] + list(out_specs)[:len(accs)],
      out_specs=list(out_specs), out_shape=[_like(a) if accumulate else a for a in outs],
      input_output_aliases={n + i: i for i in range(len(accs))},
      compiler_params=params, interpret=interpret, name=name,
  )(*(x for x, _ in inputs.values()), *accs)


def _dot_t(a: Array, b: Array) -> Array:
  """``a @ b.T`` in float32: [m, d] x [n, d] -> [m, n]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dot(a: Array, b: Array) -> Array:
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _tdot(a: Array, b: Array) -> Array:
  """``a.T @ b`` in float32: [m, n] x [m, d] -> [n, d]."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _masked_logits(q: Array, k: Array, c: _Call, vis: Array | None) -> Array:
  """[bq, bk] float32 logits in log2 units (``exp2`` of them is ``exp`` of
  the scaled logits), ``_NEG`` where not visible."""
  s = _dot_t(q, k) * (c.geo.scale * _LOG2E)
  return s if vis is None else jnp.where(vis, s, _NEG)


def _tiles(body: Callable, carry, *, causal: bool, start, stop, diagonal):
  """Runs ``body(j, carry, masked)`` for tiles ``j`` in ``[start, stop)``.

  With ``causal``, tiles in ``diagonal = (lo, hi)`` straddle the causal
  diagonal and run masked; ``[start, stop)`` holds only tiles that may be
  visible.
  """
  run = lambda a, b, c, masked: jax.lax.fori_loop(  # noqa: E731
      a, b, functools.partial(body, masked=masked), c)
  if not causal:
    return run(start, stop, carry, False)
  lo, hi = diagonal
  clip = lambda x: jnp.minimum(jnp.maximum(x, start), stop)  # noqa: E731
  if isinstance(start, int) and isinstance(stop, int):
    clip = lambda x: x  # noqa: E731  (no skipping: the diagonal lies inside)
  carry = run(start, clip(lo), carry, False)
  carry = run(clip(lo), clip(hi), carry, True)
  return run(clip(hi), stop, carry, False)


def _key_tiles(body: Callable, carry, c: _Call, t0, live: tuple):
  """Runs ``body(j, carry, masked)`` over the key tiles that the query tile
  at ``t0`` (within its segment) may see: all, or with ``causal`` those up
  to the diagonal, within the ``live = (lo, hi)`` range."""
  geo, bq, bk = c.geo, c.bq, c.bk
  hi = (t0 + bq + bk - 1) // bk  # key tiles up to the diagonal
  start, stop = 0, (hi if geo.causal else geo.kept // bk)
  if live is not None:
    start, stop = live[0], jnp.minimum(stop, live[1])
  return _tiles(body, carry, causal=geo.causal, start=start, stop=stop,
                diagonal=(t0 // bk, hi))


def _vector(ins: dict, name: str, index=None) -> Array | None:
  """Token vector ``name`` (all of its block, or ``index``), or None if absent."""
  ref = ins.get(name)
  if ref is None:
    return None
  return ref[...] if index is None else ref[index]


def _seed(ins: dict) -> Array:
  return ins["seed"][0]


def _col_hash(ins: dict, keys) -> Array:
  """The dropout hashes of the keys ``keys`` of the window (:func:`.tile_masks.col_hash`)."""
  return tm.col_hash(_seed(ins), ins["k_pos"][keys])


def _token_masks(ins: dict, tokens: bool, q_seg: Array | None, keys) -> dict:
  """The token vectors :func:`tm.visible` needs for key tile ``keys``; none
  on the unmasked path."""
  if not tokens:
    return {}
  return dict(q_seg=q_seg, k_seg=_vector(ins, "k_seg", keys),
              k_valid=_vector(ins, "k_valid", keys))


def _over_key_tiles(body: Callable, carry, ins: dict, c: _Call, t0, q_seg: Array | None):
  """The key-tile loop of a query tile (forward, dq): ``body(j, carry,
  masked, tokens)`` over the live key tiles, without the token masks when
  the tiles hold only this query tile's document (``tm.uniform``)."""
  if not c.masks:
    return _key_tiles(functools.partial(body, tokens=False), carry, c, t0, None)
  q_lo, q_hi = tm.id_range(q_seg, jnp.ones((c.bq,), jnp.int32))
  k_lo, k_hi = ins["k_lo"][...], ins["k_hi"][...]
  live = tm.span(tm.live(k_lo, k_hi, q_lo, q_hi))
  pure = tm.uniform(k_lo, k_hi, ins["k_full"][...], live[0], live[1], q_lo, q_hi)
  loops = [lambda carry, tokens=tokens: _key_tiles(
      functools.partial(body, tokens=tokens), carry, c, t0, live) for tokens in (True, False)]
  return jax.lax.cond(pure, loops[1], loops[0], carry)


# ----------------------------------------------------------------------------
# Forward: grid (B, M / bq, heads); merges into the running (out, lse).
# ----------------------------------------------------------------------------


def _forward_kernel(ins: dict, accs_in, accs_out, *, c: _Call):
  pl = _pl()
  o_ref, l_ref = accs_out
  geo, bq, bk = c.geo, c.bq, c.bk
  t0 = (pl.program_id(1) % (geo.kept // bq)) * bq  # query tile, within segment
  q = ins["q"][...]
  q_seg = _vector(ins, "q_seg")
  rows = (tm.row_hash(_seed(ins), c.head0 + pl.program_id(2), ins["q_pos"][...])
          if c.rate else None)

  def body(j, carry, masked, tokens):  # logits and m in log2 units
    acc, m, l = carry
    keys = pl.ds(j * bk, bk)
    vis = tm.visible((bq, bk), diagonal=masked, q0=t0, k0=j * bk,
                     **_token_masks(ins, tokens, q_seg, keys))
    s = _masked_logits(q, ins["k"][keys, :], c, vis)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_new[:, None])
    if tokens:  # a row may have seen no key yet: its m_new is _NEG
      p = jnp.where(vis, p, 0.0)
    corr = jnp.exp2(m - m_new)
    l = l * corr + jnp.sum(p, axis=1)
    if c.rate:
      p = jnp.where(tm.keep(rows, _col_hash(ins, keys), c.rate), p, 0.0)
    v = ins["v"][keys, :]
    acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  d = q.shape[-1]
  carry = (jnp.zeros((bq, d), _F32), jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32))
  acc, m, l = _over_key_tiles(body, carry, ins, c, t0, q_seg)
  seen = l > 0  # rows that see no key get out 0, lse -inf
  l_safe = jnp.where(seen, l, 1.0)
  lse_b = jnp.where(seen, (m + jnp.log2(l_safe)) / _LOG2E, -jnp.inf)
  out_b = acc / (l_safe * (1.0 - c.rate))[:, None]
  if not accs_in:  # a block: its own (out, lse)
    o_ref[...] = out_b.astype(o_ref.dtype)
    l_ref[...] = lse_b
    return
  o_in, l_in = accs_in
  out, lse = merge(o_in[...].astype(_F32), l_in[...], out_b, lse_b, seen)
  o_ref[...] = out.astype(o_ref.dtype)
  l_ref[...] = lse


# ----------------------------------------------------------------------------
# Backward: dq (grid as the forward) and dk, dv (grid over key tiles and kv
# heads); both add into their accumulators in place.
# ----------------------------------------------------------------------------


def _store(ref, acc_in, value: Array) -> None:
  """``ref = value`` (fresh output) or ``ref = acc + value`` (``acc_in``: the
  one aliased accumulator), rounded to ``ref``'s dtype once."""
  if acc_in:
    value = acc_in[0][...].astype(_F32) + value
  ref[...] = value.astype(ref.dtype)


def _row_lse(l_ref_value: Array, masks: bool) -> Array:
  """The global log-sum-exp in log2 units; 0 for rows that see no key (their
  weights are masked to 0 anyway)."""
  lse = l_ref_value * _LOG2E
  return jnp.where(lse == -jnp.inf, 0.0, lse) if masks else lse


def _dq_kernel(ins: dict, accs_in, accs_out, *, c: _Call):
  pl = _pl()
  (dq_ref,) = accs_out
  geo, bq, bk = c.geo, c.bq, c.bk
  t0 = (pl.program_id(1) % (geo.kept // bq)) * bq
  q, do = ins["q"][...], ins["do"][...]
  lse, delta = _row_lse(ins["lse"][...], c.masks), ins["delta"][...]
  q_seg = _vector(ins, "q_seg")
  rows = (tm.row_hash(_seed(ins), c.head0 + pl.program_id(2), ins["q_pos"][...])
          if c.rate else None)

  def body(j, dq, masked, tokens):
    keys = pl.ds(j * bk, bk)
    vis = tm.visible((bq, bk), diagonal=masked, q0=t0, k0=j * bk,
                     **_token_masks(ins, tokens, q_seg, keys))
    k, v = ins["k"][keys, :], ins["v"][keys, :]
    p = jnp.exp2(_masked_logits(q, k, c, vis) - lse[:, None])
    if tokens:
      p = jnp.where(vis, p, 0.0)
    dp = _dot_t(do, v)
    if c.rate:
      dp = jnp.where(tm.keep(rows, _col_hash(ins, keys), c.rate), dp, 0.0) / (1.0 - c.rate)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _over_key_tiles(body, jnp.zeros(q.shape, _F32), ins, c, t0, q_seg)
  _store(dq_ref, accs_in, dq * geo.scale)


def _dkv_kernel(ins: dict, accs_in, accs_out, *, c: _Call):
  pl = _pl()
  dk_ref, dv_ref = accs_out
  geo, bq, bk = c.geo, c.bq, c.bk
  s0 = (pl.program_id(1) % (geo.kept // bk)) * bk  # key tile, within segment
  k, v = ins["k"][...], ins["v"][...]
  k_seg, k_valid = _vector(ins, "k_seg"), _vector(ins, "k_valid")
  cols = _col_hash(ins, slice(None)) if c.rate else None  # the key tile's dropout hashes
  n_q = geo.kept // bq
  start, stop = (s0 // bq if geo.causal else 0), n_q  # query tiles from the diagonal on
  pure = None
  if c.masks:
    k_lo, k_hi = tm.id_range(k_seg, k_valid)
    zeros = jnp.zeros((n_q,), jnp.int32)
    q_lo, q_hi = (ins["q_lo"][...], ins["q_hi"][...]) if c.seg else (zeros, zeros)
    lo, hi = tm.span(tm.live(q_lo, q_hi, k_lo, k_hi))
    start, stop = jnp.maximum(start, lo), hi
    full = jnp.ones((n_q,), jnp.int32) * (jnp.min(k_valid) if c.valid else 1)
    # the key tile's one id against every query tile in range (roles swapped)
    pure = tm.uniform(q_lo, q_hi, full, lo, hi, k_lo, k_hi)

  def body(i, carry, masked, head, rows, tokens):
    dk, dv = carry
    queries = pl.ds(i * bq, bq)
    q = ins["q"][queries, head, :]
    do = ins["do"][queries, head, :]
    vis = tm.visible((bq, bk), diagonal=masked, q0=i * bq, k0=s0, **(dict(
        q_seg=_vector(ins, "q_seg", queries), k_seg=k_seg, k_valid=k_valid)
        if tokens else {}))
    lse = _row_lse(ins["lse"][queries, head], c.masks)
    p = jnp.exp2(_masked_logits(q, k, c, vis) - lse[:, None])
    if tokens:
      p = jnp.where(vis, p, 0.0)
    dp = _dot_t(do, v)
    p_drop = p
    if c.rate:
      kept = tm.keep(rows(queries), cols, c.rate)
      p_drop = jnp.where(kept, p, 0.0) / (1.0 - c.rate)
      dp = jnp.where(kept, dp, 0.0) / (1.0 - c.rate)
    dv = dv + _tdot(p_drop.astype(do.dtype), do)
    ds = p * (dp - ins["delta"][queries, head][:, None])
    return dk + _tdot(ds.astype(q.dtype), q), dv

  first_head = c.head0 + pl.program_id(2) * geo.group  # (not inside the cond)

  def heads(carry, tokens):
    for head in range(geo.group):  # query heads of this kv head
      rows = None
      if c.rate:
        global_head = first_head + head
        rows = functools.partial(lambda h, queries: tm.row_hash(
            _seed(ins), h, ins["q_pos"][queries]), global_head)
      carry = _tiles(functools.partial(body, head=head, rows=rows, tokens=tokens), carry,
                     causal=geo.causal, start=start, stop=stop,
                     diagonal=(s0 // bq, (s0 + bk + bq - 1) // bq))
    return carry

  carry = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
  if c.masks:
    dk, dv = jax.lax.cond(pure, functools.partial(heads, tokens=False),
                          functools.partial(heads, tokens=True), carry)
  else:
    dk, dv = heads(carry, tokens=False)
  _store(dk_ref, accs_in[:1], dk * geo.scale)
  _store(dv_ref, accs_in[1:], dv)


# ----------------------------------------------------------------------------
# Launchers: BlockSpecs of the tensors, token vectors and tile id ranges.
# ----------------------------------------------------------------------------


def _tokens(x: Array | None, rate: int) -> Array | None:
  """A token vector as [B, M, r, Kt]: [B, L] (shared by the kv heads) or
  [X, T, K] (one per kv head, blocks: r = 1)."""
  if x is None:
    return None
  x = _view(x, rate)
  x = x[..., None] if x.ndim == 3 else x
  return x.astype(jnp.int32)


def _id_ranges(seg: Array | None, valid: Array | None,
               tile_len: int) -> tuple[Array, Array, Array]:
  """Per tile of ``tile_len`` tokens along axis 1 of [B, M, r, Kt] vectors:
  min and max segment id over its valid tokens, and whether all its tokens
  are valid (int32), each [B, M / tile, r, Kt]. Computed once per call, for
  every head."""
  ref = seg if seg is not None else valid
  b, m, r, kt = ref.shape
  ids = jnp.zeros(ref.shape, jnp.int32) if seg is None else seg
  ids = ids.reshape(b, m // tile_len, tile_len, r, kt)
  if valid is None:
    return jnp.min(ids, axis=2), jnp.max(ids, axis=2), jnp.ones_like(ids[:, :, 0])
  ok = valid.reshape(ids.shape) != 0
  return (jnp.min(jnp.where(ok, ids, tm.BIG), axis=2),
          jnp.max(jnp.where(ok, ids, -tm.BIG), axis=2),
          jnp.all(ok, axis=2).astype(jnp.int32))


def _masking(geo: StridedBranch, vis: Visibility, dropout: Dropout | None) -> dict:
  """The static flags and the [B, M, r, Kt] token vectors of a launch."""
  r = geo.rate
  tokens = dict(q_seg=_tokens(vis.q_seg, r), k_seg=_tokens(vis.kv_seg, r),
                k_valid=_tokens(vis.kv_valid, r))
  flags = dict(valid=vis.kv_valid is not None, seg=vis.q_seg is not None)
  if dropout is not None:
    seed, head0 = tm.hash_key(dropout)
    tokens.update(q_pos=_tokens(dropout.q_pos, r), k_pos=_tokens(dropout.k_pos, r),
                  seed=seed.reshape(1))
    flags.update(rate=float(dropout.rate), head0=head0)
  some = next((x for x in tokens.values() if x is not None and x.ndim == 4), None)
  flags["per_kv"] = some is not None and some.shape[-1] > 1
  return dict(tokens=tokens, flags=flags)


def _token_inputs(tokens: dict, tiled: str, tile_len: int, window: int, range_tile: int,
                  tile_map, window_map) -> dict:
  """``{name: (vector, BlockSpec)}`` of the token vectors present in
  ``tokens``: the grid's side ``tiled`` (``"q"`` or ``"k"``) by tile of
  ``tile_len``, the other side by segment window of ``window``, with its
  per-tile id ranges (tiles of ``range_tile``) by window too."""
  pl = _pl()
  other = "k" if tiled == "q" else "q"

  def spec(n, index):
    return pl.BlockSpec((None, n, None, None), index)

  specs = {f"{tiled}_{x}": spec(tile_len, tile_map) for x in ("seg", "valid", "pos")}
  specs.update({f"{other}_{x}": spec(window, window_map) for x in ("seg", "valid", "pos")})
  specs.update({f"{other}_{x}": spec(window // range_tile, window_map)
                for x in ("lo", "hi", "full")})
  specs["seed"] = pl.BlockSpec((1,), lambda *a: (0,))
  return {name: (x, specs[name]) for name, x in tokens.items() if x is not None}


def _query_grid(c: _Call, shape, tokens: dict) -> tuple[tuple, dict, object, object]:
  """Grid (B, M / bq, query heads) of the query-tile kernels and the specs
  of its inputs: ``q`` tiles (and out, dout, dq), the segment's K/V window,
  per-token rows (lse, delta), and the token vectors / key-tile id ranges."""
  pl = _pl()
  b, length, _, d = shape
  geo, bq, bk = c.geo, c.bq, c.bk
  t, g, h0 = geo.kept, geo.group, geo.heads[0]
  per_seg = t // bq

  def q_map(bi, i, hq):
    h = h0 + hq
    return bi, i, geo.off(h // g), h, 0

  def kv_map(bi, i, hq):
    kv = (h0 + hq) // g
    return bi, i // per_seg, geo.off(kv), kv, 0

  def tok_tile(bi, i, hq):
    kv = (h0 + hq) // g
    return bi, i, geo.off(kv), c.kvt(kv)

  def tok_window(bi, i, hq):
    kv = (h0 + hq) // g
    return bi, i // per_seg, geo.off(kv), c.kvt(kv)

  if c.masks:
    tokens = dict(tokens, **dict(zip(("k_lo", "k_hi", "k_full"), _id_ranges(
        tokens["k_seg"], tokens["k_valid"], bk))))
  inputs = _token_inputs(tokens, "q", bq, t, bk, tok_tile, tok_window)
  return ((b, length // geo.rate // bq, geo.heads[1] - h0), inputs,
          pl.BlockSpec((None, bq, None, None, d), q_map),
          (pl.BlockSpec((None, t, None, None, d), kv_map),
           pl.BlockSpec((None, bq, None, None), lambda *a: q_map(*a)[:4])))


def _call_for(kernel: str, geo: StridedBranch, run: Pallas, masking: dict) -> _Call:
  want = getattr(run.tiles, kernel)
  return _Call(geo, tile(geo.kept, want.q), tile(geo.kept, want.k), **masking["flags"])


def forward(geo: StridedBranch, run: Pallas, q: Array, k: Array, v: Array,
            vis: Visibility, dropout: Dropout | None, out: Array | None = None,
            lse: Array | None = None) -> tuple[Array, Array]:
  """Merges the branch into ``(out, lse)`` in place, or (None) returns its own.

  Args:
    geo: the branch.
    run: the backend (tiles, interpret mode).
    q: shape [B, L, H, D].
    k, v: shape [B, L, K, D].
    vis: token vectors, [B, L] (or [X, T, K] for blocks), or None.
    dropout: dropout with positions shaped like the token vectors, or None.
    out: shape [B, L, H, D], running output (0 where nothing merged yet), or
      None for a block (``rate = 1``, every position kept): fresh outputs.
    lse: shape [B, L, H] float32, running log-sum-exp (``-inf`` likewise).

  Returns:
    The updated ``(out, lse)``; positions and heads the branch does not keep
    are unchanged.
  """
  if out is None:
    out, lse = _like(q), _like(q, q.shape[:3], _F32)
  masking = _masking(geo, vis, dropout)
  c = _call_for("fwd", geo, run, masking)
  grid, tokens, q_spec, (kv_spec, l_spec) = _query_grid(c, q.shape, masking["tokens"])
  qv, kv_, vv = (_view(x, geo.rate) for x in (q, k, v))
  o5, l4 = _launch(
      functools.partial(_forward_kernel, c=c), c.name("fwd"), run.interpret,
      _compiler_params(run.tiles.fwd, run.interpret), grid,
      dict(q=(qv, q_spec), k=(kv_, kv_spec), v=(vv, kv_spec), **tokens),
      [q_spec, l_spec], [_view_out(out, geo.rate), _view_out(lse, geo.rate)])
  return o5.reshape(out.shape), l4.reshape(lse.shape)


def backward(geo: StridedBranch, run: Pallas, q: Array, k: Array, v: Array,
             vis: Visibility, dropout: Dropout | None, dout: Array, lse: Array,
             delta: Array, grads: tuple[Array, Array, Array] | None
             ) -> tuple[Array, Array, Array]:
  """Adds the branch's gradients into ``grads = (dq, dk, dv)`` in place.

  Args:
    geo, run, vis, dropout: as in :func:`forward`.
    q, dout: shape [B, L, H, D].
    k, v: shape [B, L, K, D].
    lse: shape [B, L, H] float32, the global log-sum-exp.
    delta: shape [B, L, H] float32, ``rowsum(dout * out)`` of the global out.
    grads: accumulators shaped like ``q, k, v``, or None for a block
      (``rate = 1``): fresh gradients.
  """
  pl = _pl()
  if grads is None:
    grads = (_like(q), _like(k), _like(v))
  b, length, _, d = q.shape
  t, r, g = geo.kept, geo.rate, geo.group
  h0, h1 = geo.heads
  m = length // r
  qv, kv_, vv, dov, lv, dlv = (_view(x, r) for x in (q, k, v, dout, lse, delta))
  dq, dk, dv = (_view_out(x, r) for x in grads)
  masking = _masking(geo, vis, dropout)

  # dq: a query tile against its segment's keys.
  c = _call_for("dq", geo, run, masking)
  grid, tokens, q_spec, (kv_spec, l_spec) = _query_grid(c, q.shape, masking["tokens"])
  (dq,) = _launch(
      functools.partial(_dq_kernel, c=c), c.name("dq"), run.interpret,
      _compiler_params(run.tiles.dq, run.interpret), grid,
      dict(q=(qv, q_spec), k=(kv_, kv_spec), v=(vv, kv_spec), do=(dov, q_spec),
           lse=(lv, l_spec), delta=(dlv, l_spec), **tokens), [q_spec], [dq])

  # dk, dv: a key tile against its segment's queries of every head reading it.
  c = _call_for("dkv", geo, run, masking)
  bq, bk = c.bq, c.bk

  def k_map(bi, j, kh):
    kv = h0 // g + kh
    return bi, j, geo.off(kv), kv, 0

  def seg_map(bi, j, kh):
    kv = h0 // g + kh
    return bi, j // (t // bk), geo.off(kv), kv, 0

  def tok_tile(bi, j, kh):
    return k_map(bi, j, kh)[:3] + (c.kvt(h0 // g + kh),)

  def tok_window(bi, j, kh):
    return seg_map(bi, j, kh)[:3] + (c.kvt(h0 // g + kh),)

  k_spec = pl.BlockSpec((None, bk, None, None, d), k_map)
  qs_spec = pl.BlockSpec((None, t, None, g, d), seg_map)
  ls_spec = pl.BlockSpec((None, t, None, g), lambda *a: seg_map(*a)[:4])
  tokens = dict(masking["tokens"])
  if c.seg:
    tokens.update(zip(("q_lo", "q_hi"), _id_ranges(tokens["q_seg"], None, bq)[:2]))
  inputs = dict(q=(qv, qs_spec), k=(kv_, k_spec), v=(vv, k_spec), do=(dov, qs_spec),
                lse=(lv, ls_spec), delta=(dlv, ls_spec),
                **_token_inputs(tokens, "k", bk, t, bq, tok_tile, tok_window))
  dk, dv = _launch(
      functools.partial(_dkv_kernel, c=c), c.name("dkv"), run.interpret,
      _compiler_params(run.tiles.dkv, run.interpret), (b, m // bk, (h1 - h0) // g),
      inputs, [k_spec, k_spec], [dk, dv])
  return tuple(x.reshape(y.shape) for x, y in zip((dq, dk, dv), grads))


# ----------------------------------------------------------------------------
# The backend: the kernels on local branches in place, and with r = 1 as the
# blocks of the generic path (ring steps, branches not read in place).
# ----------------------------------------------------------------------------


def block_geometry(q: Array, vis: Visibility, scale: float) -> StridedBranch:
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
  capabilities = Capabilities(platforms=("gpu",), interpret=True, in_place=True,
                              masks=True, dropout=True)
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
    x, t, kh, g, d = q.shape
    out, lse = self._block_forward(block_geometry(q, vis, scale),
                                   q.reshape(x, t, kh * g, d), k, v, vis, dropout)
    return out.reshape(q.shape), lse.reshape(x, t, kh, g)

  def backward(self, q, k, v, vis, dout, out, lse, *, scale, dropout=None):
    x, t, kh, g, d = q.shape
    heads = lambda a: a.reshape(x, t, kh * g, *a.shape[4:])  # noqa: E731
    dq, dk, dv = self._block_backward(block_geometry(q, vis, scale), heads(q), k, v, vis,
                                      dropout, heads(dout).astype(q.dtype),
                                      lse.reshape(x, t, kh * g), heads(out))
    return dq.reshape(q.shape), dk, dv

  def _block_forward(self, geo, q, k, v, vis, dropout):
    """A block as a rate-1 branch, heads flattened (q [X, T, H, D]): its
    own fresh ``(out, lse)``."""
    return forward(geo, self, q, k, v, vis, dropout)

  def _block_backward(self, geo, q, k, v, vis, dropout, dout, lse, out):
    """The gradients of :meth:`_block_forward`'s block, fresh (``out``: the
    global output of its rows)."""
    return backward(geo, self, q, k, v, vis, dropout, dout, lse, row_delta(dout, out), None)

  def branch_forward(self, branch, q, k, v, vis, dropout, out, lse):
    # these kernels merge; an alone branch (a call the Hopper backend hands
    # over) must write its heads whole, so they start from (0, -inf)
    if branch.alone:
      h = slice(*branch.heads)
      out, lse = (unmerged(q) if out is None
                  else (out.at[:, :, h].set(0), lse.at[:, :, h].set(-jnp.inf)))
    return forward(branch, self, q, k, v, vis, dropout, out, lse)

  def branch_backward(self, branch, q, k, v, vis, dropout, dout, lse, out, grads, delta=None):
    if branch.alone:  # these kernels add: its heads start from 0
      h0, h1 = branch.heads
      heads = (slice(h0, h1),) + (slice(h0 // branch.group, h1 // branch.group),) * 2
      grads = (tuple(map(jnp.zeros_like, (q, k, v))) if grads is None
               else tuple(g.at[:, :, h].set(0) for g, h in zip(grads, heads)))
    delta = row_delta(dout, out) if delta is None else delta
    return backward(branch, self, q, k, v, vis, dropout, dout, lse, delta, grads), delta
