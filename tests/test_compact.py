"""Compaction and its in-place inverses (the scatters that write a branch's
results at the positions it keeps) against the transposes jax derives.

Shape legend: B batch, L local length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringdilated as rd
from ringdilated import _compact, _plan

B, L, H, K, D = 2, 64, 4, 2, 3


def _branches(mode: str):
  plan = _plan.make_plan(rd.DilatedConfig((16, 32, 64), (1, 2, 4), mode), L, H, K)
  return plan.branches


def _arrays(seed: int = 0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32),
          jnp.asarray(rng.standard_normal((B, L, K, D)), jnp.float32))


@pytest.mark.parametrize("mode", ["mix", "partition"])
def test_update_and_add_are_the_compaction_transposes(mode):
  q, k = _arrays()
  for br in _branches(mode):
    qc, kc = _compact.compact_q(br, q), _compact.compact_kv(br, k)
    pull_q = jax.vjp(functools.partial(_compact.compact_q, br), q)[1]
    np.testing.assert_allclose(_compact.add_q(br, q, qc), q + pull_q(qc)[0], atol=1e-6)
    if _compact.distinct_kv(br):
      pull_kv = jax.vjp(functools.partial(_compact.compact_kv, br), k)[1]
      np.testing.assert_allclose(_compact.add_kv(br, k, kc), k + pull_kv(kc)[0], atol=1e-6)
    # update_q writes the kept entries and leaves the others alone
    new = _compact.update_q(br, q, 2 * qc + 1)
    np.testing.assert_allclose(_compact.compact_q(br, new), 2 * qc + 1, atol=1e-6)
    untouched = np.asarray(q + pull_q(jnp.ones_like(qc))[0] == q)  # not kept
    np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(q)[untouched])


def test_partition_group_cutting_a_gqa_group_reads_a_kv_head_twice():
  """Such a branch has no in-place kv scatter: the ring falls back to the
  transpose, which sums the two slots of the shared kv head."""
  plan = _plan.make_plan(rd.DilatedConfig((16, 32, 64), (1, 2, 4), "partition"), L, 6, 2)
  assert not all(_compact.distinct_kv(br) for br in plan.branches)


def _compact_oracle(br, x: np.ndarray, heads: tuple[int, ...]) -> np.ndarray:
  """[B, L, ...] -> [X, T, K_b, ...] by loops: slot j of piece i, token t is
  position ``i * piece + t * rate + offsets[j]`` of head ``heads[j]``."""
  b, length = x.shape[:2]
  pieces = length // br.piece
  out = np.zeros((b * pieces, br.kept, len(heads)) + x.shape[3:], x.dtype)
  for bi in range(b):
    for i in range(pieces):
      for t in range(br.kept):
        for j, (head, off) in enumerate(zip(heads, br.offsets)):
          out[bi * pieces + i, t, j] = x[bi, i * br.piece + t * br.rate + off, head]
  return out


@pytest.mark.parametrize("h, kv, rates, mode", [
    (8, 4, (1, 2, 8), "mix"),        # r = 8 >= K: consecutive offsets 0..3
    (8, 4, (2, 4, 16), "mix"),       # r = 2 < K: offsets wrap (0, 1, 0, 1)
    (8, 8, (1, 4, 16), "mix"),
    (8, 4, (1, 2, 8), "partition"),  # one offset per branch
])
def test_compaction_keeps_each_slots_offset(h, kv, rates, mode):
  """compact_q, compact_kv and compact_token against loops over positions,
  for each way of laying out offsets (one, consecutive, wrapping)."""
  length = 128
  plan = _plan.make_plan(rd.DilatedConfig((16, 32, 64), rates, mode), length, h, kv)
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, length, h, D)).astype(np.float32)
  k = rng.standard_normal((2, length, kv, D)).astype(np.float32)
  ids = rng.integers(0, 9, (2, length)).astype(np.int32)
  for br in plan.branches:
    kc = np.asarray(_compact.compact_kv(br, jnp.asarray(k)))
    np.testing.assert_array_equal(kc, _compact_oracle(br, k, br.kv_heads))
    g = br.group
    qc = np.asarray(_compact.compact_q(br, jnp.asarray(q)))
    for i in range(g):  # query head a + j * G_b + i reads slot j
      heads = tuple(br.q_heads[0] + j * g + i for j in range(br.num_kv))
      np.testing.assert_array_equal(qc[:, :, :, i], _compact_oracle(br, q, heads))
    tc = np.asarray(_compact.compact_token(br, jnp.asarray(ids)))
    per_slot = np.broadcast_to(ids[:, :, None], (*ids.shape, br.num_kv))
    np.testing.assert_array_equal(tc, _compact_oracle(br, per_slot, tuple(range(br.num_kv))))


def test_consecutive_offsets_are_one_strided_slice():
  """Offsets 0..K-1 (mix, r >= K) are read by a strided slice, not by a
  masked sum over every position."""
  plan = _plan.make_plan(rd.DilatedConfig((16, 64), (1, 8), "mix"), 128, 8, 4)
  br = plan.branches[1]
  assert br.offsets == (0, 1, 2, 3)
  k = jax.ShapeDtypeStruct((2, 128, 4, D), jnp.float32)
  prims = {e.primitive.name
           for e in jax.make_jaxpr(functools.partial(_compact.compact_kv, br))(k).jaxpr.eqns}
  assert "reduce_sum" not in prims and "slice" in prims, prims
  # and written back by one in-place update per slot, not a full-size select
  kc = jax.eval_shape(functools.partial(_compact.compact_kv, br), k)
  eqns = jax.make_jaxpr(functools.partial(_compact.add_kv, br))(k, kc).jaxpr.eqns
  names = [e.primitive.name for e in eqns]
  assert names.count("dynamic_update_slice") == 4 and "select_n" not in names, names
  # and the updated buffer leaves through a barrier (no consumer fuses the updates)
  last_update = max(i for i, n in enumerate(names) if n == "dynamic_update_slice")
  assert "optimization_barrier" in names[last_update:], names
