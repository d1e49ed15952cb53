"""Test configuration: 8 simulated CPU devices for the ring tests.

XLA_FLAGS must be set before jax is imported anywhere, which is why this file
does it at the top and why the library itself never touches devices at import.
"""

import os
import subprocess
import sys

# XLA:CPU's concurrency-optimized scheduler lets simulated devices run the
# collective-permutes of independent rings out of step, and its collective
# rendezvous then mixes them up (an abort, or wrong values: seen with jax 0.10
# on a 4-device zigzag ring with three rings of different sizes). Off.
# Compiles dominate the run time; LLVM optimization takes about a third of
# each and changes nothing tested (HLO, buffer assignment, results): level 0
# for every program, the examples' and the README's included.
# XLA:CPU's MLIR fusion emitters (its default) then take most of a compile:
# its older IR emitters compile the same HLO about twice as fast (the whole
# suite 595 -> 370 s on 2 cores, jax 0.10.2) and change what is tested no
# more than the LLVM level does (results within float32 rounding; the same
# collectives; memory still linear).
_FAST_CODEGEN = "--xla_cpu_use_fusion_emitters=false"


def _xla_takes(flag: str) -> bool:
  """Whether XLA starts with ``flag``: an unknown flag aborts the process, so a
  jax release that drops it must cost speed, not the suite. Asked once, in a
  child process; the answer travels to pytest-xdist's workers in the
  environment."""
  known = os.environ.get("RINGDILATED_TEST_FAST_CODEGEN")
  if known is None:
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    known = str(int(subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                                   env=env, capture_output=True, check=False).returncode == 0))
    os.environ["RINGDILATED_TEST_FAST_CODEGEN"] = known
  return known == "1"


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    " --xla_backend_optimization_level=0"
    + (" " + _FAST_CODEGEN) * _xla_takes(_FAST_CODEGEN)
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
