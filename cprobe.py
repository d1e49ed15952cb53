"""Scratch (session 25): what the partition branches' zero writes (clears) cost. NOCLEAR=1 turns them off
(timing only: the rows the kernels would zero then hold garbage)."""
import collections, functools, os, sys
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp
import bench, profile_kernels as pk
from ringdilated._backends import mosaic
if os.environ.get("NOCLEAR") == "1":
  mosaic._Launch.clears = property(lambda self: False)

def run(name, impl, n, h=16):
  key = jax.random.split(jax.random.key(n), 4)
  q, k, v, dout = (jax.random.normal(kk, (1, n, h, 128), jnp.bfloat16) for kk in key)
  fn = bench.fwd_bwd(impl)
  wall, ev = pk.timed_trace(fn, (q, k, v, dout), 5)
  med = bench._median_ms(fn, (q, k, v, dout), 30, seconds=3.0)
  per = collections.defaultdict(float)
  for nm, us in ev:
    per[nm.split("_t")[0].replace("ringdilated_mgpu_", "") if nm.startswith("ringdilated") else "xla"] += us / 5e3
  tag = "noclear" if os.environ.get("NOCLEAR") == "1" else "clears "
  print(f"{tag} {name:22s} median {med:7.2f} device {sum(per.values()):7.2f}  " + " ".join(f"{kk} {ms:6.3f}" for kk, ms in sorted(per.items())), flush=True)

run("C r8 N=1M H=4", lambda q, k, v: bench.ours(q, k, v, segment_lengths=(16384,), dilation_rates=(8,), backend="mosaic"), 1 << 20, 4)
run("partition 1M", functools.partial(bench.ours, mode="partition", **bench.LONGNET), 1 << 20)
