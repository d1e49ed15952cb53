"""What a program costs under load: the Hopper kernels and cuDNN over one
causal branch of rate 1 at several segment lengths (kept tokens), the
number of 128-row query tiles fixed.

LongNet's branches run short segments (2048 kept tokens in every branch of
its partition mode), where a program's fixed part (its own rows' load, the
epilogue) weighs most. At ``--length`` tokens and ``--heads`` heads the
forward has ``length * heads / 128`` query tiles at every ``--kept``, of
``(kept / 128 + 1) / 2`` key steps on average, so its time is linear in
that mean: the fit's slope is a step's cost and its intercept the fixed
part, both per tile and SM in microseconds. The same for cuDNN on the
segments compacted into the batch (``[length / kept, kept, heads, D]``,
what a by-hand baseline hands it), and for both backwards (fit against the
same mean; ours is ``dq`` and dk/dv, cuDNN's is its fwd+bwd less its
forward). Every loop runs back to back for about ``--seconds`` and records
the SM clock, the share of samples held by the power cap and the mean
power (``bench.sampled_clocks``)::

  python benchmarks/kept_sweep.py --json benchmarks/results/kept_sweep_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402  (fwd_bwd, the clock sampler, the run name)

_TILE = 128  # query rows per forward program


def _loop_ms(fn, args, seconds: float, rec: dict) -> None:
  """``rec["ms"]``: the mean time of back-to-back calls (one sync at the end)
  over about ``seconds``, and what the GPU ran at meanwhile."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(3, int(seconds / (time.perf_counter() - t0)))
  with bench.sampled_clocks(jax.devices()[0], rec):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    rec["ms"] = (time.perf_counter() - t0) * 1e3 / calls


def fit(steps, ms, tiles_per_sm: float) -> dict:
  """``ms = fixed + per_step * steps`` by least squares, in microseconds per
  tile and SM."""
  per_step, fixed = np.polyfit(np.asarray(steps, float), np.asarray(ms, float), 1)
  return dict(fixed_us=float(fixed / tiles_per_sm * 1e3),
              step_us=float(per_step / tiles_per_sm * 1e3))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--length", type=int, default=262144)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--kept", default="512,1024,2048,4096,8192")
  p.add_argument("--seconds", type=float, default=3.0,
                 help="of each loop (aimed; no mean power where a loop runs under "
                 "bench.POWER_WINDOW_S)")
  p.add_argument("--json")
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ringdilated._backends import mosaic  # pylint: disable=g-import-not-at-top
  from ringdilated._backends.base import StridedBranch  # pylint: disable=g-import-not-at-top

  n, h, d = args.length, args.heads, args.head_dim
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(x, (1, n, h, d), jnp.bfloat16) for x in keys)
  recs = []
  for kept in (int(x) for x in args.kept.split(",")):
    geo = StridedBranch(kept=kept, rate=1, heads=(0, h), group=1, offset=None, causal=True,
                        scale=d ** -0.5)
    tiles = mosaic.TUNED[d]
    seg = lambda x, kept=kept: x.reshape(n // kept, kept, h, d)  # noqa: E731
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation="cudnn")
    fns = dict(ours_fwd=jax.jit(lambda q, k, v, geo=geo: mosaic.forward(geo, tiles, q, k, v)),
               cudnn_fwd=jax.jit(lambda q, k, v, seg=seg: cudnn(seg(q), seg(k), seg(v))),
               cudnn_fwd_bwd=bench.fwd_bwd(lambda q, k, v, seg=seg: cudnn(seg(q), seg(k),
                                                                          seg(v))))
    out, lse = fns["ours_fwd"](q, k, v)
    fns["ours_bwd"] = jax.jit(lambda q, k, v, do, lse, out, geo=geo: mosaic.backward(
        geo, tiles, q, k, v, do, lse, out))
    rec = dict(kept=kept, steps=(kept / _TILE + 1) / 2)
    for name, fn in fns.items():
      args_ = {"ours_bwd": (q, k, v, do, lse, out),
               "cudnn_fwd_bwd": (q, k, v, seg(do))}.get(name, (q, k, v))
      _loop_ms(fn, args_, args.seconds, rec.setdefault(name, {}))
    del out, lse
    rec["cudnn_bwd"] = dict(ms=rec["cudnn_fwd_bwd"]["ms"] - rec["cudnn_fwd"]["ms"])
    print(f"kept {kept:6d}: " + "  ".join(
        f"{name} {r['ms']:7.3f} ms" + (f" {r['sm_clock_mhz']:.0f} MHz {r['power_w']:.0f} W"
                                       if "power_w" in r and "sm_clock_mhz" in r else "")
        for name, r in rec.items() if isinstance(r, dict)), flush=True)
    recs.append(rec)
  tiles_per_sm = n * h / _TILE / jax.devices()[0].core_count  # (132 SMs on an H200)
  summary = {name: fit([r["steps"] for r in recs], [r[name]["ms"] for r in recs], tiles_per_sm)
             for name in ("ours_fwd", "cudnn_fwd", "ours_bwd", "cudnn_bwd")} if len(recs) > 1 else {}
  for name, f in summary.items():
    print(f"{name:9s}: per 128-row tile and SM, fixed {f['fixed_us']:.2f} us + "
          f"{f['step_us']:.3f} us a 128-key step")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(length=n, heads=h, head_dim=d, device=jax.devices()[0].device_kind,
                     jax_version=jax.__version__, run=bench.RUN, kept=recs, fit=summary),
                f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
