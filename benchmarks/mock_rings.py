"""Rings of 2, 4 and 8 GPUs compiled on one: per-GPU memory and bytes sent.

Only one H200 is lent at times, and 4- and 8-GPU machines not at all. jax's
``mock_num_gpu_processes=P`` makes one GPU pose as P (the other devices
belong to mocked processes; NCCL is mocked): XLA partitions and compiles the
P-GPU program in full, under jax's default partitioner (Shardy), but cannot
run it. So this records what compiling tells, and no time:

  * that the ring's forward+backward compiles for P GPUs;
  * its per-GPU peak by the compiled memory analysis (the same number
    ``bench_multi_gpu.py`` records as ``peak_bytes_per_device``), against
    the bytes of one GPU's share of ``q, k, v, out, dq, dk, dv``;
  * the bytes its collective-permutes send per GPU, read from the compiled
    program (``compiled_ppermute_bytes``).

The 2-GPU records check the method: they should equal what
``bench_multi_gpu.py`` measured on 2 real H200s for the same cases.

Cases (``bench_multi_gpu.py``'s workloads, causal, bf16, B=1, H=16, D=128,
``check_vma=True``), for each P and both layouts: LongNet-ring on the Hopper
kernels (``"mosaic"``, what ``"auto"`` picks on an H200) at 2M (strong
scaling), at P x 1M (weak) and at P x 4M (the most one H200 holds per GPU:
8M ran on 2), then dense causal 128K and LongNet-ring 2M on the cuDNN
blocks::

  python benchmarks/mock_rings.py --out benchmarks/results/h200_mock_rings.json
  python benchmarks/mock_rings.py --devices 4 --match "longnet_ring/N16777216"
  python benchmarks/mock_rings.py --kernels pallas --match "/pallas"  # the Triton kernels

Each P compiles in a subprocess of its own (the mock is set before jax
starts its GPU client; the driver starts none), all P at once. The mock
hangs in XLA's compile unless autotuning and command buffers are off, so
the subprocesses run with ``repro_pallas_ring_crash.MOCK_FLAGS``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  pylint: disable=g-import-not-at-top
import bench_multi_gpu as bm  # noqa: E402  pylint: disable=g-import-not-at-top
from repro_pallas_ring_crash import MOCK_FLAGS  # noqa: E402  pylint: disable=g-import-not-at-top
from repro_pallas_ring_crash import custom_calls  # noqa: E402  pylint: disable=g-import-not-at-top
LAYOUTS = ("zigzag", "contiguous")


def cases(p: int, kernels: str = "mosaic"):
  """The cases compiled on a mock of ``p`` GPUs, most wanted first;
  LongNet-ring's three sizes on the backend ``kernels``."""
  wanted = [("longnet_ring", n, kernels) for n in (2 * bm.M, p * bm.M, 4 * p * bm.M)]
  wanted += [("dense", 131072, "cudnn"), ("longnet_ring", 2 * bm.M, "cudnn")]
  seen = []
  for workload, n, backend in wanted:
    for layout in LAYOUTS:
      case = bm.Case("mock", workload, n, p, layout, backend)
      if case not in seen and bm.valid(workload, n, p, layout) is None:
        seen.append(case)
  return seen


def compile_case(case) -> dict:
  """Compiles ``case``'s forward+backward on the mocked mesh; its record."""
  rec = bm._base_record(case)  # pylint: disable=protected-access
  rec.update(mocked=True, partitioner="shardy" if jax.config.jax_use_shardy_partitioner
             else "gspmd")
  mesh = bm._mesh(case.p)  # pylint: disable=protected-access
  x = jax.ShapeDtypeStruct((bm.B, case.n, bm.H, bm.D), jnp.bfloat16,
                           sharding=NamedSharding(mesh, PS(None, "sp")))
  t0 = time.perf_counter()
  try:
    traced = bm.fwd_bwd_fn(bm.ring_attention(case, mesh)).trace(x, x, x, x)
    compiled = traced.lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    print(f"{case.name:52s} ERROR {rec['error'][:200]}", flush=True)
    return rec
  rec["compile_s"] = time.perf_counter() - t0
  rec["peak_bytes_per_device"] = bench._peak_bytes(compiled)  # pylint: disable=protected-access
  rec["qkv_out_grad_bytes_per_device"] = 7 * bm.local_tensor_bytes(case)
  hlo = compiled.as_text()
  rec["compiled_ppermute_bytes"] = bm.compiled_permute_bytes(hlo)
  rec["kernel_calls"] = custom_calls(hlo)
  print(f"{case.name:52s} compiled in {rec['compile_s']:5.1f} s  peak/GPU "
        f"{rec['peak_bytes_per_device'] / 2**30:7.2f} GiB "
        f"({rec['peak_bytes_per_device'] / rec['qkv_out_grad_bytes_per_device']:.3f}x the "
        f"tensors)  ppermute {rec['compiled_ppermute_bytes'] / 2**20:8.1f} MiB  "
        f"{rec['kernel_calls']}", flush=True)
  return rec


def worker(p: int, match: str | None, kernels: str) -> int:
  jax.config.update("mock_num_gpu_processes", p)
  print(f"P={p}: jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].device_kind}"
        f" ({jax.local_device_count()} real)", flush=True)
  for case in cases(p, kernels):
    if match and not re.search(match, case.name):
      continue
    print("RECORD " + json.dumps(compile_case(case)), flush=True)
  return 0


def run_worker(p: int, match: str | None, kernels: str,
               timeout: float) -> tuple[int, list[dict], str]:
  env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {MOCK_FLAGS}".strip())
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(p), "--kernels", kernels]
  cmd += ["--match", match] if match else []
  try:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    code, text = out.returncode, out.stdout + out.stderr
  except subprocess.TimeoutExpired as e:
    code = None
    text = "".join(s if isinstance(s, str) else (s or b"").decode() for s in (e.stdout, e.stderr))
  records = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RECORD ")]
  return code, records, text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="2,4,8", help="mocked ring sizes, comma list")
  parser.add_argument("--match", default=None, help="regular expression on case names")
  parser.add_argument("--out", default=None, help="JSON file the records are merged into")
  parser.add_argument("--timeout", type=float, default=500.0, help="seconds per ring size")
  parser.add_argument("--kernels", default="mosaic",
                      help="LongNet-ring's backend: mosaic (Hopper) or pallas (Triton)")
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker(args.worker, args.match, args.kernels)
  ps = [int(p) for p in args.devices.split(",")]
  bad = 0
  with concurrent.futures.ThreadPoolExecutor(len(ps)) as pool:
    for p, (code, records, text) in zip(ps, pool.map(
        lambda p: run_worker(p, args.match, args.kernels, args.timeout), ps)):
      print("\n".join(line for line in text.splitlines() if not line.startswith("RECORD ")))
      print(f"P={p}: exit {code}, {len(records)} records", flush=True)
      bad += code != 0 or any("error" in r for r in records)
      for rec in records:
        bm.merge(args.out, rec)  # (nothing without --out)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
