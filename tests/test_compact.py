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
