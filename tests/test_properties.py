"""Property tests over random configurations (hypothesis).

* Every **valid** configuration drawn -- branches, mode, causality, GQA, key
  padding, segment ids, on one device or on a ring of P = 2, 4, 8 simulated
  CPU devices (``tests/conftest.py``) -- gives the output and q/k/v gradients
  of the dense oracle ``ringdilated.reference.dilated_attention_reference``.
* Every **invalid** configuration drawn raises ``ValueError`` (``TypeError``
  for a wrong type) from ringdilated's own checks, naming the offending
  argument, before the attention is traced -- never an XLA, shape or
  assertion error from deeper down.

Validity is decided here, independently of ``ringdilated._plan``, from the
rules of DESIGN.md.

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

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _harness import jit as _jit
from _harness import mesh as _mesh
from _harness import out_and_grads as _out_and_grads
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as PS

import ringdilated as rd
from ringdilated import _plan, _ring
from ringdilated.reference import dilated_attention_reference

TOL = 2e-5  # float32, max abs error of output and gradients

# Compiles dominate; LLVM optimization changes nothing that is compared here.
_PACKAGE = pathlib.Path(rd.__file__).parent


def _divisors(n):
  return [x for x in range(1, n + 1) if n % x == 0]


# ---------------------------------------------------------------------------
# Valid configurations: the library equals the dense oracle.


def _ring_ok(w, r, n, p):
  """DESIGN.md section 3: the layout a ring of ``p`` devices can run."""
  local = n // p
  if p == 1:
    return True
  if local % r:
    return False
  return local % w == 0 if w <= local else (w % local == 0 and p % (w // local) == 0)


@st.composite
def valid_configs(draw):
  # Hypothesis starts from (and shrinks towards) the first choice of each
  # list: order them so that even that example has a ring, GQA and several
  # branches, and w = 1 comes last.
  n = draw(st.sampled_from([64, 32]))
  p = draw(st.sampled_from([8, 4, 2, 1]))
  h = draw(st.sampled_from([4, 2]))
  hkv = draw(st.sampled_from(sorted(_divisors(h))[1:] + [1]))
  mode = draw(st.sampled_from(["mix", "partition"]))
  num_branches = draw(st.sampled_from([3, 2, 1] if mode == "mix" or h > 2 else [2, 1]))
  branches = []
  for _ in range(num_branches):
    w = draw(st.sampled_from([w for w in reversed(_divisors(n))
                              if any(_ring_ok(w, r, n, p) for r in _divisors(w))]))
    r = draw(st.sampled_from([r for r in _divisors(w) if _ring_ok(w, r, n, p)]))
    branches.append((w, r))
  ws, rs = (tuple(x) for x in zip(*branches))
  return dict(n=n, p=p, h=h, hkv=hkv, d=draw(st.sampled_from([4, 8])),
              segment_lengths=ws, dilation_rates=rs, mode=mode,
              causal=draw(st.booleans()), padding=draw(st.booleans()),
              segments=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _inputs(c):
  rng = np.random.default_rng(c["seed"])
  b, n, d = 2, c["n"], c["d"]
  q, k, v = (rng.standard_normal((b, n, x, d)).astype(np.float32)
             for x in (c["h"], c["hkv"], c["hkv"]))
  cot = rng.standard_normal((b, n, c["h"], d)).astype(np.float32)
  kpm = rng.random((b, n)) > 0.3 if c["padding"] else None
  seg = (np.sort(rng.integers(0, 3, (b, n)), axis=1).astype(np.int32)
         if c["segments"] else None)
  return q, k, v, cot, kpm, seg


_COMMON = dict(d=8, padding=True, segments=True, seed=0)


# Two fixed examples that always run: every branch kind of the ring (local,
# sub-ring, w = N), GQA, both masks; and multi-query partition mode with
# every branch dilated.
@hypothesis.settings(max_examples=15, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.example(dict(_COMMON, n=64, p=8, h=4, hkv=2, segment_lengths=(8, 16, 64),
                         dilation_rates=(1, 2, 4), mode="mix", causal=True))
@hypothesis.example(dict(_COMMON, n=32, p=4, h=4, hkv=1, segment_lengths=(4, 16, 32),
                         dilation_rates=(2, 4, 8), mode="partition", causal=False))
@hypothesis.given(valid_configs())
def test_valid_configuration_matches_dense_oracle(c):
  kw = dict(segment_lengths=c["segment_lengths"], dilation_rates=c["dilation_rates"],
            mode=c["mode"], causal=c["causal"])
  p = c["p"]

  def local(q, k, v, kpm, seg):
    return rd.dilated_attention(q, k, v, key_padding_mask=kpm, segment_ids=seg,
                                axis_name="sp" if p > 1 else None, **kw)

  library = local if p == 1 else jax.shard_map(
      local, mesh=_mesh(p), in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))

  def oracle(q, k, v, kpm, seg):
    return dilated_attention_reference(q, k, v, key_padding_mask=kpm, segment_ids=seg, **kw)

  @_jit  # one compile for both
  def both(q, k, v, cot, kpm, seg):
    return (_out_and_grads(library, q, k, v, cot, kpm, seg, compile=False),
            _out_and_grads(oracle, q, k, v, cot, kpm, seg, compile=False))

  got, want = both(*_inputs(c))
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  chex.assert_tree_all_finite(got)
  chex.assert_trees_all_close(got, want, atol=TOL, rtol=0)


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
  n = draw(st.sampled_from([64, 48, 32, 24]))
  p = draw(st.sampled_from([8, 4, 2, 1]))
  h = draw(st.sampled_from([4, 2]))
  branches = []
  for _ in range(draw(st.integers(1, 2))):
    w = draw(st.sampled_from([w for w in _divisors(n) if _ring_ok(w, 1, n, p)]))
    branches.append((w, draw(st.sampled_from(
        [r for r in _divisors(w) if _ring_ok(w, r, n, p)]))))
  ws, rs = zip(*branches)
  c = dict(n=n, p=p, h=h, hkv=draw(st.sampled_from(_divisors(h))),
           segment_lengths=ws, dilation_rates=rs,
           mode=draw(st.sampled_from(["mix", "partition"])), causal=draw(st.booleans()),
           softmax_scale=draw(st.sampled_from([None, 0.5])))
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
    f = jax.shard_map(f, mesh=_mesh(p), in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))
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
  np.testing.assert_allclose(outs[0], np.asarray(want), atol=TOL, rtol=0)
