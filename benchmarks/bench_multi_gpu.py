"""Multi-GPU benchmarks of the ring (issue 16): scaling, layouts, memory, overlap.

Run on a machine with P GPUs (all visible devices are used)::

  python benchmarks/bench_multi_gpu.py --out benchmarks/results/h200x2.json --time-budget 200
  python benchmarks/bench_multi_gpu.py --devices 1            # one GPU only
  python benchmarks/bench_multi_gpu.py --only longest         # longest context per backend
  python benchmarks/bench_multi_gpu.py --smoke                # CPU, 2 simulated devices
  python benchmarks/bench_multi_gpu.py --match "longnet_ring/.*/mosaic"  # these cases only
  python benchmarks/check_targets.py benchmarks/results/h200x2.json

The sequence is sharded with ``jax.shard_map`` over
``Mesh(np.array(jax.devices()[:P]), ("sp",))`` (``in_specs P(None, "sp")``),
causal, bf16, B=1, H=16, D=128, forward+backward, for ring sizes ``P`` in
``--devices`` (default ``1,all``: one GPU, a ring of one, against all) and
both layouts (zigzag data permuted with ``rd.to_layout``):

  correctness  at N=32K, each (workload, backend, layout, P > 1): the ring's
               out, dq, dk, dv against one GPU's float32 ``backend="xla"``
               result from the same bf16 inputs (relative L2 <= 2e-2).
  strong       N fixed: dense causal (one branch w=N, r=1) at 128K and the
               LongNet-ring config at 2M, on 1 GPU and on P;
               efficiency t1 / (P tP) (check_targets.py).
  weak         N / P fixed: dense causal 64K per GPU, LongNet-ring 1M per GPU;
               efficiency = per-GPU attention FLOP/s on P over that on one.
  layouts      the strong cases in the contiguous layout (zigzag runs first).
  overlap      ring vs the same program with ``jax.lax.ppermute`` replaced by
               an identity while tracing (compute only; wrong results,
               timing only) vs the ppermutes alone (the same sizes, counts
               and permutations, taken from the jaxpr): the fraction of the
               communication hidden behind compute.
  longest8m    the issue's target: LongNet-ring at 8M tokens on P GPUs,
               ``backend="pallas"``, zigzag (a subprocess).
  dense1m      dense causal at 1M on 1 GPU and on P (slow: last).
  longest      (only when asked) the longest N that runs forward+backward on
               P GPUs, per backend: doubling from 8M, then bisecting coarsely,
               each attempt in a subprocess (an out-of-memory or a crash is
               an exit code, not a dead driver).
  local        (only when asked) LongNet-ring 2M without its last branch, so
               every branch is local (contiguous, no communication), on 1 GPU
               and on P: how far from 1 the ring's efficiency is before it
               has a ring.
  docs         (only when asked) dense causal over packed documents of 8K
               tokens (segment ids from each token's global position), at
               32K against one GPU in float32 and timed at 128K on 1 GPU and
               on P in both layouts: the ring's masked blocks between devices
               (the Hopper kernels' since session 26, Triton's before).

LongNet-ring: ``segment_lengths=(2048, 16384, 131072, 1048576, N)``,
``dilation_rates=(1, 4, 16, 64, N / 16384)``, mode mix; the branches shorter
than N of that list, then the whole sequence with rate N / 16384 (2M:
``(..., 2097152)`` / ``(..., 128)``; 8M: ``(..., 8388608)`` / ``(..., 512)``).

Each timing record has the compiled per-device peak (memory analysis), the
devices' runtime ``peak_bytes_in_use`` (a process-wide high-water mark:
``process_peak_bytes_*`` before/after; ``runtime_peak_bytes`` in a fresh
subprocess), the ppermute bytes one device sends (counted from the jaxpr,
nested jaxprs and scan lengths included) and per ring step, and the static
work balance (``rd.ring_balance``).

Process layout: this driver never initializes a device. It runs the cases in
priority order in worker subprocesses (one per run of consecutive cases) and
each attempt of ``longest8m`` / ``longest`` in its own subprocess, so a
subprocess that holds GPU memory (XLA preallocates) is never alive next to
another. Records are merged into ``--out`` after every case; ``--resume``
skips cases already recorded. ``--time-budget S``: no case starts after S
seconds (the rest are recorded as skipped). ``--trace DIR``: a
``jax.profiler`` trace of two timed runs of the first P > 1 timing case
whose name contains ``--trace-match``.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  # Before jax is imported: 2 simulated CPU devices, and no concurrency-
  # optimized CPU scheduler (it runs independent rings' collectives out of step).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=2"
                             " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
# The 8M-token case needs all of the GPU (XLA's default is 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

import ringdilated as rd  # noqa: E402
from ringdilated._layout import global_positions  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  pylint: disable=g-import-not-at-top

B, H, D = 1, 16, 128
TOL = 2e-2  # relative L2 error, bf16 ring against float32 on one GPU
M = 1 << 20
# LongNet-ring branches (w, r) below the whole sequence; the last branch is
# (N, N / RING_LAST_KEPT), so every branch keeps 2048..16384 tokens per segment.
RING_BASE = ((2048, 1), (16384, 4), (131072, 16), (1048576, 64))
RING_LAST_KEPT = 16384
# Nominal lengths; --smoke divides them (and RING_BASE, RING_LAST_KEPT) by SCALE.
SCALE = 1
CHECK_N = 32768
STRONG = (("dense", 131072), ("longnet_ring", 2 * M))
WEAK = (("dense", 65536), ("longnet_ring", M))  # tokens per GPU
DENSE_1M = 1 * M
DOC = 8192  # tokens per document of the "dense_docs" workload
DOCS_N = 131072
LONGEST_START, LONGEST_MAX = 8 * M, 64 * M
# The run every record is stamped with (the driver's, inherited by its
# subprocesses): check_targets.py divides only records of one run.
RUN = os.environ.setdefault("RINGDILATED_BENCH_RUN", time.strftime("%Y-%m-%dT%H:%M:%S"))
GROUPS = ("correctness", "strong", "weak", "layouts", "overlap", "longest8m", "dense1m",
          "longest", "local", "docs")
DEFAULT_GROUPS = GROUPS[:-3]
SMOKE_GROUPS = ("correctness", "strong", "weak", "layouts", "overlap", "longest8m",
                "longest")


def _configure(smoke: bool) -> None:
  global H, D, SCALE  # pylint: disable=global-statement
  if smoke:
    H, D, SCALE = 4, 32, 64


def _n(nominal: int) -> int:
  return nominal // SCALE


# ----------------------------------------------------------------------------
# Workloads.
# ----------------------------------------------------------------------------


def config(workload: str, n: int) -> dict:
  """The attention settings of ``workload`` at global length ``n`` (its
  documents, if any: :func:`doc_length`)."""
  if workload in ("dense", "dense_docs"):
    return dict(segment_lengths=(n,), dilation_rates=(1,), mode="mix")
  if workload in ("longnet_ring", "longnet_local"):
    base = [(w // SCALE, r) for w, r in RING_BASE if w // SCALE < n]
    last = [(n, max(1, n // (RING_LAST_KEPT // SCALE)))] * (workload == "longnet_ring")
    ws, rs = zip(*(base + last))
    return dict(segment_lengths=tuple(ws), dilation_rates=tuple(rs), mode="mix")
  raise ValueError(f"workload={workload!r}")


def doc_length(workload: str) -> int | None:
  """Tokens per packed document of ``workload`` (a token's segment id is its
  global position // this), or None: no documents."""
  return DOC // SCALE if workload == "dense_docs" else None


def valid(workload: str, n: int, p: int, layout: str) -> str | None:
  """Why ``workload`` at ``n`` can't run on a ring of ``p`` in ``layout``, or None."""
  cfg = config(workload, n)
  try:
    rd.ring_balance(rd.DilatedConfig(cfg["segment_lengths"], cfg["dilation_rates"],
                                     cfg["mode"], True, layout=layout), n, p)
  except ValueError as e:
    return str(e)
  return None


def flops(workload: str, n: int) -> float:
  """Of the visible pairs: packed documents of ``doc`` tokens see what causal
  segments of ``doc`` do."""
  cfg, doc = config(workload, n), doc_length(workload)
  if doc is not None:
    cfg = dict(cfg, segment_lengths=(doc,))
  return bench.attention_flops(n, cfg["segment_lengths"], cfg["dilation_rates"], cfg["mode"],
                               True, heads=H, head_dim=D)


class Case(NamedTuple):
  """One unit of work; its name is its identity in the results file."""

  kind: str       # correctness | timing | overlap | attempt
  workload: str
  n: int
  p: int
  layout: str
  backend: str
  vma: bool = True  # shard_map's varying-axes check (--no-check-vma: off); not in the name

  @property
  def name(self) -> str:
    return f"{self.kind}/{self.workload}/N{self.n}/P{self.p}/{self.layout}/{self.backend}"

  @classmethod
  def parse(cls, name: str, vma: bool = True) -> Case:
    kind, workload, n, p, layout, backend = name.split("/")
    return cls(kind, workload, int(n[1:]), int(p[1:]), layout, backend, vma)

  @property
  def own_process(self) -> bool:
    """Runs in a subprocess of its own (memory limits are probed)."""
    return self.kind == "attempt"


def plan(groups, ps, backends, layouts, timing_backends=None, vma: bool = True) -> list[Case]:
  """The cases of ``groups`` in priority order: the targets of check_targets.py
  first (Pallas correctness, strong scaling in zigzag, 8M), then the rest.
  ``backends`` are checked for correctness, ``timing_backends`` (default the
  same) timed; ``vma``: shard_map's varying-axes check."""
  rings = [p for p in ps if p > 1]
  out = []

  def add(kind, workload, n, p, layout, backend):
    layout = "contiguous" if p == 1 else layout
    if layout not in layouts and p > 1:
      return
    if valid(workload, n, p, layout) is None:
      out.append(Case(kind, workload, n, p, layout, backend, vma))

  first = "zigzag" if "zigzag" in layouts else layouts[0]
  order = [b for b in ("pallas", "auto") if b in backends] + [
      b for b in backends if b not in ("pallas", "auto")]
  timed = backends if timing_backends is None else timing_backends
  timing_backends = [b for b in ("auto", "pallas") if b in timed] + [
      b for b in timed if b not in ("auto", "pallas")]  # auto (the fastest) first
  head = timing_backends[:1]  # the fastest first: the scaling targets take the best
  if "correctness" in groups and "pallas" in order:
    for p in rings:
      add("correctness", "longnet_ring", _n(CHECK_N), p, first, "pallas")
  if "strong" in groups:
    for workload, n in STRONG:
      for backend in head:
        for p in ps:
          add("timing", workload, _n(n), p, first, backend)
  if "longest8m" in groups:
    for p in rings[-1:]:
      backend = "pallas" if "pallas" in timing_backends else timing_backends[0]
      add("attempt", "longnet_ring", _n(LONGEST_START), p, first, backend)
  if "strong" in groups:
    for workload, n in STRONG:
      for backend in timing_backends:
        for p in ps:
          add("timing", workload, _n(n), p, first, backend)
  if "weak" in groups:
    for workload, n in WEAK:
      for backend in timing_backends:
        for p in ps:
          add("timing", workload, _n(n) * p, p, first, backend)
  if "correctness" in groups:
    for p in rings:
      for backend in order:
        for workload in ("longnet_ring", "dense"):
          for layout in layouts:
            add("correctness", workload, _n(CHECK_N), p, layout, backend)
  if "layouts" in groups:
    for workload, n in STRONG:
      for backend in timing_backends:
        for p in rings:
          for layout in layouts:
            add("timing", workload, _n(n), p, layout, backend)
  if "overlap" in groups:
    for workload, n in STRONG:
      for backend in timing_backends:
        for p in rings:
          add("overlap", workload, _n(n), p, first, backend)
  if "local" in groups:  # LongNet-ring without its spanning branch: no ring at all
    for backend in timing_backends:
      for p in ps:
        add("timing", "longnet_local", _n(STRONG[1][1]), p, "contiguous", backend)
  if "dense1m" in groups:
    for backend in timing_backends:
      for p in ps[::-1]:
        add("timing", "dense", _n(DENSE_1M), p, first, backend)
  if "docs" in groups:
    for p in rings:
      for backend in order:
        for layout in layouts:
          add("correctness", "dense_docs", _n(CHECK_N), p, layout, backend)
    for backend in timing_backends:
      for p in ps:
        for layout in layouts:
          add("timing", "dense_docs", _n(DOCS_N), p, layout, backend)
  seen, unique = set(), []
  for case in out:
    if case.name not in seen:
      seen.add(case.name)
      unique.append(case)
  return unique


# ----------------------------------------------------------------------------
# Programs.
# ----------------------------------------------------------------------------


def _mesh(p: int):
  return jax.sharding.Mesh(np.array(jax.devices()[:p]), ("sp",))


def ring_attention(case: Case, mesh):
  """(q, k, v) -> out over the mesh: the ring of ``case``."""
  cfg, doc = config(case.workload, case.n), doc_length(case.workload)

  def attn(q, k, v):
    ids = None if doc is None else global_positions(
        case.layout, case.p, "sp", q.shape[0], q.shape[1]) // doc
    return rd.dilated_attention(q, k, v, causal=True, axis_name="sp", layout=case.layout,
                                backend=case.backend, segment_ids=ids, **cfg)
  return jax.shard_map(attn, mesh=mesh, in_specs=(PS(None, "sp"),) * 3,
                       out_specs=PS(None, "sp"), check_vma=check_vma(case))


def check_vma(case: Case) -> bool:
  """shard_map's varying-axes check of the case's ring: on (unless
  ``--no-check-vma``), except for the Pallas kernels in interpret mode (off
  a GPU, where "mosaic" runs the Triton kernels interpreted), whose grid
  loop it mistypes (jax 0.10; tests/test_pallas.py)."""
  return case.vma and (case.backend not in ("pallas", "mosaic")
                       or jax.default_backend() == "gpu")


def local_tensor_bytes(case: Case) -> int:
  """Bytes of one device's ``[B, N / P, H, D]`` bf16 tensor."""
  return B * (case.n // case.p) * H * D * 2


def fwd_bwd_fn(fn):
  """(q, k, v, dout) -> (dq, dk, dv) of ``fn``; jitted."""
  def run(q, k, v, dout):
    _, pull = jax.vjp(fn, q, k, v)
    return pull(dout)
  return jax.jit(run)


@contextlib.contextmanager
def no_ppermute():
  """While tracing: ``jax.lax.ppermute`` is an identity (results are wrong).

  The ring calls ``functools.partial(jax.lax.ppermute, ...)`` at trace time
  (``ringdilated._ring``), so patching the ``jax.lax`` attribute reaches it.
  The identity goes through ``optimization_barrier`` so that XLA does not
  see a loop-invariant chunk and hoist the blocks out of the ring's scan.
  jax's tracing caches are cleared on both sides, so neither program can be
  served the other's trace.
  """
  real = jax.lax.ppermute
  jax.lax.ppermute = lambda x, axis_name, perm, **_: jax.lax.optimization_barrier(x)
  jax.clear_caches()
  try:
    yield
  finally:
    jax.lax.ppermute = real
    jax.clear_caches()


def ppermute_census(jaxpr, times=1, out=None) -> list[tuple[int, tuple, int, int]]:
  """``[(bytes, perm, count, step)]``: every ppermute one device executes,
  with the bytes of its operands, its permutation, how often it runs (the
  product of the enclosing scan lengths) and the ring step it belongs to
  (the ppermutes of one pytree's leaves, bound back to back, are one step),
  walking nested jaxprs (as ``examples/ring_demo.py`` counts them)."""
  out = [] if out is None else out
  prev = None
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "ppermute":
      nbytes = sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars)
      perm = tuple(map(tuple, eqn.params["perm"]))
      step = out[-1][3] if prev == perm and out else (out[-1][3] + 1 if out else 0)
      out.append((int(nbytes), perm, times, step))
      prev = perm
      continue
    prev = None
    inner = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          ppermute_census(sub, inner, out)
  return out


def census_totals(census) -> tuple[int, int]:
  """(bytes one device sends, ring steps it executes)."""
  steps = {step: count for _, _, count, step in census}
  return sum(b * c for b, _, c, _ in census), sum(steps.values())


_HLO_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _shape_bytes(shape: str) -> int:
  """Bytes of the arrays of an HLO shape (a tuple's summed)."""
  return sum(_HLO_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape))


def compiled_permute_bytes(hlo: str) -> int:
  """Bytes one device sends per call by the collective-permutes of a
  compiled program (``compiled.as_text()``): each synchronous permute's and
  each asynchronous one's result, times the known trip counts of the loops
  around it (a conditional counts its largest branch).

  It can be less than the traced ppermutes (:func:`ppermute_census`): XLA
  merges equal permutes (the forward's K/V reused by the backward) and
  narrows a float32 hop to bf16 where that is exact."""
  own, calls, name = collections.Counter(), collections.defaultdict(list), None
  for line in hlo.splitlines():
    head = re.match(r"(?:ENTRY )?%(\S+) \(.*\{$", line)
    if head:
      name = head.group(1)
      continue
    sent = re.match(r"\s+(?:ROOT )?%\S+ = (.*?) (collective-permute|collective-permute-done)\(",
                    line)
    if sent:
      own[name] += _shape_bytes(sent.group(1))
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    for key, callee in re.findall(r"\b(body|calls|to_apply)=%([\w.\-]+)", line):
      calls[name].append(([callee], int(trips.group(1)) if key == "body" and trips else 1))
    branches = re.findall(r"(?:true_computation|false_computation)=%([\w.\-]+)", line)
    listed = re.search(r"branch_computations=\{([^}]*)\}", line)
    branches += re.findall(r"%([\w.\-]+)", listed.group(1)) if listed else []
    if branches:
      calls[name].append((branches, 1))

  @functools.lru_cache(maxsize=None)
  def total(comp: str) -> int:
    return own[comp] + sum(times * max(total(c) for c in callees)
                           for callees, times in calls[comp])

  entry = re.search(r"^ENTRY %(\S+) ", hlo, re.M)
  return total(entry.group(1))


def comm_only_fn(census, mesh):
  """The ppermutes of ``census`` alone: per distinct (bytes, perm), a scan of
  ``count`` ppermutes of a buffer of that size. (buffers) -> buffers."""
  merged = {}
  for nbytes, perm, count, _ in census:
    if count:
      merged[(nbytes, perm)] = merged.get((nbytes, perm), 0) + count
  entries = sorted(merged.items())

  def body(*bufs):
    outs = []
    for buf, ((_, perm), count) in zip(bufs, entries):
      def step(x, _, perm=perm):
        return jax.lax.ppermute(x, "sp", perm), None
      outs.append(jax.lax.scan(step, buf, None, length=count)[0])
    return tuple(outs)

  specs = tuple(PS("sp") for _ in entries)
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=specs))
  p = mesh.devices.size
  bufs = [jax.device_put(np.zeros(p * nbytes, np.uint8), NamedSharding(mesh, PS("sp")))
          for (nbytes, _), _ in entries]
  return fn, bufs


def _inputs(case: Case, mesh, seed: int):
  """q, k, v, dout: bf16 [B, N, H, D] normal, sharded over the mesh, in the
  case's layout (permuted with rd.to_layout up to 2M tokens; beyond, drawn
  in place: i.i.d. data permuted is the same distribution, and the
  permutation's all-gather would need the whole sequence on each GPU)."""
  sh = NamedSharding(mesh, PS(None, "sp"))
  gen = jax.jit(lambda key: jax.random.normal(key, (B, case.n, H, D), jnp.bfloat16),
                out_shardings=sh)
  lay = jax.jit(lambda x: rd.to_layout(x, case.layout, case.p), out_shardings=sh,
                donate_argnums=0)
  out = []
  for key in jax.random.split(jax.random.key(seed), 4):
    x = gen(key)
    if case.layout != "contiguous" and case.n <= _n(2 * M):
      x = lay(x)
    out.append(x)
  return out


def _peaks(devices):
  return [bench.runtime_peak(d) for d in devices]


def _base_record(case: Case) -> dict:
  cfg = config(case.workload, case.n)
  dev = jax.devices()[0]
  return dict(suite="multi_gpu", kind=case.kind, name=case.name, run=RUN,
              workload=case.workload,
              seq_len=case.n, devices=case.p, layout=case.layout, backend=case.backend,
              causal=True, dtype="bfloat16", batch=B, heads=H, head_dim=D,
              segment_lengths=list(cfg["segment_lengths"]),
              dilation_rates=list(cfg["dilation_rates"]), mode=cfg["mode"],
              check_vma=check_vma(case),
              xla_flags=os.environ.get("XLA_FLAGS", "").strip(),
              device_kind=dev.device_kind, platform=dev.platform,
              visible_devices=len(jax.devices()), jax_version=jax.__version__)


def measure_timing(case: Case, iters: int, isolated: bool, trace_dir: str | None) -> dict:
  """Forward+backward time, memory and communication of one ring."""
  rec = _base_record(case)
  rec["kind"] = "timing"
  mesh = _mesh(case.p)
  devices = list(mesh.devices.flat)
  before = _peaks(devices)
  q, k, v, dout = _inputs(case, mesh, case.n)
  traced = fwd_bwd_fn(ring_attention(case, mesh)).trace(q, k, v, dout)
  census = ppermute_census(traced.jaxpr.jaxpr)
  compiled = traced.lower().compile()
  rec["peak_bytes_per_device"] = bench._peak_bytes(compiled)  # pylint: disable=protected-access
  rec["qkv_out_grad_bytes_per_device"] = 7 * local_tensor_bytes(case)
  rec["compiled_ppermute_bytes"] = compiled_permute_bytes(compiled.as_text())
  rec["fwd_bwd_ms"] = bench._median_ms(compiled, (q, k, v, dout), iters)  # pylint: disable=protected-access
  if trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(2):
        jax.block_until_ready(compiled(q, k, v, dout))
    rec["trace"] = trace_dir
  after = _peaks(devices)
  if after[0] is not None:
    if isolated:
      rec["runtime_peak_bytes"] = after
    else:
      rec["process_peak_bytes_before"], rec["process_peak_bytes_after"] = before, after
  sent, steps = census_totals(census)
  rec.update(ppermute_bytes=sent, ppermute_steps=steps,
             ppermute_bytes_per_step=sent / steps if steps else 0.0)
  cfg = config(case.workload, case.n)
  rec["balance_worst_step"], rec["balance_whole_pass"] = rd.ring_balance(
      rd.DilatedConfig(cfg["segment_lengths"], cfg["dilation_rates"], cfg["mode"], True,
                       layout=case.layout), case.n, case.p)
  rec["flops"] = flops(case.workload, case.n)
  rec["tflops_per_gpu"] = 3.5 * rec["flops"] / rec["fwd_bwd_ms"] / 1e9 / case.p
  print(f"{case.name:48s} fwd+bwd {rec['fwd_bwd_ms']:10.2f} ms  "
        f"{rec['tflops_per_gpu']:6.1f} TFLOP/s/GPU  peak/GPU "
        f"{rec['peak_bytes_per_device'] / 2**30:7.2f} GiB  ppermute "
        f"{sent / 2**20:9.1f} MiB in {steps} steps (compiled: "
        f"{rec['compiled_ppermute_bytes'] / 2**20:.1f} MiB)", flush=True)
  return rec


def measure_overlap(case: Case, iters: int) -> dict:
  """Ring vs compute only (ppermute -> identity) vs the ppermutes alone."""
  rec = _base_record(case)
  mesh = _mesh(case.p)
  q, k, v, dout = _inputs(case, mesh, case.n)
  ring = fwd_bwd_fn(ring_attention(case, mesh)).trace(q, k, v, dout)
  census = ppermute_census(ring.jaxpr.jaxpr)
  ring = ring.lower().compile()
  with no_ppermute():
    compute = fwd_bwd_fn(ring_attention(case, mesh)).trace(q, k, v, dout)
    if ppermute_census(compute.jaxpr.jaxpr):
      raise RuntimeError("the compute-only program still holds ppermutes")
    compute = compute.lower().compile()
  if "collective-permute" in compute.as_text():
    raise RuntimeError("the compute-only program still holds collective-permutes")
  rec["fwd_bwd_ms"] = bench._median_ms(ring, (q, k, v, dout), iters)  # pylint: disable=protected-access
  rec["compute_only_ms"] = bench._median_ms(compute, (q, k, v, dout), iters)  # pylint: disable=protected-access
  comm, bufs = comm_only_fn(census, mesh)
  rec["comm_only_ms"] = bench._median_ms(comm, bufs, iters) if bufs else 0.0  # pylint: disable=protected-access
  exposed = rec["fwd_bwd_ms"] - rec["compute_only_ms"]
  rec["exposed_comm_ms"] = exposed
  rec["overlap"] = (float(np.clip(1.0 - exposed / rec["comm_only_ms"], 0.0, 1.0))
                    if rec["comm_only_ms"] > 0 else 1.0)
  rec["ppermute_bytes"], rec["ppermute_steps"] = census_totals(census)
  print(f"{case.name:48s} ring {rec['fwd_bwd_ms']:9.2f} ms  compute only "
        f"{rec['compute_only_ms']:9.2f} ms  comm only {rec['comm_only_ms']:8.2f} ms  "
        f"hidden {rec['overlap']:.2f}", flush=True)
  return rec


_REFERENCE = {}


def _reference(workload: str, n: int, data):
  """One GPU, float32, backend="xla": (out, dq, dk, dv) as float64 numpy."""
  key = (workload, n)
  if key not in _REFERENCE:
    cfg = config(workload, n)
    dev = jax.devices()[0]
    q, k, v, cot = (jax.device_put(x.astype(np.float32), dev) for x in data)
    doc = doc_length(workload)
    ids = None if doc is None else jnp.arange(n, dtype=jnp.int32)[None] // doc
    fn = functools.partial(rd.dilated_attention, causal=True, backend="xla", segment_ids=ids,
                           **cfg)

    @jax.jit
    def run(q, k, v, cot):
      out, pull = jax.vjp(fn, q, k, v)
      return (out,) + pull(cot)
    _REFERENCE[key] = [np.asarray(x, np.float64) for x in run(q, k, v, cot)]
  return _REFERENCE[key]


def measure_correctness(case: Case) -> dict:
  """The bf16 ring's out, dq, dk, dv against one GPU in float32."""
  rec = _base_record(case)
  rng = np.random.default_rng(0)
  data = [rng.standard_normal((B, case.n, H, D)).astype(jnp.bfloat16) for _ in range(4)]
  want = _reference(case.workload, case.n, data)
  mesh = _mesh(case.p)
  sh = NamedSharding(mesh, PS(None, "sp"))
  q, k, v, cot = (jax.device_put(rd.to_layout(x, case.layout, case.p), sh) for x in data)
  fn = ring_attention(case, mesh)

  @jax.jit
  def run(q, k, v, cot):
    out, pull = jax.vjp(fn, q, k, v)
    return (out,) + pull(cot)
  got = [rd.from_layout(np.asarray(x.astype(jnp.float32), np.float64), case.layout, case.p)
         for x in run(q, k, v, cot)]
  errs = {name: rel_err(g, w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
  rec.update(rel_err=errs, max_rel_err=max(errs.values()), tol=TOL,
             ok=bool(max(errs.values()) <= TOL))
  print(f"{case.name:48s} rel. L2 error out/dq/dk/dv "
        + " ".join(f"{e:.1e}" for e in errs.values()) + ("" if rec["ok"] else "  FAIL"),
        flush=True)
  return rec


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
  return err if np.isfinite(err) else float("inf")


def run_case(case: Case, args, isolated: bool, trace_dir: str | None) -> dict:
  try:
    if case.kind == "correctness":
      return measure_correctness(case)
    if case.kind == "overlap":
      return measure_overlap(case, args.iters)
    return measure_timing(case, 1 if case.kind == "attempt" else args.iters, isolated,
                          trace_dir)
  except Exception as e:  # a failing case is recorded, not fatal
    rec = _stub(case, jax_version=jax.__version__, error=f"{type(e).__name__}: {str(e)[:400]}")
    print(f"{case.name:48s} ERROR {rec['error'][:300]}", flush=True)
    return rec


# ----------------------------------------------------------------------------
# Results file (shared by the driver and its subprocesses, one at a time).
# ----------------------------------------------------------------------------


def load(path: str) -> list:
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return []


def merge(path: str, rec: dict, keep_measured: bool = False) -> None:
  """Appends ``rec`` to ``path``, replacing the record of its case from the
  same run (records of earlier runs stay: ratios divide records of one run);
  ``keep_measured``: not if a run measured that case."""
  if not path:
    return
  records = load(path)
  old = [r for r in records if r.get("name") == rec["name"]]
  if keep_measured and any("error" not in r and "skipped" not in r for r in old):
    return
  same = (rec["name"], rec.get("run"))
  records = [r for r in records if (r.get("name"), r.get("run")) != same] + [rec]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(records, f, indent=1)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Driver, worker, attempts.
# ----------------------------------------------------------------------------


def _child(args, extra: list[str], timeout: float | None) -> int | None:
  cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out,
         "--iters", str(args.iters)] + ["--smoke"] * args.smoke + [
             "--no-check-vma"] * (not args.check_vma) + extra
  try:
    return subprocess.run(cmd, timeout=timeout, check=False).returncode
  except subprocess.TimeoutExpired:
    return None


def probe_devices() -> tuple[int, str]:
  """(visible devices, kind), asked of a subprocess: the driver itself never
  initializes a device (it would hold their memory)."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  out = subprocess.run(
      [sys.executable, "-c", "import jax; d = jax.devices(); print(len(d)); "
       "print(d[0].device_kind)"], env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"could not list the devices:\n{out.stderr[-2000:]}")
  count, kind = out.stdout.strip().splitlines()[-2:]
  return int(count), kind


def _stub(case: Case, **fields) -> dict:
  return dict(suite="multi_gpu", kind="timing" if case.kind == "attempt" else case.kind,
              name=case.name, run=RUN, workload=case.workload, seq_len=case.n,
              devices=case.p, layout=case.layout, backend=case.backend, **fields)


# What a case's record says while it runs: left behind if its process dies.
STARTED = "SubprocessError: started, not finished: the process died"


def _died(args, case: Case, rc) -> None:
  """Records how ``case``'s process ended if it left no record of its own."""
  rec = next((r for r in load(args.out) if r.get("name") == case.name), None)
  if rec is None or rec.get("error") == STARTED:
    rec = _stub(case, error=f"{STARTED} ({bench._exit_text(rc)})")
    merge(args.out, rec)
    print(f"{case.name:48s} ERROR {rec['error']}", flush=True)


def attempt(case: Case, args) -> bool:
  """Runs one attempt in a subprocess; whether forward+backward ran."""
  rc = _child(args, ["--attempt", case.name], args.attempt_timeout)
  if rc != 0:
    _died(args, case, rc)
  rec = next((r for r in load(args.out) if r.get("name") == case.name), {})
  return rc == 0 and "fwd_bwd_ms" in rec


def _attempt_case(workload: str, n: int, p: int, layout: str, backend: str) -> Case:
  return Case("attempt", workload, n, p, layout, backend)


def longest(args, p: int, backends, layout: str, deadline: float | None) -> None:
  """The longest LongNet-ring N that runs forward+backward on ``p`` devices,
  per backend: doubling from 8M (halving if 8M fails), then bisecting on
  valid lengths while the gap is over a quarter of the longest that ran."""
  for backend in backends:
    ok, bad, tried = None, None, []

    def run(n):
      if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError
      case = _attempt_case("longnet_ring", n, p, layout, backend)
      ran = attempt(case, args)
      rec = next((r for r in load(args.out) if r.get("name") == case.name), {})
      tried.append(dict(seq_len=n, ok=ran, error=rec.get("error", "")[:200]))
      return ran

    try:
      n = _n(LONGEST_START)
      while valid("longnet_ring", n, p, layout) is None and n <= _n(args.longest_max):
        if run(n):
          ok = n
          if bad is not None:
            break
          n *= 2
        else:
          bad = n
          if ok is not None or n // 2 < _n(M):
            break
          n //= 2
      while ok is not None and bad is not None and bad - ok > ok // 4:
        mids = [m for m in range(ok + _n(M), bad, _n(M))
                if valid("longnet_ring", m, p, layout) is None]
        if not mids:
          break
        mid = mids[len(mids) // 2]
        if run(mid):
          ok = mid
        else:
          bad = mid
    except TimeoutError:
      print(f"longest {backend}: time budget spent", flush=True)
    if not tried:
      continue
    rec = dict(suite="multi_gpu", kind="longest", name=f"longest/longnet_ring/P{p}/{layout}/"
               f"{backend}", workload="longnet_ring", seq_len=ok or 0, devices=p,
               layout=layout, backend=backend, longest_ok=ok, first_failure=bad,
               attempts=tried, jax_version=jax.__version__)
    merge(args.out, rec)
    print(f"longest LongNet-ring on {p} devices, {backend} {layout}: runs at {ok}, "
          f"fails at {bad} ({len(tried)} attempts)", flush=True)


def worker(args, names: list[str]) -> int:
  """Runs the named cases in this process, in order, within the budget."""
  start = time.monotonic()
  traced = False
  for name in names:
    case = Case.parse(name, args.check_vma)
    if args.time_budget is not None and time.monotonic() - start > args.time_budget:
      merge(args.out, _stub(case, skipped=f"time budget of {args.time_budget:.0f} s spent"),
            keep_measured=True)
      continue
    trace_dir = None
    if (args.trace and not traced and case.kind == "timing" and case.p > 1
        and args.trace_match in name):
      trace_dir, traced = args.trace, True
    print(f"-- {name}", flush=True)
    merge(args.out, _stub(case, error=STARTED))
    merge(args.out, run_case(case, args, isolated=False, trace_dir=trace_dir))
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="benchmarks/results/h200x2.json")
  parser.add_argument("--only", default=None,
                      help=f"comma list of groups of {GROUPS} (default: all but longest, local)")
  parser.add_argument("--devices", default="1,all",
                      help="comma list of ring sizes; 'all' = every visible device")
  parser.add_argument("--backends", default=None, help="comma list (default auto,pallas)")
  parser.add_argument("--layouts", default="zigzag,contiguous")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--time-budget", type=float, default=None,
                      help="seconds; no case starts after that")
  parser.add_argument("--resume", action="store_true",
                      help="skip cases already measured in --out")
  parser.add_argument("--match", default=None,
                      help="regular expression: only the cases whose name matches it")
  parser.add_argument("--longest-max", type=int, default=LONGEST_MAX)
  parser.add_argument("--attempt-timeout", type=float, default=300.0)
  parser.add_argument("--trace", default=None, help="directory for a jax.profiler trace")
  parser.add_argument("--trace-match", default="longnet_ring")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 CPU devices")
  parser.add_argument("--no-check-vma", dest="check_vma", action="store_false",
                      help="rings under jax.shard_map(check_vma=False)")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--attempt", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  _configure(args.smoke)
  if args.smoke:
    args.longest_max = min(args.longest_max, 2 * LONGEST_START)
  if args.worker:
    with open(args.worker) as f:
      return worker(args, f.read().split())
  if args.attempt:
    case = Case.parse(args.attempt, args.check_vma)
    merge(args.out, _stub(case, error=STARTED))
    rec = run_case(case, args, isolated=True, trace_dir=None)
    merge(args.out, rec)
    return 0 if "fwd_bwd_ms" in rec else 1

  start = time.monotonic()
  deadline = None if args.time_budget is None else start + args.time_budget
  count, kind = probe_devices()
  ps = sorted({count if x == "all" else int(x) for x in args.devices.split(",")})
  if max(ps) > count:
    parser.error(f"--devices {args.devices}: only {count} devices are visible")
  groups = set((args.only or ",".join(SMOKE_GROUPS if args.smoke else DEFAULT_GROUPS))
               .split(","))
  if groups - set(GROUPS):
    parser.error(f"--only: unknown groups {sorted(groups - set(GROUPS))}")
  # --smoke: Pallas runs in interpret mode on CPU (minutes per case): its
  # correctness only, unless --backends asks for more.
  backends = (args.backends or "auto,pallas").split(",")
  layouts = args.layouts.split(",")
  print(f"{count} x {kind}, jax {jax.__version__}, rings of {ps}, groups {sorted(groups)}, "
        f"backends {backends}, layouts {layouts}", flush=True)
  timed = ["auto"] if args.smoke and args.backends is None else backends
  cases = plan(groups, ps, backends, layouts, timed, args.check_vma)
  if args.match:
    cases = [c for c in cases if re.search(args.match, c.name)]
  if args.resume:
    done = {r["name"] for r in load(args.out) if "error" not in r and "skipped" not in r}
    cases = [c for c in cases if c.name not in done]
  print(f"{len(cases)} cases, in this order: " + ", ".join(c.name for c in cases), flush=True)

  def left():
    return None if deadline is None else deadline - time.monotonic()

  i = 0
  while i < len(cases):
    if left() is not None and left() <= 0:
      for case in cases[i:]:
        merge(args.out, _stub(case, skipped=f"time budget of {args.time_budget:.0f} s spent"),
              keep_measured=True)
      print(f"time budget of {args.time_budget:.0f} s spent: skipped "
            + ", ".join(c.name for c in cases[i:]), flush=True)
      break
    if cases[i].own_process:
      attempt(cases[i], args)
      i += 1
      continue
    j = i
    while j < len(cases) and not cases[j].own_process:
      j += 1
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
      f.write("\n".join(c.name for c in cases[i:j]))
    budget = [] if left() is None else ["--time-budget", f"{left():.1f}"]
    budget += ["--trace", args.trace, "--trace-match", args.trace_match] if args.trace else []
    rc = _child(args, ["--worker", f.name] + budget,
                None if left() is None else left() + 600)
    os.unlink(f.name)
    if rc != 0:  # a crash: record where, then go on after that case
      print(f"worker {bench._exit_text(rc)}", flush=True)
      recs = {r["name"]: r for r in load(args.out)}
      dead = next((c for c in cases[i:j] if recs.get(c.name, {}).get("error") == STARTED),
                  None)
      if dead is not None:
        _died(args, dead, rc)
        j = cases.index(dead) + 1
    i = j
  if "longest" in groups:
    layout = "zigzag" if "zigzag" in layouts else layouts[0]
    # Pallas first: the least memory, the 8M target.
    longest(args, max(ps), sorted(timed, key=lambda b: b != "pallas"), layout, deadline)
  return 0


if __name__ == "__main__":
  sys.exit(main())
