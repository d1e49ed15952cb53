"""One process of the two-process ring test (launched by test_multiprocess.py).

Usage: ``python tests/_multiprocess_worker.py --process-id I --port PORT``

Each process owns 4 simulated CPU devices (``XLA_FLAGS`` from the parent);
together they form one global mesh of 8 devices over which the sequence is
sharded. Both processes build the same inputs from a fixed seed, run the ring
(forward and backward, one jit, ``jax.shard_map``), gather the global result,
and process 0 compares it with ``rd.dilated_attention`` on one local device.
Process 0 prints ``MULTIPROCESS_OK max_err=...`` when they agree.

Not a test module: the leading underscore keeps pytest from collecting it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

import ringdilated as rd
from _harness import RING_TOL, mesh, out_and_grads_fn  # this script's directory

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
B, N, H, HKV, D = 2, 64, 4, 2, 8
# w < L (local), w = 4 L (sub-rings of 4 devices, one per process), w = N
# (ring of all 8 devices: every step crosses processes).
KW = dict(segment_lengths=(4, 32, 64), dilation_rates=(1, 2, 4), causal=True)


def _inputs():
  rng = np.random.default_rng(1234)
  q, k, v = (rng.standard_normal((B, N, x, D)).astype(np.float32) for x in (H, HKV, HKV))
  cot = rng.standard_normal((B, N, H, D)).astype(np.float32)
  kpm = rng.random((B, N)) > 0.2
  seg = np.sort(rng.integers(0, 3, (B, N)), axis=1).astype(np.int32)
  return q, k, v, cot, kpm, seg


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  args = parser.parse_args()

  # Cross-process collectives on CPU (gloo is also jax 0.10's default; set it
  # explicitly so a changed default cannot silently break the test).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                             num_processes=NUM_PROCESSES, process_id=args.process_id,
                             initialization_timeout=120)
  assert jax.process_count() == NUM_PROCESSES, jax.process_count()
  assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
  devices = jax.devices()
  assert len(devices) == NUM_PROCESSES * LOCAL_DEVICES, devices

  ring_mesh = mesh(len(devices))  # all devices of both processes
  host = _inputs()

  def global_array(x):
    sharding = NamedSharding(ring_mesh, PS(None, "sp"))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  ring = jax.shard_map(
      lambda q, k, v, kpm, seg: rd.dilated_attention(
          q, k, v, key_padding_mask=kpm, segment_ids=seg, axis_name="sp", **KW),
      mesh=ring_mesh, in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))
  args_global = list(map(global_array, host))
  compiled = jax.jit(out_and_grads_fn(ring)).lower(*args_global).compile()
  # The full ring sends chunks from device 3 (process 0) to device 4
  # (process 1) and from 7 back to 0: ppermute crosses the process boundary.
  hlo = compiled.as_text()
  assert "collective-permute" in hlo and "{3,4}" in hlo and "{7,0}" in hlo, hlo[-2000:]
  got = compiled(*args_global)
  # Every process holds half of each result; gather the whole on both.
  got = [np.asarray(x) for x in multihost_utils.process_allgather(got, tiled=True)]
  assert got[0].shape == (B, N, H, D), got[0].shape

  if args.process_id == 0:
    single = jax.jit(out_and_grads_fn(
        lambda q, k, v, kpm, seg: rd.dilated_attention(
            q, k, v, key_padding_mask=kpm, segment_ids=seg, **KW)))
    with jax.default_device(jax.local_devices()[0]):
      want = [np.asarray(x) for x in single(*host)]
    errs = [float(np.max(np.abs(a - b))) for a, b in zip(got, want)]
    signal = min(float(np.max(np.abs(w))) for w in want)
    print(f"errors out/dq/dk/dv: {errs}, smallest max |value| {signal:.3f}", flush=True)
    ok = max(errs) < RING_TOL and signal > 0.1
    print(f"MULTIPROCESS_OK max_err={max(errs):.3g}" if ok else "MULTIPROCESS_MISMATCH",
          flush=True)
  else:
    ok = True
  # Keep both processes alive until process 0 has checked (and the
  # coordinator, which lives in process 0, is no longer needed).
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()
  return 0 if ok else 1


if __name__ == "__main__":
  try:
    code = main()
  except BaseException:  # report, then exit at once (see below)
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  # Skip interpreter teardown. With jax 0.10.2 on CPU, a non-coordinator
  # process sometimes (about 1 run in 10 here) stalls ~150 s while garbage
  # collecting the distributed client at exit, after process 0 (which hosts
  # the coordination service) has gone. Everything is done and flushed here.
  os._exit(code)
