"""Helpers shared by the tests (not a test module).

One place for what every comparison needs: inputs, the mesh, a ring of the
single-device function, outputs and gradients in one jit, and tolerances
(re-exported from :mod:`ringdilated.testing`, the ones users test with).
Every program compiles at LLVM optimization level 0 (``tests/conftest.py``).

Shape legend: B batch, N global sequence length, P ring size, H query heads,
K kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringdilated as rd
from ringdilated.reference import dilated_attention_reference
from ringdilated.testing import TOLERANCES as TOLERANCES
from ringdilated.testing import assert_matches_reference as assert_matches_reference
from ringdilated.testing import tolerance as tolerance

# Max abs error of a ring against the same call on one device, float32
# (observed ~1e-6: the two sum the same float32 terms in other orders).
RING_TOL = 1e-5


def mesh(p: int) -> jax.sharding.Mesh:
  """A 1-d mesh ``("sp",)`` over the first ``p`` devices (auto axis)."""
  return jax.sharding.Mesh(np.array(jax.devices()[:p]), ("sp",))


def cuda_text(fn, *args, devices: int = 1) -> str:
  """StableHLO of ``jax.jit(fn)(*args)`` lowered for CUDA here, with no GPU.

  jax >= 0.11 asks the device kind when it lowers a Triton kernel, so this
  lowers under a mesh of abstract H200s: ``("sp",)`` of ``devices`` (a
  ``shard_map`` in ``fn`` takes it from :func:`gpu_mesh`)."""
  with jax.sharding.use_abstract_mesh(gpu_mesh(devices)):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def gpu_mesh(p: int) -> jax.sharding.AbstractMesh:
  """A 1-d mesh ``("sp",)`` of ``p`` abstract H200s (see :func:`cuda_text`)."""
  h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
  kind = jax.sharding.AxisType.Auto if p > 1 else jax.sharding.AxisType.Explicit
  return jax.sharding.AbstractMesh((p,), ("sp",), (kind,), abstract_device=h200)


def attention(**kw):
  """``(q, k, v, kpm, seg) -> rd.dilated_attention(q, k, v,
  key_padding_mask=kpm, segment_ids=seg, **kw)``."""
  def attend(q, k, v, kpm, seg):
    return rd.dilated_attention(q, k, v, key_padding_mask=kpm, segment_ids=seg, **kw)
  return attend


def settings(config: rd.DilatedConfig) -> dict:
  """The fields of ``config`` as keyword arguments of ``rd.dilated_attention``."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def with_config(config: rd.DilatedConfig):
  """``(q, k, v) -> rd.dilated_attention(q, k, v, **settings(config))``."""
  return functools.partial(rd.dilated_attention, **settings(config))


def reference(**kw):
  """:func:`attention` of the dense oracle ``dilated_attention_reference``."""
  def attend(q, k, v, kpm, seg):
    return dilated_attention_reference(q, k, v, key_padding_mask=kpm, segment_ids=seg, **kw)
  return attend


def ring(attend, p: int, layout: str = "contiguous", *, check_vma: bool = True):
  """``attend`` (called on local shards, e.g. ``attention(axis_name="sp")``)
  under ``shard_map`` over :func:`mesh` ``(p)``, not jitted: global arrays
  [B, N, ...] in natural order in and out; the ring sees them in ``layout``."""
  spec = jax.sharding.PartitionSpec(None, "sp")
  sharded = jax.shard_map(attend, mesh=mesh(p), in_specs=spec, out_specs=spec,
                          check_vma=check_vma)
  if layout == "contiguous":
    return sharded

  def run(*args):
    laid_out = (None if x is None else rd.to_layout(x, layout, p) for x in args)
    return rd.from_layout(sharded(*laid_out), layout, p)
  return run


def out_and_grads_fn(fn):
  """``(q, k, v, cot, kpm, seg) -> (out, dq, dk, dv)``: ``out = fn(q, k, v,
  kpm, seg)`` and d(sum(out * cot))/d(q, k, v), the sum in float32."""
  def run(q, k, v, cot, kpm, seg):
    def loss(q, k, v):
      out = fn(q, k, v, kpm, seg)
      return jnp.sum(out.astype(jnp.float32) * cot), out
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out,) + grads
  return run


def out_and_grads(fn, q, k, v, cot, kpm, seg, *, compile=True):
  """:func:`out_and_grads_fn` of ``fn`` applied to these arguments.

  ``compile``: one jit around it (else it runs as traced by the caller).
  """
  run = out_and_grads_fn(fn)
  return (jax.jit(run) if compile else run)(q, k, v, cot, kpm, seg)


def inputs(b, n, h, hkv, d, *, masks=True, seed=0, dtype=jnp.float32):
  """q [B, N, H, D], k, v [B, N, K, D] in ``dtype``, cotangent [B, N, H, D]
  float32 (all standard normal), key_padding_mask (a quarter padding) and
  sorted segment_ids [B, N] (three segments), or None twice without masks."""
  rng = np.random.default_rng(seed)
  q, k, v, cot = (rng.standard_normal((b, n, x, d)) for x in (h, hkv, hkv, h))
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  cot = jnp.asarray(cot, jnp.float32)
  if not masks:
    return q, k, v, cot, None, None
  kpm = jnp.asarray(rng.random((b, n)) > 0.25)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, n)), axis=1), jnp.int32)
  return q, k, v, cot, kpm, seg


def zigzag_ring(attend, p: int):
  """``attend(q, k, v)`` under ``shard_map`` on a zigzag ring of ``p`` devices,
  jitted, with inputs and output in natural order."""
  spec = jax.sharding.PartitionSpec(None, "sp")
  sharded = jax.jit(jax.shard_map(attend, mesh=mesh(p), in_specs=spec, out_specs=spec))

  def run(*args):
    return rd.from_layout(sharded(*(rd.to_layout(x, "zigzag", p) for x in args)), "zigzag", p)
  return run


def nested(eqn):
  """The jaxprs in ``eqn``'s parameters, none for a Pallas kernel's body."""
  if eqn.primitive.name == "pallas_call":
    return
  for value in eqn.params.values():
    for sub in value if isinstance(value, (tuple, list)) else (value,):
      sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
      if hasattr(sub, "eqns"):
        yield sub


def jaxprs(jaxpr):
  """``jaxpr`` and every jaxpr nested in it (:func:`nested`)."""
  yield jaxpr
  for eqn in jaxpr.eqns:
    for sub in nested(eqn):
      yield from jaxprs(sub)


def eqns(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it (:func:`jaxprs`)."""
  for sub in jaxprs(jaxpr):
    yield from sub.eqns


def max_errs(got, want) -> list[float]:
  """Max abs difference of each pair (out, dq, dk, dv), in float32."""
  return [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
          for a, b in zip(got, want)]


def named(errs) -> dict[str, float]:
  """``{"out": .., "dq": .., "dk": .., "dv": ..}`` of :func:`max_errs`."""
  return dict(zip(("out", "dq", "dk", "dv"), errs))


def ring_cases(cases):
  """``pytest.mark.parametrize`` over ``(p, mode, causal)`` triples, named
  like ``4-mix-causal``."""
  return pytest.mark.parametrize(
      "p,mode,causal", cases, ids=[f"{p}-{m}-{'causal' if c else 'full'}" for p, m, c in cases])
