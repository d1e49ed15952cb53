"""The Mosaic GPU kernels alone on one Hopper GPU: exactness against the
Triton kernels (same in-place calls, random running accumulators; and ring
blocks through the backends' block entry points) and speed against cuDNN and
the Triton kernels on dense causal attention.

  python3 benchmarks/mosaic_probe.py            # every case, each in a child
                                                # process under a timeout
  python3 benchmarks/mosaic_probe.py exact:dense_causal   # one case
  python3 benchmarks/mosaic_probe.py block:visiting_both  # one ring block case
  JOBS=8 PROBE_GPUS=0,1 python3 benchmarks/mosaic_probe.py  # exactness cases in parallel

A kernel that deadlocks shows as a timeout of its case, not a hung run.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ringdilated._backends import mosaic, pallas
from ringdilated._backends.base import Dropout, StridedBranch, Visibility
from ringdilated._merge import row_delta

EXACT = {  # name: (L, H, K, D, kept, rate, heads, offset, causal[, options]); options:
    # masks docs/pad/both, "drop" (dropout 0.1), "fresh" (own outputs, as ring blocks),
    # "alone" (a partition branch that writes every row of its heads over random
    # accumulators: 0 / -inf at the other offsets, other heads unchanged)
    "dense_causal": (4096, 4, 4, 128, 4096, 1, (0, 4), None, True),
    "dense_full": (2048, 4, 4, 128, 2048, 1, (0, 4), None, False),
    "mix_r2_gqa": (4096, 4, 2, 128, 1024, 2, (0, 4), None, True),
    "part_r4_d64": (8192, 8, 8, 64, 512, 4, (4, 8), 1, True),
    "mix_r8_gqa4": (16384, 8, 2, 128, 256, 8, (0, 8), None, False),
    "docs_causal": (4096, 4, 4, 128, 4096, 1, (0, 4), None, True, "docs"),
    "pad_full": (4096, 4, 2, 128, 2048, 1, (0, 4), None, False, "pad"),
    "both_mix_r2": (8192, 4, 2, 128, 1024, 2, (0, 4), None, True, "both"),
    "both_part_r4": (8192, 8, 8, 64, 512, 4, (4, 8), 1, False, "both"),
    "drop_mix_r2_gqa": (4096, 4, 2, 128, 1024, 2, (0, 4), None, True, "drop"),
    "drop_dense_full": (2048, 4, 4, 128, 2048, 1, (0, 4), None, False, "drop"),
    "drop_both_part_r4": (8192, 8, 8, 64, 512, 4, (4, 8), 1, True, "both+drop"),
    "fresh_dense_causal": (4096, 4, 2, 128, 2048, 1, (0, 4), None, True, "fresh"),
    "fresh_dense_full": (2048, 8, 4, 64, 1024, 1, (0, 8), None, False, "fresh"),
    "alone_part_r4": (8192, 8, 8, 64, 512, 4, (4, 8), 1, True, "alone"),
    "alone_both_r2": (8192, 8, 4, 128, 1024, 2, (4, 8), 1, True, "both+alone"),
    "alone_drop_r8": (16384, 4, 4, 128, 512, 8, (2, 4), 5, False, "drop+alone"),
    "alone_mix_r2": (4096, 4, 2, 128, 1024, 2, (0, 4), None, True, "alone"),  # one branch
    # "delta": dq reads a given delta = rowsum(dout * out) instead of O (a
    # later branch after one that formed it for every row)
    "delta_mix_r2_gqa": (4096, 4, 2, 128, 1024, 2, (0, 4), None, True, "delta"),
    "delta_both_drop_r4": (8192, 8, 8, 64, 512, 4, (0, 8), None, True, "both+drop+delta"),
    "delta_fresh_full": (2048, 8, 4, 64, 1024, 1, (0, 8), None, False, "fresh+delta"),
}


def _masks(kind, length, seed=1):
  """(key validity, segment ids) [1, L]: documents of 3 to 700 tokens in
  order, and padding in the middle and at the end."""
  rng = np.random.default_rng(seed)
  seg = valid = None
  if kind in ("docs", "both"):
    seg = np.repeat(np.arange(length), rng.integers(3, 700, length))[:length][None]
    seg = jnp.asarray(seg, jnp.int32)
  if kind in ("pad", "both"):
    v = np.ones((1, length), bool)
    v[:, length // 3:length // 3 + 300] = False
    v[:, -length // 10:] = False
    valid = jnp.asarray(v)
  return valid, seg


# Ring blocks with their token vectors, one per kv head ([X, T, K]; each kv
# head's documents cut elsewhere): name -> (T, H, K, D, causal,
# masks[+drop][+recur]). Causal ones are a device's own (diagonal) block:
# queries and keys of one chunk; the others a visiting block: keys of the
# chunk before the queries'. "recur": segment ids as labels that recur (mod
# 4), so a visiting block's queries see keys of many documents; without it
# most of them see none (out 0, lse -inf).
BLOCKS = {
    "diagonal_docs": (4096, 4, 2, 128, True, "docs"),
    "visiting_both": (4096, 4, 2, 128, False, "both+recur"),
    "visiting_both_drop_d64": (4096, 4, 4, 64, False, "both+drop+recur"),
    "diagonal_pad_drop_gqa4": (2048, 8, 2, 128, True, "pad+drop"),
    "visiting_docs_unseen": (4096, 4, 2, 128, False, "docs"),
}


# causal, H=16: name -> (length, kept tokens per segment, head dim); dense cases
# are timed against cuDNN and the Triton kernels, "seg2048" (LongNet's segments
# of 2048 kept tokens, one branch of rate 1) alone, for tuning
SPEED = {"dense32k": (32768, 32768, 128), "dense32k_d64": (32768, 32768, 64),
         "seg2048": (262144, 2048, 128)}


def _inputs(length, h, k, d, seed=0):
  keys = jax.random.split(jax.random.key(seed), 8)
  n = lambda key, heads: jax.random.normal(key, (1, length, heads, d), jnp.bfloat16)  # noqa: E731
  return dict(q=n(keys[0], h), k=n(keys[1], k), v=n(keys[2], k), do=n(keys[3], h),
              out=n(keys[4], h), lse=jax.random.normal(keys[5], (1, length, h), jnp.float32),
              delta=jax.random.normal(keys[6], (1, length, h), jnp.float32),
              dq=n(keys[7], h), dk=n(keys[1], k) * 0.5, dv=n(keys[2], k) * 0.5)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def exact(name: str, tiles: mosaic.MosaicTiles | None = None) -> dict:
  """The case's relative errors (None: the tiles the backend runs)."""
  length, h, kh, d, kept, rate, heads, offset, causal, *opts = EXACT[name]
  tiles = tiles or mosaic.TUNED[d]
  opts = opts[0].split("+") if opts else []
  geo = StridedBranch(kept=kept, rate=rate, heads=heads, group=h // kh, offset=offset,
                      causal=causal, scale=d ** -0.5, alone="alone" in opts)
  x = _inputs(length, h, kh, d)
  valid, seg = _masks(next((o for o in opts if o in ("docs", "pad", "both")), None), length)
  vis = Visibility(valid, seg, seg, causal)
  drop = None
  if "drop" in opts:  # positions as on the second device of a ring
    pos = jnp.arange(length, 2 * length, dtype=jnp.int32)[None]
    drop = Dropout(0.1, jnp.uint32(1234567), np.arange(*heads).reshape(-1, h // kh), pos, pos)
  fresh = "fresh" in opts
  tri = pallas.Pallas()
  acc = (lambda x: (None, None)) if fresh else (lambda x: (x["out"], x["lse"]))  # noqa: E731
  got = jax.jit(lambda x: mosaic.forward(geo, tiles, x["q"], x["k"], x["v"], *acc(x), vis,
                                         drop))(x)
  want = jax.jit(lambda x: tri.branch_forward(geo, x["q"], x["k"], x["v"], vis, drop,
                                             *acc(x)))(x)
  finite = lambda a: np.where(np.isfinite(a), a, 0.0)  # noqa: E731
  rec = dict(out=_rel(got[0], want[0]), lse=_rel(finite(got[1]), finite(want[1])),
             lse_inf_equal=bool(np.array_equal(np.isinf(got[1]), np.isinf(want[1]))),
             nan=bool(any(np.isnan(np.asarray(a, np.float32)).any() for a in got)))
  grads = None if fresh else (x["dq"], x["dk"], x["dv"])
  given = "delta" in opts
  got, formed = jax.jit(lambda x: mosaic.backward(
      geo, tiles, x["q"], x["k"], x["v"], x["do"], want[1], x["out"], grads, vis, drop,
      row_delta(x["do"], x["out"]) if given else None))(x)
  ref, delta = jax.jit(lambda x: tri.branch_backward(geo, x["q"], x["k"], x["v"], vis, drop,
                                                     x["do"], want[1], x["out"], grads))(x)
  rec.update({n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), got, ref)})
  if formed is not None and not given:  # the delta the dq kernel formed for every row
    rec["delta"] = _rel(formed, delta)
  if fresh:
    return rec
  grads = (x["dq"], x["dk"], x["dv"])
  # the branch's own gradient part, relative to itself (accumulators removed)
  rec.update({f"{n}_own": _rel(a.astype(np.float32) - g.astype(np.float32),
                               b.astype(np.float32) - g.astype(np.float32))
              for n, a, b, g in zip(("dq", "dk", "dv"), got, ref, grads)})
  return rec


def block(name: str, tiles: mosaic.MosaicTiles | None = None) -> dict:
  """A ring block's relative errors against the Triton kernels' (both
  through the backends' block entry points, which take [X, T, K, G, D])."""
  t, h, kh, d, causal, opts = BLOCKS[name]
  opts = opts.split("+")
  g = h // kh
  x = _inputs(t, h, kh, d)
  q, dout = (x[n].reshape(1, t, kh, g, d) for n in ("q", "do"))
  per_kv = [_masks(opts[0], 2 * t, seed=1 + j) for j in range(kh)]  # 2 chunks of t
  queries, keys = slice(t, 2 * t), (slice(t, 2 * t) if causal else slice(0, t))

  def tokens(i, side):  # [1, t, K] of the kv heads' vectors, or None
    vecs = [m[i] for m in per_kv]
    if vecs[0] is None:
      return None
    return jnp.stack([v[:, side] % (4 if i and "recur" in opts else 2 ** 30) for v in vecs], -1)
  vis = Visibility(tokens(0, keys), tokens(1, queries), tokens(1, keys), causal)
  drop = None
  if "drop" in opts:
    pos = lambda side: jnp.broadcast_to(  # noqa: E731
        jnp.arange(2 * t, dtype=jnp.int32)[None, side, None], (1, t, kh))
    drop = Dropout(0.1, jnp.uint32(7654321), np.arange(h).reshape(kh, g), pos(queries),
                   pos(keys))
  ours, tri = mosaic.Mosaic(mosaic=tiles), pallas.Pallas()
  scale = d ** -0.5
  fwd = lambda be: jax.jit(lambda q, k, v: be.forward(  # noqa: E731
      q, k, v, vis, scale=scale, dropout=drop))(q, x["k"], x["v"])
  got, want = fwd(ours), fwd(tri)
  finite = lambda a: np.where(np.isfinite(a), a, 0.0)  # noqa: E731
  rec = dict(out=_rel(got[0], want[0]), lse=_rel(finite(got[1]), finite(want[1])),
             lse_inf_equal=bool(np.array_equal(np.isinf(got[1]), np.isinf(want[1]))),
             rows_unseen=int(np.isinf(np.asarray(want[1])).sum()),
             nan=bool(any(np.isnan(np.asarray(a, np.float32)).any() for a in got)))
  bwd = lambda be: jax.jit(lambda q, k, v, do: be.backward(  # noqa: E731
      q, k, v, vis, do, want[0], want[1], scale=scale, dropout=drop))(q, x["k"], x["v"], dout)
  rec.update({n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), bwd(ours), bwd(tri))})
  return rec


def _time(fn, *args, iters=10):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append((time.perf_counter() - t0) * 1e3)
  return float(np.median(ts))


def speed(name: str, tiles: mosaic.MosaicTiles | None = None,
          references: bool = True) -> dict:
  (length, kept, d), h = SPEED[name], 16
  references = references and kept == length
  tiles = tiles or mosaic.TUNED[d]
  x = _inputs(length, h, h, d)
  geo = StridedBranch(kept=kept, rate=1, heads=(0, h), group=1, offset=None, causal=True,
                      scale=d ** -0.5)
  vis = Visibility(None, None, None, True)
  tri = pallas.Pallas()
  zeros, ninf = jnp.zeros_like(x["q"]), jnp.full(x["lse"].shape, -jnp.inf, jnp.float32)
  grads = (jnp.zeros_like(x["q"]), jnp.zeros_like(x["k"]), jnp.zeros_like(x["v"]))
  rec = {}
  fm = jax.jit(lambda q, k, v: mosaic.forward(geo, tiles, q, k, v, zeros, ninf))
  ft = jax.jit(lambda q, k, v: pallas.forward(geo, tri, q, k, v, vis, None, zeros, ninf))
  out, lse = fm(x["q"], x["k"], x["v"])
  bm = jax.jit(lambda q, k, v, do: mosaic.backward(geo, tiles, q, k, v, do, lse, out, grads))
  bd = jax.jit(lambda q, k, v, do: mosaic.backward(geo, tiles, q, k, v, do, lse, out, grads,
                                                   delta=x["delta"]))
  bt = jax.jit(lambda q, k, v, do: pallas.backward(geo, tri, q, k, v, vis, None, do, lse,
                                                   x["delta"], grads))
  args = (x["q"], x["k"], x["v"])
  rec["mosaic_fwd"] = _time(fm, *args)
  rec["mosaic_bwd"] = _time(bm, *args, x["do"])
  rec["mosaic_bwd_given_delta"] = _time(bd, *args, x["do"])  # dq reads delta, not O
  rec["mosaic_fwdbwd"] = rec["mosaic_fwd"] + rec["mosaic_bwd"]
  kinds = ("mosaic",)
  if references:
    rec["triton_fwd"] = _time(ft, *args)
    rec["triton_bwd"] = _time(bt, *args, x["do"])
    rec["triton_fwdbwd"] = rec["triton_fwd"] + rec["triton_bwd"]
    cud = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation="cudnn")
    rec["cudnn_fwd"] = _time(jax.jit(cud), *args)
    loss = lambda q, k, v: jnp.sum(cud(q, k, v).astype(jnp.float32) * x["do"])  # noqa: E731
    rec["cudnn_fwdbwd"] = _time(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), *args)
    kinds = ("mosaic", "triton", "cudnn")
  flops = 4 * length * kept * d * h / 2
  rec["tflops_fwd"] = {k: flops / rec[f"{k}_fwd"] / 1e9 for k in kinds}
  rec["tflops_fwdbwd"] = {k: 3.5 * flops / rec[f"{k}_fwdbwd"] / 1e9 for k in kinds}
  return rec


def main(argv) -> int:
  if argv:
    kind, name, *tiles = argv[0].split(":")  # [kind:name:fwd_k,dq_k,dkv_q,stages]
    tiles = mosaic.MosaicTiles(*map(int, tiles[0].split(","))) if tiles else None
    if kind == "tune":
      rec = speed(name, tiles, False)
    else:
      rec = dict(exact=exact, block=block, speed=speed)[kind](name, tiles)
    print("RESULT", json.dumps(rec))
    return 0
  timeout = float(os.environ.get("CASE_TIMEOUT", "120"))
  exact_cases = [f"exact:{n}" for n in EXACT] + [f"block:{n}" for n in BLOCKS]
  timed = [f"speed:{n}" for n in SPEED]
  if os.environ.get("TUNE"):  # fwd_k,dq_k,dkv_q,stages sets, ";"-separated
    case = os.environ.get("TUNE_CASE", "dense32k")
    exact_cases, timed = [], [f"tune:{case}:{t}" for t in os.environ["TUNE"].split(";")]
  # exactness cases JOBS at a time over the GPUs PROBE_GPUS; timed ones alone
  gpus = os.environ.get("PROBE_GPUS", "0").split(",")
  jobs = int(os.environ.get("JOBS", "1"))
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    for line in pool.map(lambda a: _child(a[1], timeout, gpus[a[0] % len(gpus)], jobs > 1),
                         enumerate(exact_cases)):
      print(line, flush=True)
  for case in timed:
    print(_child(case, timeout, gpus[0], False), flush=True)
  return 0


def _child(case: str, timeout: float, gpu: str, shared: bool) -> str:
  """Runs one case in a child process on ``gpu``; its result line."""
  env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
  if shared:  # several children on one GPU
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  t0 = time.time()
  try:
    p = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True,
                       timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return f"{case} TIMEOUT"
  lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
  return (f"{case} {time.time() - t0:.0f}s " + (lines[-1] if lines else
          f"FAILED rc={p.returncode}\n{p.stderr[-3000:]}"))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
