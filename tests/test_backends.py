"""Block backend selection and the contract every backend must keep.

The cuDNN block itself runs only on a GPU (benchmarks/check_gpu.py checks it
there); on CPU these tests check that it is never picked silently, that the
fallback is the XLA block with identical results, and that the ring keeps
float32 accumulators even when a backend returns low-precision blocks (as
cuDNN does). A toy backend shows what adding one takes: a class and a
registry entry.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import types

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ringdilated as rd
from ringdilated import _backends, _plan, _ring
from ringdilated._backends import base, cudnn, xla

KW = dict(segment_lengths=(16, 64), dilation_rates=(1, 4), causal=True)


def _qkv(dtype=jnp.float32, n=64):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.standard_normal((1, n, h, 8)), dtype) for h in (4, 2, 2))


def _request(dtype=jnp.bfloat16, head_dim=64, masks=False, dropout=False):
  return _backends.Request(jax.default_backend(), jnp.dtype(dtype), head_dim, masks, dropout)


def test_auto_is_xla_on_cpu():
  assert _backends.select("auto", _request()) is _backends.REGISTRY["xla"]


def test_internal_cudnn_api_is_recognised_by_this_jax():
  # The feature check accepts the jax releases the cuDNN blocks were measured
  # with (up to 0.11.2, on the H200); jax 0.12 added ``score_mod`` to both
  # rules, so there it names the change and selection passes the backend over
  # (a fresh Python 3.12 install gets jax 0.12).
  problem = cudnn.internal_api_problem()
  if jax.__version_info__ < (0, 12):
    assert problem is None
  else:
    assert re.fullmatch(r"jax \S+ (changed the signature of|has no) _dot_product_attention_"
                        r"(fwd|bwd)_rule", problem or ""), problem


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
      f = jax.shard_map(f, mesh=harness.mesh(num_shards), in_specs=(P(None, "sp"),) * 3,
                        out_specs=P(None, "sp"))
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
  # Measured: errs[4] / errs[1] = 1.00 on these inputs. Not tightened to
  # 1.1: the errors are one bf16 rounding of the results, and an ulp flip
  # of one value moves the max: on 14 other seeds the ratio was 0.80 to
  # 1.21 (1.21 on two of them).
  assert errs[4] <= 1.5 * errs[1]


# ---------------------------------------------------------------------------
# Adding a backend: one class (in the library, one module) and one registry
# line. The toy is the XLA math without its tiles, masks or dropout.

_TOY_TRACES: list[str] = []  # the toy's methods append here when traced
_F32 = jnp.float32


def _toy_logits(q, k, vis, scale):
  """[X, K, G, T, S] float32 scores, -inf above a causal diagonal."""
  s = jnp.einsum("XTKGD,XSKD->XKGTS", q, k, preferred_element_type=_F32) * scale
  if vis.diagonal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
  return s


@dataclasses.dataclass(frozen=True)
class _Toy(base.Backend):
  """Plain float32 einsums; blocks without masks or dropout."""

  name = "toy"
  capabilities = base.Capabilities()  # everywhere; causal masks only, no dropout

  def forward(self, q, k, v, vis, *, scale, dropout=None):
    _TOY_TRACES.append("forward")
    s = _toy_logits(q, k, vis, scale)
    lse = jax.nn.logsumexp(s, axis=-1)                           # [X, K, G, T]
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    out = jnp.einsum("XKGTS,XSKD->XTKGD", p, v.astype(_F32))
    return out, jnp.moveaxis(lse, -1, 1)

  def backward(self, q, k, v, vis, dout, out, lse, *, scale, dropout=None):
    _TOY_TRACES.append("backward")
    q, k, v, dout, out = (x.astype(_F32) for x in (q, k, v, dout, out))
    lse = jnp.moveaxis(lse, 1, -1)[..., None]                   # [X, K, G, T, 1]
    p = jnp.exp(_toy_logits(q, k, vis, scale) - jnp.where(jnp.isfinite(lse), lse, 0.0))
    delta = jnp.einsum("XTKGD,XTKGD->XKGT", dout, out)[..., None]
    ds = p * (jnp.einsum("XTKGD,XSKD->XKGTS", dout, v) - delta)
    dq = jnp.einsum("XKGTS,XSKD->XTKGD", ds, k) * scale
    dk = jnp.einsum("XKGTS,XTKGD->XSKD", ds, q) * scale
    dv = jnp.einsum("XKGTS,XTKGD->XSKD", p, dout)
    return dq, dk, dv


@pytest.fixture
def toy_registered(monkeypatch):
  """The toy under the name "toy": the registry line, for this test only."""
  monkeypatch.setattr(_backends, "REGISTRY",
                      types.MappingProxyType({**_backends.REGISTRY, "toy": _Toy()}))
  _TOY_TRACES.clear()


def test_a_registered_toy_backend_runs_by_name_and_matches_the_oracle(toy_registered):
  del toy_registered
  q, k, v = _qkv(n=32)
  kw = dict(segment_lengths=(8, 32), dilation_rates=(1, 4), causal=True)
  harness.assert_matches_reference(
      functools.partial(rd.dilated_attention, backend="toy", **kw), q, k, v, **kw)
  assert set(_TOY_TRACES) == {"forward", "backward"}
  # On a ring of 4 (w = 32: a ring over all devices), config by name.
  config = rd.DilatedConfig(**kw, backend="toy", axis_name="sp")
  _TOY_TRACES.clear()
  ring = harness.ring(harness.with_config(config), 4)
  harness.assert_matches_reference(ring, q, k, v, config=config)
  assert "forward" in _TOY_TRACES and "backward" in _TOY_TRACES


def test_a_backend_object_runs_unregistered():
  _TOY_TRACES.clear()
  q, k, v = _qkv(n=32)
  kw = dict(segment_lengths=(16, 32), dilation_rates=(1, 2))
  harness.assert_matches_reference(
      functools.partial(rd.dilated_attention, backend=_Toy(), **kw), q, k, v, **kw)
  assert "forward" in _TOY_TRACES and "backward" in _TOY_TRACES
  with pytest.raises(ValueError, match=r"backend='toy' must be one of \('auto', 'xla'"):
    rd.DilatedConfig((32,), (1,), backend="toy")


def test_a_backend_name_is_accepted_only_while_registered(monkeypatch):
  with monkeypatch.context() as m:
    m.setattr(_backends, "REGISTRY",
              types.MappingProxyType({**_backends.REGISTRY, "toy": _Toy()}))
    assert rd.DilatedConfig((32,), (1,), backend="toy").backend == "toy"
    assert _backends.select("toy", _request(jnp.float32)) == _Toy()
  with pytest.raises(ValueError, match=r"backend='toy' must be one of"):
    rd.DilatedConfig((32,), (1,), backend="toy")


def test_selection_reads_capabilities_and_falls_back_with_a_warning(toy_registered, caplog):
  """The toy declares masks=False: with a key padding mask its blocks are not
  used; the portable block runs instead, and the warning says why."""
  del toy_registered
  q, k, v = _qkv(n=32)
  kpm = jnp.arange(32)[None] % 5 != 0
  kw = dict(segment_lengths=(8, 32), dilation_rates=(1, 4), causal=True, key_padding_mask=kpm)
  with caplog.at_level(logging.WARNING, logger="ringdilated"):
    got = jax.jit(functools.partial(rd.dilated_attention, backend="toy", **kw))(q, k, v)
  assert "backend='toy' unavailable (key_padding_mask" in caplog.text, caplog.text
  assert "the toy blocks take causal masks only" in caplog.text
  assert "using the XLA block" in caplog.text
  assert not _TOY_TRACES
  want = jax.jit(functools.partial(rd.dilated_attention, backend="xla", **kw))(q, k, v)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Without the mask the toy runs.
  jax.jit(functools.partial(rd.dilated_attention, backend="toy", segment_lengths=(8, 32),
                            dilation_rates=(1, 4)))(q, k, v)
  assert set(_TOY_TRACES) == {"forward"}
