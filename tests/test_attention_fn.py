"""``make_attention_fn``: dilated attention inside Flax's multi-head attention.

Flax's ``MultiHeadDotProductAttention`` with ``attention_fn=make_attention_fn(...)``
must equal ``rd.MultiHeadDilatedAttention`` given the same weights (both
modules use ``[E, N, H]`` q/k/v kernels and an ``[N, H, F]`` out kernel).
Unsupported Flax arguments must raise, not be ignored.
"""

from __future__ import annotations

import doctest

import _harness as harness
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ringdilated as rd
import ringdilated._attention_fn

B, T, E, N = 2, 32, 32, 4
W, R = (8, 32), (1, 2)


def _key(seed):
  # "rbg" keys: XLA:CPU compiles threefry sampling slowly (see test_linen.py).
  return jax.random.key(seed, impl="rbg")


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, E)), jnp.float32)


def _random_like(tree, seed=1):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(rng.standard_normal(s.shape) * 0.3 + (0.5 if len(s.shape) <= 2 else 0),
                  s.dtype) for s in leaves])


def _flax_mha(causal=False, **kw):
  fn = rd.make_attention_fn(segment_lengths=W, dilation_rates=R, causal=causal)
  return nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=32, attention_fn=fn,
                                         **kw)


def _rd_mha(causal=False, **kw):
  return rd.MultiHeadDilatedAttention(num_heads=N, qkv_features=32, segment_lengths=W,
                                      dilation_rates=R, causal=causal, **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_flax_mha_equals_multi_head_dilated_attention(causal):
  flax_mha, ours = _flax_mha(causal), _rd_mha(causal)
  x = _x()
  params = _random_like(jax.eval_shape(flax_mha.init, _key(0), x))
  # Same parameter names and layouts: query/key/value [E, N, H], out [N, H, F].
  assert (jax.tree.map(jnp.shape, params)
          == jax.tree.map(jnp.shape, jax.eval_shape(ours.init, _key(0), x)))
  assert params["params"]["out"]["kernel"].shape == (N, 8, E)
  kpm = jnp.asarray(np.random.default_rng(2).random((B, T)) > 0.2)

  @jax.jit
  def run(params, x, kpm):
    return (flax_mha.apply(params, x, mask=kpm[:, None, None, :]),
            ours.apply(params, x, key_padding_mask=kpm),
            # A float mask (nonzero = attend), broadcast over the batch.
            flax_mha.apply(params, x, mask=kpm[:1, None, None, :].astype(jnp.float32)),
            ours.apply(params, x, key_padding_mask=jnp.broadcast_to(kpm[:1], (B, T))),
            flax_mha.apply(params, x), ours.apply(params, x))

  y, want, y1, want1, y_nomask, want_nomask = run(params, x, kpm)
  assert y.shape == (B, T, E)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y1, want1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_nomask, want_nomask, atol=1e-5, rtol=1e-5)
  assert not np.allclose(y, y_nomask, atol=1e-3)  # the mask is applied


def test_nnx_multi_head_attention_with_is_causal():
  fn = rd.make_attention_fn(segment_lengths=W, dilation_rates=R)
  mha = nnx.MultiHeadAttention(N, E, qkv_features=32, attention_fn=fn, decode=False,
                               rngs=nnx.Rngs(_key(0)))
  ours = _rd_mha(causal=True)
  x = _x()
  params = {"params": {n: {"kernel": getattr(mha, n).kernel[...],
                           "bias": getattr(mha, n).bias[...]}
                       for n in ("query", "key", "value", "out")}}
  y, want = jax.jit(lambda x: (mha(x, is_causal=True), ours.apply(params, x)))(x)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


def test_dropout():
  mha = _flax_mha(dropout_rate=0.3, broadcast_dropout=False)
  x = _x()
  params = _random_like(jax.eval_shape(
      lambda x: mha.init(_key(0), x, deterministic=True), x))

  @jax.jit
  def run(params, x, key1, key2):
    drop = lambda key: mha.apply(params, x, deterministic=False,
                                 rngs={"dropout": key})
    return (_flax_mha().apply(params, x), mha.apply(params, x, deterministic=True),
            drop(key1), drop(key1), drop(key2))

  y0, y_det, y1, y1_again, y2 = run(params, x, _key(1), _key(2))
  np.testing.assert_array_equal(y_det, y0)
  np.testing.assert_array_equal(y1, y1_again)
  assert not np.allclose(y1, y0, atol=1e-3)
  assert not np.allclose(y1, y2, atol=1e-3)
  # Flax's default broadcast_dropout=True shares one mask over the batch:
  # refused when dropout is applied, harmless (evaluation) when it is not.
  default = _flax_mha(dropout_rate=0.3)
  with pytest.raises(NotImplementedError, match="broadcast_dropout=True"):
    jax.eval_shape(lambda p, x: default.apply(
        p, x, deterministic=False, rngs={"dropout": _key(1)}), params, x)
  evaluated = jax.eval_shape(lambda p, x: default.apply(p, x, deterministic=True), params, x)
  assert evaluated.shape == x.shape


def _qkv(t=T, s=T):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, t, N, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, s, N, 8)), jnp.float32)
  return q, k, k


def test_function_equals_dilated_attention_and_casts_dtype():
  fn = rd.make_attention_fn(segment_lengths=W, dilation_rates=R, mode="partition")
  q, k, v = _qkv()
  y, want, y16 = jax.jit(lambda q, k, v: (
      fn(q, k, v, deterministic=True),
      rd.dilated_attention(q, k, v, segment_lengths=W, dilation_rates=R, mode="partition"),
      fn(q, k, v, dtype=jnp.bfloat16)))(q, k, v)
  np.testing.assert_array_equal(y, want)
  assert y16.dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bias=jnp.zeros((B, N, T, T))), NotImplementedError, r"bias is not supported"),
    (dict(mask=jnp.ones((B, 1, T, T), bool)), NotImplementedError,
     r"mask of shape \(2, 1, 32, 32\) is not supported"),
    (dict(mask=jnp.ones((B, N, 1, T), bool)), NotImplementedError,
     r"mask of shape \(2, 4, 1, 32\)"),
    (dict(mask=jnp.ones((B, 1, 1, 16), bool)), NotImplementedError,
     r"mask of shape \(2, 1, 1, 16\)"),
    (dict(mask=jnp.ones((B, T), bool)), NotImplementedError, r"mask of shape \(2, 32\)"),
    (dict(precision=jax.lax.Precision.HIGHEST), NotImplementedError, r"precision="),
    (dict(module=object()), NotImplementedError, r"sow_weights"),
    (dict(einsum_dot_general=jax.lax.dot_general), NotImplementedError,
     r"einsum_dot_general="),
    (dict(dropout_rate=0.1, broadcast_dropout=False), ValueError, r"needs a dropout_rng"),
    (dict(unknown=1), TypeError, r"unknown"),
])
def test_unsupported_arguments_raise(kwargs, error, match):
  fn = rd.make_attention_fn(segment_lengths=W, dilation_rates=R)
  with pytest.raises(error, match=match):
    fn(*_qkv(), **kwargs)


def test_lengths_must_agree_and_pattern_is_validated_early():
  fn = rd.make_attention_fn(segment_lengths=W, dilation_rates=R)
  with pytest.raises(ValueError, match=r"query length T=16 must equal key length S=32"):
    fn(*_qkv(t=16))
  with pytest.raises(ValueError, match=r"query must have shape \[B, T, N, H\]"):
    fn(jnp.ones((T, N, 8)), jnp.ones((T, N, 8)), jnp.ones((T, N, 8)))
  with pytest.raises(ValueError, match=r"segment_lengths\[0\]=8 must be divisible by "
                                       r"dilation_rates\[0\]=3"):
    rd.make_attention_fn(segment_lengths=W, dilation_rates=(3, 2))


def test_docstring_examples_run():
  result = doctest.testmod(ringdilated._attention_fn, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 3 and result.failed == 0


def test_layout_is_checked_and_passed_on():
  with pytest.raises(ValueError, match=r"layout='striped' must be one of"):
    rd.make_attention_fn(segment_lengths=W, dilation_rates=R, layout="striped")
  # Under a zigzag ring of 4 the laid-out result equals one device's.
  fn = rd.make_attention_fn(segment_lengths=W, dilation_rates=R, causal=True,
                            axis_name="sp", layout="zigzag")
  q, k, v, *_ = harness.inputs(2, 32, 4, 4, 8, masks=False)
  got = harness.zigzag_ring(lambda q, k, v: fn(q, k, v), 4)(q, k, v)
  want = rd.dilated_attention(q, k, v, segment_lengths=W, dilation_rates=R, causal=True)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_flax_mha_on_a_zigzag_ring_equals_single_device():
  """Flax's multi-head attention with a zigzag ring attention_fn, same params.

  Half-chunks of 8: a local branch, a mirrored sub-ring and the
  whole-sequence ring.
  """
  p, t = 4, 64
  pattern = {"segment_lengths": (8, 32, 64), "dilation_rates": (1, 2, 4), "causal": True}

  def mha(**kw):
    return nn.MultiHeadDotProductAttention(
        num_heads=N, qkv_features=32, attention_fn=rd.make_attention_fn(**pattern, **kw))

  x = jnp.asarray(np.random.default_rng(0).standard_normal((B, t, E)), jnp.float32)
  params = _random_like(jax.eval_shape(mha().init, _key(0), x))
  spec = jax.sharding.PartitionSpec(None, "sp")
  ring = mha(axis_name="sp", layout="zigzag")
  ringed = jax.jit(jax.shard_map(ring.apply, mesh=harness.mesh(p),
                                 in_specs=(jax.sharding.PartitionSpec(), spec),
                                 out_specs=spec))
  got = rd.from_layout(ringed(params, rd.to_layout(x, "zigzag", p)), "zigzag", p)
  want = jax.jit(mha().apply)(params, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
