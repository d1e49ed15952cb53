"""Flax Linen modules: wiring, initialization, dtypes, dropout, purity.

The modules are thin, so the main check is that applying a module equals
applying its own parameters by hand around ``rd.dilated_attention``.

Compilation dominates the run time here, so comparisons are jitted together
and parameters that need no particular distribution are random values on
shapes from ``jax.eval_shape(module.init, ...)`` (no forward pass compiled).
"""

from __future__ import annotations

import concurrent.futures
import doctest
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringdilated as rd
import ringdilated.linen

P = jax.sharding.PartitionSpec
B, T, E = 2, 32, 32
W, R = (8, 32), (1, 2)


def _key(seed):
  # XLA:CPU takes seconds to compile threefry sampling; "rbg" keys compile in
  # well under one (same semantics: a key determines the stream).
  return jax.random.key(seed, impl="rbg")


def _x(seed=0, b=B, t=T, e=E, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, e)), dtype)


def _mha(**kw):
  kw = {"num_heads": 4, "segment_lengths": W, "dilation_rates": R} | kw
  return rd.MultiHeadDilatedAttention(**kw)


def _params(mha, x, seed=1, **kw):
  """Random parameters (biases and LayerNorm offsets nonzero) for ``mha``."""
  shapes = jax.eval_shape(lambda x: mha.init(_key(0), x, **kw), x)
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [
      jnp.asarray(rng.standard_normal(s.shape) * 0.3 + (0.5 if len(s.shape) <= 2 else 0),
                  s.dtype) for s in leaves])


def _by_hand(params, x, *, h, kv, sub_layer_norm=False, **attn_kw):
  """The module's computation from its parameter dict, without the module."""
  p = params["params"]

  def proj(name):
    y = jnp.einsum("BTE,END->BTND", x, p[name]["kernel"])
    return y + p[name]["bias"] if "bias" in p[name] else y

  if "qkv" in p:
    q, k, v = jnp.split(proj("qkv"), (h, h + kv), axis=2)
  else:
    q, k, v = proj("query"), proj("key"), proj("value")
  y = rd.dilated_attention(q, k, v, **attn_kw)
  if sub_layer_norm:
    mean = y.mean(axis=(-2, -1), keepdims=True)
    var = ((y - mean) ** 2).mean(axis=(-2, -1), keepdims=True)
    y = (y - mean) / jnp.sqrt(var + 1e-6) * p["sub_ln"]["scale"] + p["sub_ln"]["bias"]
  out = jnp.einsum("BTND,NDF->BTF", y, p["out"]["kernel"])
  return out + p["out"]["bias"] if "bias" in p["out"] else out


CONFIGS = [
    # module fields, expected (H, K, D, F)
    (dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4)), (4, 4, 8, E)),
    (dict(mode="partition"), (4, 4, 8, E)),
    (dict(causal=True, num_kv_heads=2), (4, 2, 8, E)),
    (dict(num_kv_heads=1, mode="partition", causal=True), (4, 1, 8, E)),
    (dict(out_features=24, qkv_features=64, num_heads=8, num_kv_heads=4), (8, 4, 8, 24)),
    (dict(use_bias=False, softmax_scale=0.3), (4, 4, 8, E)),
    (dict(sub_layer_norm=True, fused_qkv=True, num_kv_heads=2), (4, 2, 8, E)),
]


@pytest.mark.parametrize("fields, dims", CONFIGS)
def test_shapes_and_equals_manual_computation(fields, dims):
  h, kv, d, f = dims
  mha = _mha(**fields)
  x = _x()
  params = _params(mha, x)
  p = params["params"]
  names = {"qkv", "out"} if mha.fused_qkv else {"query", "key", "value", "out"}
  assert set(p) == names | ({"sub_ln"} if mha.sub_layer_norm else set())
  if mha.fused_qkv:
    assert p["qkv"]["kernel"].shape == (E, h + 2 * kv, d)
  else:
    assert p["query"]["kernel"].shape == (E, h, d)
    assert p["key"]["kernel"].shape == p["value"]["kernel"].shape == (E, kv, d)
  assert p["out"]["kernel"].shape == (h, d, f)
  assert ("bias" in p["out"]) == mha.use_bias

  rng = np.random.default_rng(2)
  kpm = jnp.asarray(rng.random((B, T)) > 0.2)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)

  @jax.jit
  def both(params, x, kpm, seg):
    y = mha.apply(params, x, key_padding_mask=kpm, segment_ids=seg)
    want = _by_hand(params, x, h=h, kv=kv, sub_layer_norm=mha.sub_layer_norm,
                    segment_lengths=mha.segment_lengths,
                    dilation_rates=mha.dilation_rates, mode=mha.mode,
                    causal=mha.causal, softmax_scale=mha.softmax_scale,
                    key_padding_mask=kpm, segment_ids=seg)
    return y, want

  y, want = both(params, x, kpm, seg)
  assert y.shape == (B, T, f) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


def test_manual_computation_negative_control():
  """The by-hand comparison notices wrong wiring: k and v swapped, or a mask dropped."""
  mha = _mha()
  x = _x()
  params = _params(mha, x)
  p = dict(params["params"])
  kpm = jnp.asarray(np.random.default_rng(2).random((B, T)) > 0.2)

  @jax.jit
  def run(params, x, kpm):
    swapped = {"params": p | {"key": p["value"], "value": p["key"]}}
    return (mha.apply(params, x, key_padding_mask=kpm),
            _by_hand(swapped, x, h=4, kv=4, segment_lengths=W, dilation_rates=R,
                     key_padding_mask=kpm),
            _by_hand(params, x, h=4, kv=4, segment_lengths=W, dilation_rates=R))

  y, swapped, unmasked = run(params, x, kpm)
  assert not np.allclose(y, swapped, atol=1e-3)
  assert not np.allclose(y, unmasked, atol=1e-3)


@pytest.mark.parametrize("kv", [4, 2])
def test_fused_qkv_equals_separate_projections(kv):
  x = _x()
  sep = _mha(num_kv_heads=kv)
  fused = _mha(num_kv_heads=kv, fused_qkv=True)
  params = _params(sep, x)
  p = params["params"]

  def fuse(order):
    return {"params": {"out": p["out"], "qkv": {
        n: jnp.concatenate([p[m][n] for m in order], axis=-2) for n in ("kernel", "bias")}}}

  fused_params = fuse(("query", "key", "value"))
  # Same tree structure and shapes as the fused module's own parameters.
  assert (jax.tree.map(jnp.shape, fused_params)
          == jax.tree.map(jnp.shape, jax.eval_shape(fused.init, _key(0), x)))
  # Negative control: key heads before query heads is a different model.
  bad_params = fuse(("key", "query", "value"))

  @jax.jit
  def run(params, fused_params, bad_params, x):
    return (sep.apply(params, x), fused.apply(fused_params, x), fused.apply(bad_params, x))

  y_sep, y_fused, y_bad = run(params, fused_params, bad_params, x)
  np.testing.assert_allclose(y_fused, y_sep, atol=1e-5, rtol=1e-5)
  assert not np.allclose(y_bad, y_sep, atol=1e-3)


# Initialization tests use one short segment so that the (unavoidable) forward
# pass of ``init`` compiles quickly; the kernels do not depend on it.
_E, _H, _KV, _D = 64, 4, 2, 16


def _init(**fields):
  mha = _mha(num_kv_heads=_KV, segment_lengths=(8,), dilation_rates=(1,), **fields)
  x = _x(t=8, e=_E)
  return jax.jit(mha.init)(_key(0), x)["params"]


def _xavier_std(fan_in, fan_out, gain=1.0):
  return gain * math.sqrt(2.0 / (fan_in + fan_out))


_FANS = {"query": (_E, _H * _D), "key": (_E, _KV * _D), "value": (_E, _KV * _D),
         "out": (_H * _D, _E)}


def test_default_init_is_xavier_normal_with_gamma_on_value_and_out():
  p1, p2 = _init(), _init(gamma_init=0.5)
  std = lambda p, n: float(jnp.std(p[n]["kernel"]))  # noqa: E731
  for n, fans in _FANS.items():
    assert std(p1, n) == pytest.approx(_xavier_std(*fans), rel=0.1), n
  for n in ("query", "key"):
    assert std(p2, n) == pytest.approx(std(p1, n), rel=1e-6), n
  for n in ("value", "out"):
    assert std(p2, n) / std(p1, n) == pytest.approx(0.5, rel=0.1), n
  for n in p1:
    assert not jnp.any(p1[n]["bias"]), n


def test_fused_init_has_the_distribution_of_separate_projections():
  for gamma in (1.0, 0.5):
    p = _init(fused_qkv=True, gamma_init=gamma)
    pieces = jnp.split(p["qkv"]["kernel"], (_H, _H + _KV), axis=1)
    for n, piece in zip(("query", "key", "value"), pieces):
      gain = gamma if n == "value" else 1.0
      assert float(jnp.std(piece)) == pytest.approx(
          _xavier_std(*_FANS[n], gain), rel=0.1), (n, gamma)
    assert float(jnp.std(p["out"]["kernel"])) == pytest.approx(
        _xavier_std(*_FANS["out"], gamma), rel=0.1)


@pytest.mark.parametrize("fused", [False, True])
def test_kernel_init_overrides_all_kernels(fused):
  p = _init(kernel_init=nn.initializers.constant(0.25), gamma_init=0.5, fused_qkv=fused)
  for n in p:
    assert jnp.all(p[n]["kernel"] == 0.25), n


def test_fused_kernel_keeps_partitioning_metadata_like_separate_kernels():
  init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
  specs = [nn.get_partition_spec(jax.eval_shape(
      _mha(kernel_init=init, fused_qkv=fused).init, _key(0), _x()))["params"]
           for fused in (False, True)]
  assert specs[1]["qkv"]["kernel"] == specs[0]["query"]["kernel"] == P(None, "model")


def test_sub_layer_norm_adds_params_and_changes_output():
  x = _x()
  plain, normed = _mha(), _mha(sub_layer_norm=True)
  params = _params(normed, x)
  init_shapes = jax.eval_shape(normed.init, _key(0), x)["params"]["sub_ln"]
  assert init_shapes["scale"].shape == init_shapes["bias"].shape == (4, 8)
  assert "sub_ln" not in jax.eval_shape(plain.init, _key(0), x)["params"]
  without = {"params": {n: v for n, v in params["params"].items() if n != "sub_ln"}}
  y_normed, y_plain = jax.jit(lambda a, b, x: (normed.apply(a, x), plain.apply(b, x)))(
      params, without, x)
  assert not np.allclose(y_normed, y_plain, atol=1e-3)


@pytest.mark.parametrize("dtype, param_dtype", [
    (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (None, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16), (jnp.float16, jnp.float32)])
@pytest.mark.parametrize("fused", [False, True])
def test_dtype_and_param_dtype_reach_every_submodule(dtype, param_dtype, fused):
  mha = _mha(dtype=dtype, param_dtype=param_dtype, fused_qkv=fused,
             sub_layer_norm=True, num_kv_heads=2)
  x = _x()
  params = jax.eval_shape(mha.init, _key(0), x)
  dtypes = {jax.tree_util.keystr(path): a.dtype
            for path, a in jax.tree_util.tree_leaves_with_path(params)}
  assert len(dtypes) == (6 if fused else 10)
  assert set(dtypes.values()) == {jnp.dtype(param_dtype)}, dtypes
  y = jax.eval_shape(mha.apply, params, x)
  assert y.dtype == (dtype or jnp.promote_types(x.dtype, param_dtype))


def test_low_precision_output_is_close_to_float32():
  mha = _mha(dtype=jnp.bfloat16, sub_layer_norm=True, num_kv_heads=2)
  x = _x()
  params = _params(mha, x)
  y, ref = jax.jit(lambda p, x: (
      mha.apply(p, x), mha.clone(dtype=jnp.float32).apply(p, x)))(params, x)
  assert y.dtype == jnp.bfloat16 and ref.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=3e-2 * scale)


def test_input_dtype_sets_compute_dtype_when_dtype_is_none():
  x = _x(dtype=jnp.bfloat16)
  mha = _mha(param_dtype=jnp.bfloat16)
  params = jax.eval_shape(mha.init, _key(0), x)
  assert jax.eval_shape(mha.apply, params, x).dtype == jnp.bfloat16


def test_dropout():
  x = _x()
  mha = _mha(dropout_rate=0.3)
  params = _params(mha, x, deterministic=True)

  @jax.jit
  def run(params, x, key1, key2):
    drop = lambda key: mha.apply(params, x, deterministic=False,  # noqa: E731
                                 rngs={"dropout": key})
    return (_mha().apply(params, x),
            mha.apply(params, x, deterministic=True),
            # The field is merged with the call argument, as in Flax.
            mha.clone(deterministic=True).apply(params, x),
            drop(key1), drop(key1), drop(key2))

  y0, y_det, y_field, y1, y1_again, y2 = run(params, x, _key(1), _key(2))
  np.testing.assert_array_equal(y_det, y0)
  np.testing.assert_array_equal(y_field, y0)
  np.testing.assert_array_equal(y1, y1_again)
  assert not np.allclose(y1, y0, atol=1e-3)
  assert not np.allclose(y1, y2, atol=1e-3)
  with pytest.raises(flax.errors.InvalidRngError):
    jax.eval_shape(lambda p, x: mha.apply(p, x, deterministic=False), params, x)
  with pytest.raises(ValueError, match="deterministic"):
    jax.eval_shape(mha.apply, params, x)


def test_dilated_attention_module_equals_function():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, T, 2, 8)), jnp.float32) for _ in range(2))
  kpm = jnp.asarray(rng.random((B, T)) > 0.2)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
  cfg = dict(segment_lengths=W, dilation_rates=R, causal=True, softmax_scale=0.2)
  partition = rd.DilatedAttention(mode="partition", **cfg)
  dropping = rd.DilatedAttention(dropout_rate=0.5, **cfg)
  assert not jax.tree.leaves(jax.eval_shape(partition.init, _key(0), q, k, v))

  @jax.jit
  def run(q, k, v, kpm, seg, key):
    # The "dropout" stream key the module draws, fed to the function.
    drop_key = nn.apply(lambda m: m.make_rng("dropout"), dropping)({}, rngs={"dropout": key})
    return (
        partition.apply({}, q, k, v, key_padding_mask=kpm, segment_ids=seg),
        rd.dilated_attention(q, k, v, mode="partition", key_padding_mask=kpm,
                             segment_ids=seg, **cfg),
        dropping.apply({}, q, k, v, deterministic=False, rngs={"dropout": key}),
        rd.dilated_attention(q, k, v, dropout_rate=0.5, dropout_rng=drop_key, **cfg),
        dropping.apply({}, q, k, v, deterministic=True),
        rd.dilated_attention(q, k, v, **cfg))

  y, want, y_drop, want_drop, y_det, want_det = run(q, k, v, kpm, seg, _key(3))
  np.testing.assert_array_equal(y, want)
  np.testing.assert_array_equal(y_drop, want_drop)
  np.testing.assert_array_equal(y_det, want_det)
  assert not np.allclose(y_drop, y_det, atol=1e-3)
  with pytest.raises(ValueError, match="deterministic=None"):
    jax.eval_shape(lambda q, k, v: dropping.apply({}, q, k, v), q, k, v)


def test_jit_does_not_retrace():
  mha = _mha(dropout_rate=0.1)
  x = _x()
  params = _params(mha, x, deterministic=True)
  traces = []

  @jax.jit
  def f(params, x, key):
    traces.append(1)
    return mha.apply(params, x, deterministic=False, rngs={"dropout": key})

  f(params, x, _key(1))
  f(params, x + 1.0, _key(2))
  f(jax.tree.map(lambda a: a * 2, params), x, _key(3))
  assert len(traces) == 1


def test_concurrent_threads_give_the_serial_results():
  # Eager apply: every thread runs the module's Python code and builds (or
  # looks up) the attention plan concurrently.
  mha = _mha(num_kv_heads=2, causal=True)
  params = _params(mha, _x())
  xs = [_x(seed=i) for i in range(16)]
  serial = [mha.apply(params, x) for x in xs]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    threaded = list(pool.map(lambda x: mha.apply(params, x), xs))
  for a, b in zip(serial, threaded):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(serial[0], serial[1])


def test_module_holds_no_state():
  mha = _mha(dropout_rate=0.1)
  before = repr(vars(mha))
  x = _x()
  params = _params(mha, x, deterministic=True)
  jax.eval_shape(lambda p, x: mha.apply(p, x, deterministic=False,
                                        rngs={"dropout": _key(0)}), params, x)
  assert repr(vars(mha)) == before
  assert mha == _mha(dropout_rate=0.1) and hash(mha) == hash(_mha(dropout_rate=0.1))


@pytest.mark.parametrize("layout, t, pattern", [
    ("contiguous", T, {}),
    ("zigzag", T, {}),
    # Zigzag half-chunks of 8: a local branch, a mirrored sub-ring and the
    # whole-sequence ring, each with a different rate.
    ("zigzag", 64, {"segment_lengths": (8, 32, 64), "dilation_rates": (1, 2, 4)}),
], ids=["contiguous", "zigzag", "zigzag-whole-sequence"])
def test_ring_execution_equals_single_device(layout, t, pattern):
  n = 4
  mesh = jax.make_mesh((n,), ("sp",), devices=jax.devices()[:n])
  fields = dict(num_kv_heads=2, causal=True, sub_layer_norm=True, **pattern)
  x = _x(t=t)
  kpm = jnp.asarray(np.random.default_rng(2).random((B, t)) > 0.2)
  params = _params(_mha(**fields), x)
  want = jax.jit(lambda p, x, m: _mha(**fields).apply(p, x, key_padding_mask=m))(
      params, x, kpm)

  ring = _mha(axis_name="sp", layout=layout, **fields)
  shard = jax.sharding.NamedSharding(mesh, P(None, "sp"))
  x, kpm = (rd.to_layout(a, layout, n) for a in (x, kpm))
  f = jax.jit(jax.shard_map(
      lambda p, x, m: ring.apply(p, x, key_padding_mask=m), mesh=mesh,
      in_specs=(P(), P(None, "sp"), P(None, "sp")), out_specs=P(None, "sp")))
  args = (jax.device_put(params, jax.sharding.NamedSharding(mesh, P())),
          jax.device_put(x, shard), jax.device_put(kpm, shard))
  assert "ppermute" in str(jax.make_jaxpr(f)(*args))  # segments spanning devices are rings
  np.testing.assert_allclose(rd.from_layout(f(*args), layout, n), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields, match", [
    (dict(num_heads=0), r"num_heads=0 must be a positive int"),
    (dict(num_heads=-2), r"num_heads=-2 must be a positive int"),
    (dict(num_kv_heads=3), r"num_heads=4 must be divisible by num_kv_heads=3"),
    (dict(num_kv_heads=0), r"num_kv_heads=0 must be a positive int"),
    (dict(qkv_features=30), r"qkv_features=30 must be divisible by num_heads=4"),
    (dict(num_heads=5), r"qkv_features=32 must be divisible by num_heads=5"),
    (dict(qkv_features=0), r"qkv_features=0 must be a positive int"),
    (dict(out_features=-1), r"out_features=-1 must be a positive int"),
    (dict(mode="bad"), r"mode='bad' must be one of"),
    (dict(gamma_init=0.0), r"gamma_init=0.0 must be a positive"),
    (dict(dropout_rate=1.5), r"dropout_rate=1.5 must be in \[0, 1\)"),
    (dict(segment_lengths=(8, 12)), r"segment_lengths\[1\]=12"),
    (dict(layout="striped"), r"layout='striped' must be one of"),
])
def test_invalid_fields_raise(fields, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(_mha(**fields).init, _key(0), _x())


def test_input_must_be_btE():
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, E\]"):
    jax.eval_shape(_mha().init, _key(0), _x()[0])


def test_docstring_examples_run():
  result = doctest.testmod(ringdilated.linen, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 2 and result.failed == 0
