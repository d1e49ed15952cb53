"""Scratch (session 25): why the higher-rate partition branches cost more per unit of work."""
import collections, functools, sys
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp
import bench, profile_kernels as pk

def run(name, n, h, seg, rate):
  key = jax.random.split(jax.random.key(n + seg), 4)
  q, k, v, dout = (jax.random.normal(kk, (1, n, h, 128), jnp.bfloat16) for kk in key)
  impl = lambda q, k, v: bench.ours(q, k, v, segment_lengths=(seg,), dilation_rates=(rate,), backend="mosaic")
  units = n // seg * h  # segment-heads of 2048 kept tokens
  wall, ev = pk.timed_trace(bench.fwd_bwd(impl), (q, k, v, dout), 5)
  per = collections.defaultdict(float)
  for nm, us in ev:
    per[nm.split("_r")[0].replace("ringdilated_mgpu_", "") if nm.startswith("ringdilated") else "xla"] += us / 5e3
  print(f"{name:34s} units {units:5d}  " + "  ".join(f"{kk} {ms:7.3f} ({ms / units * 2048:6.3f} per 2048)" for kk, ms in sorted(per.items())), flush=True)

run("A r1 N=1M H=4", 1 << 20, 4, 2048, 1)
run("B r1 N=128K H=4 (r8's grid)", 1 << 17, 4, 2048, 1)
run("C r8 seg 16384 N=1M H=4", 1 << 20, 4, 16384, 8)
run("D r8 seg 16384 N=1M H=16", 1 << 20, 16, 16384, 8)
run("E r1 N=256K H=16", 1 << 18, 16, 2048, 1)
