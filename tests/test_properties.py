"""Property tests over random configurations (hypothesis).

* Every **valid** configuration drawn by ``ringdilated.testing.configs`` --
  branches, mode, causality, GQA, key padding, segment ids, on one device or
  on a ring of P = 2, 4, 8 simulated CPU devices (``tests/conftest.py``) in
  either layout -- gives the output and q/k/v gradients of the dense oracle
  ``ringdilated.reference.dilated_attention_reference``
  (``ringdilated.testing.assert_matches_reference``).
* Every **invalid** configuration drawn raises ``ValueError`` (``TypeError``
  for a wrong type) from ringdilated's own checks, naming the offending
  argument, before the attention is traced -- never an XLA, shape or
  assertion error from deeper down.

Which rules a configuration breaks is decided here, independently of
``ringdilated._plan`` and of the strategy, from the rules of the README's
"Configuration rules" (contiguous layout).

Each valid example compiles a program (seconds on CPU), so the space is small
(N in {32, 64}, D in {4, 8}, H in {2, 4}) and the example counts are low.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import pathlib
import threading
from unittest import mock

import _harness as harness
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import ringdilated as rd
from ringdilated import _plan, _ring, testing
from ringdilated.reference import dilated_attention_reference

_PACKAGE = pathlib.Path(rd.__file__).parent


def _divisors(n):
  return [x for x in range(1, n + 1) if n % x == 0]


# ---------------------------------------------------------------------------
# Valid configurations: the library equals the dense oracle.


def _ring_ok(w, r, n, p):
  """README "Configuration rules": the branches a contiguous ring of ``p``
  devices can run."""
  local = n // p
  if p == 1:
    return True
  if local % r:
    return False
  return local % w == 0 if w <= local else (w % local == 0 and p % (w // local) == 0)


def _inputs(case, head_dim, padding, segments, seed):
  """q, k, v float32 [2, N, ., D] and the masks the draw asks for."""
  q, k, v, _, kpm, seg = harness.inputs(2, case.seq_len, case.num_heads, case.num_kv_heads,
                                        head_dim, seed=seed)
  return q, k, v, kpm if padding else None, seg if segments else None


def _case(n, p, h, hkv, *args, **kw):
  return testing.Case(n, h, hkv, p, rd.DilatedConfig(*args, **kw,
                                                     axis_name="sp" if p > 1 else None))


_COMMON = dict(head_dim=8, padding=True, segments=True, seed=0)


# Three fixed examples that always run: every branch kind of the contiguous
# ring (local, sub-ring, w = N), GQA, both masks; multi-query partition mode
# with every branch dilated; every schedule of the zigzag ring (local,
# mirrored sub-ring of 2, whole ring). Ten random draws besides (each
# compiles a ring's forward and backward).
@hypothesis.settings(max_examples=10, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.example(case=_case(64, 8, 4, 2, (8, 16, 64), (1, 2, 4), "mix", True), **_COMMON)
@hypothesis.example(case=_case(32, 4, 4, 1, (4, 16, 32), (2, 4, 8), "partition", False),
                    **_COMMON)
@hypothesis.example(case=_case(64, 4, 4, 2, (8, 16, 64), (1, 2, 4), "mix", True,
                               layout="zigzag"), **_COMMON)
@hypothesis.given(case=testing.configs(), head_dim=st.sampled_from([8, 4]),
                  padding=st.booleans(), segments=st.booleans(),
                  seed=st.integers(0, 2**16))
def test_valid_configuration_matches_dense_oracle(case, head_dim, padding, segments, seed):
  q, k, v, kpm, seg = _inputs(case, head_dim, padding, segments, seed)
  library = harness.attention(**harness.settings(case.config))
  if case.num_shards > 1:
    library = harness.ring(library, case.num_shards, case.config.layout)
  # Shapes, dtype, finiteness, and out, dq, dk, dv within tolerance(float32).
  harness.assert_matches_reference(lambda q, k, v: library(q, k, v, kpm, seg), q, k, v,
                                   config=case.config, key_padding_mask=kpm,
                                   segment_ids=seg)


# ---------------------------------------------------------------------------
# Invalid configurations: a named ValueError/TypeError before tracing.


class _Violation:
  """A rule the drawn arguments break: the error type it calls for and the
  words the message must contain (the argument's name)."""

  def __init__(self, error, *words):
    self.error, self.words = error, words

  def matches(self, exc):
    return isinstance(exc, self.error) and all(w in str(exc) for w in self.words)

  def __repr__(self):
    return f"{self.error.__name__}{self.words}"


def _violations(c):
  """Every rule of DESIGN.md section 1-4 the arguments break (empty: valid)."""
  found = []
  ws, rs = c["segment_lengths"], c["dilation_rates"]
  n, p, h, hkv = c["n"], c["p"], c["h"], c["hkv"]
  ints = {}
  for name, values in (("segment_lengths", ws), ("dilation_rates", rs)):
    ints[name] = []
    if not isinstance(values, tuple):  # e.g. a bare int: not a sequence
      found.append(_Violation(TypeError, name))
      continue
    for i, x in enumerate(values):
      if not isinstance(x, int) or isinstance(x, bool):
        found.append(_Violation(TypeError, f"{name}[{i}]"))
        ints[name].append(None)
      elif x <= 0:
        found.append(_Violation(ValueError, f"{name}[{i}]"))
        ints[name].append(None)
      else:
        ints[name].append(x)
  sequences = isinstance(ws, tuple) and isinstance(rs, tuple)
  if sequences and not ws:
    found.append(_Violation(ValueError, "segment_lengths"))
  if sequences and len(ws) != len(rs):
    found.append(_Violation(ValueError, "segment_lengths", "dilation_rates"))
  if h % hkv:
    found.append(_Violation(ValueError, "kv heads"))
  if c["mode"] not in ("mix", "partition"):
    found.append(_Violation(ValueError, "mode="))
  if not isinstance(c["causal"], bool):
    found.append(_Violation(TypeError, "causal="))
  if sequences and c["mode"] == "partition" and len(ws) > h:
    found.append(_Violation(ValueError, "num_heads"))
  scale = c["softmax_scale"]
  if scale is not None and not (math.isfinite(scale) and scale > 0):
    found.append(_Violation(ValueError, "softmax_scale"))
  for i, (w, r) in enumerate(zip(ints["segment_lengths"], ints["dilation_rates"])):
    if w is not None and n % w:
      found.append(_Violation(ValueError, f"segment_lengths[{i}]"))
    if w is not None and r is not None and w % r:
      # Either name is fine: the rule ties the two.
      found.append(_Violation(ValueError, f"segment_lengths[{i}]"))
      found.append(_Violation(ValueError, f"dilation_rates[{i}]"))
    local = n // p
    if p > 1 and r is not None and local % r:
      found.append(_Violation(ValueError, f"dilation_rates[{i}]"))
    if p > 1 and w is not None and not _ring_ok(w, 1, n, p):
      found.append(_Violation(ValueError, f"segment_lengths[{i}]"))
  return found


def _mutate(draw, c, kind):
  """Breaks one rule of a valid configuration ``c`` (in place)."""
  ws, rs = list(c["segment_lengths"]), list(c["dilation_rates"])
  n, p = c["n"], c["p"]
  if not ws:  # emptied by a first mutation: give the second one a branch
    ws, rs = [n], [1]
  i = draw(st.integers(0, len(ws) - 1))
  if kind == "w_not_dividing_n":
    ws[i], rs[i] = draw(st.sampled_from([x for x in (3, 5, 7, 9, 10, 12, 20, 40, 96)
                                         if n % x])), 1
  elif kind == "r_not_dividing_w":
    rs[i] = draw(st.sampled_from([x for x in (3, 5, 7, 2 * ws[i]) if ws[i] % x]))
  elif kind == "lengths_differ":
    rs = draw(st.sampled_from([rs[:-1], rs + [1]]))
  elif kind == "empty":
    ws, rs = [], []
  elif kind == "not_positive":
    which = draw(st.sampled_from([ws, rs]))
    which[i] = draw(st.sampled_from([0, -which[i]]))
  elif kind == "not_int":
    which = draw(st.sampled_from([ws, rs]))
    which[i] = draw(st.sampled_from([float(which[i]), True, str(which[i]), None]))
  elif kind == "heads":
    c["hkv"] = 3
  elif kind == "mode":
    c["mode"] = draw(st.sampled_from(["both", "Mix", ""]))
  elif kind == "causal":
    c["causal"] = draw(st.sampled_from(["yes", 1, None]))
  elif kind == "partition_heads":
    c["mode"], c["h"], c["hkv"] = "partition", 2, 1
    ws, rs = ws + [n, n, n], rs + [1, 1, 1]
  elif kind == "softmax_scale":
    c["softmax_scale"] = draw(st.sampled_from([0.0, -1.0, math.inf, math.nan]))
  elif kind == "ring_rate":  # valid on one device, not for L = N / P tokens
    c["p"] = p = draw(st.sampled_from([2, 4, 8]))
    ws[i], rs[i] = n, 2 * (n // p)
  elif kind == "ring_segment":  # w divides N, but neither divides L nor is g L
    c["n"], c["p"] = n, p = draw(st.sampled_from([(48, 2), (48, 8), (24, 8), (48, 4)]))
    ws[i], rs[i] = draw(st.sampled_from([w for w in _divisors(n)
                                         if not _ring_ok(w, 1, n, p)])), 1
  c["segment_lengths"], c["dilation_rates"] = tuple(ws), tuple(rs)
  if kind == "not_sequence":  # a bare int or a string instead of a sequence
    name = draw(st.sampled_from(["segment_lengths", "dilation_rates"]))
    c[name] = draw(st.sampled_from([n, ",".join(map(str, c[name]))]))


_MUTATIONS = ["w_not_dividing_n", "r_not_dividing_w", "not_positive", "not_int", "heads",
              "mode", "causal", "softmax_scale", "ring_rate", "ring_segment",
              "partition_heads", "lengths_differ", "empty", "not_sequence"]


@st.composite
def invalid_configs(draw, kind):
  """A valid configuration with rule ``kind`` broken, and maybe one more."""
  case = draw(testing.configs(seq_lens=(64, 48, 32, 24), layouts=("contiguous",),
                              max_branches=2))
  config = case.config
  c = dict(n=case.seq_len, p=case.num_shards, h=case.num_heads, hkv=case.num_kv_heads,
           segment_lengths=config.segment_lengths, dilation_rates=config.dilation_rates,
           mode=config.mode, causal=config.causal,
           softmax_scale=draw(st.sampled_from([None, 0.5])))
  # The strategy's valid is this file's valid (an independent statement of
  # the rules).
  assert not _violations(c), c
  kinds = {kind, draw(st.sampled_from(_MUTATIONS))} if draw(st.booleans()) else {kind}
  for k in sorted(kinds, key=_MUTATIONS.index):  # the length changes last
    _mutate(draw, c, k)
  return c


def _trace(c):
  """Traces (never runs) the call under jit, inside shard_map when p > 1."""
  p = c["p"]
  kw = dict(segment_lengths=c["segment_lengths"], dilation_rates=c["dilation_rates"],
            mode=c["mode"], causal=c["causal"], softmax_scale=c["softmax_scale"],
            axis_name="sp" if p > 1 else None)

  def f(q, k, v):
    return rd.dilated_attention(q, k, v, **kw)

  if p > 1:
    f = harness.ring(f, p)
  q = jax.ShapeDtypeStruct((1, c["n"], c["h"], 4), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, c["n"], c["hkv"], 4), jnp.float32)
  jax.jit(f).trace(q, kv, kv)


@pytest.mark.parametrize("kind", _MUTATIONS)
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(data=st.data())
def test_invalid_configuration_raises_named_error_before_tracing(kind, data):
  c = data.draw(invalid_configs(kind))
  expected = _violations(c)
  hypothesis.assume(expected)  # a second mutation may undo the first
  traced = mock.Mock(side_effect=AssertionError("the attention was traced"))
  with mock.patch.object(_ring, "attention", traced):
    try:
      _trace(c)
    except (ValueError, TypeError) as e:
      error = e
    else:
      raise AssertionError(f"no error for {c}; expected one of {expected}")
  assert not traced.called
  # Ours, not jax's or XLA's: exactly ValueError/TypeError, raised in the package.
  assert type(error) in (ValueError, TypeError), repr(error)
  raised_in = pathlib.Path(_innermost_frame(error).f_code.co_filename)
  assert _PACKAGE in raised_in.parents, (raised_in, error)
  assert any(v.matches(error) for v in expected), (repr(error), expected)


def _innermost_frame(exc):
  tb = exc.__traceback__
  while tb.tb_next is not None:
    tb = tb.tb_next
  return tb.tb_frame


# ---------------------------------------------------------------------------
# Concurrency: the plan and the jitted function from 16 threads at once.


def test_plan_and_jit_from_sixteen_threads():
  """test_linen.py runs eager module applies in threads; here 16 threads race
  on building one (new) plan and on the first trace of one jitted function."""
  n, h, hkv = 32, 4, 2
  ws, rs = (4, 16, 32), (1, 2, 8)  # used by no other test: a cold plan cache
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.standard_normal((1, n, x, 8)), jnp.float32)
             for x in (h, hkv, hkv))
  f = jax.jit(functools.partial(rd.dilated_attention, segment_lengths=ws,
                                dilation_rates=rs, causal=True))
  start = threading.Barrier(16)

  def work(_):
    start.wait()
    # Equal, not identical, inputs (lists; a new config object per thread).
    plan = _plan.make_plan(rd.DilatedConfig(list(ws), list(rs), "mix", True), n, h, hkv)
    return plan, np.asarray(f(q, k, v))

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    results = list(pool.map(work, range(16)))
  plans, outs = zip(*results)
  # Pure: equal inputs give equal plans. (lru_cache returns one object once
  # the cache is warm; a thread that misses concurrently may get its own,
  # equal copy -- which is harmless, so only equality is required here.)
  assert all(pl == plans[0] and hash(pl) == hash(plans[0]) for pl in plans)
  config = rd.DilatedConfig(ws, rs, "mix", True)
  assert _plan.make_plan(config, n, h, hkv) is _plan.make_plan(
      rd.DilatedConfig(list(ws), list(rs), "mix", True), n, h, hkv)
  for out in outs:
    np.testing.assert_array_equal(out, outs[0])
  want = dilated_attention_reference(q, k, v, segment_lengths=ws, dilation_rates=rs,
                                     causal=True)
  np.testing.assert_allclose(outs[0], np.asarray(want), atol=harness.tolerance(jnp.float32),
                             rtol=0)
