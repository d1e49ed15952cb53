"""GPU benchmarks of ringdilated against the references a user would pick.

Run on a GPU machine::

  python benchmarks/bench.py --out benchmarks/results/h100.json [--only dense,longnet]

Every case is timed in this one process on this one GPU, side by side with its
reference: forward and forward+backward (median of repeated runs after
warm-up, synchronised with ``block_until_ready``), peak memory from the
compiled program's memory analysis (arguments + outputs + temporaries), and
TFLOP/s from the attention FLOPs the pattern really needs (causal halves
included; backward counted as 2.5x forward).

Cases (bf16, B=1, H=16, D=128):
  dense      one branch w=N, r=1, causal: cuDNN, ours, ours on a 1-device ring.
  longnet    segment_lengths=(2048, 4096, 8192, 16384), rates (1, 2, 4, 8),
             causal, both modes: ours vs gathering each branch and calling
             cuDNN by hand.
  ringattn   the ``ringattention`` package (if importable) at 8K/32K causal.
  pallas     backend="pallas" (strided in-place kernels) on the dense and
             LongNet cases, with the cuDNN references at the same lengths.
  zigzag     the dense causal case on a 1-device ring in the zigzag layout
             (overhead vs the contiguous ``ours_dense_ring1`` of ``dense``:
             run both groups together), and the attention work of one ring
             step of the busiest device for P = 8 (cuDNN blocks): contiguous
             (one L x L block) vs zigzag (two L/2 x L/2 blocks), which with
             one GPU stands in for the multi-GPU wall time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

# Let XLA's allocator use the whole GPU (default 75%): the 1M-token cases need it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import ringdilated as rd

B, H, D = 1, 16, 128
LONGNET = dict(segment_lengths=(2048, 4096, 8192, 16384), dilation_rates=(1, 2, 4, 8))


def attention_flops(n: int, segment_lengths, dilation_rates, mode: str, causal: bool,
                    heads: int = H, head_dim: int = D) -> float:
  """Forward FLOPs of the attention matmuls (QK^T and PV) the pattern needs."""
  k = len(segment_lengths)
  total = 0.0
  for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
    hb = heads if mode == "mix" else heads // k + (i < heads % k)
    t = w // r
    pairs = t * (t + 1) / 2 if causal else t * t
    total += (n // w) * hb * 4 * pairs * head_dim
  return total


# ----------------------------------------------------------------------------
# Implementations under test, each (q, k, v) -> out.
# ----------------------------------------------------------------------------


def cudnn_dense(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def ours(q, k, v, *, backend="auto", **kw):
  return rd.dilated_attention(q, k, v, causal=True, backend=backend, **kw)


def cudnn_block(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def step_contiguous(q, k, v):
  """Busiest device, one causal ring step, contiguous layout: an L x L block."""
  return cudnn_block(q, k, v)


def step_zigzag(q, k, v):
  """Every device, one causal ring step, zigzag: two L/2 x L/2 blocks."""
  c = q.shape[1] // 2
  # half 1 sees the visiting half 0; plus one same-half block (here half 0)
  cross = cudnn_block(q[:, c:], k[:, :c], v[:, :c])
  same = cudnn_block(q[:, :c], k[:, :c], v[:, :c])
  return jnp.concatenate([same, cross], axis=1)


def ours_ring1(q, k, v, **kw):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
  f = jax.shard_map(functools.partial(ours, axis_name="sp", **kw), mesh=mesh,
                    in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
  return f(q, k, v)


def gather_cudnn(q, k, v, *, segment_lengths, dilation_rates, mode, remat=False):
  """What a user writes by hand: gather each branch, cuDNN, scatter, combine.

  Mix weights come from cuDNN's returned log-sum-exp, which jax treats as
  constant: this baseline's gradient is *not* exact in mix mode (ours is); it
  is here for speed only. ``remat``: each branch under ``jax.checkpoint``
  (what the user does when the plain version runs out of memory).
  """
  b, n, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  k_ = len(segment_lengths)
  outs, lses = [], []
  bounds = np.cumsum([0] + [h // k_ + (i < h % k_) for i in range(k_)])
  for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
    if mode == "mix":
      heads, offs = np.arange(h), (np.arange(h) // g) % r
    else:
      heads = np.arange(bounds[i], bounds[i + 1])
      offs = np.full(len(heads), i % r)
    def pick(x, hs, os_):
      x = x[:, :, hs].reshape(b * n // w, w // r, r, len(hs), d)
      idx = jnp.asarray(os_).reshape(1, 1, 1, -1, 1)
      return jnp.take_along_axis(x, idx, axis=2)[:, :, 0]
    kvh = heads // g

    def branch(q, k, v, heads=heads, offs=offs, kvh=kvh, w=w, r=r):
      qb = pick(q, heads, offs)
      kb, vb = pick(k, kvh, offs), pick(v, kvh, offs)
      ob, lb = jax.nn.dot_product_attention(qb, kb, vb, is_causal=True,
                                            implementation="cudnn", return_residual=True)
      hit = (np.arange(r)[:, None] == offs[None, :]).reshape(1, 1, r, len(heads), 1)
      full = jnp.where(hit, ob[:, :, None], 0).reshape(b, n, len(heads), d)
      lfull = jnp.where(hit[..., 0], lb[:, :, None].astype(jnp.float32), -jnp.inf)
      return full, lfull.reshape(b, n, len(heads))

    full, lfull = (jax.checkpoint(branch) if remat else branch)(q, k, v)
    outs.append((heads, full))
    lses.append(lfull)
  if mode == "partition":
    return jnp.concatenate([o for _, o in outs], axis=2)
  lse = jnp.stack(lses)
  wts = jax.nn.softmax(lse, axis=0)
  wts = jnp.where(jnp.isfinite(lse), wts, 0.0)
  return sum(wts[i][..., None] * outs[i][1].astype(jnp.float32)
             for i in range(k_)).astype(q.dtype)


def ringattention_pkg(q, k, v):
  """The published JAX ring attention (``ringattention`` on PyPI), 1-device ring."""
  if not hasattr(jax.lib, "xla_bridge"):  # it reads jax.lib.xla_bridge at import
    import types  # pylint: disable=g-import-not-at-top
    jax.lib.xla_bridge = types.SimpleNamespace(get_backend=jax.extend.backend.get_backend)
  from ringattention import ringattention  # pylint: disable=g-import-not-at-top
  n = q.shape[1]
  chunk = min(n, 512)
  kwargs = dict(causal_block_size=1, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                query_chunk_size=chunk, key_chunk_size=chunk, dtype=jnp.bfloat16,
                policy=jax.checkpoint_policies.nothing_saveable, precision=None,
                prevent_cse=True)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
  f = jax.shard_map(
      lambda q, k, v: ringattention(q, k, v, None, None, None, "sp", True, kwargs),
      mesh=mesh, check_vma=False, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
  return f(q, k, v)


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------


def _median_ms(fn, args, iters):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def measure(name, impl, n, flops_fwd, config, iters=10):
  rng = np.random.default_rng(n)
  shapes = [(B, n, H, D)] * 3
  q, k, v = (jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16) for s in shapes)
  dout = jnp.asarray(rng.standard_normal((B, n, H, D), np.float32), jnp.bfloat16)
  fwd = jax.jit(impl)

  @jax.jit
  def fwd_bwd(q, k, v, dout):
    out, pull = jax.vjp(impl, q, k, v)
    return pull(dout)

  rec = dict(name=name, config=config, seq_len=n, dtype="bfloat16", batch=B, heads=H,
             head_dim=D, device=jax.devices()[0].device_kind, jax_version=jax.__version__)
  try:
    compiled = fwd_bwd.lower(q, k, v, dout).compile()
    rec["peak_bytes"] = _peak_bytes(compiled)
    rec["fwd_ms"] = _median_ms(fwd, (q, k, v), iters)
    rec["fwd_bwd_ms"] = _median_ms(compiled, (q, k, v, dout), iters)
  except Exception as e:  # a failing case is recorded, not fatal
    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"{name:28s} N={n:>8d}  ERROR {rec['error']}", flush=True)
    return rec
  rec["qkv_out_grad_bytes"] = 7 * B * n * H * D * 2
  rec["tflops_fwd"] = flops_fwd / rec["fwd_ms"] / 1e9
  rec["tflops_fwd_bwd"] = 3.5 * flops_fwd / rec["fwd_bwd_ms"] / 1e9
  print(f"{name:28s} N={n:>8d} fwd {rec['fwd_ms']:9.3f} ms  fwd+bwd {rec['fwd_bwd_ms']:9.3f} ms"
        f"  {rec['tflops_fwd_bwd']:6.1f} TFLOP/s  peak {rec['peak_bytes'] / 2**30:7.2f} GiB",
        flush=True)
  return rec


def _dense(n: int):
  """(config, forward FLOPs) of the dense causal case: one branch w=N, r=1."""
  cfg = dict(segment_lengths=(n,), dilation_rates=(1,), mode="mix", causal=True)
  return cfg, attention_flops(n, (n,), (1,), "mix", True)


def _longnet(n: int, mode: str):
  """(config, forward FLOPs) of the causal LongNet case."""
  cfg = dict(LONGNET, mode=mode, causal=True)
  return cfg, attention_flops(n, LONGNET["segment_lengths"], LONGNET["dilation_rates"],
                              mode, True)


def cases(only):
  if "dense" in only:
    for n in (8192, 32768, 131072):
      cfg, fl = _dense(n)
      yield "cudnn_dense", cudnn_dense, n, fl, cfg
      yield "ours_dense", functools.partial(ours, segment_lengths=(n,), dilation_rates=(1,)), n, fl, cfg
      yield "ours_dense_ring1", functools.partial(
          ours_ring1, segment_lengths=(n,), dilation_rates=(1,)), n, fl, cfg
  if "longnet" in only:
    for n in (65536, 262144, 524288, 1048576):
      for mode in ("mix", "partition"):
        cfg, fl = _longnet(n, mode)
        yield f"ours_longnet_{mode}", functools.partial(ours, mode=mode, **LONGNET), n, fl, cfg
        yield f"gather_cudnn_longnet_{mode}", functools.partial(
            gather_cudnn, mode=mode, **LONGNET), n, fl, cfg
        if n == 1 << 20 and mode == "mix":  # the plain one needs 100 GiB here
          yield f"gather_cudnn_remat_longnet_{mode}", functools.partial(
              gather_cudnn, mode=mode, remat=True, **LONGNET), n, fl, cfg
  if "pallas" in only:
    for n in (8192, 32768):
      cfg, fl = _dense(n)
      yield "cudnn_dense", cudnn_dense, n, fl, cfg
      yield "ours_pallas_dense", functools.partial(
          ours, segment_lengths=(n,), dilation_rates=(1,), backend="pallas"), n, fl, cfg
    for n in (65536, 262144, 524288, 1048576):
      for mode in ("mix", "partition"):
        cfg, fl = _longnet(n, mode)
        yield f"ours_pallas_longnet_{mode}", functools.partial(
            ours, mode=mode, backend="pallas", **LONGNET), n, fl, cfg
        yield f"ours_longnet_{mode}", functools.partial(ours, mode=mode, **LONGNET), n, fl, cfg
        if mode == "partition" or n < 1 << 20:
          yield f"gather_cudnn_longnet_{mode}", functools.partial(
              gather_cudnn, mode=mode, **LONGNET), n, fl, cfg
  if "zigzag" in only:  # run with "dense": its ours_dense_ring1 is the reference
    for n in (8192, 32768, 131072):
      cfg, fl = _dense(n)
      yield "ours_dense_ring1_zigzag", functools.partial(
          ours_ring1, segment_lengths=(n,), dilation_rates=(1,), layout="zigzag"), n, fl, cfg
    for n in (131072, 1048576):  # per-device length L = n / 8
      local = n // 8
      cfg = dict(segment_lengths=(n,), dilation_rates=(1,), mode="mix", causal=True,
                 ring_size=8)
      yield "step_contiguous_p8", step_contiguous, local, 4.0 * local**2 * H * D, cfg
      yield "step_zigzag_p8", step_zigzag, local, 2.0 * local**2 * H * D, cfg
  if "ringattn" in only:
    for n in (8192, 32768):
      cfg, fl = _dense(n)
      yield "ringattention_pkg", ringattention_pkg, n, fl, cfg
      yield "ours_dense_ring1", functools.partial(
          ours_ring1, segment_lengths=(n,), dilation_rates=(1,)), n, fl, cfg


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help="results JSON path")
  parser.add_argument("--only", default="dense,longnet,ringattn,zigzag",
                      help="comma list of case groups, or implementation names")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--max-seq", type=int, default=1 << 20)
  parser.add_argument("--seqs", default="", help="comma list: only these lengths")
  args = parser.parse_args(argv)
  only = set(args.only.split(","))
  seqs = {int(x) for x in args.seqs.split(",") if x}
  records = []
  if args.out and os.path.exists(args.out):
    with open(args.out) as f:
      records = json.load(f)
  groups = {"dense", "longnet", "ringattn", "zigzag", "pallas"}
  done = set()  # a case in two groups runs once
  for name, impl, n, fl, cfg in cases(only & groups or groups):
    if not only & groups and name not in only:
      continue
    if n > args.max_seq or (seqs and n not in seqs) or (name, n) in done:
      continue
    done.add((name, n))
    rec = measure(name, impl, n, fl, cfg, args.iters)
    records = [r for r in records if (r["name"], r["seq_len"]) != (name, n)] + [rec]
    if args.out:  # after every case, so a run cut short keeps what it measured
      os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
