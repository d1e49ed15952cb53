"""``ringdilated.testing``: the oracle assertion catches wrong attention, the
strategies draw only configurations the library runs.

Small shapes and few hypothesis examples: every compared example compiles
a program. ``harness.assert_matches_reference`` is the public function.
"""

from __future__ import annotations

import dataclasses
import doctest
import functools

import _harness as harness
import hypothesis
import jax
import jax.numpy as jnp
import pytest
from hypothesis import strategies as st

import ringdilated as rd
from ringdilated import testing

PATTERN = dict(segment_lengths=(4, 16), dilation_rates=(1, 2), causal=True)


def _qkv(dtype=jnp.float32):
  case = testing.Case(16, 4, 2, 1, rd.DilatedConfig(**PATTERN))
  return case.inputs(seed=1, dtype=dtype)


def test_the_library_passes_with_masks_and_in_low_precision():
  q, k, v, _, kpm, seg = harness.inputs(1, 16, 4, 2, 8, seed=2)
  harness.assert_matches_reference(
      lambda q, k, v: rd.dilated_attention(q, k, v, key_padding_mask=kpm,
                                           segment_ids=seg, **PATTERN),
      q, k, v, key_padding_mask=kpm, segment_ids=seg, **PATTERN)
  q, k, v = _qkv(jnp.bfloat16)
  config = rd.DilatedConfig(**PATTERN, mode="partition", softmax_scale=0.5)
  harness.assert_matches_reference(
      functools.partial(rd.dilated_attention, mode="partition", softmax_scale=0.5, **PATTERN),
      q, k, v, config=config)


def test_a_ring_passes_through_its_natural_order_wrapper():
  # Half-chunks of 4: a mirrored sub-ring of 2 (w = 8) and the whole ring.
  case = testing.Case(32, 4, 2, 4, rd.DilatedConfig(
      (8, 32), (1, 4), causal=True, layout="zigzag", axis_name="sp"))
  config = case.config
  ring = harness.ring(harness.with_config(config), case.num_shards, config.layout)
  harness.assert_matches_reference(ring, *case.inputs(), config=config)


def _fails(match, fn, *, grads=True, **pattern):
  q, k, v = _qkv()
  with pytest.raises(AssertionError, match=match) as caught:
    harness.assert_matches_reference(fn, q, k, v, grads=grads, **(pattern or PATTERN))
  return str(caught.value)


def test_wrong_causal_flag_is_caught():
  message = _fails(r"out: max \|got - want\| = ",
                   functools.partial(rd.dilated_attention, **dict(PATTERN, causal=False)))
  assert "dq: max" in message and "atol=2e-05" in message


def test_wrong_offsets_are_caught():
  # "partition" keeps offset i mod r_i in every head of group i; "mix" keeps
  # kv_head mod r_i: same segments and rates, other positions.
  _fails(r"out: max", functools.partial(rd.dilated_attention, mode="partition", **PATTERN),
         grads=False)


def test_a_slightly_scaled_output_is_caught():
  wrong = lambda q, k, v: 1.001 * rd.dilated_attention(q, k, v, **PATTERN)  # noqa: E731
  message = _fails(r"out: max \|got - want\| = .* values out of tolerance", wrong)
  assert message.count("\n") == 4  # a line each for out, dq, dk, dv


def test_a_wrong_gradient_alone_is_caught_and_named():
  def right(q, k, v):
    return rd.dilated_attention(q, k, v, **PATTERN)

  attend = jax.custom_vjp(right)

  def fwd(q, k, v):
    return jax.vjp(right, q, k, v)

  def bwd(pull, dout):
    dq, dk, dv = pull(dout)
    return dq, 1.01 * dk, dv  # the bug: dk off by 1%

  attend.defvjp(fwd, bwd)
  message = _fails(r"dk: max", attend)
  assert "out:" not in message and "dq:" not in message and "dv:" not in message


def test_non_finite_values_and_wrong_dtypes_are_reported():
  nan = lambda q, k, v: rd.dilated_attention(q, k, v, **PATTERN).at[0, 3, 1, 2].set(jnp.nan)  # noqa: E731
  _fails(r"out: 1 non-finite values, first at \(0, 3, 1, 2\)", nan, grads=False)
  half = lambda q, k, v: rd.dilated_attention(q, k, v, **PATTERN).astype(jnp.float16)  # noqa: E731
  _fails(r"out: dtype float16, want q's dtype float32", half, grads=False)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(), ValueError, "not neither"),
    (dict(PATTERN, config=rd.DilatedConfig(**PATTERN)), ValueError, "not both"),
    (dict(config=rd.DilatedConfig(**PATTERN, dropout_rate=0.1)), ValueError,
     r"config.dropout_rate=0.1: the oracle has no dropout"),
    (dict(config=rd.DilatedConfig(**PATTERN, detach_weights=True)), ValueError,
     "pass grads=False"),
    (dict(config=PATTERN), TypeError, "must be a ringdilated.DilatedConfig"),
    (dict(PATTERN, segment_lengths=(4, 15)), ValueError,
     r"segment_lengths\[1\]=15 must be divisible by dilation_rates\[1\]=2"),
])
def test_assert_matches_reference_rejects_bad_arguments(kwargs, error, match):
  q, k, v = _qkv()
  with pytest.raises(error, match=match):
    testing.assert_matches_reference(lambda q, k, v: q, q, k, v, **kwargs)


def test_tolerances():
  assert testing.tolerance(jnp.float32) == testing.tolerance("float32") == 2e-5
  assert testing.tolerance(jnp.zeros(2, jnp.bfloat16).dtype) == 3e-2
  assert testing.tolerance(jnp.float16) == 5e-3
  assert harness.TOLERANCES is testing.TOLERANCES
  with pytest.raises(ValueError, match=r"dtype=dtype\('int32'\) has no tolerance"):
    testing.tolerance(jnp.dtype(jnp.int32))


# ---------------------------------------------------------------------------
# Strategies.


def _trace(case: testing.Case):
  """Traces (runs no device work) the case's ring on [1, N, ., 4] inputs."""
  q = jax.ShapeDtypeStruct((1, case.seq_len, case.num_heads, 4), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, case.seq_len, case.num_kv_heads, 4), jnp.float32)
  attend = harness.with_config(case.config)
  if case.num_shards > 1:
    attend = harness.ring(attend, case.num_shards, case.config.layout)
  return jax.eval_shape(attend, q, kv, kv)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(testing.configs())
def test_drawn_configurations_are_accepted_by_the_library(case):
  config = case.config
  assert case.seq_len % case.num_shards == 0 and case.num_heads % case.num_kv_heads == 0
  assert (config.axis_name is None) == (case.num_shards == 1)
  if config.mode == "partition":
    assert len(config.segment_lengths) <= case.num_heads
  assert _trace(case).shape == (1, case.seq_len, case.num_heads, 4)


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(testing.configs(seq_lens=(32,), num_heads=(2,), max_branches=2))
def test_drawn_configurations_run_and_match_the_reference(case):
  attend = harness.with_config(case.config)
  if case.num_shards > 1:
    attend = harness.ring(attend, case.num_shards, case.config.layout)
  harness.assert_matches_reference(attend, *case.inputs(head_dim=4), config=case.config,
                                   grads=False)


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(st.data())
def test_strategy_arguments_restrict_the_draws(data):
  case = data.draw(testing.configs(seq_lens=(24,), num_shards=(8, 3, 4), num_heads=(6,),
                                   layouts=("zigzag",), modes=("partition",), causal=True,
                                   max_branches=2, axis_name="ring"))
  config = case.config
  assert (case.seq_len, case.num_heads, config.mode, config.causal) == (24, 6, "partition", True)
  assert case.num_shards in (3, 4) and config.axis_name == "ring"  # 2 * 8 does not divide 24
  assert config.layout == "zigzag" and len(config.branches) <= 2


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(seq_lens=(30,), num_shards=(4,)), ValueError, r"no ring of num_shards=\(4,\)"),
    (dict(seq_lens=(24,), num_shards=(8,), layouts=("zigzag",)), ValueError, "no ring"),
    (dict(layouts="zigzag"), ValueError, r"layouts='zigzag' must be a non-empty sequence"),
    (dict(modes=("both",)), ValueError, r"modes=\('both',\) must be"),
    (dict(num_heads=(0,)), ValueError, r"num_heads\[0\]=0 must be positive"),
    (dict(seq_lens=()), ValueError, "seq_lens must not be empty"),
    (dict(max_branches=1.5), TypeError, "max_branches=1.5 must be an int"),
    (dict(causal="yes"), TypeError, "causal='yes' must be a bool or None"),
])
def test_configs_rejects_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    testing.configs(**kwargs)


def test_case_inputs():
  case = testing.Case(16, 4, 2, 2, rd.DilatedConfig((8,), (1,), axis_name="sp"))
  q, k, v = case.inputs(seed=3, batch=2, head_dim=4, dtype=jnp.bfloat16)
  assert (q.shape, k.shape, v.shape) == ((2, 16, 4, 4), (2, 16, 2, 4), (2, 16, 2, 4))
  assert q.dtype == jnp.bfloat16 and case.local_len == 8
  again = case.inputs(seed=3, batch=2, head_dim=4, dtype=jnp.bfloat16)
  assert all(bool(jnp.all(a == b)) for a, b in zip((q, k, v), again))
  assert dataclasses.is_dataclass(case) and hash(case) == hash(dataclasses.replace(case))


def test_docstring_examples_run():
  result = doctest.testmod(testing, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 4 and result.failed == 0


def test_package_import_does_not_import_testing_or_hypothesis():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys, ringdilated; bad = {'hypothesis', 'ringdilated.testing'} & "
          "set(sys.modules); assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)
