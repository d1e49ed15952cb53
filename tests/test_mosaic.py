"""The Hopper (Mosaic GPU) backend on CPU: what can be checked without the GPU.

The kernels themselves run only on a Hopper GPU (``benchmarks/mosaic_probe.py``
compares them with the Triton kernels there, ``benchmarks/check_gpu.py``
with float32 XLA). Here:

* every kernel variant (rate 1 and 4, causal or not, with and without key
  padding, segment ids and dropout, merging into accumulators or writing
  fresh outputs) lowers to a Mosaic GPU kernel for CUDA, with exactly the
  operands its variant needs;
* the per-program live tile ranges (tile skipping for packed documents and
  padding) cover every visible (query, key) pair, and "pure" programs (no
  token mask needed) really see every pair of their range, against brute
  force;
* the layouts the kernels read (rows per offset for the TMA) are exact;
* which calls the kernels take and which go to the Triton kernels, and what
  ``backend="auto"`` picks on a Hopper GPU;
* the backend's glue (blocks of the ring, branches with token vectors, the
  accumulators) on a ring of 2 and on one device against the oracle, with
  the two kernel entry points bound to the Triton kernels in interpret mode
  (the same in-place contract), so only the Mosaic GPU code itself is
  out of the CPU's reach.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ringdilated as rd
from ringdilated import _backends
from ringdilated._backends import mosaic, pallas
from ringdilated._backends import tile_masks as tm
from ringdilated._backends.base import Dropout, Request, StridedBranch, Visibility, keep_mask
from ringdilated._merge import row_delta, unmerged


# ----------------------------------------------------------------------------
# Lowering to Mosaic GPU.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rate,causal,masks,drop,fresh,d,alone,delta", [
    (1, True, "", False, False, 128, False, False), (4, False, "", False, True, 128, False, True),
    (1, False, "both", False, False, 128, False, False),
    (4, True, "seg", True, False, 128, False, True),
    (2, True, "valid", False, False, 128, False, False),
    (1, True, "", True, True, 128, False, False),
    (2, False, "both", True, False, 128, False, False),
    (4, True, "both", True, False, 64, False, False),
    (1, False, "", False, True, 64, False, False), (4, True, "", False, False, 128, True, False),
    (2, True, "both", True, True, 64, True, True)])
def test_kernels_lower_to_mosaic_gpu(rate, causal, masks, drop, fresh, d, alone, delta):
  b, length, h, kh = 1, 4096, 4, 2
  tiles = mosaic.Mosaic().mosaic_tiles(d)  # the head dim's tuned tiles
  geo = StridedBranch(kept=2048 // rate, rate=rate, heads=(0, h), group=h // kh,
                      offset=None, causal=causal, scale=d ** -0.5, alone=alone)

  def vis(seg, valid):
    return Visibility(valid if masks in ("valid", "both") else None,
                      seg if masks in ("seg", "both") else None,
                      seg if masks in ("seg", "both") else None, causal)

  def dropout(pos):
    return Dropout(0.1, jnp.uint32(3), np.arange(h).reshape(kh, h // kh), pos, pos) if drop else None

  def fwd(q, k, v, o, l, seg, valid):
    accs = (None, None) if fresh else (o, l)
    return mosaic.forward(geo, tiles, q, k, v, *accs, vis(seg, valid), dropout(seg))

  def bwd(q, k, v, do, l, o, dq, dk, dv, seg, valid):
    return mosaic.backward(geo, tiles, q, k, v, do, l, o,
                           None if fresh else (dq, dk, dv), vis(seg, valid), dropout(seg),
                           l * 0.5 if delta else None)

  sd = jax.ShapeDtypeStruct
  qs, kvs = sd((b, length, h, d), jnp.bfloat16), sd((b, length, kh, d), jnp.bfloat16)
  rows, tok = sd((b, length, h), jnp.float32), sd((b, length), jnp.int32)
  # (function, arguments, operands of each kernel: inputs and accumulators;
  # dq's are dq and the delta it writes for dk, dv, or dq alone where it
  # reads a given delta instead of O)
  for fn, args, operands in ((fwd, (qs, kvs, kvs, qs, rows, tok, tok), ((3, 2),)),
                             (bwd, (qs, kvs, kvs, qs, rows, qs, qs, kvs, kvs, tok, tok),
                              ((6, 1) if delta else (6, 2), (6, 2)))):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @mosaic_gpu\w*\(([^)]*)\)", text)
    # token vectors add the queries' and keys' ids, validity and the tile
    # ranges; dropout the row hashes and key positions; fresh outputs are
    # not operands
    assert [len(c.split(",")) for c in calls] == [
        n + 4 * bool(masks) + 2 * drop + (0 if fresh else accs) for n, accs in operands]
    # every kernel is named by its branch; "_f": it writes (fresh outputs, or
    # an alone branch's whole heads) instead of merging or adding
    names = set(re.findall(r"ringdilated_mgpu_(\w+?)_mosaic_gpu", text))
    assert len(names) == len(calls)
    assert {n.endswith("_f") for n in names} == {fresh or alone}


@pytest.mark.parametrize("causal,masks,drop,d", [(True, True, False, 128),
                                                  (False, True, True, 64),
                                                  (True, False, True, 128)])
def test_ring_blocks_lower_with_their_masks_and_dropout(causal, masks, drop, d):
  """A ring block (fresh outputs; token vectors and positions [X, T, K], one
  per kv head, of two chunks) through the backend's block entry points."""
  x, t, h, kh = 2, 1024, 4, 2
  sd = jax.ShapeDtypeStruct
  qs, kvs = sd((x, t, kh, h // kh, d), jnp.bfloat16), sd((x, t, kh, d), jnp.bfloat16)
  tok = sd((x, t, kh), jnp.int32)

  def fwd_bwd(q, k, v, cot, q_seg, k_seg, q_pos, k_pos):
    vis = Visibility(k_seg > 0 if masks else None, q_seg if masks else None,
                     k_seg if masks else None, causal)
    dropout = (Dropout(0.1, jnp.uint32(3), np.arange(h).reshape(kh, h // kh), q_pos, k_pos)
               if drop else None)
    out, lse = mosaic.Mosaic().forward(q, k, v, vis, scale=d ** -0.5, dropout=dropout)
    return mosaic.Mosaic().backward(q, k, v, vis, cot, out, lse, scale=d ** -0.5,
                                    dropout=dropout)

  text = jax.jit(fwd_bwd).trace(qs, kvs, kvs, qs, tok, tok, tok, tok).lower(
      lowering_platforms=("cuda",)).as_text()
  calls = re.findall(r"custom_call @mosaic_gpu\w*\(([^)]*)\)", text)
  names = re.findall(r"ringdilated_mgpu_(\w+?)_mosaic_gpu", text)
  flags = "_m" * masks + "_p" * drop + "_f"
  assert sorted(set(names)) == sorted(f"{k}_r1_t{t}{flags}" for k in ("dkv", "dq", "fwd"))
  # q, k, v (forward); q, k, v, dout, lse, O (dq); q, k, v, dout, lse, delta
  # (dk, dv); plus ids of the queries and keys, validity and the tile
  # ranges, and the dropout hashes
  extra = 4 * masks + 2 * drop
  assert sorted(len(c.split(",")) for c in calls) == sorted(
      [3 + extra, 6 + extra, 6 + extra])


@pytest.mark.parametrize("alone", [False, True])
def test_kernels_lower_inside_shard_map_with_check_vma(alone):
  """Inside ``jax.shard_map(check_vma=True)`` (jax's default) every value is
  typed by the mesh axes it varies over: fresh outputs are typed as ``q``,
  and accumulators reach the kernel as arrays aliased to its outputs (jax
  0.11.2's launcher refuses varying Refs, which ``pl.run_state`` would pass).
  Lowered for CUDA here; benchmarks/check_gpu.py runs them on a GPU."""
  b, length, h, kh, d = 1, 2048, 4, 2, 128
  tiles = mosaic.TUNED[d]
  geo = StridedBranch(kept=512, rate=2, heads=(0, h), group=h // kh, offset=None,
                      causal=True, scale=d ** -0.5, alone=alone)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",))
  seen = {}

  def body(q, k, v):
    fresh = mosaic.forward(geo, tiles, q, k, v)
    merged = mosaic.forward(geo, tiles, q, k, v, *unmerged(q))
    grads, _ = mosaic.backward(geo, tiles, q, k, v, q, merged[1], merged[0],
                               (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)))
    new, _ = mosaic.backward(geo, tiles, q, k, v, q, fresh[1], fresh[0])
    again, _ = mosaic.backward(geo, tiles, q, k, v, q, merged[1], merged[0], grads,
                               delta=row_delta(q, merged[0]))
    for name, xs in (("fresh", fresh), ("merged", merged), ("grads", grads),
                     ("new", new), ("again", again)):
      seen[name] = [set(jax.typeof(x).mat.varying) for x in xs]
    return sum(x.astype(jnp.float32).sum((2, 3), keepdims=True)
               for x in (fresh[0], new[0], again[0]))

  spec = P(None, "sp")
  qs = jax.ShapeDtypeStruct((b, 2 * length, h, d), jnp.bfloat16)
  kvs = jax.ShapeDtypeStruct((b, 2 * length, kh, d), jnp.bfloat16)
  f = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=True)
  text = jax.jit(f).trace(qs, kvs, kvs).lower(lowering_platforms=("cuda",)).as_text()
  assert all(v == [{"sp"}] * len(v) for v in seen.values()), seen
  calls = re.findall(r"custom_call @mosaic_gpu\w*\([^)]*\)[^\n]*", text)
  assert len(calls) == 8  # forward twice, (dq, dk/dv) three times
  # the in-place launches alias their accumulators: (out, lse), (dq, delta),
  # (dk, dv), then dq (reading the delta formed) and (dk, dv)
  assert sum("output_operand_alias" in c for c in calls) == 5


def test_the_backend_needs_a_launcher_that_aliases(monkeypatch):
  assert mosaic.launcher_problem() is None  # this jax's
  monkeypatch.setattr(mosaic, "_hopper_problem", lambda: None)
  monkeypatch.setattr(mosaic, "_launcher", lambda: (lambda meshes_and_fns, out_types=(): None))
  mosaic.launcher_problem.cache_clear()
  try:
    why = mosaic.Mosaic().problem(_request())
    assert why == "jax's Pallas kernel launcher takes no input_output_aliases"
    assert _backends.select("mosaic", _request()).name == "xla"  # with a warning
  finally:
    mosaic.launcher_problem.cache_clear()


# ----------------------------------------------------------------------------
# Live tile ranges.
# ----------------------------------------------------------------------------


def _visible(own_ids, own_valid, ids, valid):
  return (own_ids[:, None] == ids[None, :]) & (own_valid[:, None] != 0) & (valid[None, :] != 0)


@pytest.mark.parametrize("own,tile,own_keys", [(128, 128, False), (128, 64, False),
                                               (128, 64, True), (128, 128, True)])
def test_spans_cover_every_visible_pair(own, tile, own_keys):
  """Branches in place (one id vector for queries and keys) and ring blocks
  (the keys' ids of another chunk: an earlier one's, or in reverse order,
  or unordered)."""
  rng = np.random.default_rng(own + tile + own_keys)
  t, checked, pure_seen, impure_seen = 512, 0, 0, 0
  for trial in range(9):
    b, r = 1, (1, 2)[trial % 2]
    m = 4 * t
    seg = np.sort(rng.integers(0, (1, 3, 40)[trial % 3], (b, r, m)), axis=-1).astype(np.int32)
    kseg = seg
    if trial >= 6:  # a block: the keys' own ids
      kseg = (np.maximum(seg - seg.max() // 2, 0), seg[..., ::-1],
              rng.integers(0, 3, seg.shape))[trial - 6].astype(np.int32)
    valid = (rng.random((b, r, m)) > (0.1, 0.0, 0.3)[trial % 3]).astype(np.int32)
    valid[..., m // 2:m // 2 + 300] = 0 if trial == 5 else valid[..., m // 2:m // 2 + 300]
    spans = np.asarray(mosaic._spans(jnp.asarray(seg), jnp.asarray(kseg), jnp.asarray(valid), t,
                                     own, tile, own_keys))
    ones = np.ones(m, np.int32)
    for ri in range(r):
      q_ids, k_ids, val = seg[0, ri], kseg[0, ri], valid[0, ri]
      own_ids, ids = (k_ids, q_ids) if own_keys else (q_ids, k_ids)
      for c in range(m // own):
        s0 = c * own // t * t
        o = slice(c * own, (c + 1) * own)
        lo, hi, plo, phi = spans[0, ri, c]
        assert plo <= phi <= t // tile
        for j in range(t // tile):
          s = slice(s0 + j * tile, s0 + (j + 1) * tile)
          vis = _visible(own_ids[o], (val if own_keys else ones)[o], ids[s],
                         (ones if own_keys else val)[s])
          if vis.any():
            assert lo <= j < hi, (trial, c, j, lo, hi)
          if plo <= j < phi:  # no token mask needed
            assert lo <= j < hi and vis.all(), (trial, c, j)
          checked += 1
        pure_seen += int(plo < phi)
        impure_seen += int(lo < hi and (plo > lo or phi < hi))
  assert checked > 0 and pure_seen > 0 and impure_seen > 0  # all kinds of program occurred


def test_spans_skip_other_documents():
  """Two documents per segment: a program of the second sees only its half."""
  t = 512
  seg = jnp.asarray(np.repeat([0, 1], t // 2)[None, None], jnp.int32)
  spans = np.asarray(mosaic._spans(seg, seg, jnp.ones_like(seg), t, 128, 64, False))
  np.testing.assert_array_equal(spans[0, 0], [[0, 4, 0, 4], [0, 4, 0, 4], [4, 8, 4, 8],
                                              [4, 8, 4, 8]])


@pytest.mark.parametrize("own_keys", [False, True])
def test_spans_mask_only_the_tiles_a_document_boundary_cuts(own_keys):
  """A document that starts (queries' side) or ends (keys' side) inside a
  tile: the programs wholly inside it need token masks in that tile only,
  not in every tile of their range (as when a program was masked whole:
  with documents of varied length nearly every program). A program that
  holds the boundary itself needs them everywhere (``plo = phi = t / tile``)."""
  t = 512
  cut = 100 if not own_keys else 412  # inside key (query) tile 1 (6) of 64
  seg = jnp.asarray((np.arange(t) >= cut).astype(np.int32)[None, None])
  spans = np.asarray(mosaic._spans(seg, seg, jnp.ones_like(seg), t, 128, 64, own_keys))[0, 0]
  if not own_keys:  # queries 128-255 see keys 100-255: tile 1 mixes the documents
    np.testing.assert_array_equal(spans[0], [0, 8, 8, 8])
    np.testing.assert_array_equal(spans[1], [1, 8, 2, 8])
  else:  # keys 256-383 are seen by queries 256-411: tile 6 mixes them
    np.testing.assert_array_equal(spans[2], [0, 7, 0, 6])
    np.testing.assert_array_equal(spans[3], [0, 8, 8, 8])


def test_programs_run_each_tile_once_in_order_masked_only_outside_the_pure_run():
  """The loop nest a query-tile program runs (:func:`mosaic._span`, then
  :func:`mosaic._per_program` over :func:`mosaic._query_loops`), with a step
  that records what it is called with: every tile of the program's range
  once, in increasing order (the order the memory warpgroup streams them),
  on the diagonal from ``full`` on, with a token mask exactly outside the
  pure run, and none at all in a program whose tiles all are pure."""
  n = 8  # tiles of a segment

  def step(j, carry, diagonal, masked):
    seen, order, count = carry
    return (seen.at[j].add(1 + 2 * diagonal + 4 * masked), order.at[j].set(count), count + 1)

  @jax.jit
  def nest(row, clo, chi, full):
    lo, hi, pure, impure = mosaic._span(row[None, None, None], 0, 0, 0, clo, chi, masks=True)
    full = mosaic._clip(full, lo, hi)
    carry = (jnp.zeros(n, jnp.int32), jnp.full(n, -1, jnp.int32), jnp.int32(0))
    seen, order, _ = mosaic._per_program(impure, pure, functools.partial(
        mosaic._query_loops, step, lo, full, hi, True), carry)
    return seen, order, lo, hi, pure[0], pure[1], impure

  rng = np.random.default_rng(0)
  kinds = set()
  for _ in range(300):
    lo, hi = np.sort(rng.integers(0, n + 1, 2))
    plo = rng.integers(lo, hi + 1) if rng.random() < 0.8 else n  # n: no pure tile
    phi = n if plo == n else rng.integers(plo, hi + 1)
    clo, chi = np.sort(rng.integers(0, n + 1, 2))
    full = rng.integers(0, n + 1)
    seen, order, a, z, p0, p1, impure = (np.asarray(x) for x in nest(
        jnp.asarray([lo, hi, plo, phi], jnp.int32), clo, chi, full))
    assert (a, z) == (max(lo, clo), max(min(hi, chi), max(lo, clo)))
    tiles = np.arange(n)
    inside = (tiles >= a) & (tiles < z)
    np.testing.assert_array_equal(seen > 0, inside)
    diagonal = (seen - 1) % 4 // 2
    masked = (seen - 1) // 4
    np.testing.assert_array_equal(diagonal[inside], tiles[inside] >= min(max(full, a), z))
    in_pure_run = (tiles >= plo) & (tiles < phi)
    expect = ~in_pure_run[inside] if impure else np.zeros(inside.sum(), bool)
    np.testing.assert_array_equal(masked[inside], expect)
    assert bool(impure) == bool(np.any(~in_pure_run[inside])), (lo, hi, plo, phi, clo, chi)
    np.testing.assert_array_equal(order[inside], np.arange(inside.sum()))
    kinds.add((bool(impure), bool(p0 < p1), bool(a < z)))
  assert {(True, True, True), (True, False, True), (False, True, True)} <= kinds


# ----------------------------------------------------------------------------
# Layouts.
# ----------------------------------------------------------------------------


def test_rows_put_each_offset_contiguous():
  x = jnp.arange(2 * 12 * 3, dtype=jnp.float32).reshape(2, 12, 3)
  rows = mosaic._rows(x, 4)  # [B, H, r, M]
  assert rows.shape == (2, 3, 4, 3)
  for b, h, o, m in [(0, 0, 0, 0), (1, 2, 3, 2), (0, 1, 2, 1)]:
    assert rows[b, h, o, m] == x[b, m * 4 + o, h]
  np.testing.assert_array_equal(mosaic._unrows(rows), x)
  tokens = mosaic._tokens(jnp.arange(24).reshape(2, 12), 4)
  assert tokens[1, 3, 2] == 12 + 2 * 4 + 3


@pytest.mark.parametrize("offset,heads", [(None, (0, 4)), (1, (2, 4))])
def test_dropout_hashes_drop_what_the_xla_block_drops(offset, heads):
  """The row and key hashes the kernels read, combined per weight as the
  kernels do (:func:`tile_masks.kept`), give the XLA block's keep mask for
  every (head, query, key) of a branch read in place; and the kernels'
  head indexing (q's whole head axis, as lse) picks the branch's heads."""
  b, length, h, kh, rate = 2, 32, 4, 2, 0.3
  geo = StridedBranch(kept=4, rate=2, heads=heads, group=h // kh, offset=offset,
                      causal=True, scale=1.0)
  pos = jnp.asarray(np.random.default_rng(0).permutation(4 * b * length)[:b * length]
                    .reshape(b, length), jnp.int32)  # global positions, any order
  g0 = 7  # global head of the branch's first head
  n = heads[1] - heads[0]
  drop = Dropout(rate, jnp.uint32(99), g0 + np.arange(n).reshape(n // geo.group, geo.group),
                 pos, pos)
  ins = mosaic._dropout_inputs(drop, geo, h)
  rh, khash = np.asarray(ins["rh"]), np.asarray(ins["kh"])  # [B, H, r, M], [B, r, M]
  assert rh.shape == (b, h, 2, length // 2) and khash.shape == (b, 2, length // 2)
  for hq in range(*heads):
    off = geo.off(hq // geo.group)
    x = rh[:, hq, off, :, None] ^ khash[:, off, None, :]  # [B, M, M] of the offset
    got = np.asarray(tm.kept(jnp.asarray(x), rate))
    p = pos[:, off::2]  # positions of the offset's tokens
    want = keep_mask(Dropout(rate, drop.seed, np.array([[g0 + hq - heads[0]]]),
                             p[..., None], p[..., None]))[:, 0, 0]
    np.testing.assert_array_equal(got, want)
  assert 0.5 < got.mean() < 0.9  # (a mask that keeps about 1 - rate)


def test_ring_block_token_vectors_are_per_kv_head():
  """A ring block's token vectors ([X, T, K]: one per kv head, queries and
  keys of different chunks) reach the kernels as [X, K, T] rows, indexed by
  kv head (:meth:`mosaic._Launch.tok`), and its dropout hashes give the XLA
  block's keep mask for every (head, query, key)."""
  x, t, h, kh, rate = 2, 16, 4, 2, 0.3
  g = h // kh
  rng = np.random.default_rng(1)
  geo = StridedBranch(kept=t, rate=1, heads=(0, h), group=g, offset=0, causal=False, scale=1.0)
  q_pos, k_pos = (jnp.asarray(rng.permutation(4 * x * t * kh)[:x * t * kh].reshape(x, t, kh),
                              jnp.int32) for _ in range(2))
  q_seg, k_seg = (jnp.asarray(np.sort(rng.integers(0, 4, (x, t, kh)), axis=1), jnp.int32)
                  for _ in range(2))
  valid = jnp.asarray(rng.random((x, t, kh)) > 0.2)
  vis = Visibility(valid, q_seg, k_seg, False)
  drop = Dropout(rate, jnp.uint32(5), 3 + np.arange(h).reshape(kh, g), q_pos, k_pos)
  assert mosaic._per_kv(vis, None) and mosaic._per_kv(None, drop)
  assert not mosaic._per_kv(Visibility(None, None, None, True), None)
  c = mosaic._Launch(geo, 64, 64, 2, jnp.bfloat16, 64, per_kv=True)
  assert c.tok(1) == 1 and dataclasses.replace(c, per_kv=False).tok(1) == 0
  ins = mosaic._mask_inputs(vis, 1, t, 8, 4, own_keys=False)
  for name, want in (("q_ids", q_seg), ("k_ids", k_seg), ("valid", valid)):
    np.testing.assert_array_equal(ins[name], np.asarray(want).transpose(0, 2, 1), name)
  assert ins["span"].shape == (x, kh, t // 8, 4)
  hashes = mosaic._dropout_inputs(drop, geo, h)
  rh, khash = np.asarray(hashes["rh"]), np.asarray(hashes["kh"])  # [X, H, 1, T], [X, K, T]
  assert rh.shape == (x, h, 1, t) and khash.shape == (x, kh, t)
  for hq in range(h):
    kv = hq // g
    got = np.asarray(tm.kept(jnp.asarray(rh[:, hq, 0, :, None] ^ khash[:, kv, None, :]), rate))
    want = keep_mask(Dropout(rate, drop.seed, np.array([[3 + hq]]), q_pos[..., kv:kv + 1],
                             k_pos[..., kv:kv + 1]))[:, 0, 0]
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------
# Which calls the kernels take; what "auto" picks on Hopper.
# ----------------------------------------------------------------------------


def test_calls_the_kernels_take():
  backend = mosaic.Mosaic()
  x = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  assert backend._takes(256, x)
  assert not backend._takes(192, x)  # not a multiple of 128
  assert not backend._takes(256, x[..., :32])  # head dim 32
  assert not backend._takes(256, x.astype(jnp.float32))
  assert not mosaic.Mosaic(interpret=True)._takes(256, x)
  # tiles: tuned per head dim unless given
  assert backend.mosaic_tiles(64) == mosaic.TUNED[64] != mosaic.TUNED[128]
  assert backend.mosaic_tiles(128) == mosaic.TUNED[128]
  mine = mosaic.Mosaic(mosaic=mosaic.MosaicTiles(fwd_k=64))
  assert mine.mosaic_tiles(64) == mine.mosaic_tiles(128) == mosaic.MosaicTiles(fwd_k=64)
  # inside shard_map with either check_vma (see the lowering test below)
  seen = []
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",))
  for check in (True, False):
    jax.jit(jax.shard_map(lambda y, check=check: (seen.append(
        (check, backend._takes(256, y))), y)[1], mesh=mesh,
        in_specs=P(None, "sp"), out_specs=P(None, "sp"), check_vma=check))(
            jnp.zeros((1, 512, 2, 128), jnp.bfloat16))
  assert seen == [(True, True), (False, True)]


def _request(**kw):
  kw = dict(dict(platform="gpu", dtype=jnp.dtype(jnp.bfloat16), head_dim=128, masks=False,
                 dropout=False), **kw)
  return Request(**kw)


def test_auto_on_hopper(monkeypatch):
  monkeypatch.setattr(mosaic, "_hopper_problem", lambda: None)
  monkeypatch.setattr(_backends.cudnn, "internal_api_problem", lambda: None)
  assert _backends.select("auto", _request()).name == "mosaic"
  assert _backends.select("auto", _request(masks=True)).name == "mosaic"
  assert _backends.select("auto", _request(dense=True)).name == "cudnn"
  assert _backends.select("auto", _request(dense=True, masks=True)).name == "mosaic"
  # cuDNN takes no dropout: dense attention with dropout stays on these kernels
  assert _backends.select("auto", _request(dense=True, dropout=True)).name == "mosaic"
  assert _backends.select("mosaic", _request(dense=True)).name == "mosaic"  # explicit


def test_auto_passes_over_these_kernels_only_for_cudnn(monkeypatch):
  """Measured slower than cuDNN (dense attention) means nothing where cuDNN
  can't run: these kernels then beat the Triton ones that would be next."""
  monkeypatch.setattr(mosaic, "_hopper_problem", lambda: None)
  monkeypatch.setattr(_backends.cudnn, "internal_api_problem",
                      lambda: "no cuDNN attention in this jax")
  assert _backends.select("auto", _request(dense=True)).name == "mosaic"


def test_auto_elsewhere_passes_it_over(monkeypatch, caplog):
  monkeypatch.setattr(_backends.cudnn, "internal_api_problem", lambda: None)
  monkeypatch.setattr(mosaic, "_hopper_problem", lambda: "compute capability 8.0 (the "
                      "Mosaic GPU kernels need Hopper, 9.0)")
  with caplog.at_level("DEBUG", logger="ringdilated"):
    assert _backends.select("auto", _request()).name == "cudnn"
  assert "passes 'mosaic' over: compute capability 8.0" in caplog.text
  assert _backends.select("auto", _request(platform="cpu")).name == "xla"


# ----------------------------------------------------------------------------
# The glue, with the kernel entry points bound to the Triton kernels.
# ----------------------------------------------------------------------------


class _Bound(mosaic.Mosaic):
  """The Mosaic backend whose kernels (bound to the Triton ones) run in the
  interpreter and take float32 too."""

  dtypes = (*mosaic.Mosaic.dtypes, jnp.dtype(jnp.float32))

  def _takes(self, kept, x):
    return mosaic.Mosaic._takes(dataclasses.replace(self, interpret=False), kept, x)


@pytest.fixture(name="bound")
def _bound(monkeypatch):
  calls = []
  triton = pallas.Pallas(interpret=True)

  def forward(geo, tiles, q, k, v, out=None, lse=None, vis=None, dropout=None):
    calls.append("fwd" + "_fresh" * (out is None) + "_drop" * (dropout is not None))
    vis = vis if vis is not None else Visibility(None, None, None, geo.causal)
    return triton.branch_forward(geo, q, k, v, vis, dropout, out, lse)  # (alone: as it)

  def backward(geo, tiles, q, k, v, dout, lse, out, grads=None, vis=None, dropout=None,
               delta=None):
    calls.append("bwd" + "_fresh" * (grads is None) + "_delta" * (delta is not None)
                 + "_drop" * (dropout is not None))
    vis = vis if vis is not None else Visibility(None, None, None, geo.causal)
    if delta is not None:
      return triton.branch_backward(geo, q, k, v, vis, dropout, dout, lse, None, grads, delta)
    # as the dq kernel: delta formed at the branch's rows only (0 elsewhere),
    # returned if mosaic.forms_every_row says they are all
    rows = np.arange(q.shape[1])[:, None] % geo.rate
    heads = np.arange(q.shape[2])
    offsets = heads // geo.group % geo.rate if geo.offset is None else geo.offset
    kept = (rows == offsets) & (heads >= geo.heads[0]) & (heads < geo.heads[1])
    formed = jnp.where(kept, row_delta(dout, out), 0.0)
    grads, _ = triton.branch_backward(geo, q, k, v, vis, dropout, dout, lse, None, grads, formed)
    return grads, formed if mosaic.forms_every_row(geo, q.shape[2]) else None

  monkeypatch.setattr(mosaic, "forward", forward)
  monkeypatch.setattr(mosaic, "backward", backward)
  monkeypatch.setattr(mosaic, "_hopper_problem", lambda: None)
  return calls


def _out_and_grads(backend, q, k, v, cot, ring, **kw):
  def go(q, k, v, cot, extra):
    fn = functools.partial(rd.dilated_attention, backend=backend,
                           axis_name="sp" if ring else None, **kw, **extra)
    out, pull = jax.vjp(fn, q, k, v)
    return (out,) + pull(cot)

  extra = {name: kw.pop(name) for name in ("segment_ids", "key_padding_mask") if name in kw}
  if ring:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",))
    spec = P(None, "sp")
    go = jax.shard_map(go, mesh=mesh, in_specs=(spec,) * 4 + ({m: spec for m in extra},),
                       out_specs=spec, check_vma=False)
  return jax.jit(go)(q, k, v, cot, extra)


# A sixth case, mix mode, causal, with masks on one device, is left out: mix
# branches with masks in place run in the third case (local branches on each
# device of the ring), causal ones with masks on one device in the fourth.
@pytest.mark.parametrize("mode,segments,causal,masks,ring,drop", [
    ("mix", ((256, 2048), (1, 2)), True, False, True, False),
    ("partition", ((256, 2048), (1, 2)), True, False, True, False),
    ("mix", ((256, 1024, 2048), (1, 2, 4)), False, True, True, False),
    ("partition", ((512, 1024), (1, 2)), True, True, False, True),
    ("mix", ((256, 2048), (1, 2)), True, False, True, True),
])
def test_glue_matches_the_oracle(bound, mode, segments, causal, masks, ring, drop):
  rng = np.random.default_rng(0)
  b, n, h, kh, d = 1, 2048, 4, 2, 64
  q, cot = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((b, n, kh, d)), jnp.float32) for _ in range(2))
  kw = dict(segment_lengths=segments[0], dilation_rates=segments[1], mode=mode, causal=causal)
  if masks:
    cuts = np.sort(rng.choice(np.arange(1, n), 5, replace=False))
    kw["segment_ids"] = jnp.asarray(np.searchsorted(cuts, np.arange(n), "right")[None],
                                    jnp.int32)
    kw["key_padding_mask"] = jnp.asarray((np.arange(n) < n - 150)[None])
  if drop:
    kw.update(dropout_rate=0.2, dropout_rng=jax.random.key(5))
  want = _out_and_grads("xla", q, k, v, cot, False, **dict(kw))
  got = _out_and_grads(_Bound(), q, k, v, cot, ring, **dict(kw))
  # local branches and the rings' own blocks in place (with their masks and
  # dropout; the first writes new buffers where the branches write every
  # element: in mix mode it keeps every head (rate 1), in partition mode
  # without a ring every branch is alone on its heads); blocks between
  # devices as fresh outputs, with their masks and dropout
  first_new = mode == "mix" or not ring
  # in mix mode the first branch's dq forms delta for every row and head,
  # and the later ones read it
  in_place = {kernel + "_fresh" * (i == 0 and first_new)
              + "_delta" * (kernel == "bwd" and i > 0 and mode == "mix") + "_drop" * drop
              for kernel in ("fwd", "bwd") for i in range(len(segments[0]))}
  blocks = {"fwd_fresh" + "_drop" * drop, "bwd_fresh" + "_drop" * drop} if ring else set()
  assert set(bound) == in_place | blocks
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)


def _kernels_reading(jaxpr, var, skip=None) -> list[str]:
  """The names of the kernels of ``jaxpr`` that read ``var`` or a value
  computed from it (not through the equation ``skip``)."""
  seen, names = {var}, []
  for eqn in jaxpr.eqns:
    if eqn is not skip and seen.intersection(
        x for x in eqn.invars if not isinstance(x, jax.extend.core.Literal)):
      seen.update(eqn.outvars)
      names += [e.params["name"] for e in
                [eqn, *(x for j in harness.nested(eqn) for x in harness.eqns(j))]
                if e.primitive.name == "pallas_call"]
  return names


def test_ring_backward_cuts_its_rows_of_out_before_the_in_place_branches(bound):
  """A ring branch reads only its compacted rows of ``out``. They pass one
  optimization barrier with ``dout``, and every kernel reads ``dout`` from
  it, so XLA cuts the rows before the in-place branches run and ``out`` can
  go once they no longer read it (on mocked rings of 4M tokens per H200, XLA
  cut them late without it and kept all of ``out`` live: 129.3 against
  113.1 GiB per GPU)."""
  rng = np.random.default_rng(0)
  b, n, h, kh, d = 1, 2048, 4, 2, 64
  q, cot = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((b, n, kh, d)), jnp.float32) for _ in range(2))
  kw = dict(segment_lengths=(256, 2048), dilation_rates=(1, 2), mode="mix", causal=True)
  jaxpr = jax.make_jaxpr(lambda *a: _out_and_grads(_Bound(), *a, True, **kw))(q, k, v, cot)
  local = (b, n // 2, h, d)  # dout on each of the ring's 2 devices
  cuts = []
  for sub in harness.jaxprs(jaxpr.jaxpr):
    for eqn in sub.eqns:
      shapes = [x.aval.shape for x in eqn.invars]
      if eqn.primitive.name == "optimization_barrier" and local in shapes:
        # [X, T, K_b, G_b, D]: the rows of the branch of 2048 (a ring of 2)
        assert [s for s in shapes if s != local] == [(b, n // 2 // 2, kh, h // kh, d)]
        i = shapes.index(local)
        cuts.append((_kernels_reading(sub, eqn.invars[i], skip=eqn),
                     _kernels_reading(sub, eqn.outvars[i])))
  assert len(cuts) == 1, cuts  # one backward
  before, after = cuts[0]
  assert not before
  # the in-place branches: 256 of rate 1, and the own block of the ring (512
  # kept tokens per device), each a dq and a dk/dv kernel
  assert {f"ringdilated_{kernel}_{branch}" for kernel in ("dq", "dkv")
          for branch in ("r1_t256", "r2_t512")} <= set(after), after


@pytest.mark.parametrize("per_segment,segments", [(1, 1), (4, 1), (3, 5), (16, 2)])
def test_heavy_first_orders_every_pair_once(per_segment, segments):
  """Causal query-tile pairs: a permutation of the grid that keeps the
  segments in order and runs each one's pairs last (most key tiles) first."""
  n = per_segment * segments
  got = np.array([int(mosaic._heavy_first(jnp.int32(i), per_segment, True)) for i in range(n)])
  assert sorted(got) == list(range(n))
  np.testing.assert_array_equal(got // per_segment, np.arange(n) // per_segment)
  np.testing.assert_array_equal(got % per_segment, per_segment - 1 - np.arange(n) % per_segment)
  plain = [int(mosaic._heavy_first(jnp.int32(i), per_segment, False)) for i in range(n)]
  assert plain == list(range(n))
