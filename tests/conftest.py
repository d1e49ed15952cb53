"""Test configuration: 8 simulated CPU devices for the ring tests.

XLA_FLAGS must be set before jax is imported anywhere, which is why this file
does it at the top and why the library itself never touches devices at import.
"""

import os

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
# collectives; memory still linear). If a jax release drops the flag, XLA
# aborts at start-up ("Unknown flag in XLA_FLAGS"): delete the line then.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    " --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
