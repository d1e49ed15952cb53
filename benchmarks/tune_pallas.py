"""Sweeps the Pallas kernels' tiles, warps and stages on this GPU.

Run on a GPU machine: ``python benchmarks/tune_pallas.py [fwd|dq|dkv ...]``
(default: all three). Each kernel is
varied alone, the others at the default ``backends.KernelTiles()``; prints the forward (for
``fwd``) or forward+backward time of a dense causal 32K sequence and of the
LongNet mix configuration at 256K (bf16, B=1, H=16, D=128).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ringdilated as rd
from ringdilated import backends

CANDIDATES = {
    "fwd": [(128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3),
            (64, 64, 4, 3), (128, 64, 8, 3)],
    "dq": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 4, 3),
           (128, 32, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2)],
    "dkv": [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 128, 4, 3),
            (64, 128, 4, 3), (128, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3),
            (64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (128, 64, 8, 2)],
}
WORKLOADS = {
    "dense32K": (32768, dict(segment_lengths=(32768,), dilation_rates=(1,))),
    "longnet256K": (262144, dict(segment_lengths=(2048, 4096, 8192, 16384),
                                 dilation_rates=(1, 2, 4, 8))),
}


def _time(fn, args, iters=5):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def main(argv) -> int:
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  default = backends.KernelTiles()
  kernels = argv[1:] or list(CANDIDATES)
  for wname, (n, cfg) in WORKLOADS.items():
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.standard_normal((1, n, 16, 128)), jnp.bfloat16)
                   for _ in range(4))
    for kernel in kernels:
      for cand in CANDIDATES[kernel]:
        tiles = dataclasses.replace(default, **{kernel: backends.Tiles(*cand)})
        backend = dataclasses.replace(backends.REGISTRY["pallas"], tiles=tiles)
        attn = functools.partial(rd.dilated_attention, causal=True, backend=backend, **cfg)
        try:
          if kernel == "fwd":
            ms = _time(jax.jit(attn), (q, k, v))
          else:
            ms = _time(jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do)),
                       (q, k, v, do))
          print(f"{wname:12s} {kernel:4s} {cand} {ms:9.3f} ms", flush=True)
        except Exception as e:  # a config that does not compile is reported
          print(f"{wname:12s} {kernel:4s} {cand} ERROR {type(e).__name__}: "
                f"{str(e)[:120]}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
