"""Per-device memory is linear in the sequence length, at a million tokens.

The forward + backward ring program is lowered and compiled for 8 simulated
CPU devices (never run) and its per-device temporary buffer size read from
``compiled.memory_analysis()``. Doubling the sequence length must double it
(``O(N / P)``), where dense attention would quadruple it.

``tests/conftest.py`` provides the 8 devices. (test_ring.py checks the other
direction: fixed ``N``, growing ring.)
"""

from __future__ import annotations

import dataclasses

import _harness as harness
import jax
import jax.numpy as jnp

import ringdilated as rd

P = 8
KEPT = 256  # kept tokens per segment, w / r, in every branch (LongNet)


def longnet_config(n: int) -> dict:
  """Segment lengths 256, 1024, 4096, ... below ``n``, then ``n``; ``w / r = 256``.

  For n = 2**20 on 8 devices (L = 131072): five local branches, one on
  sub-rings of 2 devices (w = 262144) and one over the whole ring (w = N).
  """
  ws, w = [], KEPT
  while w < n:
    ws.append(w)
    w *= 4
  ws.append(n)
  return dict(segment_lengths=tuple(ws), dilation_rates=tuple(w // KEPT for w in ws),
              causal=True)


def _temp_bytes(n: int, kw: dict, h: int = 1, d: int = 4) -> int:
  ring = harness.ring(lambda q, k, v: rd.dilated_attention(q, k, v, axis_name="sp", **kw), P)

  def grads(q, k, v):
    return jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v)), argnums=(0, 1, 2))(q, k, v)

  x = jax.ShapeDtypeStruct((1, n, h, d), jnp.float32)
  # (memory_analysis does not depend on the LLVM optimization level.)
  mem = jax.jit(grads).lower(x, x, x).compile().memory_analysis()
  # Per device: the arguments are the local shards of q, k, v.
  assert mem.argument_size_in_bytes == 3 * (n // P) * h * d * 4
  return mem.temp_size_in_bytes


def test_temp_memory_is_linear_in_sequence_length_at_a_million_tokens():
  n = 2**20
  temp = {m: _temp_bytes(m, longnet_config(m)) for m in (n // 2, n)}
  ratio = temp[n] / (2 * temp[n // 2])
  # Observed: 296 MB at N = 2**19, 592 MB at N = 2**20 per device (ratio 1.0001).
  assert 1 / 1.2 < ratio < 1.2, temp
  # Nowhere near one dense [L, L] float32 score matrix of the local length.
  local = n // P
  assert temp[n] < local * local * 4 / 50, temp


def test_negative_control_untiled_dense_branch_is_quadratic():
  """The same check fails for one dense branch (w = N, r = 1) when the
  portable block takes the whole [L, L] chunk as one tile: the block
  quadruples. With its default tiles it stays linear."""
  untiled = dataclasses.replace(rd.backends.REGISTRY["xla"], query_tile=2**30,
                                key_tile=2**30)
  kw = dict(segment_lengths=None, dilation_rates=(1,), causal=True)
  for backend, low, high in ((untiled, 1.6, 2.2), ("xla", 0.0, 1.2)):
    temp = {m: _temp_bytes(m, dict(kw, segment_lengths=(m,), backend=backend))
            for m in (2048, 4096)}
    assert low < temp[4096] / (2 * temp[2048]) < high, (backend, temp)
