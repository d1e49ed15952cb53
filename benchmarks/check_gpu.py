"""GPU correctness check of a fast backend against the XLA block.

Run on a GPU machine: ``python benchmarks/check_gpu.py [cudnn|pallas ...]``
(default: both). Prints the max relative error of outputs and q/k/v
gradients of the backend against
``backend="xla"`` computed in float32 from the same bf16 inputs, for dense and
dilated configurations, causal and not, single device and a 1-device ring.
Exits non-zero if an error exceeds the bf16 tolerance.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import ringdilated as rd
from ringdilated import backends

TOL = 2e-2  # relative L2 error, bf16 inputs against float32 math


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _run(q, k, v, cot, backend, ring, **kw):
  fn = functools.partial(rd.dilated_attention, backend=backend, **kw)
  if ring:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
    fn = jax.shard_map(functools.partial(fn, axis_name="sp"), mesh=mesh,
                       in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))

  @jax.jit
  def go(q, k, v):
    out, pull = jax.vjp(fn, q, k, v)
    return (out,) + pull(cot.astype(out.dtype))
  return go(q, k, v)


def main(argv) -> int:
  print("jax", jax.__version__, jax.devices()[0].device_kind)
  request = backends.Request(jax.default_backend(), jnp.dtype(jnp.bfloat16), 128, False, False)
  picked = backends.select("cudnn", request)
  print("cudnn selected:", picked.name)
  if picked.name != "cudnn":
    return 1
  backends = argv[1:] or ["cudnn", "pallas"]
  rng = np.random.default_rng(0)
  worst = 0.0
  cases = [
      dict(segment_lengths=(4096,), dilation_rates=(1,)),
      dict(segment_lengths=(512, 1024, 2048, 4096), dilation_rates=(1, 2, 4, 8)),
      dict(segment_lengths=(512, 1024, 2048, 4096), dilation_rates=(1, 2, 4, 8),
           mode="partition"),
  ]
  for backend, kw in ((b, kw) for b in backends for kw in cases):
    for causal in (False, True):
      for ring in (False, True):
        b, n, h, hkv, d = 2, 4096, 8, 4, 128
        q = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((b, n, hkv, d)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((b, n, hkv, d)), jnp.bfloat16)
        cot = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
        got = _run(q, k, v, cot, backend, ring, causal=causal, **kw)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        want = _run(*f32, cot, "xla", False, causal=causal, **kw)
        errs = [_rel(g, w) for g, w in zip(got, want)]
        ok = all(np.isfinite(errs)) and max(errs) < TOL
        worst = max(worst, max(errs))
        print(f"{backend:6s} {kw.get('mode', 'mix'):9s} w={kw['segment_lengths']} causal={causal!s:5} "
              f"ring={ring!s:5} rel err out/dq/dk/dv = "
              + " ".join(f"{e:.1e}" for e in errs) + ("" if ok else "  FAIL"))
  print(f"worst relative error {worst:.2e} (tolerance {TOL})")
  return 0 if worst < TOL else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
