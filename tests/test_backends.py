"""Block backend selection and the contract every backend must keep.

The cuDNN block itself runs only on a GPU (benchmarks/check_gpu.py checks it
there); on CPU these tests check that it is never picked silently, that the
fallback is the XLA block with identical results, and that the ring keeps
float32 accumulators even when a backend returns low-precision blocks (as
cuDNN does).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ringdilated as rd
from ringdilated import _backends, _plan, _ring
from ringdilated._backends import cudnn, xla

KW = dict(segment_lengths=(16, 64), dilation_rates=(1, 4), causal=True)


def _qkv(dtype=jnp.float32, n=64):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.standard_normal((1, n, h, 8)), dtype) for h in (4, 2, 2))


def _request(dtype=jnp.bfloat16, head_dim=64, masks=False, dropout=False):
  return _backends.Request(jax.default_backend(), jnp.dtype(dtype), head_dim, masks, dropout)


def test_auto_is_xla_on_cpu():
  assert _backends.select("auto", _request()) is _backends.REGISTRY["xla"]


def test_internal_cudnn_api_is_recognised_by_this_jax():
  # The feature check must accept the jax this project pins; if a release
  # changes jax's internal cuDNN rules this names what changed.
  assert cudnn.internal_api_problem() is None


def test_cudnn_request_falls_back_to_xla_with_a_warning(caplog):
  q, k, v = _qkv()
  with caplog.at_level(logging.WARNING, logger="ringdilated"):
    got = jax.jit(functools.partial(rd.dilated_attention, backend="cudnn", **KW))(q, k, v)
  assert "backend='cudnn' unavailable" in caplog.text and "'cpu'" in caplog.text
  want = jax.jit(functools.partial(rd.dilated_attention, backend="xla", **KW))(q, k, v)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cudnn_reasons():
  cudnn_ = _backends.REGISTRY["cudnn"]
  assert "not 'gpu'" in _backends._platform_problem(cudnn_, _request())  # pylint: disable=protected-access
  assert "dtype float32" in cudnn_.problem(_request(jnp.float32))
  assert "head dim 136" in cudnn_.problem(_request(head_dim=136))
  assert "key_padding_mask" in _backends.problem(cudnn_, _request(masks=True))


def test_unknown_backend_raises():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"backend='tpu' must be one of"):
    rd.dilated_attention(q, k, v, backend="tpu", **KW)


class _LowPrecision(xla.XLA):
  """The XLA block returning block outputs and grads in the input dtype."""

  def forward(self, q, k, v, vis, **kw):
    out, lse = super().forward(q, k, v, vis, **kw)
    return out.astype(q.dtype), lse

  def backward(self, q, *args, **kw):
    return tuple(x.astype(q.dtype) for x in super().backward(q, *args, **kw))


def test_ring_accumulates_low_precision_blocks_in_float32():
  """A backend with bf16 block outputs (like cuDNN) runs in the ring, and the
  ring's error against float32 math stays at the level of one device."""
  q, k, v = _qkv(jnp.bfloat16)
  rng = np.random.default_rng(1)
  cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  config = rd.DilatedConfig(KW["segment_lengths"], KW["dilation_rates"], causal=True)
  lowp = _LowPrecision()

  def run(num_shards, q, k, v, backend):
    axis = "sp" if num_shards > 1 else None
    static = _ring.Static(_plan.make_plan(config, 64, 4, 2, num_shards), 8 ** -0.5, 0.0,
                          axis, backend)
    f = lambda q, k, v: _ring.attention(static, q, k, v, None, None, None)  # noqa: E731
    if axis:
      mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_shards]), ("sp",))
      f = jax.shard_map(f, mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
    out, pull = jax.vjp(f, q, k, v)
    return (out,) + pull(cot.astype(out.dtype))

  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = jax.jit(functools.partial(run, 1, backend=_backends.REGISTRY["xla"]))(*f32)
  errs = {}
  for p in (1, 4):
    got = jax.jit(functools.partial(run, p, backend=lowp))(q, k, v)
    assert [x.dtype for x in got] == [jnp.bfloat16] * 4
    errs[p] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) for g, w in zip(got, want))
  assert errs[1] < 5e-2
  assert errs[4] <= 1.5 * errs[1]
