"""Helpers shared by the ring tests (not a test module).

Shape legend: B batch, N sequence length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import ringdilated as rd

# Compiles dominate the run time; LLVM optimization does not change what is
# tested (HLO, buffer assignment, results) and takes half of each compile.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def mesh(p: int) -> jax.sharding.Mesh:
  """A 1-d mesh ``("sp",)`` over the first ``p`` devices (auto axis)."""
  return jax.sharding.Mesh(np.array(jax.devices()[:p]), ("sp",))


def out_and_grads_fn(fn):
  """``(q, k, v, cot, kpm, seg) -> (out, dq, dk, dv)``: ``out = fn(q, k, v,
  kpm, seg)`` and d(sum(out * cot))/d(q, k, v)."""
  def run(q, k, v, cot, kpm, seg):
    def loss(q, k, v):
      out = fn(q, k, v, kpm, seg)
      return jnp.sum(out * cot), out
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out,) + grads
  return run


def out_and_grads(fn, q, k, v, cot, kpm, seg, *, compile=True):
  """:func:`out_and_grads_fn` of ``fn`` applied to these arguments.

  ``compile``: one jit around it (else it runs as traced by the caller).
  """
  run = out_and_grads_fn(fn)
  return (jit(run) if compile else run)(q, k, v, cot, kpm, seg)


def inputs(b, n, h, hkv, d, *, masks=True, seed=0):
  """q, k, v [B, N, ., D] float32, cotangent, key_padding_mask, segment_ids."""
  rng = np.random.default_rng(seed)
  q, k, v, cot = (jnp.asarray(rng.standard_normal((b, n, x, d)), jnp.float32)
                  for x in (h, hkv, hkv, h))
  if not masks:
    return q, k, v, cot, None, None
  kpm = jnp.asarray(rng.random((b, n)) > 0.25)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, n)), axis=1), jnp.int32)
  return q, k, v, cot, kpm, seg


def zigzag_ring(attend, p: int):
  """``attend(q, k, v)`` under ``shard_map`` on a zigzag ring of ``p`` devices,
  jitted, with inputs and output in natural order."""
  spec = jax.sharding.PartitionSpec(None, "sp")
  ring = jit(jax.shard_map(attend, mesh=mesh(p), in_specs=spec, out_specs=spec))

  def run(*args):
    return rd.from_layout(ring(*(rd.to_layout(x, "zigzag", p) for x in args)), "zigzag", p)
  return run


def max_errs(got, want) -> list[float]:
  """Max abs difference of each pair (out, dq, dk, dv)."""
  return [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want)]
