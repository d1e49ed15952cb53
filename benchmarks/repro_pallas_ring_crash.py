"""Which programs crash: ``backend="pallas"`` rings on 2 GPUs (SIGSEGV while compiling).

On 2 H200s (jax 0.11.2), ``backend="pallas"`` used to kill the process with
SIGSEGV while compiling a program that holds both a local branch (the fused
in-place path) and a branch spanning the devices (ring blocks). The crash is
in XLA's Shardy partitioner (``ManualComputationUnusedInputsPattern``) and
needs no kernel: a zero-size constant among a ``shard_map``'s operands
segfaults it (variants z1, z2; jax hoists array constants into those
operands). The library made one when it merged a spanning branch back over
all heads (``full.at[:, :, 0:H].set(...)``: a scatter whose index is empty);
d3-d5 make one with ``.at[:].set`` (z3, d5 without it, compiles).
The same backtrace, and the same crash of z1 and z2, on 2 simulated CPU
devices with jax 0.11.2 (``--smoke``); jax 0.10.2 and 0.12.0 compile them.

This script runs variants, each in its own subprocess (a segfault is an exit
code, not a dead driver), up to 4 at once with
``XLA_PYTHON_CLIENT_PREALLOCATE=false``, and prints a table
variant -> exit code / result::

  python benchmarks/repro_pallas_ring_crash.py            # all variants, 2 GPUs
  python benchmarks/repro_pallas_ring_crash.py a_contiguous d1_alias_of_ppermute
  python benchmarks/repro_pallas_ring_crash.py --smoke    # CPU: interpret mode, 2 devices
  python benchmarks/repro_pallas_ring_crash.py --mock-gpus  # one GPU as 2: compile only

``--mock-gpus`` makes one GPU pose as two (jax's ``mock_num_gpu_processes``:
the second device belongs to a mocked process, and NCCL is mocked), so a
2-GPU program is partitioned and compiled by the GPU compiler in full, but
not run: a child that compiles exits 0 without checking values. It adds
``--xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer=`` to XLA_FLAGS:
without them every library variant hung in XLA's compile (240 s, GSPMD too).
Session 23 (one H200 as two, jax 0.11.2, Shardy): z1 and z2 crash; with the
old merge back in the library, a_contiguous, m_contiguous and m_fwd_bwd
crash and compile under GSPMD; with the fix, every a_* and m_* variant run
compiles (``benchmarks/results/logs/h200_session23_calls.log``); session 26: m_docs_fwd_bwd
compiles too, all of its kernels the Hopper kernels (``h200_session26_calls.log``).

Variants:
  a_*  the library's minimal case (``backend="pallas"``; m_* the same with
       ``backend="mosaic"``, the Hopper kernels): N=16384, B=1, H=4, D=64, bf16,
       segment_lengths=(2048, 16384), dilation_rates=(1, 2), forward only,
       ring of 2 (contiguous, zigzag, causal), with controls holding only the
       local branch or only the spanning one, and one forward+backward (and
       one with 6 packed documents: segment ids, so masked ring blocks).
  b_*  a_* with XLA_FLAGS ``--xla_gpu_enable_command_buffer=`` (no command buffers).
  c_*  a_* with ``--xla_gpu_enable_latency_hiding_scheduler=false``.
  d*   an upstream-style reproducer without ringdilated: a tiny Pallas Triton
       kernel (``input_output_aliases={1: 0}``: adds its first input into
       an accumulator) under ``jax.shard_map`` over 2 devices, whose aliased
       accumulator is: d0 local (control), d1 the output of a ppermute, d2
       built by ``.at[].set`` from a ppermute result; d3 kernels inside a
       ``lax.scan`` that ppermutes plus an aliased call outside it on the
       scan's result; d4 the aliased call inside the scan; d5 d3 with the
       scan of length 0 and one more step after it (the shape of a ring of
       2 in ``ringdilated._ring``).
  z*   the cause: z1 ``zeros_like(x).at[:].set(x)`` and z2 a zero-size
       constant in a ``shard_map``, no kernel; z3 d5 without its ``.at[:].set``.

Each child checks its result against the same program in plain jax (the a_*
variants against one device's float32 ``backend="xla"``) and exits 0 (ok),
1 (wrong values) or 2 (exception); a negative code is a signal.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

N, B, H, D = 16384, 1, 4, 64
BRANCHES = ((2048, 1), (16384, 2))
FLAGS = {
    "b": "--xla_gpu_enable_command_buffer=",
    "c": "--xla_gpu_enable_latency_hiding_scheduler=false",
}
# name -> (description, child arguments)
LIBRARY = {
    "contiguous": "local + spanning branch, contiguous, forward",
    "zigzag": "local + spanning branch, zigzag, forward",
    "causal": "local + spanning branch, contiguous, causal, forward",
    "local_only": "control: only the local branch (2048, 1), forward",
    "ring_only": "control: only the spanning branch (16384, 2), forward",
    "fwd_bwd": "local + spanning branch, contiguous, forward+backward",
    "docs_fwd_bwd": "local + spanning branch, contiguous, causal, 6 packed documents "
                    "(segment ids: masked ring blocks), forward+backward",
    "generic_only": "a_contiguous with no in-place branch: every kernel fresh, none aliased",
    "ring_only_fwd_bwd": "control: only the spanning branch, forward+backward",
}
STANDALONE = {
    "d0_alias_local": "aliased kernel, accumulator computed locally (control)",
    "d1_alias_of_ppermute": "aliased accumulator = ppermute output",
    "d2_alias_set_from_ppermute": "aliased accumulator = zeros.at[].set(ppermute output)",
    "d3_scan_then_alias": "kernels in a scan with ppermute (length 2), aliased call after",
    "d4_alias_in_scan": "aliased call inside a scan with ppermute (length 2)",
    "d5_ring_of_2_shape": "scan of length 0 + ppermute + kernel, then an aliased call",
    "e1_d5_named": "d5 with distinct kernel names",
    "e2_d5_no_alias": "d5 with the aliased kernel made non-aliased",
    "e3_two_kernels_on_ppermute": "two distinct non-aliased kernels on a ppermute output, no scan",
    "e4_two_kernels_beside_ppermute": "two distinct non-aliased kernels on local data, ppermute beside",
    "e5_one_kernel_twice_on_ppermute": "one non-aliased kernel twice, on a ppermute output",
    "z1_set_all": "no kernel: zeros_like(x).at[:].set(x) (a scatter with an empty index)",
    "z2_empty_constant": "no kernel: x + the sum of a zero-size numpy constant",
    "z3_d5_without_set": "d5 with its .at[:].set left out (kernels, scan, alias kept)",
}
_NO_SHARDY = "ENV:JAX_USE_SHARDY_PARTITIONER=false"
# XLA_FLAGS a mocked GPU needs: without them XLA's compile hangs (session 23).
MOCK_FLAGS = "--xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer="
# Round 2: flags on the minimal standalone crash (d5) and the library case.
FLAG_VARIANTS = {
    "f1_d5_one_compile_thread": ("d5_ring_of_2_shape", "--xla_gpu_force_compilation_parallelism=1"),
    "f2_d5_autotune_0": ("d5_ring_of_2_shape", "--xla_gpu_autotune_level=0"),
    "f3_d5_no_p2p_decompose": ("d5_ring_of_2_shape",
                               "--xla_gpu_collective_permute_decomposer_threshold=9223372036854775807"),
    "f4_a_one_compile_thread": ("a_contiguous", "--xla_gpu_force_compilation_parallelism=1"),
    "f5_d5_no_async_cp": ("d5_ring_of_2_shape",
                          "--xla_gpu_disable_async_collectives=COLLECTIVEPERMUTE"),
    # The crash is in Shardy's canonicalizer (ManualComputationUnusedInputsPattern,
    # cuda-gdb backtrace): the same programs partitioned by GSPMD instead.
    "g1_a_contiguous_gspmd": ("a_contiguous", _NO_SHARDY),
    "g2_a_zigzag_gspmd": ("a_zigzag", _NO_SHARDY),
    "g3_a_fwd_bwd_gspmd": ("a_fwd_bwd", _NO_SHARDY),
    "g4_d5_gspmd": ("d5_ring_of_2_shape", _NO_SHARDY),
    "g5_e2_gspmd": ("e2_d5_no_alias", _NO_SHARDY),
}


def variants() -> dict[str, tuple[str, str, str]]:
  """name -> (description, child variant, extra XLA_FLAGS), in run order."""
  out = {f"a_{k}": (v, f"a_{k}", "") for k, v in LIBRARY.items()}
  out.update({f"m_{k}": (f"{v}, Hopper kernels", f"m_{k}", "") for k, v in LIBRARY.items()})
  for letter, flag in FLAGS.items():
    for k in ("contiguous", "zigzag"):
      out[f"{letter}_{k}"] = (f"a_{k} with {flag}", f"a_{k}", flag)
  out.update({k: (v, k, "") for k, v in STANDALONE.items()})
  out.update({k: (f"{child} with {flag}", child, flag)
              for k, (child, flag) in FLAG_VARIANTS.items()})
  return out


# ----------------------------------------------------------------------------
# Children.
# ----------------------------------------------------------------------------


def custom_calls(hlo: str) -> dict[str, int]:
  """target -> count of the custom calls (kernels) in a compiled program's text."""
  targets = re.findall(r'custom_call_target="([^"]+)"', hlo)
  return {t: targets.count(t) for t in sorted(set(targets))}


def _rel(a, b) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def child_library(variant: str, smoke: bool, mock: bool) -> int:
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import ringdilated as rd  # pylint: disable=g-import-not-at-top

  scale = 16 if smoke else 1
  n = N // scale
  branches = [(w // scale, r) for w, r in BRANCHES]
  kind = variant[2:]
  if kind == "local_only":
    branches = branches[:1]
  elif kind.startswith("ring_only"):
    branches = branches[1:]
  if kind == "generic_only":
    from ringdilated import _ring  # pylint: disable=g-import-not-at-top
    _ring._strided = lambda *a: None  # pylint: disable=protected-access
  layout = "zigzag" if kind == "zigzag" else "contiguous"
  docs = kind == "docs_fwd_bwd"
  causal = kind == "causal" or docs
  kw = dict(segment_lengths=tuple(w for w, _ in branches),
            dilation_rates=tuple(r for _, r in branches), causal=causal)
  rng = np.random.default_rng(0)
  q, k, v, cot = (rng.standard_normal((B, n, H, D)).astype(jnp.bfloat16) for _ in range(4))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",))
  backend = "mosaic" if variant.startswith("m_") else "pallas"
  if docs:  # 6 documents; the ids travel sharded as a fourth input
    kw["segment_ids"] = (np.arange(n)[None] * 6 // n).astype(np.int32)
  attend = lambda q, k, v, *s: rd.dilated_attention(  # noqa: E731
      q, k, v, axis_name="sp", layout=layout, backend=backend,
      **dict(kw, segment_ids=s[0] if s else None))
  # shard_map's varying-axes check mistypes Pallas' interpreter loop (jax 0.10).
  ring = jax.shard_map(attend, mesh=mesh, in_specs=(P(None, "sp"),) * (3 + docs),
                       out_specs=P(None, "sp"), check_vma=jax.default_backend() == "gpu")
  extra = (rd.to_layout(kw["segment_ids"], layout, 2),) if docs else ()
  if kind.endswith("fwd_bwd"):
    fn = jax.jit(lambda q, k, v, c: (lambda o, pull: (o,) + pull(c))(
        *jax.vjp(lambda q, k, v: ring(q, k, v, *extra), q, k, v)))
    args = [rd.to_layout(x, layout, 2) for x in (q, k, v, cot)]
  else:
    fn, args = jax.jit(ring), [rd.to_layout(x, layout, 2) for x in (q, k, v)]
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  print(f"compiled in {time.perf_counter() - t0:.1f} s", flush=True)
  if mock:
    print(f"compiled for a mocked second GPU, not run; custom calls "
          f"{custom_calls(compiled.as_text())}", flush=True)
    return 0
  got = compiled(*args)
  got = got if isinstance(got, tuple) else (got,)
  got = [rd.from_layout(np.asarray(x.astype(jnp.float32)), layout, 2) for x in got]

  def single(q, k, v, c):
    o, pull = jax.vjp(functools.partial(rd.dilated_attention, backend="xla", **kw), q, k, v)
    return (o,) + pull(c)
  want = jax.jit(single)(*(x.astype(np.float32) for x in (q, k, v, cot)))[:len(got)]
  errs = [_rel(g, w) for g, w in zip(got, want)]
  print("relative L2 error vs one device float32: " + " ".join(f"{e:.1e}" for e in errs),
        flush=True)
  return 0 if max(errs) < 2e-2 else 1


def child_standalone(variant: str, smoke: bool, mock: bool) -> int:
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  interpret = smoke or jax.default_backend() != "gpu"
  if interpret:
    params = None
  else:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    params = plgpu.CompilerParams(num_warps=4, num_stages=2)
  rows, cols, block = 256, 128, 64

  def spec():
    return pl.BlockSpec((block, cols), lambda i: (i, 0))

  named = variant != "d5_ring_of_2_shape" or variant.startswith("e1")
  alias = variant != "e2_d5_no_alias"

  def add_into(x, acc):
    """acc + x, written into acc's buffer (input 1 aliased to output 0)."""
    def kernel(x_ref, acc_ref, o_ref):
      o_ref[...] = acc_ref[...] + x_ref[...]
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(acc.shape, acc.dtype),
                          grid=(acc.shape[0] // block,), in_specs=[spec(), spec()],
                          out_specs=spec(), input_output_aliases={1: 0} if alias else {},
                          compiler_params=params, interpret=interpret,
                          name="add_into" if named else None)(x, acc)

  def scaled(x, by, name):
    """by * x, a plain (non-aliased) kernel: a ring block's stand-in."""
    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] * by
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(x.shape[0] // block,), in_specs=[spec()], out_specs=spec(),
                          compiler_params=params, interpret=interpret,
                          name=name if named else None)(x)

  twice = functools.partial(scaled, by=2.0, name="twice")

  def program(x, add, dbl, pperm):
    """The variant's body on one device's [rows, cols] block."""
    if variant == "d0_alias_local":
      return add(x, x * 3.0)
    if variant == "d1_alias_of_ppermute":
      return add(x, pperm(x))
    if variant == "d2_alias_set_from_ppermute":
      acc = jnp.zeros((2 * rows, cols), x.dtype).at[:rows].set(pperm(x))
      return add(jnp.concatenate([x, x]), acc)[:rows] + 0.0
    if variant == "e3_two_kernels_on_ppermute":
      return scaled(dbl(pperm(x)), 3.0, "thrice")
    if variant == "e4_two_kernels_beside_ppermute":
      return scaled(dbl(x), 3.0, "thrice") + pperm(x)
    if variant == "e5_one_kernel_twice_on_ppermute":
      return dbl(dbl(pperm(x)))
    if variant == "z1_set_all":
      return jnp.zeros_like(x).at[:].set(x)
    if variant == "z2_empty_constant":
      return x + jnp.asarray(np.zeros((0,), np.int32)).sum()
    if variant in ("d3_scan_then_alias", "d4_alias_in_scan", "d5_ring_of_2_shape",
                   "e1_d5_named", "e2_d5_no_alias", "z3_d5_without_set"):
      length = 2 if variant in ("d3_scan_then_alias", "d4_alias_in_scan") else 0
      inside_alias = variant == "d4_alias_in_scan"

      def body(carry, _):
        kv, acc = carry
        nxt = pperm(kv)  # in flight while this step computes, as in the ring
        acc = add(kv, acc) if inside_alias else acc + dbl(kv)
        return (nxt, acc), None
      (kv, acc), _ = jax.lax.scan(body, (pperm(x), jnp.zeros_like(x)), None, length=length)
      acc = acc + dbl(kv)  # the ring's last step, after the scan
      if variant == "z3_d5_without_set":
        return add(x, acc)
      out = jnp.zeros((rows, cols), x.dtype).at[:].set(acc)
      return add(x, out)
    raise ValueError(variant)

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",))
  perm = [(0, 1), (1, 0)]
  real = functools.partial(program, add=add_into, dbl=twice,
                           pperm=lambda x: jax.lax.ppermute(x, "sp", perm))
  ref = functools.partial(program, add=lambda x, acc: acc + x, dbl=lambda x: 2 * x,
                          pperm=lambda x: jax.lax.ppermute(x, "sp", perm))
  # Without the varying-axes check: the kernels' out_shape carries no mesh axes.
  sm = functools.partial(jax.shard_map, mesh=mesh, in_specs=P("sp"), out_specs=P("sp"),
                         check_vma=False)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2 * rows, cols)), jnp.float32)
  t0 = time.perf_counter()
  compiled = jax.jit(sm(real)).lower(x).compile()
  print(f"compiled in {time.perf_counter() - t0:.1f} s", flush=True)
  if mock:
    print("compiled for a mocked second GPU; not run", flush=True)
    return 0
  got = np.asarray(compiled(x))
  want = np.asarray(jax.jit(sm(ref))(x))
  err = float(np.max(np.abs(got - want)))
  print(f"max |kernel - plain jax| = {err:.1e}", flush=True)
  return 0 if err < 1e-5 else 1


def child(variant: str, smoke: bool, mock: bool) -> int:
  import faulthandler  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  # Where a child that hangs is, printed before the driver's timeout kills it.
  if "REPRO_TIMEOUT" in os.environ:
    faulthandler.dump_traceback_later(float(os.environ["REPRO_TIMEOUT"]) - 5)
  if mock:
    jax.config.update("mock_num_gpu_processes", 2)
  print(f"{variant}: jax {jax.__version__}, {len(jax.devices())} x "
        f"{jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True)
  try:
    if variant[:2] in ("a_", "m_"):
      return child_library(variant, smoke, mock)
    return child_standalone(variant, smoke, mock)
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    return 2


# ----------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------


def _result(code) -> str:
  if code is None:
    return "timeout"
  if code == 0:
    return "ok"
  if code == 1:
    return "WRONG VALUES"
  if code == 2:
    return "EXCEPTION"
  if code < 0:
    try:
      return f"CRASH {signal.Signals(-code).name}"
    except ValueError:
      return f"CRASH signal {-code}"
  return f"exit {code}"


def run_variant(name, description, child_variant, flags, smoke, mock, timeout):
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1",
             REPRO_TIMEOUT=str(timeout))
  env.pop("JAX_USE_SHARDY_PARTITIONER", None)  # jax's default unless the variant says
  base = env.get("XLA_FLAGS", "")
  if mock:
    base += " " + MOCK_FLAGS
  if smoke and "xla_force_host_platform_device_count" not in base:
    base += (" --xla_force_host_platform_device_count=2"
             " --xla_cpu_enable_concurrency_optimized_scheduler=false")
  if flags.startswith("ENV:"):  # an environment variable, not an XLA flag
    key, value = flags[4:].split("=", 1)
    env[key] = value
    flags = ""
  env["XLA_FLAGS"] = f"{base} {flags}".strip()
  cmd = [sys.executable, os.path.abspath(__file__), "--child", child_variant]
  cmd += ["--smoke"] * smoke + ["--mock-gpus"] * mock
  with tempfile.TemporaryFile("w+") as log:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
      code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()  # this child, by its pid
      proc.wait()
      code = None
    seconds = time.perf_counter() - t0
    log.seek(0)
    output = log.read()
  return name, description, flags, code, seconds, output


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("variants", nargs="*", help="names (default: all)")
  parser.add_argument("--jobs", type=int, default=4, help="subprocesses at once")
  parser.add_argument("--timeout", type=float, default=60.0, help="seconds per variant")
  parser.add_argument("--smoke", action="store_true", help="CPU: interpret mode, 2 devices")
  parser.add_argument("--mock-gpus", action="store_true",
                      help="one GPU poses as two; compile only")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--gdb", default=None, metavar="VARIANT",
                      help="run one variant under cuda-gdb and print the crash backtrace")
  args = parser.parse_args(argv)
  if args.child:
    return child(args.child, args.smoke, args.mock_gpus)
  if args.gdb:
    _, child_variant, flags = variants()[args.gdb]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    cmd = ["cuda-gdb", "-q", "-batch", "-ex", "set pagination off", "-ex", "run",
           "-ex", "bt 40", "--args", sys.executable, os.path.abspath(__file__),
           "--child", child_variant]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                         check=False)
    lines = [l for l in (out.stdout + out.stderr).splitlines()
             if l.startswith("#") or "SIGSEGV" in l or "signal" in l.lower()]
    print("\n".join(line[:300] for line in lines[:60]), flush=True)
    return 0
  table = variants()
  names = args.variants or list(table)
  unknown = [n for n in names if n not in table]
  if unknown:
    parser.error(f"unknown variants {unknown}; known: {list(table)}")
  print(f"{len(names)} variants, {args.jobs} at a time, {args.timeout:.0f} s each at most",
        flush=True)
  results = {}
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = [pool.submit(run_variant, n, *table[n], args.smoke, args.mock_gpus,
                           args.timeout) for n in names]
    for fut in concurrent.futures.as_completed(futures):
      name, _, _, code, seconds, output = fut.result()
      results[name] = fut.result()
      last = (output.strip().splitlines() or [""])[-1][:120]
      print(f"  done {name:30s} {_result(code):16s} {seconds:6.1f} s  {last}", flush=True)
  print(f"\n{'variant':30s} {'result':16s} {'exit':>6s} {'s':>6s}  what")
  for name in names:
    _, description, _, code, seconds, _ = results[name]
    print(f"{name:30s} {_result(code):16s} {str(code):>6s} {seconds:6.1f}  {description}")
  bad = [n for n in names if results[n][3] != 0]
  for name in bad:
    output = results[name][5].strip().splitlines()
    print(f"\n--- {name} ({_result(results[name][3])}): last lines of its output")
    print("\n".join(output[-15:]))
  print(f"\n{len(names) - len(bad)} ok, {len(bad)} not ok", flush=True)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
