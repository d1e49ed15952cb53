"""``detach_weights=True``: mix weights are constants in the gradient.

LongNet's reference implementation (torchscale) combines the branches with
weights computed under ``torch.no_grad()``. The oracle here is written from
that definition in plain ``jnp``: each branch is a dense masked softmax
(masks from ``ringdilated.reference.dense_mask``), the branches are combined
with ``jax.lax.stop_gradient`` of the softmax of their log-sum-exps, and
autodiff gives the gradients.

Shape legend: B batch, N sequence length, H query heads, K kv heads,
D head dim, P ring size.
"""

from __future__ import annotations

import functools

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ringdilated as rd
from ringdilated.reference import dense_mask

B, N, H, K, D = 2, 64, 4, 2, 8
CONFIG = dict(segment_lengths=(8, 32, 64), dilation_rates=(1, 2, 4))


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


@functools.lru_cache(maxsize=None)
def _inputs():
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.standard_normal((B, N, h, D)), jnp.float32)
               for h in (H, K, K, H))


def _oracle(q, k, v, *, causal, detach):
  """Dense per-branch attention, combined with (optionally detached) weights."""
  kf, vf = (jnp.repeat(x, H // K, axis=2) for x in (k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kf) * D ** -0.5
  outs, lses = [], []
  for w, r in zip(CONFIG["segment_lengths"], CONFIG["dilation_rates"]):
    seen = dense_mask(N, H, K, segment_lengths=(w,), dilation_rates=(r,), causal=causal) > 0
    z = jnp.where(seen[None], s, -jnp.inf)
    lse = jax.nn.logsumexp(z, axis=-1)                       # [B, H, N]
    p = jnp.where(seen[None], jnp.exp(z - jnp.where(jnp.isfinite(lse), lse, 0)[..., None]), 0)
    outs.append(jnp.einsum("bhqk,bkhd->bqhd", p, vf))
    lses.append(jnp.moveaxis(lse, 1, 2))                     # [B, N, H]
  lse = jnp.stack(lses)
  weights = jnp.where(jnp.isfinite(lse), jax.nn.softmax(lse, axis=0), 0.0)
  if detach:
    weights = jax.lax.stop_gradient(weights)
  return sum(wt[..., None] * o for wt, o in zip(weights, outs))


def _out_and_grads(fn):
  """Output and d(sum(out * cot))/d(q, k, v) of ``fn(q, k, v)``, jitted."""
  return harness.out_and_grads(lambda q, k, v, *_: fn(q, k, v), *_inputs(), None, None)


_errs = harness.max_errs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_detached_weights_match_the_stop_gradient_oracle(causal):
  got = _out_and_grads(functools.partial(
      rd.dilated_attention, **CONFIG, causal=causal, detach_weights=True))
  want = _out_and_grads(functools.partial(_oracle, causal=causal, detach=True))
  assert max(_errs(got, want)) < 2e-5, _errs(got, want)
  # Negative control: the exact gradient (weights not detached) differs.
  exact = _out_and_grads(functools.partial(_oracle, causal=causal, detach=False))
  assert max(_errs(exact, want)[1:]) > 1e-2
  assert _errs(exact[:1], want[:1])[0] < 2e-5  # same output
  default = _out_and_grads(functools.partial(rd.dilated_attention, **CONFIG, causal=causal))
  assert max(_errs(default, exact)) < 2e-5


def test_detached_weights_on_a_ring_match_one_device():
  p = 4  # w = 32: sub-rings of 2, w = 64: the whole ring
  kw = dict(CONFIG, causal=True, detach_weights=True)
  ring = harness.ring(functools.partial(rd.dilated_attention, axis_name="sp", **kw), p)
  got = _out_and_grads(ring)
  want = _out_and_grads(functools.partial(rd.dilated_attention, **kw))
  assert max(_errs(got, want)) < harness.RING_TOL, _errs(got, want)


def test_detach_weights_changes_nothing_in_partition_mode():
  kw = dict(CONFIG, mode="partition", causal=True)
  a = _out_and_grads(functools.partial(rd.dilated_attention, **kw, detach_weights=True))
  b = _out_and_grads(functools.partial(rd.dilated_attention, **kw))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_detach_weights_must_be_a_bool():
  q = jnp.ones((1, 16, 2, 8))
  with pytest.raises(TypeError, match=r"detach_weights='yes' must be a bool"):
    rd.dilated_attention(q, q, q, segment_lengths=(16,), dilation_rates=(1,),
                         detach_weights="yes")


def _module_grads(attend):
  q, k, v, cot = _inputs()
  return jax.jit(jax.grad(lambda q: jnp.sum(attend(q, k, v) * cot)))(q)


def test_modules_and_attention_fn_pass_detach_weights_on():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ringdilated import nnx as rdnnx  # pylint: disable=g-import-not-at-top
  kw = dict(CONFIG, causal=True)
  want = _module_grads(functools.partial(rd.dilated_attention, **kw, detach_weights=True))
  exact = _module_grads(functools.partial(rd.dilated_attention, **kw))
  linen = rd.DilatedAttention(**kw, detach_weights=True)
  fn = rd.make_attention_fn(**kw, detach_weights=True)
  for got in (_module_grads(lambda q, k, v: linen.apply({}, q, k, v)),
              _module_grads(rdnnx.DilatedAttention(**kw, detach_weights=True)),
              _module_grads(fn)):
    np.testing.assert_allclose(got, want, atol=1e-6)
  assert float(jnp.max(jnp.abs(want - exact))) > 1e-2
  with pytest.raises(TypeError, match=r"detach_weights=1 must be a bool"):
    rdnnx.MultiHeadDilatedAttention(4, 32, **kw, detach_weights=1, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"detach_weights=1 must be a bool"):
    rd.make_attention_fn(**kw, detach_weights=1)
  with pytest.raises(TypeError, match=r"detach_weights=1 must be a bool"):
    rd.MultiHeadDilatedAttention(num_heads=4, **kw, detach_weights=1)  # when built
