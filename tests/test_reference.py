"""Tests of the dense oracle itself (ringdilated.reference).

The oracle is checked against jax.nn.dot_product_attention, against literal
hand-written masks, and against explicit numpy float64 loops that follow the
definition a second, independent way (gather kept positions per segment,
concatenate the branches' key lists, take one softmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ringdilated.reference import dense_mask, dilated_attention_reference


# Most tests use the default shape so that eager op compilations are reused.
def _qkv(seed, b=2, n=16, h=4, hkv=2, d=8, dtype=jnp.float32):
  # numpy, not jax.random: eager threefry compiles are slow on CPU.
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, n, h, d))
  k = rng.standard_normal((b, n, hkv, d))
  v = rng.standard_normal((b, n, hkv, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


# ---------------------------------------------------------------------------
# Independent numpy float64 loop references.
# ---------------------------------------------------------------------------


def _kept_lists(n, w, r, o):
  """For each segment, the list of kept absolute positions."""
  return [list(range(s + o, s + w, r)) for s in range(0, n, w)]


def _loop_mix(q, k, v, ws, rs, causal, kpm=None, sid=None):
  """Mix mode: per query, concatenate every branch's key list; one softmax."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, n, h_, d = q.shape
  group = h_ // k.shape[2]
  out = np.zeros_like(q)
  for b in range(b_):
    for h in range(h_):
      kvh = h // group
      for p in range(n):
        keys = []
        for w, r in zip(ws, rs):
          o = kvh % r
          for seg in _kept_lists(n, w, r, o):
            if p in seg:
              keys.extend(seg)  # duplicates across branches are kept
        keys = [x for x in keys if not causal or x <= p]
        if kpm is not None:
          keys = [x for x in keys if kpm[b, x]]
        if sid is not None:
          keys = [x for x in keys if sid[b, x] == sid[b, p]]
        if not keys:
          continue
        s = np.array([q[b, p, h] @ k[b, x, kvh] for x in keys]) / np.sqrt(d)
        a = np.exp(s - s.max())
        a /= a.sum()
        out[b, p, h] = sum(ai * v[b, x, kvh] for ai, x in zip(a, keys))
  return out


def _loop_partition_one_head_per_branch(q, k, v, ws, rs, causal):
  """Partition mode with H == number of branches: head i uses branch i only.

  For every segment, slice out the kept positions, run plain dense (causal)
  attention on that small block, and scatter the result back.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, n, h_, d = q.shape
  assert h_ == len(ws)
  group = h_ // k.shape[2]
  out = np.zeros_like(q)
  for h in range(h_):
    w, r, o = ws[h], rs[h], h % rs[h]
    kvh = h // group
    for idx in _kept_lists(n, w, r, o):
      idx = np.array(idx)
      qs, ks, vs = q[:, idx, h], k[:, idx, kvh], v[:, idx, kvh]
      s = np.einsum("bqd,bkd->bqk", qs, ks) / np.sqrt(d)
      if causal:
        s = np.where(np.tril(np.ones((len(idx), len(idx)), bool)), s, -np.inf)
      a = np.exp(s - s.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      out[:, idx, h] = np.einsum("bqk,bkd->bqd", a, vs)
  return out


# ---------------------------------------------------------------------------
# Plain attention.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_single_full_branch_is_plain_attention(causal):
  q, k, v = _qkv(0)
  cfg = dict(segment_lengths=(16,), dilation_rates=(1,), causal=causal)
  got = dilated_attention_reference(q, k, v, **cfg)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  # Gradients agree too.
  def loss_ref(q, k, v):
    return jnp.sum(jnp.sin(dilated_attention_reference(q, k, v, **cfg)))

  def loss_jax(q, k, v):
    return jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, is_causal=causal)))

  g_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(q, k, v)
  g_jax = jax.grad(loss_jax, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_ref, g_jax):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_softmax_scale_and_jit():
  q, k, v = _qkv(1)
  got = jax.jit(
      lambda q, k, v: dilated_attention_reference(
          q, k, v, segment_lengths=(16,), dilation_rates=(1,), softmax_scale=0.3
      )
  )(q, k, v)
  want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_dtype_is_preserved():
  q, k, v = _qkv(2, dtype=jnp.bfloat16)
  out = dilated_attention_reference(
      q, k, v, segment_lengths=(4,), dilation_rates=(2,)
  )
  assert out.dtype == jnp.bfloat16


def test_float64_under_x64():
  with jax.enable_x64(True):
    q, k, v = _qkv(3, b=1, n=8, h=2, hkv=1, d=4, dtype=jnp.float64)
    ws, rs = (4, 8), (1, 2)
    out = dilated_attention_reference(q, k, v, segment_lengths=ws, dilation_rates=rs)
    assert out.dtype == jnp.float64
    want = _loop_mix(q, k, v, ws, rs, causal=False)
    np.testing.assert_allclose(out, want, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------
# dense_mask, checked by hand.
# ---------------------------------------------------------------------------


def test_dense_mask_literal_one_branch_mix():
  # N=8, w=4, r=2. Head 0 (kv head 0) has offset 0: kept {0,2} and {4,6}.
  # Head 1 (kv head 1) has offset 1: kept {1,3} and {5,7}.
  c = dense_mask(8, 2, 2, segment_lengths=(4,), dilation_rates=(2,))
  assert c.dtype == np.int32 and c.shape == (2, 8, 8)
  head0 = np.array([
      [1, 0, 1, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [1, 0, 1, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 1, 0, 1, 0],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 1, 0, 1, 0],
      [0, 0, 0, 0, 0, 0, 0, 0],
  ])
  head1 = np.array([
      [0, 0, 0, 0, 0, 0, 0, 0],
      [0, 1, 0, 1, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [0, 1, 0, 1, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 1, 0, 1],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 1, 0, 1],
  ])
  np.testing.assert_array_equal(c[0], head0)
  np.testing.assert_array_equal(c[1], head1)

  # Causal keeps the lower triangle of the same pattern.
  cc = dense_mask(8, 2, 2, segment_lengths=(4,), dilation_rates=(2,), causal=True)
  np.testing.assert_array_equal(cc[0], np.tril(head0))
  np.testing.assert_array_equal(cc[1], np.tril(head1))


def test_dense_mask_literal_gqa_offsets():
  # H=4, K=2: heads 0,1 -> kv head 0 -> offset 0; heads 2,3 -> offset 1.
  c = dense_mask(4, 4, 2, segment_lengths=(4,), dilation_rates=(2,))
  even = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
  odd = np.array([[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]])
  for h, want in enumerate([even, even, odd, odd]):
    np.testing.assert_array_equal(c[h], want)


def test_dense_mask_literal_two_branches_count_twice():
  # Branch 0: w=4, r=1 (two dense 4x4 blocks). Branch 1: w=8, r=2, offset 0
  # (kept {0,2,4,6}, one segment). Pairs reached by both branches count 2.
  c = dense_mask(8, 1, 1, segment_lengths=(4, 8), dilation_rates=(1, 2))
  want = np.array([
      [2, 1, 2, 1, 1, 0, 1, 0],
      [1, 1, 1, 1, 0, 0, 0, 0],
      [2, 1, 2, 1, 1, 0, 1, 0],
      [1, 1, 1, 1, 0, 0, 0, 0],
      [1, 0, 1, 0, 2, 1, 2, 1],
      [0, 0, 0, 0, 1, 1, 1, 1],
      [1, 0, 1, 0, 2, 1, 2, 1],
      [0, 0, 0, 0, 1, 1, 1, 1],
  ])
  np.testing.assert_array_equal(c[0], want)
  cc = dense_mask(
      8, 1, 1, segment_lengths=(4, 8), dilation_rates=(1, 2), causal=True
  )
  np.testing.assert_array_equal(cc[0], np.tril(want))


def test_dense_mask_partition_groups_and_offsets():
  # H=8, three branches -> groups of 3, 3, 2 heads; offsets i mod r_i = 0, 1, 2.
  ws, rs = (8, 8, 8), (1, 2, 4)
  c = dense_mask(8, 8, 8, segment_lengths=ws, dilation_rates=rs, mode="partition")
  full = np.ones((8, 8), int)
  kept1 = [1, 3, 5, 7]  # branch 1, offset 1
  b1 = np.zeros((8, 8), int)
  b1[np.ix_(kept1, kept1)] = 1
  kept2 = [2, 6]  # branch 2, offset 2
  b2 = np.zeros((8, 8), int)
  b2[np.ix_(kept2, kept2)] = 1
  want = [full, full, full, b1, b1, b1, b2, b2]
  for h in range(8):
    np.testing.assert_array_equal(c[h], want[h], err_msg=f"head {h}")
  # Partition offsets do not depend on the kv head (GQA gives the same mask).
  c_gqa = dense_mask(
      8, 8, 2, segment_lengths=ws, dilation_rates=rs, mode="partition"
  )
  np.testing.assert_array_equal(c_gqa, c)


def test_dense_mask_partition_needs_a_head_per_branch():
  with pytest.raises(ValueError, match="partition"):
    dense_mask(
        8, 2, 2, segment_lengths=(8, 8, 8), dilation_rates=(1, 2, 4),
        mode="partition",
    )


# ---------------------------------------------------------------------------
# Against the loop references.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [2, 1])
def test_partition_one_head_per_branch_matches_loop(causal, hkv):
  # H=4, four branches: head i uses branch i with offset i mod r_i = 0,1,2,1.
  ws, rs = (4, 8, 16, 16), (1, 2, 4, 2)
  q, k, v = _qkv(4, hkv=hkv)
  got = dilated_attention_reference(
      q, k, v, segment_lengths=ws, dilation_rates=rs, mode="partition",
      causal=causal,
  )
  want = _loop_partition_one_head_per_branch(q, k, v, ws, rs, causal)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ws,rs", [((4, 8), (1, 2)), ((8, 16), (2, 4))])
def test_mix_matches_concatenated_key_lists(causal, ws, rs):
  q, k, v = _qkv(5)
  got = dilated_attention_reference(
      q, k, v, segment_lengths=ws, dilation_rates=rs, causal=causal
  )
  want = _loop_mix(q, k, v, ws, rs, causal)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_mix_duplicate_keys_count_twice():
  # Two identical branches must equal one branch (the factor 2 cancels), but
  # two branches that overlap only in part must not equal a plain union.
  q, k, v = _qkv(6)
  one = dilated_attention_reference(q, k, v, segment_lengths=(4,), dilation_rates=(1,))
  two = dilated_attention_reference(
      q, k, v, segment_lengths=(4, 4), dilation_rates=(1, 1)
  )
  np.testing.assert_allclose(one, two, atol=1e-6)
  ws, rs = (4, 8), (1, 2)
  got = dilated_attention_reference(q, k, v, segment_lengths=ws, dilation_rates=rs)
  union = np.minimum(dense_mask(16, 4, 2, segment_lengths=ws, dilation_rates=rs), 1)
  k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8.0)
  s = jnp.where(union[None] > 0, s, -jnp.inf)
  union_out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
  assert np.max(np.abs(np.asarray(got) - np.asarray(union_out))) > 1e-3


def test_masks_match_loop():
  n = 16
  ws, rs = (4, 16), (1, 2)
  q, k, v = _qkv(7)
  rng = np.random.default_rng(0)
  kpm = rng.random((2, n)) > 0.3
  sid = np.repeat(np.array([[0, 1, 2, 3], [5, 5, 6, 7]]), 4, axis=1)
  sid[1, 6:] += 1  # a boundary inside a dilation segment
  for causal in (False, True):
    got = dilated_attention_reference(
        q, k, v, segment_lengths=ws, dilation_rates=rs, causal=causal,
        key_padding_mask=jnp.asarray(kpm), segment_ids=jnp.asarray(sid),
    )
    want = _loop_mix(q, k, v, ws, rs, causal, kpm=kpm, sid=sid)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Empty rows: exactly 0 output, finite gradient.
# ---------------------------------------------------------------------------


def _assert_finite_grads(fn, q, k, v):
  grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))(
      q, k, v
  )
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  return grads


def test_fully_padded_batch_element_gives_zero_and_finite_grad():
  q, k, v = _qkv(8)
  kpm = jnp.array([[True] * 16, [False] * 16])

  def fn(q, k, v):
    return dilated_attention_reference(
        q, k, v, segment_lengths=(8, 16), dilation_rates=(1, 2),
        key_padding_mask=kpm,
    )

  out = fn(q, k, v)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.all(np.abs(np.asarray(out[0])).sum(-1) > 0)
  gq, gk, gv = _assert_finite_grads(fn, q, k, v)
  np.testing.assert_array_equal(gq[1], 0.0)
  np.testing.assert_array_equal(gk[1], 0.0)
  np.testing.assert_array_equal(gv[1], 0.0)
  assert np.any(np.asarray(gq[0]) != 0)


def test_unkept_positions_give_zero_and_finite_grad():
  # One branch w=8, r=2, mix, H=4, K=2: heads 0,1 have offset 0 (odd positions
  # not kept), heads 2,3 have offset 1 (even positions not kept).
  q, k, v = _qkv(9)

  def fn(q, k, v):
    return dilated_attention_reference(
        q, k, v, segment_lengths=(8,), dilation_rates=(2,), causal=True
    )

  out = np.asarray(fn(q, k, v))
  np.testing.assert_array_equal(out[:, 1::2, :2], 0.0)
  np.testing.assert_array_equal(out[:, 0::2, 2:], 0.0)
  assert np.all(np.abs(out[:, 0::2, :2]).sum(-1) > 0)
  assert np.all(np.abs(out[:, 1::2, 2:]).sum(-1) > 0)
  gq, gk, gv = _assert_finite_grads(fn, q, k, v)
  np.testing.assert_array_equal(gq[:, 1::2, :2], 0.0)
  np.testing.assert_array_equal(gq[:, 0::2, 2:], 0.0)
  # kv head 0 serves heads 0,1 (offset 0): its odd keys are never seen.
  np.testing.assert_array_equal(gk[:, 1::2, 0], 0.0)
  np.testing.assert_array_equal(gv[:, 0::2, 1], 0.0)


def test_causal_with_padded_first_key_gives_zero_row():
  # Causal + key 0 padded: query 0 sees nothing.
  q, k, v = _qkv(10)
  kpm = jnp.array([[False] + [True] * 15] * 2)

  def fn(q, k, v):
    return dilated_attention_reference(
        q, k, v, segment_lengths=(16,), dilation_rates=(1,), causal=True,
        key_padding_mask=kpm,
    )

  out = np.asarray(fn(q, k, v))
  np.testing.assert_array_equal(out[:, 0], 0.0)
  assert np.all(np.abs(out[:, 1:]).sum(-1) > 0)
  _assert_finite_grads(fn, q, k, v)


# ---------------------------------------------------------------------------
# segment_ids.
# ---------------------------------------------------------------------------


def test_segment_ids_isolate_documents():
  q, k, v = _qkv(11)
  sid = jnp.array([[0] * 5 + [1] * 11] * 2)  # boundary not on a dilation segment

  def fn(k, v):
    return dilated_attention_reference(
        q, k, v, segment_lengths=(8, 16), dilation_rates=(1, 2),
        segment_ids=sid,
    )

  base = np.asarray(fn(k, v))
  # Perturb keys and values of document 1: document 0 is unchanged.
  k2 = k.at[:, 5:].add(3.0)
  v2 = v.at[:, 5:].add(3.0)
  moved = np.asarray(fn(k2, v2))
  np.testing.assert_array_equal(moved[:, :5], base[:, :5])
  assert np.max(np.abs(moved[:, 5:] - base[:, 5:])) > 1e-2
  # And the other way round.
  k3 = k.at[:, :5].add(3.0)
  v3 = v.at[:, :5].add(3.0)
  moved = np.asarray(fn(k3, v3))
  np.testing.assert_array_equal(moved[:, 5:], base[:, 5:])
  assert np.max(np.abs(moved[:, :5] - base[:, :5])) > 1e-2


# ---------------------------------------------------------------------------
# Argument validation.
# ---------------------------------------------------------------------------


def test_mismatched_tuple_lengths_raise():
  q, k, v = _qkv(12)
  with pytest.raises(ValueError, match="segment_lengths.*dilation_rates"):
    dilated_attention_reference(
        q, k, v, segment_lengths=(4, 8), dilation_rates=(1,)
    )
  with pytest.raises(ValueError, match="segment_lengths.*dilation_rates"):
    dense_mask(16, 4, 2, segment_lengths=(4,), dilation_rates=(1, 2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(segment_lengths=(3,), dilation_rates=(1,)), r"segment_lengths\[0\]=3"),
        (dict(segment_lengths=(8,), dilation_rates=(3,)), r"dilation_rates\[0\]=3"),
        (dict(segment_lengths=(8,), dilation_rates=(1,), mode="bogus"), "mode"),
        (dict(segment_lengths=(), dilation_rates=()), "segment_lengths"),
    ],
)
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dense_mask(8, 2, 2, **kwargs)


def test_bad_heads_raise():
  with pytest.raises(ValueError, match="num_kv_heads"):
    dense_mask(8, 3, 2, segment_lengths=(8,), dilation_rates=(1,))
