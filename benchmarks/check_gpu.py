"""GPU correctness check of the backends and of rings over all visible GPUs.

Run on a GPU machine::

  python benchmarks/check_gpu.py                     # multi-GPU rings, then one GPU
  python benchmarks/check_gpu.py cudnn pallas        # these backends only
  python benchmarks/check_gpu.py --sections single   # the one-GPU section only
  python benchmarks/check_gpu.py --smoke             # CPU, 2 simulated devices

Every case compares the outputs and q/k/v gradients (relative L2 error) of a
backend in bf16 against ``backend="xla"`` on one device in float32 from the
same bf16 inputs; tolerance 2e-2.

multi   rings over all visible devices (``jax.shard_map``, sequence sharded,
        zigzag data permuted with ``rd.to_layout``), every backend (xla,
        cudnn, pallas, mosaic; ``--no-check-vma`` runs the rings under
        ``check_vma=False``), both layouts, mix and partition, with a local and a
        spanning branch (N=16384, ``(2048, 16384)`` / ``(1, 2)``) and three
        branches (``(2048, 8192, 16384)`` / ``(1, 2, 4)``), causal and not,
        with and without ``segment_ids`` / ``key_padding_mask``; not the whole
        cross product: a design that covers each option with each backend
        and layout, the Pallas cases first. A negative control (contiguous
        data fed to a zigzag ring) must exceed the tolerance.
single  the original check on one GPU: dense and dilated configurations,
        causal and not, plain and on a 1-device ring, cudnn, pallas and mosaic.

A line is printed (flushed) before each case, so after a crash (SIGSEGV) the
last line says where. An exception fails its case, not the run. Exit code:
0 all passed, 1 a case failed, 3 cases left out by ``--time-budget``.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=2"
                             " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ringdilated as rd  # noqa: E402
from ringdilated import backends as rd_backends  # noqa: E402

TOL = 2e-2  # relative L2 error, bf16 inputs against float32 math


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes and options of a check (``--smoke``: :data:`SMOKE`, for CPU).

  Attributes:
    scale: lengths are divided by it.
    b, h, hkv, d: batch, query heads, kv heads, head dim of the multi-GPU
      section (grouped-query attention).
    check_vma: rings under ``jax.shard_map(check_vma=True)`` where the
      backend allows it (``--no-check-vma``: never).
  """

  scale: int = 1
  b: int = 1
  h: int = 8
  hkv: int = 4
  d: int = 64
  check_vma: bool = True

  @property
  def n(self) -> int:
    """Sequence length of the multi-GPU section."""
    return 16384 // self.scale

  def config(self, name: str) -> dict:
    """``two_branch``: a local and a spanning branch; ``three_branch``."""
    s = self.scale
    if name == "two_branch":
      return dict(segment_lengths=(2048 // s, self.n), dilation_rates=(1, 2))
    return dict(segment_lengths=(2048 // s, 8192 // s, self.n), dilation_rates=(1, 2, 4))

  def vma(self, backend: str) -> bool:
    """Off for Pallas in interpret mode (off a GPU), whose grid loop the
    varying-axes check mistypes (jax 0.10; see tests/test_pallas.py), and
    with --no-check-vma."""
    return self.check_vma and (backend not in ("pallas", "mosaic")
                               or jax.default_backend() == "gpu")


SMOKE = Settings(scale=16, h=4, hkv=2, d=32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
  return err if np.isfinite(err) else float("inf")


# ----------------------------------------------------------------------------
# One GPU (the original check).
# ----------------------------------------------------------------------------


def _run(st: Settings, q, k, v, cot, backend, ring, **kw):
  fn = functools.partial(rd.dilated_attention, backend=backend, **kw)
  if ring:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
    fn = jax.shard_map(functools.partial(fn, axis_name="sp"), mesh=mesh,
                       in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"),
                       check_vma=st.vma(backend))

  @jax.jit
  def go(q, k, v, cot):
    out, pull = jax.vjp(fn, q, k, v)
    return (out,) + pull(cot.astype(out.dtype))
  return go(q, k, v, cot)


def single_cases(st: Settings, names):
  s = st.scale
  configs = [
      dict(segment_lengths=(4096 // s,), dilation_rates=(1,)),
      dict(segment_lengths=tuple(w // s for w in (512, 1024, 2048, 4096)),
           dilation_rates=(1, 2, 4, 8)),
      dict(segment_lengths=tuple(w // s for w in (512, 1024, 2048, 4096)),
           dilation_rates=(1, 2, 4, 8), mode="partition"),
      dict(segment_lengths=tuple(w // s for w in (512, 1024, 2048, 4096)),
           dilation_rates=(1, 2, 4, 8), **_dropout_kw(("dropout",))),
  ]
  for backend in names:
    for kw in configs:
      for causal in (False, True):
        for ring in (False, True):
          yield backend, kw, causal, ring


def run_single(st: Settings, backend, kw, causal, ring, rng):
  b, n, h, hkv, d = 2, 4096 // st.scale, 8, 4, 128 // min(st.scale, 4)
  q = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((b, n, hkv, d)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((b, n, hkv, d)), jnp.bfloat16)
  cot = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
  got = _run(st, q, k, v, cot, backend, ring, causal=causal, **kw)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = _run(st, *f32, cot, "xla", False, causal=causal, **kw)
  return [_rel(g, w) for g, w in zip(got, want)]


# ----------------------------------------------------------------------------
# Rings over all visible devices.
# ----------------------------------------------------------------------------


def multi_cases(names, layouts):
  """(backend, layout, mode, config name, causal, masks), most important first:
  the local + spanning pair (causal, mix) on Pallas (the crash of
  repro_pallas_ring_crash.py), Pallas with masks, the same pair on the other
  backends, the negative control (backend None), then every backend x layout
  x mode with the pair, masks (segment ids, key padding, both) on three
  branches, dropout (with segment ids; alone), three branches unmasked
  causal and not; each case once."""
  order = [b for b in ("pallas", "cudnn", "xla") if b in names] + [
      b for b in names if b not in ("pallas", "cudnn", "xla")]
  first = []
  if "pallas" in order:
    first += [("pallas", layout, "mix", "two_branch", True, ()) for layout in layouts]
    first += [("pallas", layouts[0], "mix", "three_branch", True, (m,))
              for m in ("segment_ids", "key_padding_mask")]
  first += [(b, layout, "mix", "two_branch", True, ()) for b in order if b != "pallas"
            for layout in layouts]
  first.append((None, "zigzag", "mix", "two_branch", True, ()))  # negative control
  rest = []
  for backend in order:
    for layout in layouts:
      for mode in ("mix", "partition"):
        rest.append((backend, layout, mode, "two_branch", True, ()))
    for layout in layouts:
      rest.append((backend, layout, "mix", "three_branch", True, ("segment_ids",)))
      rest.append((backend, layout, "mix", "three_branch", True, ("key_padding_mask",)))
      rest.append((backend, layout, "partition", "three_branch", False,
                   ("segment_ids", "key_padding_mask")))
  for backend in order:  # dropout (in place and on the ring) with documents
    rest.append((backend, layouts[0], "mix", "three_branch", True, ("segment_ids", "dropout")))
    rest.append((backend, layouts[-1], "partition", "two_branch", True, ("dropout",)))
  for backend in order:
    for layout in layouts:
      rest.append((backend, layout, "mix", "three_branch", False, ()))
      rest.append((backend, layout, "partition", "three_branch", True, ()))
      rest.append((backend, layout, "mix", "two_branch", False, ("segment_ids",)))
  seen = set()
  for case in first + rest:
    if case not in seen:
      seen.add(case)
      yield case


def _dropout_kw(masks) -> dict:
  """Dropout 0.1 with a fixed key when "dropout" is among a case's masks:
  the float32 reference drops the same weights (a function of the key, the
  head and the global positions)."""
  return dict(dropout_rate=0.1, dropout_rng=jax.random.key(7)) if "dropout" in masks else {}


def _tokens_of(masks):
  return [m for m in masks if m != "dropout"]


def _mask_data(b, n, rng):
  """segment_ids [B, N]: documents of random lengths crossing the devices'
  boundaries; key_padding_mask [B, N]: the last 10% and 5% at random padded."""
  cuts = np.sort(rng.choice(np.arange(1, n), size=6, replace=False))
  seg = np.searchsorted(cuts, np.arange(n), side="right").astype(np.int32)
  pad = (np.arange(n) < n - n // 10) & (rng.random(n) > 0.05)
  return {"segment_ids": np.broadcast_to(seg, (b, n)).copy(),
          "key_padding_mask": np.broadcast_to(pad, (b, n)).copy()}


def _reference(st: Settings, cache: dict, cfg_name, mode, causal, masks, data, tokens):
  """One device, float32, backend="xla": (out, dq, dk, dv) as numpy, kept
  in ``cache`` (one per data set) for the cases that share it."""
  key = (cfg_name, mode, causal, masks)
  if key not in cache:
    cfg = st.config(cfg_name)
    dev = jax.devices()[0]
    q, k, v, cot = (jax.device_put(x.astype(np.float32), dev) for x in data)
    extra = {m: jax.device_put(tokens[m], dev) for m in _tokens_of(masks)}

    @jax.jit
    def run(q, k, v, cot, extra):
      fn = functools.partial(rd.dilated_attention, causal=causal, mode=mode, backend="xla",
                             **cfg, **extra, **_dropout_kw(masks))
      out, pull = jax.vjp(fn, q, k, v)
      return (out,) + pull(cot)
    cache[key] = [np.asarray(x, np.float64) for x in run(q, k, v, cot, extra)]
  return cache[key]


def ring_out_and_grads(st: Settings, backend, layout, mode, cfg, causal, masks, data, tokens, p,
                       lay_out=True):
  """The bf16 ring over ``p`` devices: (out, dq, dk, dv) in natural order.
  ``lay_out=False`` feeds the data unpermuted (the negative control)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:p]), ("sp",))
  sh = NamedSharding(mesh, P(None, "sp"))
  perm = (lambda x: rd.to_layout(x, layout, p)) if lay_out else (lambda x: x)
  q, k, v, cot = (jax.device_put(perm(x), sh) for x in data)
  extra = {m: jax.device_put(perm(tokens[m]), sh) for m in _tokens_of(masks)}

  def attend(q, k, v, extra):
    return rd.dilated_attention(q, k, v, causal=causal, mode=mode, backend=backend,
                                axis_name="sp", layout=layout, **cfg, **extra,
                                **_dropout_kw(masks))

  def go(q, k, v, cot, extra):
    out, pull = jax.vjp(lambda q, k, v: attend(q, k, v, extra), q, k, v)
    return (out,) + pull(cot)

  spec = P(None, "sp")
  ring = jax.jit(jax.shard_map(go, mesh=mesh, in_specs=(spec,) * 4 + ({m: spec for m in extra},),
                               out_specs=spec, check_vma=st.vma(backend)))
  return [rd.from_layout(np.asarray(x.astype(jnp.float32), np.float64), layout, p)
          for x in ring(q, k, v, cot, extra)]


def _negative_control(st: Settings, cache: dict, data, tokens, p) -> bool:
  """Contiguous data fed to a zigzag ring (XLA blocks) must miss the
  tolerance: the comparison can fail. Whether it did."""
  label = f"negative control: contiguous data on a zigzag ring of {p} (must exceed {TOL})"
  print(f"{label} ...", flush=True)
  try:
    want = _reference(st, cache, "two_branch", "mix", True, (), data, tokens)
    got = ring_out_and_grads(st, "xla", "zigzag", "mix", st.config("two_branch"), True, (),
                             data, tokens, p, lay_out=False)
    err = max(_rel(g, w) for g, w in zip(got, want))
  except Exception as e:  # pylint: disable=broad-except
    print(f"{label} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
    return False
  print(f"{label}: {err:.1e} {'PASS' if err > TOL else 'FAIL'}", flush=True)
  return err > TOL


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("backends", nargs="*", help="default: pallas cudnn xla mosaic "
                      "(multi), cudnn pallas mosaic (single)")
  parser.add_argument("--sections", default="multi,single")
  parser.add_argument("--layouts", default="zigzag,contiguous")
  parser.add_argument("--time-budget", type=float, default=None,
                      help="seconds; no case starts after that (exit code 3)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU")
  parser.add_argument("--match", default=None,
                      help="regular expression: only the cases whose printed label matches "
                      "(the negative control always runs)")
  parser.add_argument("--no-check-vma", action="store_true",
                      help="rings under jax.shard_map(check_vma=False)")
  args = parser.parse_args(argv)
  st = dataclasses.replace(SMOKE if args.smoke else Settings(),
                           check_vma=not args.no_check_vma)
  start = time.monotonic()
  sections = args.sections.split(",")
  layouts = args.layouts.split(",")
  devices = jax.devices()
  p = len(devices)
  print(f"jax {jax.__version__}, {p} x {devices[0].device_kind}", flush=True)
  failed, left_out, worst = [], 0, 0.0
  request = rd_backends.Request(jax.default_backend(), jnp.dtype(jnp.bfloat16), 128, False,
                                False)
  picked = rd_backends.select("cudnn", request)
  print(f"cudnn selected: {picked.name}", flush=True)
  if picked.name != "cudnn" and not args.smoke:
    failed.append("cudnn not selected on this machine")

  def over_budget():
    return args.time_budget is not None and time.monotonic() - start > args.time_budget

  def check(label, errors):
    """Prints ``label``, runs ``errors()`` -> [rel err of out, dq, dk, dv],
    records a failure (an exception or an error over TOL); the worst error."""
    print(f"{label} ...", flush=True)
    try:
      errs = errors()
    except Exception as e:  # pylint: disable=broad-except
      print(f"{label} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
      failed.append(label)
      return 0.0
    ok = max(errs) < TOL
    print(f"{label} rel err out/dq/dk/dv = " + " ".join(f"{e:.1e}" for e in errs)
          + ("" if ok else "  FAIL"), flush=True)
    if not ok:
      failed.append(label)
    return max(errs)

  rng = np.random.default_rng(0)
  if "multi" in sections:
    if p < 2:
      print("multi: skipped, fewer than 2 devices visible", flush=True)
    else:
      n, cache = st.n, {}
      data = [rng.standard_normal((st.b, n, h, st.d)).astype(jnp.bfloat16)
              for h in (st.h, st.hkv, st.hkv, st.h)]
      tokens = _mask_data(st.b, n, rng)
      names = args.backends or ["pallas", "cudnn", "xla", "mosaic"]
      for backend, layout, mode, cfg_name, causal, masks in multi_cases(names, layouts):
        label = (f"ring P={p} {backend or '-':6s} {layout:10s} {mode:9s} {cfg_name:12s} "
                 f"causal={causal!s:5} masks={'+'.join(masks) or '-':29s}")
        if backend is not None and args.match and not re.search(args.match, label):
          continue
        if over_budget():
          left_out += 1
          continue
        if backend is None:
          if not _negative_control(st, cache, data, tokens, p):
            failed.append("negative control")
          continue
        cfg = st.config(cfg_name)
        try:
          rd.ring_balance(rd.DilatedConfig(cfg["segment_lengths"], cfg["dilation_rates"],
                                           mode, causal, layout=layout), n, p)
        except ValueError as e:
          print(f"{label} not valid on this ring: {e}", flush=True)
          continue

        def errors(backend=backend, layout=layout, mode=mode, cfg=cfg, cfg_name=cfg_name,
                   causal=causal, masks=masks):
          want = _reference(st, cache, cfg_name, mode, causal, masks, data, tokens)
          got = ring_out_and_grads(st, backend, layout, mode, cfg, causal, masks, data, tokens,
                                   p)
          return [_rel(g, w) for g, w in zip(got, want)]
        worst = max(worst, check(label, errors))

  if "single" in sections:
    names = args.backends or ["cudnn", "pallas", "mosaic"]
    for backend, kw, causal, ring in single_cases(st, names):
      label = (f"1 GPU  {backend:6s} {kw.get('mode', 'mix'):9s} w={kw['segment_lengths']} "
               f"causal={causal!s:5} ring={ring!s:5}" + " dropout" * ("dropout_rate" in kw))
      if args.match and not re.search(args.match, label):
        continue
      if over_budget():
        left_out += 1
        continue
      worst = max(worst, check(label, functools.partial(run_single, st, backend, kw, causal,
                                                        ring, rng)))

  print(f"worst relative error {worst:.2e} (tolerance {TOL}); {len(failed)} failed"
        + (f"; {left_out} case(s) left out by the time budget" if left_out else ""),
        flush=True)
  for label in failed:
    print(f"FAILED  {label}")
  if failed:
    return 1
  return 3 if left_out else 0


if __name__ == "__main__":
  sys.exit(main())
