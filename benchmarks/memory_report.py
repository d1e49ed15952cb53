"""What fills the peak memory of one benchmark case: XLA's buffer report.

Compiles (does not run) forward+backward of a ``bench.py`` case with XLA's
dumps on and prints the largest allocations of the memory-usage report with
the shapes that share each one::

  python benchmarks/memory_report.py ours_longnet_mix 1048576 [--top 30]
  python benchmarks/memory_report.py ours_docs64k_longnet_mix 1048576
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

_DUMP = tempfile.mkdtemp(prefix="xla_dump_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_dump_to={_DUMP} --xla_dump_hlo_module_re=.*fwd_bwd.*")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402  pylint: disable=g-import-not-at-top


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("name", help="a case name of bench.py, e.g. ours_longnet_mix")
  parser.add_argument("seq_len", type=int)
  parser.add_argument("--top", type=int, default=30)
  args = parser.parse_args(argv)
  found = [c for c in bench.cases(set(bench.GROUPS))
           if c.name == args.name and c.n == args.seq_len]
  if not found:
    parser.error(f"no case {args.name} at N={args.seq_len}")
  case = found[0]
  n = case.n
  x = jax.ShapeDtypeStruct((bench.B, n, bench.H, bench.D), jnp.bfloat16)
  extra = case.extra(n) if case.extra else ()  # masks / dropout key: small, concrete

  m = bench.fwd_bwd(case.impl).lower(x, x, x, x, *extra).compile().memory_analysis()
  gib = 2.0**30
  print(f"{args.name} N={n}: arguments {m.argument_size_in_bytes / gib:.2f} GiB, "
        f"outputs {m.output_size_in_bytes / gib:.2f} GiB, "
        f"temporaries {m.temp_size_in_bytes / gib:.2f} GiB")
  reports = sorted(glob.glob(os.path.join(_DUMP, "*after_optimizations-memory-usage-report.txt")))
  with open(reports[-1]) as f:
    lines = f.read().splitlines()
  print("\n".join(lines[:args.top + 4]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
