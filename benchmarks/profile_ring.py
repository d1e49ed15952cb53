"""Where a ring's time goes, per GPU: device time per kernel group and idle time.

Profiles ``bench_multi_gpu.py`` timing cases (by name) under
``jax.profiler.trace`` and prints, per case and per GPU, the time of one
forward+backward: the span from its first kernel to its last, the time some
stream is busy, the time the GPU waits with nothing running (a ring step
waiting for its peer, or the host), and each kernel group's device time:
ours by name, cuDNN's, NCCL's, XLA's fusions by name (largest first)::

  python benchmarks/profile_ring.py --no-check-vma \\
      timing/longnet_ring/N2097152/P1/contiguous/mosaic \\
      timing/longnet_ring/N2097152/P2/contiguous/mosaic

One GPU's program against the ring's shows what the ring adds: the strong-
scaling gap of ``check_targets.py`` split into kernels, glue and waiting.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_multi_gpu as bmg  # noqa: E402  (sets XLA's memory fraction before jax)
import profile_kernels  # noqa: E402


def group(name: str) -> str:
  """A kernel's group: ours and cuDNN's by name, NCCL's as one, XLA's fusions
  by name without their numeric suffix."""
  if name.startswith("ringdilated") or "sdpa" in name or "cudnn" in name:
    return name
  if "nccl" in name.lower():
    return "nccl"
  return "xla " + re.sub(r"[._]\d+$", "", name)


def busy_us(intervals: list[tuple[float, float]]) -> float:
  """Length of the union of ``[(start, duration)]``."""
  total, end = 0.0, float("-inf")
  for start, dur in sorted(intervals):
    stop = start + dur
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def summarize(events: list[tuple], steps: int) -> dict:
  """Per device: span, busy and idle ms per step and each group's ms per step."""
  out = {}
  for device in sorted({e[0] for e in events}):
    mine = [e for e in events if e[0] == device]
    start = min(ts for *_, ts, _ in mine)
    stop = max(ts + dur for *_, ts, dur in mine)
    busy = busy_us([(ts, dur) for *_, ts, dur in mine])
    compute = busy_us([(ts, dur) for _, _, name, ts, dur in mine if group(name) != "nccl"])
    per = collections.defaultdict(float)
    count = collections.Counter()
    for _, _, name, _, dur in mine:
      per[group(name)] += dur / steps / 1e3
      count[group(name)] += 1
    out[device] = dict(span_ms=(stop - start) / steps / 1e3, busy_ms=busy / steps / 1e3,
                       compute_ms=compute / steps / 1e3,
                       idle_ms=(stop - start - busy) / steps / 1e3,
                       groups_ms=dict(per), launches={k: c // steps for k, c in count.items()})
  return out


def uncovered_us(start: float, dur: float, cover: list[tuple[float, float]]) -> float:
  """Length of ``[start, start + dur)`` outside the union of ``cover``."""
  inside = [(max(s, start), min(s + d, start + dur) - max(s, start)) for s, d in cover
            if s < start + dur and s + d > start]
  return dur - busy_us(inside)


def timeline(events: list[tuple]) -> dict:
  """Per device, every kernel in time order as ``[start ms, ms, stream,
  group]`` (times from the device's first kernel), and each NCCL kernel's
  time with no other kernel running (``alone_ms``) beside the kernels that
  end before and start after it: where a ring waits for its transfers."""
  out = {}
  for device in sorted({e[0] for e in events}):
    mine = sorted((e for e in events if e[0] == device), key=lambda e: e[3])
    t0 = mine[0][3]
    compute = [(ts, dur) for _, _, name, ts, dur in mine if group(name) != "nccl"]
    rows, waits = [], []
    for _, stream, name, ts, dur in mine:
      rows.append([round((ts - t0) / 1e3, 3), round(dur / 1e3, 3), stream, group(name)[:60]])
      if group(name) == "nccl":
        before = [n for _, _, n, s, d in mine if group(n) != "nccl" and s + d <= ts]
        after = [n for _, _, n, s, _ in mine if group(n) != "nccl" and s >= ts]
        waits.append(dict(start_ms=rows[-1][0], ms=rows[-1][1],
                          alone_ms=round(uncovered_us(ts, dur, compute) / 1e3, 3),
                          before=group(before[-1])[:60] if before else None,
                          after=group(after[0])[:60] if after else None))
    out[device] = dict(kernels=rows, nccl=waits)
  return out


def profile(name: str, steps: int, vma: bool = True, with_timeline: bool = False) -> dict:
  case = bmg.Case.parse(name, vma)
  mesh = bmg._mesh(case.p)  # pylint: disable=protected-access
  q, k, v, dout = bmg._inputs(case, mesh, case.n)  # pylint: disable=protected-access
  fn = bmg.fwd_bwd_fn(bmg.ring_attention(case, mesh)).lower(q, k, v, dout).compile()
  wall, events = profile_kernels.timed_trace(fn, (q, k, v, dout), steps, timeline=True)
  rec = dict(case=name, wall_ms=wall, steps=steps, devices=summarize(events, steps))
  if with_timeline:
    rec["timeline"] = timeline(events)
  return rec


def report(rec: dict, top: int) -> None:
  print(f"{rec['case']}: wall {rec['wall_ms']:.2f} ms per fwd+bwd")
  for device, d in rec["devices"].items():
    print(f"  {device}: span {d['span_ms']:.2f}  busy {d['busy_ms']:.2f}  compute "
          f"{d['compute_ms']:.2f}  idle {d['idle_ms']:.2f} ms")
    ranked = sorted(d["groups_ms"], key=d["groups_ms"].get, reverse=True)
    for g in ranked[:top]:
      print(f"    {g[:70]:70s} {d['groups_ms'][g]:8.3f} ms x{d['launches'][g]}")
    rest = sum(d["groups_ms"][g] for g in ranked[top:])
    if rest:
      print(f"    {'(the rest: ' + str(len(ranked) - top) + ' groups)':70s} {rest:8.3f} ms")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("cases", nargs="+", help="bench_multi_gpu.py timing case names")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--no-check-vma", dest="check_vma", action="store_false")
  p.add_argument("--json")
  p.add_argument("--timeline", action="store_true",
                 help="with --json: every kernel in time order and the NCCL kernels' time "
                      "alone (use --steps 1)")
  args = p.parse_args(argv)
  recs = []
  for name in args.cases:
    recs.append(profile(name, args.steps, args.check_vma, args.timeline))
    report(recs[-1], args.top)
    for device, t in recs[-1].get("timeline", {}).items():
      alone = sorted(t["nccl"], key=lambda w: -w["alone_ms"])[:8]
      print(f"  {device}: NCCL alone {sum(w['alone_ms'] for w in t['nccl']):.2f} ms; longest:")
      for w in alone:
        print(f"    at {w['start_ms']:9.3f} ms  {w['ms']:7.3f} ms, alone {w['alone_ms']:7.3f} ms"
              f"  after {w['before']}  before {w['after']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(recs, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
