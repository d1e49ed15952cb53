"""Where the time goes: device time per kernel from a profile.

Runs LongNet fwd+bwd (the ``masked`` group's cases of ``bench.py``), or
dense causal attention (ours and cuDNN's), under ``jax.profiler.trace`` and
sums the device time of each kernel over a few steps: our attention kernels
(``ringdilated_*``) and cuDNN's one row per kernel name, XLA's fusions and
copies as one group. Two cases side by side show which kernels a mask makes
slower and what its glue (ids, validity and live ranges, computed in XLA)
costs::

  python benchmarks/profile_kernels.py --n 262144 --cases unmasked,docs64k,docs8k
  python benchmarks/profile_kernels.py --n 32768 --cases cudnn_dense,mosaic_dense

Prints per case: wall time per step, summed device time per step and each
kernel group's, with its difference to the first case's; ``--json`` writes
the records (``results/profile_h200.json`` holds the H200's).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402  (the cases and inputs of the benchmark)


def _longnet(impl, extra=None):
  return lambda mode: (functools.partial(impl, mode=mode, **bench.LONGNET), extra)


def _dense(impl, extra=None):
  return lambda mode: (lambda q, k, v, *x: impl(q, k, v, *x, segment_lengths=(q.shape[1],),
                                                dilation_rates=(1,)), extra)


# case -> mode -> (impl(q, k, v, *extra), extra(n) -> tuple or None)
CASES = {
    "unmasked": _longnet(bench.ours),
    "docs64k": _longnet(bench.ours_docs, bench._documents(65536)),
    "docs8k": _longnet(bench.ours_docs, bench._documents(8192)),
    "docsvar": _longnet(bench.ours_docs, bench._documents(None)),  # bench.doc_lengths
    "pad10": _longnet(bench.ours_padded, bench._padding(0.1)),
    "dropout": _longnet(bench.ours_dropout, bench._dropout_key(0)),
    "dense": _dense(bench.ours),
    "dense_docs8k": _dense(bench.ours_docs, bench._documents(8192)),
    "dense_docsvar": _dense(bench.ours_docs, bench._documents(None)),  # bench.doc_lengths
    "cudnn_dense": lambda mode: (bench.cudnn_dense, None),
    "mosaic_dense": _dense(functools.partial(bench.ours, backend="mosaic")),
    # segments of 2048 at rate 1, every head: LongNet partition's rate-1 work
    "seg2048": lambda mode: (functools.partial(bench.ours, segment_lengths=(2048,),
                                               dilation_rates=(1,), backend="mosaic"), None),
}


def device_events(trace_dir: str, timeline: bool = False) -> list[tuple]:
  """(name, microseconds) of every kernel on a device's streams in the
  perfetto trace ``jax.profiler.trace`` wrote under ``trace_dir`` (a device's
  "XLA Ops" and "XLA Modules" lines repeat the streams' time: left out).
  With ``timeline``: (device, stream, name, start us, microseconds)."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  meta = [e for e in events if e.get("ph") == "M"]
  devices = {e["pid"]: e["args"]["name"] for e in meta
             if e.get("name") == "process_name" and "/device:" in e["args"]["name"]}
  streams = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta
             if e.get("name") == "thread_name" and e["pid"] in devices
             and e["args"]["name"].lower().startswith("stream")}
  found = [(devices[e["pid"]], streams[e["pid"], e["tid"]], e["name"], float(e["ts"]),
            float(e["dur"])) for e in events
           if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams and "dur" in e]
  if not found:
    lines = sorted({e["args"]["name"] for e in meta if e.get("name") in ("process_name",
                                                                         "thread_name")})
    raise RuntimeError(f"no kernels on a device stream in the profile; lines: {lines[:40]}")
  return found if timeline else [(name, dur) for _, _, name, _, dur in found]


def _group(name: str) -> str:
  """Our kernels by name, the masked flag dropped (so a masked kernel lines
  up with its unmasked twin); cuDNN's by name; XLA's fusions as one group."""
  if name.startswith("ringdilated"):
    return re.sub(r"_m(?=(_p|_f)*(_mosaic_gpu_kernel)?$)", "", name)
  return name if ("sdpa" in name or "cudnn" in name) else "xla (fusions, copies)"


def timed_trace(fn, args, steps: int, timeline: bool = False) -> tuple[float, list]:
  """``fn(*args)`` warmed up, then ms per call over ``steps`` calls, then the
  device kernels (:func:`device_events`) of ``steps`` more under the profiler."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fn(*args))
  wall = (time.perf_counter() - t0) / steps * 1e3
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(fn(*args))
    return wall, device_events(tmp, timeline)


def profile(case: str, n: int, steps: int, mode: str) -> dict:
  device = jax.devices()[0]
  q, k, v, dout = bench._inputs(n, device, n)
  impl, make_extra = CASES[case](mode)
  extra = tuple(jax.device_put(x, device) for x in make_extra(n)) if make_extra else ()

  wall, events = timed_trace(bench.fwd_bwd(impl), (q, k, v, dout, *extra), steps)
  per = collections.defaultdict(float)
  count = collections.Counter()
  for name, us in events:
    per[_group(name)] += us / steps / 1e3
    count[_group(name)] += 1
  return dict(case=case, mode=mode, seq_len=n, wall_ms=wall, steps=steps,
              device_ms=sum(per.values()), kernels_ms=dict(per),
              launches={k: c // steps for k, c in count.items()})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=262144)
  p.add_argument("--mode", default="mix", choices=("mix", "partition"))
  p.add_argument("--cases", default="unmasked,docs64k,docs8k",
                 help=f"comma-separated, the first is the reference: {', '.join(CASES)}")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--json")
  args = p.parse_args(argv)
  recs = [profile(c, args.n, args.steps, args.mode) for c in args.cases.split(",")]
  base = recs[0]
  for r in recs:
    print(f"{r['case']:10s} N={r['seq_len']}: wall {r['wall_ms']:8.2f} ms/step, device "
          f"{r['device_ms']:8.2f} ms/step ({r['device_ms'] / base['device_ms']:.3f} x "
          f"{base['case']}), launches {sum(r['launches'].values())}")
    for name in sorted(r["kernels_ms"], key=r["kernels_ms"].get, reverse=True):
      ref = base["kernels_ms"].get(name)
      print(f"    {name:58s} {r['kernels_ms'][name]:8.3f} ms  x{r['launches'][name]:<4d}"
            + (f" ({r['kernels_ms'][name] - ref:+.3f})" if ref is not None else ""))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(recs, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
