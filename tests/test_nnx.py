"""Flax NNX modules: same parameters and outputs as the Linen modules.

The NNX modules are checked against the Linen ones (tested by hand in
test_linen.py): Linen parameters copied into the NNX module must give the
same output. Comparisons are jitted together (compilation dominates).
"""

from __future__ import annotations

import doctest
import math
import os
import subprocess
import sys

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ringdilated
import ringdilated as rd
from ringdilated import nnx as rdnnx

B, T, E = 2, 32, 32
W, R = (8, 32), (1, 2)


def _key(seed):
  # "rbg" keys: XLA:CPU compiles threefry sampling slowly (see test_linen.py).
  return jax.random.key(seed, impl="rbg")


def _rngs(seed=0):
  return nnx.Rngs(params=_key(seed), dropout=_key(seed + 100))


def _x(seed=0, b=B, t=T, e=E, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, e)), dtype)


def _pair(**kw):
  """The Linen module and the NNX module with the same configuration."""
  kw = {"num_heads": 4, "segment_lengths": W, "dilation_rates": R} | kw
  linen = rd.MultiHeadDilatedAttention(**kw)
  h = kw.pop("num_heads")
  return linen, rdnnx.MultiHeadDilatedAttention(h, E, rngs=_rngs(), **kw)


def _linen_params(mha, x, seed=1):
  """Random Linen parameters (biases and LayerNorm offsets nonzero)."""
  shapes = jax.eval_shape(lambda x: mha.init(_key(0), x, deterministic=True), x)
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [
      jnp.asarray(rng.standard_normal(s.shape) * 0.3 + (0.5 if len(s.shape) <= 2 else 0),
                  s.dtype) for s in leaves])


def _nnx_params(module):
  """``{submodule: {param: array}}`` of an NNX module, like Linen's ``params``."""
  return {name: {leaf: getattr(sub, leaf)[...] for leaf in ("kernel", "bias", "scale")
                 if isinstance(getattr(sub, leaf, None), nnx.Param)}
          for name in ("query", "key", "value", "qkv", "sub_ln", "out")
          if (sub := getattr(module, name, None)) is not None}


def _load(module, params):
  """Copies Linen ``params`` into the NNX module (shapes must agree)."""
  for name, leaves in params["params"].items():
    for leaf, value in leaves.items():
      getattr(getattr(module, name), leaf)[...] = value


def _jit_call(module):
  graphdef, state = nnx.split(module)

  def call(state, *args, **kw):
    return nnx.merge(graphdef, state)(*args, **kw)

  return state, call


CONFIGS = [
    dict(),
    dict(mode="partition", causal=True),
    dict(num_kv_heads=2, causal=True),
    dict(num_kv_heads=1, fused_qkv=True),
    dict(num_kv_heads=2, fused_qkv=True, sub_layer_norm=True),
    dict(out_features=24, qkv_features=64, num_heads=8, num_kv_heads=4),
    dict(use_bias=False, softmax_scale=0.3, sub_layer_norm=True),
]


@pytest.mark.parametrize("fields", CONFIGS)
def test_nnx_equals_linen_with_the_same_weights(fields):
  linen, mod = _pair(**fields)
  x = _x()
  params = _linen_params(linen, x)
  # Same parameter names and shapes as Linen.
  assert (jax.tree.map(jnp.shape, _nnx_params(mod))
          == jax.tree.map(jnp.shape, params["params"]))
  _load(mod, params)
  rng = np.random.default_rng(2)
  kpm = jnp.asarray(rng.random((B, T)) > 0.2)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
  state, call = _jit_call(mod)

  @jax.jit
  def both(state, params, x, kpm, seg):
    return (call(state, x, key_padding_mask=kpm, segment_ids=seg),
            linen.apply(params, x, key_padding_mask=kpm, segment_ids=seg))

  y, want = both(state, params, x, kpm, seg)
  assert y.shape == want.shape == (B, T, fields.get("out_features", E))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


def test_linen_comparison_negative_control():
  linen, mod = _pair(num_kv_heads=2)
  x = _x()
  params = _linen_params(linen, x)
  p = params["params"]
  _load(mod, {"params": p | {"key": p["value"], "value": p["key"]}})
  y, want = jax.jit(lambda x: (mod(x), linen.apply(params, x)))(x)
  assert not np.allclose(y, want, atol=1e-3)


@pytest.mark.parametrize("dtype, param_dtype", [
    (jnp.bfloat16, jnp.float32), (None, jnp.bfloat16), (jnp.float32, jnp.bfloat16)])
def test_dtype_and_param_dtype(dtype, param_dtype):
  _, mod = _pair(dtype=dtype, param_dtype=param_dtype, fused_qkv=True,
                 sub_layer_norm=True, num_kv_heads=2)
  leaves = jax.tree.leaves(_nnx_params(mod))
  assert len(leaves) == 6
  assert {a.dtype for a in leaves} == {jnp.dtype(param_dtype)}
  state, call = _jit_call(mod)
  x = _x()
  assert jax.eval_shape(call, state, x).dtype == (
      dtype or jnp.promote_types(x.dtype, param_dtype))


def test_default_init_is_xavier_normal_with_gamma_on_value_and_out():
  e, h, kv = 64, 4, 2
  d = e // h
  fans = {"query": (e, h * d), "key": (e, kv * d), "value": (e, kv * d), "out": (h * d, e)}
  for fused in (False, True):
    mod = rdnnx.MultiHeadDilatedAttention(
        h, e, segment_lengths=(8,), dilation_rates=(1,), num_kv_heads=kv,
        gamma_init=0.5, fused_qkv=fused, rngs=_rngs())
    p = _nnx_params(mod)
    kernels = {"out": p["out"]["kernel"]}
    if fused:
      kernels |= dict(zip(("query", "key", "value"),
                          jnp.split(p["qkv"]["kernel"], (h, h + kv), axis=1)))
    else:
      kernels |= {n: p[n]["kernel"] for n in ("query", "key", "value")}
    for n, (fan_in, fan_out) in fans.items():
      gain = 0.5 if n in ("value", "out") else 1.0
      assert float(jnp.std(kernels[n])) == pytest.approx(
          gain * math.sqrt(2 / (fan_in + fan_out)), rel=0.1), (n, fused)
    assert not any(jnp.any(p[n]["bias"]) for n in p)


def test_dropout_keys_deterministic_and_eval():
  linen, mod = _pair(dropout_rate=0.3)
  x = _x()
  params = _linen_params(linen, x)
  _load(mod, params)
  plain = linen.clone(dropout_rate=0.0)

  def run(mod, x, key1, key2):
    return (plain.apply(params, x),
            mod(x, deterministic=True),
            mod(x, deterministic=False, rngs=nnx.Rngs(dropout=key1)),
            mod(x, deterministic=False, rngs=nnx.Rngs(dropout=key1)),
            mod(x, deterministic=False, rngs=nnx.Rngs(dropout=key2)),
            # The stream kept at construction advances between calls.
            mod(x, deterministic=False), mod(x, deterministic=False))

  y0, y_det, y1, y1_again, y2, s1, s2 = jax.tree.map(
      np.asarray, nnx.jit(run)(mod, x, _key(1), _key(2)))
  np.testing.assert_array_equal(y_det, y0)
  np.testing.assert_array_equal(y1, y1_again)
  assert not np.allclose(y1, y0, atol=1e-3)
  assert not np.allclose(y1, y2, atol=1e-3)
  assert not np.allclose(s1, s2, atol=1e-3)
  with pytest.raises(ValueError, match="deterministic=None"):
    mod(x)
  mod.eval()
  assert mod.attention.deterministic is True
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(mod, x), y0, atol=1e-6)


def test_dilated_attention_module_equals_function():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, T, 2, 8)), jnp.float32) for _ in range(2))
  kpm = jnp.asarray(rng.random((B, T)) > 0.2)
  cfg = dict(segment_lengths=W, dilation_rates=R, causal=True, softmax_scale=0.2)
  attn = rdnnx.DilatedAttention(mode="partition", **cfg)
  dropping = rdnnx.DilatedAttention(dropout_rate=0.5, **cfg)
  assert not jax.tree.leaves(nnx.state(attn, nnx.Param))

  @jax.jit
  def run(q, k, v, kpm, key):
    drop_key = nnx.Rngs(dropout=key).dropout()
    return (attn(q, k, v, key_padding_mask=kpm),
            rd.dilated_attention(q, k, v, mode="partition", key_padding_mask=kpm, **cfg),
            dropping(q, k, v, deterministic=False, rngs=nnx.Rngs(dropout=key)),
            rd.dilated_attention(q, k, v, dropout_rate=0.5, dropout_rng=drop_key, **cfg))

  y, want, y_drop, want_drop = run(q, k, v, kpm, _key(3))
  np.testing.assert_array_equal(y, want)
  np.testing.assert_array_equal(y_drop, want_drop)
  with pytest.raises(ValueError, match="needs dropout keys"):
    dropping(q, k, v, deterministic=False)


@pytest.mark.parametrize("fields, match", [
    (dict(num_heads=0), r"num_heads=0 must be a positive int"),
    (dict(num_kv_heads=3), r"num_heads=4 must be divisible by num_kv_heads=3"),
    (dict(qkv_features=30), r"qkv_features=30 must be divisible by num_heads=4"),
    (dict(out_features=-1), r"out_features=-1 must be a positive int"),
    (dict(mode="bad"), r"mode='bad' must be one of"),
    (dict(gamma_init=0.0), r"gamma_init=0.0 must be a positive"),
    (dict(dropout_rate=1.5), r"dropout_rate=1.5 must be in \[0, 1\)"),
    (dict(layout="striped"), r"layout='striped' must be one of"),
    (dict(dilation_rates=(3, 2)),
     r"segment_lengths\[0\]=8 must be divisible by dilation_rates\[0\]=3"),
])
def test_invalid_arguments_raise_at_construction(fields, match):
  kw = {"num_heads": 4, "segment_lengths": W, "dilation_rates": R} | fields
  h = kw.pop("num_heads")
  with pytest.raises(ValueError, match=match):
    rdnnx.MultiHeadDilatedAttention(h, E, rngs=_rngs(), **kw)


def test_zigzag_ring_equals_single_device():
  """``layout`` reaches the function: a zigzag ring of 4 on laid-out inputs."""
  q, k, v, *_ = harness.inputs(B, T, 4, 4, 8, masks=False)
  attn = rdnnx.DilatedAttention(W, R, causal=True, axis_name="sp", layout="zigzag")
  got = harness.zigzag_ring(lambda q, k, v: attn(q, k, v), 4)(q, k, v)
  want = rd.dilated_attention(q, k, v, segment_lengths=W, dilation_rates=R, causal=True)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_multi_head_zigzag_ring_equals_single_device():
  """The multi-head module on a zigzag ring of 4 equals it on one device.

  Half-chunks of 8: a local branch, a mirrored sub-ring and the
  whole-sequence ring.
  """
  p, t = 4, 64
  kw = {"segment_lengths": (8, 32, 64), "dilation_rates": (1, 2, 4), "causal": True,
        "num_kv_heads": 2}
  one = rdnnx.MultiHeadDilatedAttention(4, E, rngs=_rngs(), **kw)
  ring = rdnnx.MultiHeadDilatedAttention(4, E, rngs=_rngs(1), axis_name="sp",
                                         layout="zigzag", **kw)
  nnx.update(ring, nnx.state(one, nnx.Param))  # the same parameters
  x = _x(t=t)
  spec = jax.sharding.PartitionSpec(None, "sp")
  state, call = _jit_call(ring)
  ringed = jax.jit(jax.shard_map(call, mesh=harness.mesh(p),
                                 in_specs=(jax.sharding.PartitionSpec(), spec),
                                 out_specs=spec))
  one_state, one_call = _jit_call(one)
  got = rd.from_layout(ringed(state, rd.to_layout(x, "zigzag", p)), "zigzag", p)
  want = jax.jit(one_call)(one_state, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_input_shape_is_checked():
  _, mod = _pair()
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, E=32\]"):
    mod(_x(e=16))
  # The sequence length is known only at call.
  _, mod = _pair(segment_lengths=(8, 12))
  with pytest.raises(ValueError, match=r"sequence length 32 must be divisible by "
                                       r"segment_lengths\[1\]=12"):
    mod(_x())


def test_package_import_does_not_import_nnx():
  code = "import sys, ringdilated; assert 'flax.nnx' not in sys.modules, sorted(sys.modules)"
  subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {
      "JAX_PLATFORMS": "cpu"})
  assert ringdilated.nnx is rdnnx
  assert issubclass(rdnnx.MultiHeadDilatedAttention, nnx.Module)


def test_docstring_examples_run():
  result = doctest.testmod(rdnnx, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 3 and result.failed == 0
