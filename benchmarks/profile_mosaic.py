"""Inside the Hopper kernels: where a program's time goes, from Mosaic GPU's
on-device profiler.

The kernels of ``ringdilated/_backends/mosaic.py`` name the phases of each
warpgroup (``fwd_begin``, ``fwd_step``, ``fwd_end``; ``dq_*``; ``dkv_*``;
``memory_begin``); with the profiler on (``mosaic._compiler_params``
wrapped here) every range is recorded per program and warpgroup, with the
SM it ran on. This runs one causal branch of rate 1 (segments of ``--kept``
tokens) forward and backward once and prints, per kernel, a fit of a
program's time against its number of steps (fixed cost + cost per step:
what short segments pay), the compute warpgroups' time before their first
step and after their last, the steps' own times, and the median of every
named range (the waits for a program's own rows, ``*_own``, and for a
step's streamed tiles, ``dq_wait``, ``dkv_wait``; ``dq_delta``; the final
stores, ``*_store``) with how often a warpgroup runs it::

  python benchmarks/profile_mosaic.py --length 32768 --kept 2048

Times are SM clock cycles (the profiler's ``%clock``), in thousands. The
profiler copies its buffer out at each program's end, which the traces do
not show and which slows the run: compare programs' inner phases, not the
kernel's total time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile

import numpy as np


def _ranges(events: list[dict]) -> list[tuple[str, float]]:
  """(name, duration) of every range of one warpgroup's trace, nested
  ranges paired innermost first."""
  begun, ranges = [], []
  for e in events:
    if e["ph"] == "B":
      begun.append(e)
    elif e["ph"] == "E" and begun:
      b = begun.pop()
      ranges.append((b["name"], e["ts"] - b["ts"]))
  return ranges


def summarize(events: list[dict]) -> dict:
  """Per-kernel summary of one kernel's trace (the profiler's JSON events:
  ``name``, ``ph`` B/E, ``ts``, ``pid`` = SM + 1, ``tid`` = one per program
  and warpgroup). Event times within a program are cycles / 1000."""
  traces = collections.defaultdict(list)
  for e in events:
    traces[e["tid"]].append(e)
  kernel, comp = None, []
  spans = collections.defaultdict(list)
  for es in traces.values():
    steps = [e for e in es if e["name"].endswith("_step")]
    if not steps:
      continue
    for name, dur in _ranges(es):
      spans[name].append(dur)
    kernel = steps[0]["name"][:-len("_step")]
    begins = [e["ts"] for e in steps if e["ph"] == "B"]
    ends = [e["ts"] for e in steps if e["ph"] == "E"]
    first, last = min(e["ts"] for e in es), max(e["ts"] for e in es)
    comp.append(dict(steps=len(begins), total=last - first, begin=begins[0] - first,
                     end=last - ends[-1]))
  if not comp:
    return dict(kernel=None, programs=len(traces))
  n = np.array([c["steps"] for c in comp], float)
  total = np.array([c["total"] for c in comp])
  (fixed, per_step), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), total, rcond=None)
  return dict(kernel=kernel, warpgroups=len(comp), sms=len({e["pid"] for e in events}),
              fixed_kcycles=float(fixed), per_step_kcycles=float(per_step),
              begin_kcycles=float(np.median([c["begin"] for c in comp])),
              end_kcycles=float(np.median([c["end"] for c in comp])),
              step_kcycles=float(np.median(spans[f"{kernel}_step"])),
              median_steps=float(np.median(n)),
              scopes={name: dict(kcycles=float(np.median(d)), per_warpgroup=len(d) / len(comp))
                      for name, d in sorted(spans.items())})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--length", type=int, default=32768)
  p.add_argument("--kept", type=int, default=2048)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--space", type=int, help="profiler events per warpgroup (default: room "
                 "for four per 64-key step, steps and their waits, and 128 more)")
  p.add_argument("--json")
  args = p.parse_args(argv)
  args.space = args.space or 4 * (args.kept // 64) + 128

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  from ringdilated._backends import mosaic  # pylint: disable=g-import-not-at-top
  from ringdilated._backends.base import StridedBranch  # pylint: disable=g-import-not-at-top

  tmp = tempfile.mkdtemp(prefix="mosaic_profile_")
  mosaic._compiler_params = lambda: plgpu.CompilerParams(  # the profiler on
      approx_math=True, profile_space=args.space, profile_dir=tmp)
  h, d = args.heads, args.head_dim
  tiles = mosaic.TUNED[d]
  geo = StridedBranch(kept=args.kept, rate=1, heads=(0, h), group=1, offset=None, causal=True,
                      scale=d ** -0.5)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(x, (1, args.length, h, d), jnp.bfloat16) for x in keys)
  fwd = jax.jit(lambda q, k, v: mosaic.forward(geo, tiles, q, k, v))
  bwd = jax.jit(lambda q, k, v, do, lse, out: mosaic.backward(geo, tiles, q, k, v, do, lse, out))
  out, lse = jax.block_until_ready(fwd(q, k, v))  # compiled, then one traced call each
  jax.block_until_ready(bwd(q, k, v, do, lse, out))
  for f in glob.glob(os.path.join(tmp, "*.json")):
    os.remove(f)
  jax.block_until_ready(fwd(q, k, v))
  jax.block_until_ready(bwd(q, k, v, do, lse, out))
  jax.effects_barrier()  # (the traces are written by host callbacks)
  recs = []
  for path in sorted(glob.glob(os.path.join(tmp, "*.json"))):
    with open(path) as f:
      rec = summarize(json.load(f)["traceEvents"])
    if rec["kernel"] is None:
      continue
    rec.update(length=args.length, kept=args.kept, heads=h, head_dim=d,
               device=jax.devices()[0].device_kind, jax_version=jax.__version__)
    recs.append(rec)
    print(f"{rec['kernel']:4s} {rec['warpgroups']} compute warpgroup traces on {rec['sms']} SMs: "
          f"program = {rec['fixed_kcycles']:.2f}k + {rec['per_step_kcycles']:.3f}k x steps "
          f"cycles (median {rec['median_steps']:.1f} steps); before the first step "
          f"{rec['begin_kcycles']:.2f}k, after the last {rec['end_kcycles']:.2f}k, "
          f"a step {rec['step_kcycles']:.3f}k", flush=True)
    print("     ranges (median k-cycles x per warpgroup): " + "; ".join(
        f"{name} {v['kcycles']:.2f}k x{v['per_warpgroup']:.1f}" for name, v in rec["scopes"].items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(recs, f, indent=1)
  return 0 if recs else 1


if __name__ == "__main__":
  sys.exit(main())
