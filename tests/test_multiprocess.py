"""The ring across two processes (multi-controller JAX, like two hosts).

Two local processes, 4 simulated CPU devices each, join one
``jax.distributed`` job over loopback; the ring runs over the global 8-device
mesh, so ``ppermute`` crosses the process boundary (CPU collectives through
gloo). See ``tests/_multiprocess_worker.py`` for what each process does.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

WORKER = pathlib.Path(__file__).with_name("_multiprocess_worker.py")
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_ring_over_two_processes_matches_single_device():
  port = _free_port()
  env = dict(os.environ)
  # The parent's XLA_FLAGS (conftest) ask for 8 devices; each worker has 4.
  env["XLA_FLAGS"] = re.sub(r"(--xla_force_host_platform_device_count=)\d+", r"\g<1>4",
                            os.environ["XLA_FLAGS"])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_NUM_CPU_DEVICES", None)
  procs = [
      subprocess.Popen(
          [sys.executable, str(WORKER), "--process-id", str(i), "--port", str(port)],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
          cwd=WORKER.parent.parent)
      for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:  # only on timeout or error: never leave workers behind
      if p.poll() is None:
        p.kill()
        p.communicate()
  report = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{out[-4000:]}"
                     for i, (p, out) in enumerate(zip(procs, outputs)))
  assert [p.returncode for p in procs] == [0, 0], report
  assert "MULTIPROCESS_OK max_err=" in outputs[0], report
