"""Key padding, segment ids and dropout inside the Pallas kernels.

Run here in Pallas interpret mode (the same kernel code the Triton build
runs; ``test_kernels_lower_to_triton`` lowers every variant for a GPU
without one). Outputs and q/k/v gradients are compared with the dense
oracle, dropout with the XLA block on the same key, rings with one device;
tile skipping is observed by poisoning one key tile per batch row and
counting which tiles reach the output.

Shape legend: B batch, N sequence length, P ring size, H query heads,
K kv heads, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _harness import cuda_text, max_errs, mesh, out_and_grads

import ringdilated as rd
from ringdilated import _plan, _ring
from ringdilated._backends import pallas
from ringdilated.reference import dilated_attention_reference

TOL = 2e-5
N, H, HKV, D = 128, 4, 2, 16
# Documents of 3..50 tokens: some shorter than a 16-token tile, most crossing
# the 16/32/64-token segments of the branches below.
DOCS = (5, 20, 3, 50, 30, 20)


def _inputs(seed: int = 0, b: int = 1):
  rng = np.random.default_rng(seed)
  q, k, v, cot = (jnp.asarray(rng.standard_normal((b, N, x, D)), jnp.float32)
                  for x in (H, HKV, HKV, H))
  seg = jnp.asarray(np.repeat(np.arange(len(DOCS)), DOCS)[None].repeat(b, 0), jnp.int32)
  kpm = np.ones((b, N), bool)
  kpm[:, 50:60] = False     # padding in the middle
  kpm[:, -10:] = False      # and at the end
  kpm[:, 25:28] = False     # the whole 3-token document: its queries see no key
  return q, k, v, cot, jnp.asarray(kpm), seg


def _attend(backend: str, **kw):
  def attend(q, k, v, kpm, seg):
    return rd.dilated_attention(q, k, v, key_padding_mask=kpm, segment_ids=seg,
                                backend=backend, **kw)
  return attend


def _oracle(**kw):
  def attend(q, k, v, kpm, seg):
    return dilated_attention_reference(q, k, v, key_padding_mask=kpm, segment_ids=seg, **kw)
  return attend


@pytest.mark.parametrize("mode,causal,masks", [
    ("mix", True, "both"),
    ("mix", False, "padding"),
    ("partition", True, "segments"),
    ("partition", False, "both"),
])
def test_masks_match_dense_oracle(mode, causal, masks):
  """Local branches read in place (r = 1, 2, 4) and a whole-sequence branch,
  GQA, with padding and/or packed documents: outputs and gradients."""
  q, k, v, cot, kpm, seg = _inputs()
  kpm = kpm if masks in ("both", "padding") else None
  seg = seg if masks in ("both", "segments") else None
  kw = dict(segment_lengths=(16, 32, 64, 128), dilation_rates=(1, 2, 4, 1),
            mode=mode, causal=causal)
  got = out_and_grads(_attend("pallas", **kw), q, k, v, cot, kpm, seg)
  want = out_and_grads(_oracle(**kw), q, k, v, cot, kpm, seg)
  assert max(max_errs(got, want)) < TOL, max_errs(got, want)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in got)
  if kpm is not None and seg is not None:  # a fully padded document sees nothing
    np.testing.assert_array_equal(np.asarray(got[0])[0, 25:28], 0.0)
  unmasked = out_and_grads(_oracle(**kw), q, k, v, cot, None, None)
  assert max(max_errs(got, unmasked)) > 1e-2  # the masks did something


def test_dropout_equals_the_xla_block():
  """Same key, same dropped weights: the kernels hash (seed, head, query
  position, key position) as the XLA block does, forward and backward."""
  q, k, v, cot, kpm, seg = _inputs(1)
  kw = dict(segment_lengths=(16, 64, 128), dilation_rates=(1, 2, 2), causal=True,
            dropout_rate=0.3, dropout_rng=jax.random.key(7))
  got = out_and_grads(_attend("pallas", **kw), q, k, v, cot, kpm, seg)
  want = out_and_grads(_attend("xla", **kw), q, k, v, cot, kpm, seg)
  assert max(max_errs(got, want)) < TOL, max_errs(got, want)
  plain = out_and_grads(_attend("xla", **{**kw, "dropout_rate": 0.0}), q, k, v, cot, kpm, seg)
  assert max(max_errs(got, plain)) > 1e-1  # dropout dropped something


# Rings of 4, whose middle branch runs on sub-rings of 2 (contiguous: w = 2L;
# zigzag: w = 2C, mirrored pairs), so both ring sizes run in both layouts.
# (Whole rings of 2 with the kernels as blocks: test_pallas's zigzag ring and
# test_mosaic's glue rings, masked and dropped.)
@pytest.mark.parametrize("p,layout,segments", [
    (4, "contiguous", (16, 64, 128)),
    # One ring: XLA:CPU's rendezvous aborts on this 4-device zigzag ring when
    # two sub-rings run next to interpreted kernels (simulated devices only).
    (4, "zigzag", (16, 32, 128))])
def test_masked_ring_equals_one_device(p, layout, segments):
  """Ring blocks (Pallas kernels with r = 1 on compacted chunks) and local
  branches in place, with padding, documents and dropout, on sub-rings of 2
  and rings of 4 in both layouts."""
  q, k, v, cot, kpm, seg = _inputs(2)
  kw = dict(segment_lengths=segments, dilation_rates=(1, 2, 4), causal=True,
            dropout_rate=0.2, dropout_rng=jax.random.key(1, impl="rbg"))
  want = out_and_grads(_attend("xla", **kw), q, k, v, cot, kpm, seg)

  def attend(q, k, v, cot, kpm, seg):
    return out_and_grads(_attend("pallas", axis_name="sp", layout=layout, **kw),
                         q, k, v, cot, kpm, seg, compile=False)
  # Pallas' interpreter mistypes its grid loop under shard_map's varying-axes
  # check (jax 0.10); the Triton build runs with the check (check_gpu.py).
  spec = jax.sharding.PartitionSpec(None, "sp")
  sharded = jax.jit(jax.shard_map(attend, mesh=mesh(p), in_specs=spec, out_specs=spec,
                                  check_vma=False))
  got = sharded(*(rd.to_layout(x, layout, p) for x in (q, k, v, cot, kpm, seg)))
  got = [rd.from_layout(x, layout, p) for x in got]
  assert max(max_errs(got, want)) < TOL, max_errs(got, want)


def _poisoned(b: int, tile: int | None):
  """q, k, v [b, 128, 1, 16]; batch row ``i`` has NaN values in key tile
  ``i`` only (none if ``tile`` is None)."""
  rng = np.random.default_rng(3)
  q, k, v = (rng.standard_normal((b, 128, 1, 16)).astype(np.float32) for _ in range(3))
  for i in range(b if tile else 0):
    v[i, i * tile:(i + 1) * tile] = np.nan
  return tuple(jnp.asarray(x) for x in (q, k, v))


def _tiles_reaching(out: np.ndarray, tile: int) -> np.ndarray:
  """[query tiles, key tiles] bool: poisoned key tile j (batch row j) made
  query tile i NaN, i.e. the kernel computed that pair of tiles."""
  bad = np.isnan(np.asarray(out)).any(axis=(2, 3))  # [key tile = batch, N]
  return bad.reshape(bad.shape[0], -1, tile).any(axis=2).T


def test_tile_skipping_really_happens():
  """With 16-token tiles and documents of 64 tokens, the forward computes a
  query tile against the 4 key tiles of its document only; a masked key
  inside a computed tile would poison the output (0 * NaN), so counting
  NaN outputs counts computed tiles. Negative control: without segment ids
  every tile is computed (8 per query tile)."""
  tiles = pallas.KernelTiles(*(pallas.Tiles(16, 16, 4, 1) for _ in range(3)))
  backend = pallas.Pallas(tiles=tiles)
  q, k, v = _poisoned(8, 16)
  seg = jnp.asarray(np.repeat([[0, 1]], 64, axis=1).reshape(1, 128).repeat(8, 0), jnp.int32)
  attend = functools.partial(rd.dilated_attention, segment_lengths=(128,),
                             dilation_rates=(1,), backend=backend)
  computed = _tiles_reaching(jax.jit(attend)(q, k, v, segment_ids=seg), 16)
  doc = np.arange(8) // 4
  np.testing.assert_array_equal(computed, doc[:, None] == doc[None, :])
  assert computed.sum(axis=1).tolist() == [4] * 8
  everything = _tiles_reaching(jax.jit(attend)(q, k, v), 16)
  assert everything.sum(axis=1).tolist() == [8] * 8
  # Whole documents of whole tiles take the kernels' unmasked loop: still exact.
  clean = _poisoned(2, None)
  kw = dict(segment_lengths=(128,), dilation_rates=(1,), causal=True)
  got = out_and_grads(lambda q, k, v, kpm, seg: attend(q, k, v, segment_ids=seg, causal=True),
                      *clean, clean[0], None, seg[:2])
  want = out_and_grads(_oracle(**kw), *clean, clean[0], None, seg[:2])
  assert max(max_errs(got, want)) < TOL, max_errs(got, want)

  # Backward: dk/dv of a key tile loop over the query tiles of its document
  # only (poisoned cotangents of the other document never reach them).
  cot = np.ones((8, 128, 1, 16), np.float32)
  for i in range(8):
    cot[i, i * 16:(i + 1) * 16] = np.nan
  q, k, v = _poisoned(8, None)
  grads = jax.jit(lambda q, k, v, cot: jax.vjp(
      lambda q, k, v: attend(q, k, v, segment_ids=seg), q, k, v)[1](cot))
  _, dk, dv = grads(q, k, v, jnp.asarray(cot))
  for grad in (dk, dv):
    reached = _tiles_reaching(grad, 16).T  # [query tile poisoned, key tile]
    np.testing.assert_array_equal(reached, doc[:, None] == doc[None, :])


def test_partially_padded_tail_is_skipped():
  """Trailing all-padding key tiles are dead: poisoned values there never
  reach a real query, whatever its document."""
  tiles = pallas.KernelTiles(*(pallas.Tiles(16, 16, 4, 1) for _ in range(3)))
  backend = pallas.Pallas(tiles=tiles)
  q, k, v = _poisoned(8, 16)
  kpm = jnp.asarray(np.arange(128)[None].repeat(8, 0) < 96)  # last 2 tiles padding
  out = jax.jit(functools.partial(rd.dilated_attention, segment_lengths=(128,),
                                  dilation_rates=(1,), backend=backend))(
                                      q, k, v, key_padding_mask=kpm)
  computed = _tiles_reaching(out, 16)
  assert computed[:, :6].all() and not computed[:, 6:].any()


@pytest.mark.parametrize("masks,dropout", [(False, False), (True, False), (True, True)])
def test_kernels_lower_to_triton(masks, dropout):
  """Every kernel variant lowers to Triton IR for a GPU (no GPU needed):
  the ops of the masks and the dropout hash exist in the Triton lowering."""
  config = rd.DilatedConfig((64, 128, 256), (1, 2, 4), causal=True,
                            dropout_rate=0.1 if dropout else 0.0)
  static = _ring.Static(_plan.make_plan(config, 256, 4, 2), 0.25, config.dropout_rate,
                        None, pallas.Pallas())
  s = jax.ShapeDtypeStruct

  def fwd_bwd(q, k, v, kpm, seg, key, cot):
    out, pull = jax.vjp(
        lambda q, k, v: _ring.attention(static, q, k, v, kpm, seg, key), q, k, v)
    return out, pull(cot)
  x = s((1, 256, 4, 64), jnp.bfloat16)
  kv = s((1, 256, 2, 64), jnp.bfloat16)
  text = cuda_text(fwd_bwd, x, kv, kv, s((1, 256), jnp.bool_) if masks else None,
                   s((1, 256), jnp.int32) if masks else None,
                   jax.random.key(0) if dropout else None, x)
  assert text.count("__gpu$xla.gpu.triton") == 9  # 3 branches x fwd, dq, dkv
