"""Single-device dilated attention against the dense oracle.

Every comparison is against ``ringdilated.reference`` (a dense O(N^2) masked
softmax written from the definition, sharing no code with the library), for
outputs and for ``jax.grad`` of q, k and v (``ringdilated.testing``'s
``assert_matches_reference`` where the comparison is exactly that).
"""

from __future__ import annotations

import dataclasses
import functools

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringdilated as rd
from ringdilated import _backends, _plan, _ring
from ringdilated._backends.base import keep_mask
from ringdilated.reference import dense_mask, dilated_attention_reference


def _inputs(seed, b=2, n=32, h=4, hkv=2, d=8, dtype=jnp.float32):
  """q, k, v in ``dtype``, cotangent, key_padding_mask, segment_ids."""
  return harness.inputs(b, n, h, hkv, d, seed=seed, dtype=dtype)


def _attention(**kw):
  """``(q, k, v) -> rd.dilated_attention(q, k, v, **kw)`` (masks included)."""
  return lambda q, k, v: rd.dilated_attention(q, k, v, **kw)


def _out_and_grads(q, k, v, cot, **kw):
  """Output and d(sum(out * cot))/d(q, k, v) of rd.dilated_attention, jitted."""
  return harness.out_and_grads(lambda q, k, v, *_: rd.dilated_attention(q, k, v, **kw),
                               q, k, v, cot, None, None)


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
  seed = CONFIGS.index((w, r, mode, h, hkv))  # fixed: the same inputs every run
  q, k, v, _, kpm, seg = _inputs(seed, h=h, hkv=hkv)
  kw = dict(segment_lengths=w, dilation_rates=r, mode=mode, causal=causal)
  if masks:
    kw.update(key_padding_mask=kpm, segment_ids=seg)
  # out, dq, dk, dv within tolerance(float32) of the oracle's
  harness.assert_matches_reference(_attention(**kw), q, k, v, **kw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("w,r,mode,h,hkv", [CONFIGS[2], CONFIGS[8]])
def test_low_precision_close_to_fp32_oracle(w, r, mode, h, hkv, dtype):
  q, k, v, cot, kpm, _ = _inputs(7, h=h, hkv=hkv, dtype=dtype)
  kw = dict(segment_lengths=w, dilation_rates=r, mode=mode, causal=True,
            key_padding_mask=kpm)
  got = jax.eval_shape(harness.out_and_grads_fn(lambda q, k, v, *_: rd.dilated_attention(
      q, k, v, **kw)), q, k, v, cot, None, None)
  assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1:])
  # Against the oracle in float32 on the same (rounded) values, within
  # tolerance(dtype).
  harness.assert_matches_reference(_attention(**kw), q, k, v, **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_single_dense_branch_is_dot_product_attention(causal):
  q, k, v, cot, *_ = _inputs(3, n=32, h=4, hkv=2)
  got = _out_and_grads(q, k, v, cot, segment_lengths=(32,), dilation_rates=(1,),
                       causal=causal)
  want = harness.out_and_grads(
      lambda q, k, v, *_: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
      q, k, v, cot, None, None)
  assert max(harness.max_errs(got, want)) < 2e-5


def test_softmax_scale():
  q, k, v, *_ = _inputs(4)
  kw = dict(segment_lengths=(8, 32), dilation_rates=(1, 2), softmax_scale=0.3)
  harness.assert_matches_reference(_attention(**kw), q, k, v, atol=2e-5, **kw)


def test_large_logits_do_not_overflow():
  q, k, v, cot, *_ = _inputs(5)
  kw = dict(segment_lengths=(8, 32), dilation_rates=(1, 4), causal=True,
            softmax_scale=100.0)
  got = _out_and_grads(q, k, v, cot, **kw)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in got)
  want = jax.jit(harness.reference(**kw))(q, k, v, None, None)
  assert float(jnp.max(jnp.abs(got[0] - want))) < 1e-4


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
  kw = dict(segment_lengths=(8, 32), dilation_rates=(2, 4), causal=True)
  out, dq, dk, dv = _out_and_grads(q, k, v, cot, key_padding_mask=kpm, segment_ids=seg,
                                   **kw)
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

  @functools.partial(jax.jit, static_argnums=1)  # one compile per rate
  def run(key, rate):
    attend = harness.attention(dropout_rate=rate, dropout_rng=key, **kw)
    return harness.out_and_grads(attend, q, k, v, cot, None, None, compile=False)
  a, b = run(jax.random.key(0), 0.3), run(jax.random.key(0), 0.3)
  c, plain = run(jax.random.key(1), 0.3), run(jax.random.key(0), 0.0)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.allclose(np.asarray(a[0]), np.asarray(c[0]))
  assert not np.allclose(np.asarray(a[0]), np.asarray(plain[0]))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in a)


def test_dropout_gradient_matches_autodiff_of_same_mask():
  """The custom backward equals finite differences of the dropped forward.

  The forward runs in float32 whatever the input dtype (float64 inputs too:
  the blocks accumulate in float32, so x64 would not help), so f (~11) carries
  rounding noise of ~2e-6, which a difference quotient with step h divides
  by h; truncation error shrinks with h instead. The five-point stencil
  (truncation ~h^4) at h = 0.05 keeps both far below the bound, 2e-3 of
  max(1, |fd|): the error is 4e-6 of it for the direction below, 1.4e-5
  median and 1.6e-4 max over 30 random directions. (The central difference
  at h = 1e-3 used before: 7e-4 for this direction, 4e-4 median and 2.8e-3
  max over the 30, above the bound.)
  """
  q, k, v, cot, *_ = _inputs(12, b=1, n=16, h=2, hkv=2, d=4)
  kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), dropout_rate=0.5,
            dropout_rng=jax.random.key(3))
  f = jax.jit(lambda q: jnp.sum(rd.dilated_attention(q, k, v, **kw) * cot))
  g = jax.jit(jax.grad(f))(q)
  direction = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
  h = 0.05
  f_at = [float(f(q + t * h * direction)) for t in (-2, -1, 1, 2)]
  fd = (f_at[0] - 8 * f_at[1] + 8 * f_at[2] - f_at[3]) / (12 * h)
  assert abs(float(jnp.sum(g * direction)) - fd) < 2e-3 * max(1.0, abs(fd))


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
  # Nor the four weights of two queries and two keys (one multiply per weight
  # mixes row and key hashes): odd parity as often as for independent draws.
  for s in (1, 64):
    k8 = keep.astype(np.int8)
    parity = k8[..., s:, s:] ^ k8[..., s:, :-s] ^ k8[..., :-s, s:] ^ k8[..., :-s, :-s]
    assert abs(parity.mean() - (1 - (1 - 2 * 0.7) ** 4) / 2) < 0.01
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
