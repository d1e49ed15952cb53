"""Interleaved A/B of versions of a kernel module, in one process, one GPU.

A kernel change counts only when measured side by side with what it
replaces. This compiles the same fwd+bwd program once with the working
tree's kernel module and once with each other version of it (files, for
example the last commit's and experimental variants), and times them in
turn, round after round, so clock and temperature drift fall on all::

  git show HEAD:ringdilated/_backends/mosaic.py > ab_base_mosaic.py   # untracked
  python benchmarks/ab_kernels.py --base ab_base_mosaic.py [--base ab_variant.py] \\
      --n 262144 --cases unmasked,docs64k,docs8k

``--forward`` times the forward alone (a change to the forward kernel,
undiluted by the backward's time). ``--module`` names the module the files
replace (default ``ringdilated._backends.mosaic``; its ``forward`` and
``backward`` are swapped while a version's program is traced). Cases are those of
``profile_kernels.py``. Prints per case and version the median of each
round, the ratio to the first ``--base`` and the compiled program's peak.
Versions whose programs lower to the same text (without locations; the
Mosaic GPU kernels inside included) are compiled and timed once, under the
joined names: a case that no version changes (the unmasked one, for a
change of the masked kernels) gives the reference time once. (Two equal
programs timed apart differed by 0.1-0.6% at 1M on the H200.)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import os
import re
import statistics
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402
import profile_kernels  # noqa: E402


def load_base(path: str, module: str):
  """The file ``path`` as a sibling of ``module`` (so its relative imports
  resolve in the same package)."""
  package, _, name = module.rpartition(".")
  stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(f"{package}._ab_{stem}_{name}", path)
  base = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = base  # (dataclasses look their module up)
  spec.loader.exec_module(base)
  return base


def lower_with(target, source, impl, args, forward: bool = False):
  """``fwd_bwd(*args)`` (``forward``: the forward alone, ``dout`` unused)
  lowered while ``target``'s forward and backward are ``source``'s."""
  saved = target.forward, target.backward
  target.forward, target.backward = source.forward, source.backward
  program = (jax.jit(lambda q, k, v, dout, *extra: impl(q, k, v, *extra)) if forward
             else bench.fwd_bwd(impl))
  try:
    return program.lower(*args)
  finally:
    target.forward, target.backward = saved


def _digest(lowered) -> str:
  """Of the lowered program's text without locations: equal for one program
  from two files. (With ``jax_traceback_in_locations_limit`` 0, which
  :func:`main` sets, the serialized Mosaic GPU kernels carry none either.)"""
  return hashlib.sha256(lowered.as_text(debug_info=False).encode()).hexdigest()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base", required=True, action="append",
                 help="another version of the module (a file; repeat for more)")
  p.add_argument("--module", default="ringdilated._backends.mosaic")
  p.add_argument("--n", type=int, default=262144)
  p.add_argument("--mode", default="mix", choices=("mix", "partition"))
  p.add_argument("--cases", default="unmasked,docs64k,docs8k",
                 help=f"comma-separated: {', '.join(profile_kernels.CASES)}")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--iters", type=int, default=8)
  p.add_argument("--forward", action="store_true", help="time the forward alone")
  p.add_argument("--smoke", action="store_true", help="bench.py's tiny sizes (CPU)")
  args = p.parse_args(argv)
  bench._configure(args.smoke)  # pylint: disable=protected-access
  jax.config.update("jax_traceback_in_locations_limit", 0)
  target = importlib.import_module(args.module)
  versions = {os.path.splitext(os.path.basename(path))[0]: load_base(path, args.module)
              for path in args.base}
  versions["new"] = target
  first = next(iter(versions))
  device = jax.devices()[0]
  q, k, v, dout = bench._inputs(args.n, device, args.n)  # pylint: disable=protected-access
  for case in args.cases.split(","):
    impl, make_extra = profile_kernels.CASES[case](args.mode)
    extra = tuple(jax.device_put(x, device) for x in make_extra(args.n)) if make_extra else ()
    inputs = (q, k, v, dout, *extra)
    compiled, names = {}, {}  # digest -> program, version names
    for name, mod in versions.items():
      lowered = lower_with(target, mod, impl, inputs, args.forward)
      digest = _digest(lowered)
      if digest not in compiled:
        compiled[digest] = lowered.compile()
      names.setdefault(digest, []).append(name)
    times = {digest: [] for digest in compiled}
    for _ in range(args.rounds):
      for digest, fn in compiled.items():
        times[digest].append(bench._median_ms(fn, inputs, args.iters, seconds=60.0))  # pylint: disable=protected-access
    base = statistics.median(times[next(d for d in names if first in names[d])])
    for digest, ts in times.items():
      mid = statistics.median(ts)
      peak = bench._peak_bytes(compiled[digest]) / 2**30  # pylint: disable=protected-access
      print(f"{case:12s} N={args.n} {'='.join(names[digest]):16s} {mid:9.3f} ms  "
            f"x{mid / base:.3f}  peak {peak:.2f} GiB  rounds " + " ".join(f"{t:.2f}" for t in ts),
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
