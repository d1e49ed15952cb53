"""Single-device dilated attention against the dense oracle.

Every comparison is against ``ringdilated.reference`` (a dense O(N^2) masked
softmax written from the definition, sharing no code with the library), for
outputs and for ``jax.grad`` of q, k and v.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringdilated as rd
from ringdilated import _backends, _plan, _ring
from ringdilated._backends.base import keep_mask
from ringdilated.reference import dense_mask, dilated_attention_reference

# Max abs error allowed against the float32 oracle, per input dtype.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}


def _inputs(seed, b=2, n=32, h=4, hkv=2, d=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((b, n, x, d)) for x in (h, hkv, hkv))
  cot = rng.standard_normal((b, n, h, d))
  kpm = rng.random((b, n)) > 0.25
  seg = np.sort(rng.integers(0, 3, (b, n)), axis=1)
  cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  return (cast(q), cast(k), cast(v), jnp.asarray(cot, jnp.float32),
          jnp.asarray(kpm), jnp.asarray(seg, jnp.int32))


@functools.lru_cache(maxsize=None)
def _compiled_out_and_grads(fn, static):
  @jax.jit
  def run(q, k, v, cot, arrays):
    def loss(q, k, v):
      out = fn(q, k, v, **arrays, **dict(static))
      return jnp.sum(out.astype(jnp.float32) * cot), out
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out,) + grads
  return run


def _out_and_grads(fn, q, k, v, cot, **kw):
  """Output and d(sum(out * cot))/d(q, k, v), jitted (eager is slow on CPU)."""
  arrays = {n: x for n, x in kw.items() if isinstance(x, jax.Array)}
  static = tuple(sorted((n, x) for n, x in kw.items() if n not in arrays))
  return _compiled_out_and_grads(fn, static)(q, k, v, cot, arrays)


def _max_err(a, b):
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(a, b))


CONFIGS = [
    # (segment_lengths, dilation_rates, mode, heads, kv heads)
    ((32,), (1,), "mix", 4, 4),
    ((8, 16), (1, 2), "mix", 4, 4),
    ((8, 16, 32), (1, 2, 4), "mix", 4, 2),
    ((8, 16, 32), (1, 2, 4), "mix", 8, 1),
    ((4, 4), (1, 2), "mix", 2, 2),        # overlapping branches count twice
    ((8, 16, 32), (2, 4, 8), "mix", 4, 4),
    ((8, 16), (1, 2), "partition", 4, 4),
    ((8, 16, 32), (1, 2, 4), "partition", 5, 5),   # uneven head groups
    ((8, 16, 32), (1, 2, 4), "partition", 8, 2),   # groups cut GQA groups
    ((4, 8, 16, 32), (1, 2, 4, 8), "partition", 4, 1),
]


@pytest.mark.parametrize("causal,masks", [(False, False), (True, True)])
@pytest.mark.parametrize("w,r,mode,h,hkv", CONFIGS)
def test_matches_oracle_fp32(w, r, mode, h, hkv, causal, masks):
  q, k, v, cot, kpm, seg = _inputs(hash((w, r, mode, h, hkv)) % 1000, h=h, hkv=hkv)
  kw = dict(segment_lengths=w, dilation_rates=r, mode=mode, causal=causal)
  if masks:
    kw.update(key_padding_mask=kpm, segment_ids=seg)
  got = _out_and_grads(rd.dilated_attention, q, k, v, cot, **kw)
  want = _out_and_grads(dilated_attention_reference, q, k, v, cot, **kw)
  assert _max_err(got, want) < TOL[jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("w,r,mode,h,hkv", [CONFIGS[2], CONFIGS[8]])
def test_low_precision_close_to_fp32_oracle(w, r, mode, h, hkv, dtype):
  q, k, v, cot, kpm, seg = _inputs(7, h=h, hkv=hkv, dtype=dtype)
  kw = dict(segment_lengths=w, dilation_rates=r, mode=mode, causal=True,
            key_padding_mask=kpm)
  got = _out_and_grads(rd.dilated_attention, q, k, v, cot, **kw)
  assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1:])
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = _out_and_grads(dilated_attention_reference, *f32, cot, **kw)
  assert _max_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("causal", [False, True])
def test_single_dense_branch_is_dot_product_attention(causal):
  q, k, v, cot, *_ = _inputs(3, n=32, h=4, hkv=2)
  got = _out_and_grads(rd.dilated_attention, q, k, v, cot,
                       segment_lengths=(32,), dilation_rates=(1,), causal=causal)
  want = _out_and_grads(jax.nn.dot_product_attention, q, k, v, cot, is_causal=causal)
  assert _max_err(got, want) < 2e-5


def test_softmax_scale():
  q, k, v, cot, *_ = _inputs(4)
  kw = dict(segment_lengths=(8, 32), dilation_rates=(1, 2), softmax_scale=0.3)
  got = _out_and_grads(rd.dilated_attention, q, k, v, cot, **kw)
  want = _out_and_grads(dilated_attention_reference, q, k, v, cot, **kw)
  assert _max_err(got, want) < 2e-5


def test_large_logits_do_not_overflow():
  q, k, v, cot, *_ = _inputs(5)
  kw = dict(segment_lengths=(8, 32), dilation_rates=(1, 4), causal=True,
            softmax_scale=100.0)
  got = _out_and_grads(rd.dilated_attention, q, k, v, cot, **kw)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in got)
  want = _out_and_grads(dilated_attention_reference, q, k, v, cot, **kw)
  assert float(jnp.max(jnp.abs(got[0] - want[0]))) < 1e-4


def test_receptive_field_is_the_dilation_pattern():
  """d out[p, h] / d k[j] is nonzero exactly on the keys the oracle mask allows."""
  n, h, hkv = 16, 4, 2
  q, k, v, *_ = _inputs(6, b=1, n=n, h=h, hkv=hkv)
  kw = dict(segment_lengths=(4, 16), dilation_rates=(1, 4), causal=True)
  counts = dense_mask(n, h, hkv, **kw)
  # jac[p, head, j, kv head, d] = d out[0, p, head].sum() / d k[0, j, kv head, d]
  jac = jax.jit(jax.jacrev(
      lambda k: rd.dilated_attention(q, k, v, **kw)[0].sum(-1)))(k)[..., 0, :, :, :]
  for head in range(h):
    seen = np.asarray(jnp.any(jac[:, head, :, head // (h // hkv)] != 0, axis=-1))
    want = counts[head] > 0
    np.fill_diagonal(want, False)  # d softmax / d own key vanishes when alone
    np.testing.assert_array_equal(seen & ~np.eye(n, dtype=bool), want)


def test_negative_control_wrong_offset_is_caught():
  """The oracle comparison fails for a plan with a deliberately wrong offset."""
  q, k, v, *_ = _inputs(8, h=4, hkv=4)
  kw = dict(segment_lengths=(8, 32), dilation_rates=(2, 4))
  config = rd.DilatedConfig(kw["segment_lengths"], kw["dilation_rates"])
  plan = _plan.make_plan(config, 32, 4, 4)
  bad = list(plan.branches)
  bad[1] = dataclasses.replace(bad[1], offsets=tuple((o + 1) % 4 for o in bad[1].offsets))
  bad_plan = dataclasses.replace(plan, branches=tuple(bad))
  want = dilated_attention_reference(q, k, v, **kw)
  good = _ring.attention(_ring.Static(plan, 8 ** -0.5, 0.0, None), q, k, v, None, None, None)
  wrong = _ring.attention(_ring.Static(bad_plan, 8 ** -0.5, 0.0, None), q, k, v, None, None, None)
  assert float(jnp.max(jnp.abs(good - want))) < 2e-5
  assert float(jnp.max(jnp.abs(wrong - want))) > 1e-2


def test_causal_future_keys_change_nothing():
  q, k, v, *_ = _inputs(9)
  kw = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4), causal=True)
  f = jax.jit(lambda q, k, v: rd.dilated_attention(q, k, v, **kw))
  out = f(q, k, v)
  t = 20
  out2 = f(q, k.at[:, t:].add(3.0), v.at[:, t:].multiply(-2.0))
  np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(out2[:, :t]))
  assert not np.allclose(np.asarray(out[:, t:]), np.asarray(out2[:, t:]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_rows_without_keys_are_zero_with_finite_grads(dtype):
  q, k, v, cot, kpm, seg = _inputs(10, dtype=dtype)
  kpm = kpm.at[0].set(False)  # batch 0: every key is padding
  kw = dict(segment_lengths=(8, 32), dilation_rates=(2, 4), causal=True,
            key_padding_mask=kpm, segment_ids=seg)
  out, dq, dk, dv = _out_and_grads(rd.dilated_attention, q, k, v, cot, **kw)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, dq, dk, dv))
  assert float(jnp.max(jnp.abs(out[0]))) == 0.0
  assert float(jnp.max(jnp.abs(dq[0]))) == 0.0
  # Causal + dilation: rows the oracle says see nothing are exactly 0.
  counts = dense_mask(32, 4, 2, segment_lengths=(8, 32), dilation_rates=(2, 4),
                      causal=True)
  blind = counts.sum(-1) == 0  # [H, N]
  assert blind.any()
  assert float(jnp.max(jnp.abs(out[1].astype(jnp.float32)[blind.T]))) == 0.0


def test_dropout_is_deterministic_given_rng():
  q, k, v, cot, *_ = _inputs(11)
  kw = dict(segment_lengths=(8, 32), dilation_rates=(1, 2))
  run = lambda key, rate: _out_and_grads(  # noqa: E731
      rd.dilated_attention, q, k, v, cot, dropout_rate=rate, dropout_rng=key, **kw)
  a, b = run(jax.random.key(0), 0.3), run(jax.random.key(0), 0.3)
  c, plain = run(jax.random.key(1), 0.3), run(jax.random.key(0), 0.0)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.allclose(np.asarray(a[0]), np.asarray(c[0]))
  assert not np.allclose(np.asarray(a[0]), np.asarray(plain[0]))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in a)


def test_dropout_gradient_matches_autodiff_of_same_mask():
  """The custom backward equals finite differences of the dropped forward."""
  q, k, v, cot, *_ = _inputs(12, b=1, n=16, h=2, hkv=2, d=4)
  kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), dropout_rate=0.5,
            dropout_rng=jax.random.key(3))
  f = jax.jit(lambda q: jnp.sum(rd.dilated_attention(q, k, v, **kw) * cot))
  g = jax.jit(jax.grad(f))(q)
  direction = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
  eps = 1e-3
  fd = (f(q + eps * direction) - f(q - eps * direction)) / (2 * eps)
  assert abs(float(jnp.sum(g * direction)) - float(fd)) < 2e-3 * max(1.0, abs(float(fd)))


def test_dropout_mask_statistics():
  """The hash keeps 1 - rate of the weights, independently per head and pair."""
  x, t, kh, g = 1, 512, 2, 2
  pos = jnp.broadcast_to(jnp.arange(t)[None, :, None], (x, t, kh))
  drop = _backends.Dropout(0.3, jnp.uint32(12345), np.arange(kh * g).reshape(kh, g), pos, pos)
  keep = np.asarray(keep_mask(drop))  # [X, K, G, T, S]
  assert keep.shape == (x, kh, g, t, t)
  assert abs(keep.mean() - 0.7) < 0.005
  per_head = keep.reshape(kh * g, -1)
  assert np.all(np.abs(per_head.mean(axis=1) - 0.7) < 0.01)
  # Two heads agree as often as independent draws would: 0.7^2 + 0.3^2.
  assert abs((per_head[0] == per_head[1]).mean() - 0.58) < 0.01
  # Neighbouring keys of one query are not correlated either.
  assert abs((keep[..., 1:] == keep[..., :-1]).mean() - 0.58) < 0.01
  other = keep_mask(drop._replace(seed=jnp.uint32(54321)))
  assert abs((np.asarray(other) == keep).mean() - 0.58) < 0.01


def test_jit_does_not_retrace():
  q, k, v, *_ = _inputs(13)
  traces = []

  @jax.jit
  def f(q, k, v):
    traces.append(1)
    return rd.dilated_attention(q, k, v, segment_lengths=(8, 16), dilation_rates=(1, 2))

  f(q, k, v)
  f(q + 1, k, v)
  assert len(traces) == 1


def test_plan_is_pure_and_shared():
  config = rd.DilatedConfig((8, 16), (1, 2), "mix", True)
  assert _plan.make_plan(config, 32, 4, 2) is _plan.make_plan(
      rd.DilatedConfig([8, 16], [1, 2], "mix", True), 32, 4, 2)
  assert hash(config) == hash(rd.DilatedConfig((8, 16), (1, 2), "mix", True))
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.causal = False  # type: ignore[misc]


def _call(**overrides):
  q, k, v, *_ = _inputs(0, b=1, n=32, h=4, hkv=2)
  kw = dict(q=q, k=k, v=v, segment_lengths=(8, 16), dilation_rates=(1, 2))
  kw.update(overrides)
  return rd.dilated_attention(**kw)


_Q = jnp.zeros((1, 32, 4, 8))
_K = jnp.zeros((1, 32, 2, 8))


@pytest.mark.parametrize("overrides,error,match", [
    (dict(segment_lengths=(8, 16, 32)), ValueError, r"segment_lengths=\(8, 16, 32\).*same length"),
    (dict(segment_lengths=()), ValueError, "must not be empty"),
    (dict(segment_lengths=(8, 0)), ValueError, r"segment_lengths\[1\]=0 must be positive"),
    (dict(dilation_rates=(1, -2)), ValueError, r"dilation_rates\[1\]=-2 must be positive"),
    (dict(dilation_rates=(1, 1.5)), TypeError, r"dilation_rates\[1\]=1.5 must be an int"),
    (dict(segment_lengths=(8, 12), dilation_rates=(1, 5)), ValueError,
     r"segment_lengths\[1\]=12 must be divisible by dilation_rates\[1\]=5"),
    (dict(segment_lengths=(8, 12)), ValueError,
     r"sequence length 32 must be divisible by segment_lengths\[1\]=12"),
    (dict(mode="both"), ValueError, r"mode='both' must be one of"),
    (dict(causal="yes"), TypeError, r"causal='yes' must be a bool"),
    (dict(k=jnp.zeros((1, 32, 3, 8)), v=jnp.zeros((1, 32, 3, 8))), ValueError,
     r"query heads 4 .* must be divisible by kv heads 3"),
    (dict(k=jnp.zeros((1, 16, 2, 8)), v=jnp.zeros((1, 16, 2, 8))), ValueError,
     r"k shape \(1, 16, 2, 8\) does not match q shape"),
    (dict(v=jnp.zeros((1, 32, 2, 4))), ValueError, "k and v must have the same shape"),
    (dict(q=jnp.zeros((32, 4, 8))), ValueError, r"q must have shape \[B, N, heads, D\]"),
    (dict(q=_Q.astype(jnp.bfloat16)), TypeError, "q, k, v must have one dtype"),
    (dict(q=_Q.astype(jnp.int32)), TypeError, "q must be floating point"),
    (dict(key_padding_mask=jnp.ones((1, 16), bool)), ValueError,
     r"key_padding_mask must have shape \[B, N\]=\(1, 32\), got \(1, 16\)"),
    (dict(key_padding_mask=jnp.ones((1, 32))), TypeError, "key_padding_mask must have a bool dtype"),
    (dict(segment_ids=jnp.ones((1, 32))), TypeError, "segment_ids must have a integer dtype"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale=-1.0 must be a positive"),
    (dict(dropout_rate=1.0), ValueError, r"dropout_rate=1.0 must be in \[0, 1\)"),
    (dict(dropout_rate=0.1), ValueError, "dropout_rate=0.1 needs a dropout_rng"),
    (dict(mode="partition", segment_lengths=(2, 4, 8, 16, 32), dilation_rates=(1,) * 5),
     ValueError, "num_heads=4 < 5 branches"),
    (dict(axis_name="sp"), ValueError, "axis_name='sp' is not bound"),
])
def test_invalid_input_raises(overrides, error, match):
  with pytest.raises(error, match=match):
    _call(**overrides)


def test_validation_happens_before_tracing():
  """Errors surface while tracing under jit too, from our checks, not XLA's."""
  q, k, v, *_ = _inputs(0, b=1, n=32, h=4, hkv=2)
  f = jax.jit(lambda q, k, v: rd.dilated_attention(
      q, k, v, segment_lengths=(8, 12), dilation_rates=(1, 1)))
  with pytest.raises(ValueError, match=r"segment_lengths\[1\]=12"):
    f(q, k, v)


def test_numpy_scalars_are_accepted():
  q, k, v, *_ = _inputs(14, b=1, n=32, h=4, hkv=2)
  kw = dict(segment_lengths=np.array([8, 16]), dilation_rates=(np.int64(1), 2))
  f = jax.jit(lambda q, k, v, **extra: rd.dilated_attention(q, k, v, **kw, **extra),
              static_argnames=("softmax_scale", "causal"))
  got = f(q, k, v, softmax_scale=np.float32(0.25), causal=np.bool_(True))
  want = dilated_attention_reference(q, k, v, segment_lengths=(8, 16), dilation_rates=(1, 2),
                                     softmax_scale=0.25, causal=True)
  assert float(jnp.max(jnp.abs(got - want))) < 2e-5
