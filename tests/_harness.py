"""Helpers shared by the ring tests (not a test module).

Shape legend: B batch, N sequence length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Compiles dominate the run time; LLVM optimization does not change what is
# tested (HLO, buffer assignment, results) and takes half of each compile.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def mesh(p: int) -> jax.sharding.Mesh:
  """A 1-d mesh ``("sp",)`` over the first ``p`` devices (auto axis)."""
  return jax.sharding.Mesh(np.array(jax.devices()[:p]), ("sp",))


def out_and_grads(fn, q, k, v, cot, kpm, seg, *, compile=True):
  """``fn(q, k, v, kpm, seg)`` and d(sum(out * cot))/d(q, k, v).

  ``compile``: one jit around it (else it runs as traced by the caller).
  """
  def run(q, k, v, cot, kpm, seg):
    def loss(q, k, v):
      out = fn(q, k, v, kpm, seg)
      return jnp.sum(out * cot), out
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out,) + grads
  return (jit(run) if compile else run)(q, k, v, cot, kpm, seg)


def max_errs(got, want) -> list[float]:
  """Max abs difference of each pair (out, dq, dk, dv)."""
  return [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want)]
