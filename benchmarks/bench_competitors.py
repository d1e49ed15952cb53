"""Ours against tokamax's Mosaic GPU attention, with cuDNN beside both, on one GPU.

Run on an H200 (one GPU, ``jax.devices()[0]``) where tokamax imports
(``pip install tokamax``: Python >= 3.12, jax >= 0.11.1)::

  python benchmarks/bench_competitors.py --out benchmarks/results/h200_competitors.json
  python benchmarks/bench_competitors.py --smoke   # CPU: tiny sizes, XLA stands in

tokamax (Google's kernel library) holds the other Pallas Mosaic GPU (Hopper)
flash attention with a causal backward; jax's own ``attention_mgpu`` example
raises ``NotImplementedError`` for a causal backward, so it is not here.
Users weigh the two, so this times them side by side: forward+backward,
``--rounds`` interleaved rounds in one process (clock and temperature drift
fall on every implementation), the median of the rounds' medians. Groups:

  dense      dense causal 32K: cuDNN, ours (``backend="mosaic"``), tokamax.
  docs8k     dense causal 128K over packed documents of 8K tokens, and
  docsvar    of varied length (``bench.doc_lengths``): cuDNN's packed
             layout, ours (``segment_ids``), tokamax (each query's document
             start as its ``k_start``, with the causal mask).
  partition  LongNet partition 1M: strided slices + cuDNN (issue 17's
             baseline), the same slices + tokamax, ours.

tokamax runs with the configuration its heuristics pick (what a user gets
without autotuning); ``--tune S`` also searches its own autotuning space for
dense causal 32K for up to S seconds and times the best as
``tokamax_tuned`` (:func:`tune_tokamax`). Before the timings each
implementation's out and gradients are compared with float32 XLA attention
under the same mask at 4096 tokens (relative Frobenius norm of the
difference, the worst of out, dq, dk, dv, kept as ``rel_err``; ``exact``
when under 2e-2: a time counts only beside that). Shapes as ``bench.py``:
bf16, B=1, H=16, D=128.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402  (sets the allocator's memory fraction first)

GROUPS = ("dense", "docs8k", "docsvar", "partition")
TOLERANCE = 2e-2


def doc_starts(n: int, doc: int | None) -> np.ndarray:
  """[B, N] int32: the first token of each token's document
  (:func:`bench.doc_lengths`), tokamax's ``k_start`` of the packed documents."""
  lengths = bench.doc_lengths(n, doc)
  first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  return np.broadcast_to(np.repeat(first, lengths).astype(np.int32), (bench.B, n))


def tokamax_attend(q, k, v, *, is_causal=True, k_start=None, configs=(None, None)):
  """tokamax's Mosaic GPU flash attention (``k_start`` [B, N]: keys before
  it are hidden from each query; ``configs``: its forward's and backward's,
  None for its heuristics' choice). ``--smoke``: XLA with the same mask."""
  if bench.CUDNN is None:
    return jax.nn.dot_product_attention(q, k, v, mask=_k_start_mask(k_start, q.shape[1]),
                                        is_causal=is_causal)
  # pylint: disable=g-import-not-at-top
  from tokamax._src.ops.attention import base, pallas_mosaic_gpu, pallas_mosaic_gpu_vjp
  mask = base.Mask(k_start=None if k_start is None else k_start[:, None, :], is_causal=is_causal)
  op = pallas_mosaic_gpu.PallasMosaicGpuFlashAttention(
      config=configs[0], vjp=pallas_mosaic_gpu_vjp.PallasMosaicGpuFlashAttentionVjp(
          config=configs[1]))
  return op(q, k, v, mask=mask)


def _tokamax_spaces():
  """tokamax 0.0.17's own autotuning spaces on sm90 (its kernels'
  ``get_autotuning_configs``): the forward's, then the backward's."""
  # pylint: disable=g-import-not-at-top
  from tokamax._src.ops.attention import pallas_mosaic_gpu_kernel_sm90 as sm90
  from tokamax._src.ops.attention import pallas_mosaic_gpu_vjp_common as vjp_common
  fwd = [sm90.Config(block_q=bq, block_kv=bk, num_stages=st, persistent=p)
         for bq in (64, 128) for bk in (64, 128, 256) for p in (True, False) for st in (2, 3, 4)]
  bwd = [vjp_common.Config(block_q_dkv=bq, block_kv_dkv=bk, block_q_dq=bq, block_kv_dq=bk,
                           num_stages=st, compute_wgs=wgs)
         for bq in (64, 128) for bk in (64, 128) for st in (2, 3) for wgs in (1, 2)]
  return fwd, bwd


def tune_tokamax(device, n: int, budget: float) -> tuple | None:
  """The fastest of tokamax's autotuning space at dense causal ``n``, searched
  by hand (its autotuner's entry point imports its whole package): the
  forward's config by forward time, then the backward's by forward+backward
  time with that forward. Configs that fail (shared memory) are skipped; each
  search stops after half of ``budget`` seconds with the best so far. None
  without tokamax."""
  try:
    fwd_space, bwd_space = _tokamax_spaces()
  except ImportError:
    return None
  q, k, v, dout = bench._inputs(n, device, n)  # pylint: disable=protected-access

  def search(space, timed):
    best, start = (float("inf"), None), time.monotonic()
    for config in space:
      if time.monotonic() - start > budget / 2:
        break
      try:
        ms = timed(config)
      except Exception as e:  # pylint: disable=broad-except
        print(f"tune       {config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        continue
      print(f"tune       {config}: {ms:.3f} ms", flush=True)
      best = min(best, (ms, config), key=lambda x: x[0])
    return best[1]

  fwd = search(fwd_space, lambda c: bench._median_ms(  # pylint: disable=protected-access
      jax.jit(functools.partial(tokamax_attend, configs=(c, None))), (q, k, v), 8))
  if fwd is None:
    return None
  bwd = search(bwd_space, lambda c: bench._median_ms(  # pylint: disable=protected-access
      bench.fwd_bwd(functools.partial(tokamax_attend, configs=(fwd, c))), (q, k, v, dout), 8))
  return fwd, bwd


def _tokamax_version() -> str | None:
  try:
    return importlib.metadata.version("tokamax")
  except importlib.metadata.PackageNotFoundError:
    return None


def _k_start_mask(k_start, n: int):
  """[B, 1, N, N] bool: key ``j`` visible to query ``i`` iff ``j >= k_start[i]``
  (None: everything)."""
  if k_start is None:
    return None
  return (jnp.arange(n)[None, None, None, :] >= k_start[:, None, :, None])


def _ours_backend() -> str:
  """The Hopper kernels; XLA with ``--smoke`` (no GPU)."""
  return "xla" if bench.CUDNN is None else "mosaic"


def _check_n() -> int:
  return max(256, 4096 // bench.SCALE)


# Each group: (n, {implementation: (impl(q, k, v, *extra), extra(n) or None)},
# forward FLOPs, (segment ids(n), their mask) for the check's oracle or None).
# Documents: ours gets segment ids, cuDNN its packed layout, tokamax k_start.
def _group(name: str, small: bool, tuned: tuple | None = None):
  if name == "dense":
    n = _check_n() if small else 32768 // bench.SCALE
    base = dict(segment_lengths=(n,), dilation_rates=(1,))
    impls = {
        "cudnn": (bench.cudnn_dense, None),
        "ours": (functools.partial(bench.ours, backend=_ours_backend(), **base), None),
        "tokamax": (tokamax_attend, None),
    }
    if tuned:
      impls["tokamax_tuned"] = (functools.partial(tokamax_attend, configs=tuned), None)
    return n, impls, bench.attention_flops(n, (n,), (1,), "mix", True), None
  if name in ("docs8k", "docsvar"):
    n = _check_n() if small else 131072 // bench.SCALE
    doc = max(1, (1024 if small else 8192) // bench.SCALE) if name == "docs8k" else None
    base = dict(segment_lengths=(n,), dilation_rates=(1,))
    return n, {
        "cudnn_packed": (bench.cudnn_packed, bench._packed_layout(doc)),  # pylint: disable=protected-access
        "ours": (functools.partial(bench.ours_docs, backend=_ours_backend(), **base),
                 bench._documents(doc)),  # pylint: disable=protected-access
        "tokamax": (lambda q, k, v, s: tokamax_attend(q, k, v, k_start=s),
                    lambda n: (doc_starts(n, doc),)),
    }, bench.packed_flops(n, doc), (bench._documents(doc), bench.same_document)  # pylint: disable=protected-access
  if name == "partition":
    n = 1048576 // bench.SCALE
    cfg = dict(bench.LONGNET)
    return n, {
        "slice_cudnn": (functools.partial(bench.slice_cudnn_partition, **cfg), None),
        "slice_tokamax": (functools.partial(bench.slice_cudnn_partition, attend=tokamax_attend,
                                            **cfg), None),
        "ours": (functools.partial(bench.ours, mode="partition", backend=_ours_backend(),
                                   **cfg),
                 None),
    }, bench.attention_flops(n, cfg["segment_lengths"], cfg["dilation_rates"], "partition",
                             True), None
  raise ValueError(f"group {name!r} is not one of {GROUPS}")


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(name: str, device, tuned: tuple | None = None) -> dict:
  """{implementation: worst relative error of out, dq, dk, dv} against float32
  XLA attention at the check length (the partition group: its dense kernels
  are the other groups' checks)."""
  if name == "partition":
    return {}
  n, impls, _, oracle = _group(name, small=True, tuned=tuned)
  q, k, v, dout = bench._inputs(n, device, 7)  # pylint: disable=protected-access
  mask = None
  if oracle is not None:
    make, build = oracle
    mask = build(jnp.asarray(make(n)[0]))

  def exact(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation="xla")
  f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
  ref = bench.fwd_bwd(exact)(*f32)
  ref_out = jax.jit(exact)(*f32[:3])
  errors = {}
  for impl_name, (impl, extra) in impls.items():
    args = tuple(jax.device_put(x, device) for x in extra(n)) if extra else ()
    try:
      out = jax.jit(impl)(q, k, v, *args)
      grads = bench.fwd_bwd(impl)(q, k, v, dout, *args)
      errors[impl_name] = max([_relative(out, ref_out)]
                              + [_relative(g, r) for g, r in zip(grads, ref)])
    except Exception as e:  # pylint: disable=broad-except
      errors[impl_name] = f"{type(e).__name__}: {str(e)[:300]}"
  return errors


def measure(name: str, device, rounds: int, iters: int, errors: dict,
            tuned: tuple | None = None) -> list[dict]:
  """One record per implementation of group ``name``: the rounds' medians
  (each a median of ``iters`` runs), their median, the compiled peak, the
  GPU's clock in the last round."""
  n, impls, flops, _ = _group(name, small=False, tuned=tuned)
  q, k, v, dout = bench._inputs(n, device, n)  # pylint: disable=protected-access
  compiled, inputs, records = {}, {}, {}
  for impl_name, (impl, extra) in impls.items():
    rec = dict(group=name, name=impl_name, seq_len=n, batch=bench.B, heads=bench.H,
               head_dim=bench.D, dtype="bfloat16", device=device.device_kind,
               jax_version=jax.__version__, tokamax_version=_tokamax_version(), run=bench.RUN,
               rel_err=errors.get(impl_name))
    if impl_name in errors:
      rec["exact"] = isinstance(rec["rel_err"], float) and rec["rel_err"] < TOLERANCE
    if impl_name == "tokamax_tuned":
      rec["tokamax_configs"] = [str(c) for c in tuned]
    records[impl_name] = rec
    try:
      args = (q, k, v, dout, *(jax.device_put(x, device) for x in (extra(n) if extra else ())))
      compiled[impl_name] = bench.fwd_bwd(impl).lower(*args).compile()
      inputs[impl_name] = args
      rec["peak_bytes"] = bench._peak_bytes(compiled[impl_name])  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except
      rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  times = {impl_name: [] for impl_name in compiled}
  for r in range(rounds):
    for impl_name, fn in compiled.items():
      sample = {}
      with bench.sampled_clocks(device, sample):
        times[impl_name].append(bench._median_ms(fn, inputs[impl_name], iters, seconds=30.0))  # pylint: disable=protected-access
      if r == rounds - 1:
        records[impl_name].update(sample)
  for impl_name, ts in times.items():
    rec = records[impl_name]
    rec.update(fwd_bwd_ms=statistics.median(ts), rounds_ms=ts,
               tflops_fwd_bwd=3.5 * flops / statistics.median(ts) / 1e9)
  first = next(iter(times), None)
  for impl_name, rec in records.items():
    if "fwd_bwd_ms" in rec and first:
      rec[f"speed_vs_{first}"] = records[first]["fwd_bwd_ms"] / rec["fwd_bwd_ms"]
    print(_line(rec), flush=True)
  return list(records.values())


def _line(rec: dict) -> str:
  head = f"{rec['group']:10s} {rec['name']:14s} N={rec['seq_len']:>8d}"
  if "fwd_bwd_ms" not in rec:
    return f"{head}  ERROR {rec.get('error')}"
  err = rec["rel_err"]
  err_text = ("" if err is None else f"  err {err:.1e}" if isinstance(err, float)
              else f"  check failed: {err[:80]}")
  speed = next((f"  x{v:.3f} {k[9:]}" for k, v in rec.items() if k.startswith("speed_vs_")), "")
  power = f"  {rec['sm_clock_mhz']:.0f} MHz" if "sm_clock_mhz" in rec else ""
  return (f"{head}  fwd+bwd {rec['fwd_bwd_ms']:9.3f} ms{speed}  "
          f"peak {rec['peak_bytes'] / 2**30:6.2f} GiB  rounds "
          + " ".join(f"{t:.2f}" for t in rec["rounds_ms"]) + err_text + power)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="results JSON (replaced by this run's records)")
  p.add_argument("--only", default=",".join(GROUPS), help=f"comma list of {GROUPS}")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--iters", type=int, default=8)
  p.add_argument("--time-budget", type=float, default=None,
                 help="seconds; no group starts after that")
  p.add_argument("--tune", type=float, default=0.0,
                 help="seconds for a search of tokamax's autotuning space at dense "
                 "causal 32K, timed as 'tokamax_tuned' in the dense group (0: none)")
  p.add_argument("--smoke", action="store_true", help="bench.py's tiny sizes (CPU)")
  args = p.parse_args(argv)
  bench._configure(args.smoke)  # pylint: disable=protected-access
  device, start, records = jax.devices()[0], time.monotonic(), []
  tuned = None
  if args.tune and "dense" in args.only.split(",") and bench.CUDNN is not None:
    tuned = tune_tokamax(device, 32768 // bench.SCALE, args.tune)
  for name in args.only.split(","):
    if args.time_budget is not None and time.monotonic() - start > args.time_budget:
      print(f"time budget of {args.time_budget:.0f} s spent: {name} not run", flush=True)
      continue
    errors = check(name, device, tuned)
    records += measure(name, device, args.rounds, args.iters, errors, tuned)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
