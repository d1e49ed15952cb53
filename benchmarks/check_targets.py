"""Checks a benchmark results JSON against the project's speed/memory targets.

Usage: ``python benchmarks/check_targets.py benchmarks/results/h100.json``.
Prints one line per target with the measured value and exits non-zero if any
target is missed or could not be evaluated (a missing or failed case).
"""

from __future__ import annotations

import json
import sys


def _index(records):
  return {(r["name"], r["seq_len"]): r for r in records if "error" not in r}


def baseline_out_of_memory(rec, errors, mode: str, n: int) -> str | None:
  """Why no gather+cuDNN baseline of ``mode`` ran at ``n``: its out-of-memory
  error (plain and under ``jax.checkpoint``), or None if one ran or failed
  otherwise."""
  if (f"gather_cudnn_longnet_{mode}", n) in rec:
    return None
  for name in (f"gather_cudnn_longnet_{mode}", f"gather_cudnn_remat_longnet_{mode}"):
    err = errors.get((name, n), "")
    if "RESOURCE_EXHAUSTED" in err:
      return f"{name}: {err[err.index('RESOURCE_EXHAUSTED'):][:80]}"
  return None


def targets(rec, errors=None):
  """Yields (description, value, passed) for every target."""
  errors = errors or {}
  def get(name, n, key="fwd_bwd_ms"):
    r = rec.get((name, n))
    return None if r is None else r[key]

  def ratio(num, den):
    return None if num is None or den is None else num / den

  # Throughput is inverse time: ours >= 0.95x cuDNN <=> time_cudnn / time_ours >= 0.95.
  v = ratio(get("cudnn_dense", 32768), get("ours_dense", 32768))
  yield "dense causal 32K fwd+bwd throughput vs cuDNN >= 0.95x", v, v is not None and v >= 0.95
  v = ratio(get("ours_dense_ring1", 32768), get("ours_dense", 32768))
  yield "ring path on 1 device within 5% of non-ring (32K)", v, v is not None and v <= 1.05
  v = ratio(get("ours_dense_ring1_zigzag", 32768), get("ours_dense_ring1", 32768))
  yield "zigzag layout on a 1-device ring within 5% of contiguous (32K)", v, v is not None and v <= 1.05
  n = 1 << 20
  for mode in ("mix", "partition"):
    # The memory targets need the in-place kernels: backend="pallas".
    ours = f"ours_pallas_longnet_{mode}"
    v = ratio(get(f"gather_cudnn_longnet_{mode}", n), get(ours, n))
    desc = f"LongNet {mode} 1M throughput (pallas) vs gather+cuDNN >= 1.0x"
    oom = baseline_out_of_memory(rec, errors, mode, n)
    if v is None and oom and get(ours, n) is not None:
      yield f"{desc} [baseline out of memory: {oom}]", float("inf"), True
    else:
      yield desc, v, v is not None and v >= 1.0
    r = rec.get((ours, n))
    v = None if r is None else r["peak_bytes"] / r["qkv_out_grad_bytes"]
    yield f"LongNet {mode} 1M peak (pallas) <= 1.15x bytes of q,k,v,out,dq,dk,dv", v, \
        v is not None and v <= 1.15
    v = ratio(get(ours, n, "peak_bytes"), get(ours, n // 2, "peak_bytes"))
    yield f"LongNet {mode} peak(1M)/peak(512K) (pallas) <= 2.1", v, v is not None and v <= 2.1
  v = ratio(get("ringattention_pkg", 32768), get("ours_dense_ring1", 32768))
  yield ">= 10x the ringattention package at 32K (fwd+bwd)", v, v is not None and v >= 10


def main(argv) -> int:
  if len(argv) != 2:
    print(__doc__)
    return 2
  with open(argv[1]) as f:
    records = json.load(f)
  rec = _index(records)
  errors = {(r["name"], r["seq_len"]): r["error"] for r in records if "error" in r}
  for (name, n), err in errors.items():  # why a case is missing
    print(f"info  {name} N={n} failed: {err[:100]}")
  failed = 0
  for name in ("cudnn_dense", "ours_longnet_mix", "ours_longnet_partition"):
    for n in (32768, 1 << 20):  # context for the peak targets, not targets
      r = rec.get((name, n))
      if r:
        print(f"info  {name} N={n}: {r['fwd_bwd_ms']:.1f} ms, peak / bytes of "
              f"q,k,v,out,dq,dk,dv {r['peak_bytes'] / r['qkv_out_grad_bytes']:.3f}")
  for desc, value, ok in targets(rec, errors):
    shown = "missing" if value is None else f"{value:.3f}"
    print(f"{'PASS' if ok else 'FAIL'}  {desc}: {shown}")
    failed += not ok
  print(f"{failed} target(s) missed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
