"""What fills the peak memory of one benchmark case: XLA's buffer report.

Compiles (does not run) forward+backward of a ``bench.py`` case with XLA's
dumps on and prints the largest allocations of the memory-usage report with
the shapes that share each one::

  python benchmarks/memory_report.py ours_longnet_mix 1048576 [--top 30]
  python benchmarks/memory_report.py ours_docs64k_longnet_mix 1048576
  python benchmarks/memory_report.py longnet_ring 8388608 --ring 2 --layout zigzag --no-check-vma

With ``--ring P`` the name is a workload of ``bench_multi_gpu.py`` (``dense``,
``longnet_ring``) and the program is its ring over the first P devices;
sizes are per device, in units of one local ``[B, N / P, H, D]`` tensor too.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

import jax
from jax.sharding import NamedSharding, PartitionSpec
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402  pylint: disable=g-import-not-at-top
import bench_multi_gpu as multi  # noqa: E402  pylint: disable=g-import-not-at-top


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("name", help="a case name of bench.py, e.g. ours_longnet_mix")
  parser.add_argument("seq_len", type=int)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--ring", type=int, default=None, help="ring size P (bench_multi_gpu.py)")
  parser.add_argument("--layout", default="zigzag")
  parser.add_argument("--backend", default="auto")
  parser.add_argument("--no-check-vma", action="store_true")
  args = parser.parse_args(argv)
  # XLA reads its flags when the backend starts, at the first compile below.
  dump = tempfile.mkdtemp(prefix="xla_dump_")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*(fwd_bwd|run).*")
  if args.ring:
    return _report(*ring_memory(args.name, args.seq_len, args.ring, args.layout,
                                 args.backend, not args.no_check_vma), dump, args.top)
  found = [c for c in bench.cases(set(bench.GROUPS))
           if c.name == args.name and c.n == args.seq_len]
  if not found:
    parser.error(f"no case {args.name} at N={args.seq_len}")
  case = found[0]
  n = case.n
  x = jax.ShapeDtypeStruct((bench.B, n, bench.H, bench.D), jnp.bfloat16)
  extra = case.extra(n) if case.extra else ()  # masks / dropout key: small, concrete

  m = bench.fwd_bwd(case.impl).lower(x, x, x, x, *extra).compile().memory_analysis()
  return _report(f"{args.name} N={n}", m, bench.B * n * bench.H * bench.D * 2, dump,
                 args.top)


def ring_memory(workload: str, n: int, p: int, layout: str, backend: str, check_vma: bool):
  """(label, memory analysis, bytes of one local tensor) of a bench_multi_gpu
  ring's forward+backward, compiled, not run."""
  case = multi.Case("timing", workload, n, p, layout, backend, check_vma)
  mesh = multi._mesh(p)  # pylint: disable=protected-access
  x = jax.ShapeDtypeStruct((multi.B, case.n, multi.H, multi.D), jnp.bfloat16,
                           sharding=NamedSharding(mesh, PartitionSpec(None, "sp")))
  m = multi.fwd_bwd_fn(multi.ring_attention(case, mesh)).lower(x, x, x, x).compile()
  label = f"{case.name} check_vma={multi.check_vma(case)}, per device"
  return label, m.memory_analysis(), multi.local_tensor_bytes(case)


def _report(label: str, m, tensor: int, dump: str, top: int) -> int:
  gib = 2.0**30
  print(f"{label}: arguments {m.argument_size_in_bytes / gib:.2f} GiB, "
        f"outputs {m.output_size_in_bytes / gib:.2f} GiB, "
        f"temporaries {m.temp_size_in_bytes / gib:.2f} GiB "
        f"({m.temp_size_in_bytes / tensor:.2f} tensors of {tensor / gib:.2f} GiB)")
  reports = sorted(glob.glob(os.path.join(dump, "*after_optimizations-memory-usage-report.txt")))
  with open(reports[-1]) as f:
    lines = f.read().splitlines()
  print("\n".join(lines[:top + 4]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
