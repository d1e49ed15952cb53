"""The zigzag layout: load-balanced causal rings.

Device ``d`` of ``P`` holds half-chunks ``d`` and ``2P - 1 - d`` of the
global sequence (``rd.to_layout``). Every comparison runs the ring on the
laid-out sequence, maps the result back with ``rd.from_layout`` and compares
it with one device on the natural order, for outputs and ``jax.grad`` of
q, k and v. The balance tests count the work of the static schedule
(``_schedule.step_work``, built from the same rule the ring executes).

``tests/conftest.py`` provides 8 CPU devices. Shape legend: B batch,
N global sequence length, P ring size, C = N / (2P) half-chunk length,
H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import functools

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _harness import max_errs as _max_errs
from _harness import mesh as _mesh
from _harness import out_and_grads as _out_and_grads
from jax.sharding import PartitionSpec as PS

import ringdilated as rd
from ringdilated import _plan, _ring, _schedule

N = 128
B, H, K, D = 2, 4, 2, 8
# For P = 2, 4, 8 these cover local branches (w <= C), mirrored sub-rings
# (w = m C, m | P, m = 2..P) and the whole-sequence zigzag ring (w = N).
MIX = dict(segment_lengths=(8, 16, 32, 64, 128), dilation_rates=(1, 2, 2, 4, 4))
PARTITION = dict(segment_lengths=(8, 32, 64, 128), dilation_rates=(1, 2, 4, 4))
CONFIG = {"mix": MIX, "partition": PARTITION}
LONGNET = dict(segment_lengths=(2048, 4096, 8192, 16384), dilation_rates=(1, 2, 4, 8))


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


@functools.lru_cache(maxsize=None)
def _inputs(seed=0):
  """q, k, v, cotangent, key_padding_mask, segment_ids in natural order."""
  return harness.inputs(B, N, H, K, D, seed=seed)


def _attend(axis_name, kw):
  return harness.attention(axis_name=axis_name, **kw)


def _ring_in(p, layout, kw, data_layout=None):
  """Natural order in and out; the ring sees the sequence in ``data_layout``."""
  return harness.ring(_attend("sp", dict(kw, layout=layout)), p, data_layout or layout)


@functools.lru_cache(maxsize=None)
def _single_device(mode, causal):
  return _out_and_grads(_attend(None, dict(CONFIG[mode], mode=mode, causal=causal)),
                        *_inputs())


# ---------------------------------------------------------------------------
# to_layout / from_layout.


def test_to_layout_puts_half_chunks_d_and_2p_minus_1_minus_d_on_device_d():
  x = np.arange(16)[None]
  np.testing.assert_array_equal(
      rd.to_layout(x, "zigzag", 2), [[0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]])
  for p in (1, 2, 4, 8):
    laid = rd.to_layout(np.arange(32), "zigzag", p, axis=0).reshape(p, 2, -1)
    chunks = laid[:, :, 0] // (32 // (2 * p))  # half-chunk index of each half
    np.testing.assert_array_equal(chunks[:, 0], np.arange(p))
    np.testing.assert_array_equal(chunks[:, 1], 2 * p - 1 - np.arange(p))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_from_layout_inverts_to_layout(axis):
  x = np.random.default_rng(0).standard_normal((16, 16, 16)).astype(np.float32)
  for p in (1, 2, 4, 8):
    for layout in ("contiguous", "zigzag"):
      y = rd.to_layout(jnp.asarray(x), layout, p, axis=axis)
      assert isinstance(y, jax.Array)
      np.testing.assert_array_equal(np.asarray(rd.from_layout(y, layout, p, axis=axis)), x)
  # numpy in, numpy out; contiguous is the identity
  assert isinstance(rd.to_layout(x, "zigzag", 2), np.ndarray)
  assert rd.to_layout(x, "contiguous", 4) is x
  assert not np.array_equal(rd.to_layout(x, "zigzag", 2, axis=axis), x)


def test_layout_of_a_sequence_sharded_over_an_explicit_mesh_axis():
  """``jax.make_mesh`` axes are explicit: the permutation keeps the sharding."""
  mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])
  sharding = jax.sharding.NamedSharding(mesh, PS(None, "sp"))
  x = np.random.default_rng(0).standard_normal((2, 32, 3)).astype(np.float32)
  y = rd.to_layout(jax.device_put(x, sharding), "zigzag", 4)
  assert y.sharding.is_equivalent_to(sharding, y.ndim)
  np.testing.assert_array_equal(np.asarray(y), rd.to_layout(x, "zigzag", 4))
  back = jax.jit(lambda y: rd.from_layout(y, "zigzag", 4))(y)
  np.testing.assert_array_equal(np.asarray(back), x)


@pytest.mark.parametrize("args,error,match", [
    ((np.zeros((1, 8)), "striped", 2), ValueError, r"layout='striped' must be one of"),
    ((np.zeros((1, 12)), "zigzag", 4), ValueError,
     r"to_layout: x.shape\[1\]=12 must be divisible by 8"),
    ((np.zeros((1, 8)), "zigzag", 0), ValueError, r"axis_size=0 must be positive"),
    ((np.zeros((1, 8)), "zigzag", 2.0), TypeError, r"axis_size=2.0 must be an int"),
    ((np.zeros((1, 8)), "zigzag", 2, 2), ValueError, r"axis=2 is out of range"),
    (([0, 1, 2, 3], "zigzag", 2), TypeError, r"x must be an array, got list"),
])
def test_to_layout_rejects_bad_arguments(args, error, match):
  with pytest.raises(error, match=match):
    rd.to_layout(*args)


# ---------------------------------------------------------------------------
# The zigzag ring equals one device.


def test_config_covers_every_zigzag_schedule():
  for p in (2, 4, 8):
    plan = _plan.make_plan(rd.DilatedConfig(**MIX, layout="zigzag"), N, H, K, p)
    kinds = {(br.schedule, br.ring_size) for br in plan.branches}
    assert ("contiguous", 1) in kinds and ("zigzag", p) in kinds
    assert {g for s, g in kinds if s == "mirror"} == {g for g in (2, 4, 8) if g <= p}


# Every value pair of (ring size, mode), (ring size, causality) and (mode,
# causality) once: 4 of the 8 combinations. Zigzag rings of P = 4: the
# dropout test below (mix, causal), test_pallas_masks, test_properties'
# fixed example (mix, causal).
PAIRWISE = [(2, "mix", True), (2, "partition", False), (8, "mix", False),
            (8, "partition", True)]


@harness.ring_cases(PAIRWISE)
def test_zigzag_ring_matches_single_device(p, mode, causal):
  """GQA (H=4, K=2), key padding and packed segments; outputs and grads."""
  kw = dict(CONFIG[mode], mode=mode, causal=causal)
  got = _out_and_grads(_ring_in(p, "zigzag", kw), *_inputs())
  want = _single_device(mode, causal)
  assert all(float(jnp.max(jnp.abs(w))) > 0.1 for w in want)
  errs = _max_errs(got, want)
  assert max(errs) < harness.RING_TOL, harness.named(errs)


def test_negative_control_zigzag_data_run_as_contiguous_fails():
  kw = dict(MIX, causal=True)
  q, k, v, _, kpm, seg = _inputs()
  wrong = jax.jit(_ring_in(4, "contiguous", kw, data_layout="zigzag"))(q, k, v, kpm, seg)
  want = _single_device("mix", True)[0]
  assert float(jnp.max(jnp.abs(wrong - want))) > 1e-2


def test_one_device_zigzag_is_contiguous():
  """P = 1: both layouts are the identity, so the results are bitwise equal."""
  kw = dict(MIX, causal=True)
  q, k, v, _, kpm, seg = _inputs()
  for axis_name, p in ((None, 1), ("sp", 1)):
    outs = []
    for layout in ("contiguous", "zigzag"):
      f = _attend(axis_name, dict(kw, layout=layout))
      if axis_name:
        f = jax.shard_map(f, mesh=_mesh(p), in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))
      outs.append(np.asarray(jax.jit(f)(q, k, v, kpm, seg)))
    np.testing.assert_array_equal(*outs)


@pytest.mark.parametrize("layout,rates,conds", [("contiguous", (2, 4), False),
                                                ("zigzag", (2, 4), False),
                                                ("contiguous", (2, 32), True)])
def test_causal_rings_have_no_data_dependent_skips(layout, rates, conds):
  """Causal rings compute a block on every device at every step: zigzag
  rings, and contiguous ones (pairs of devices sharing the later chunk's
  queries, larger rings after swapping halves into the zigzag order).
  Only chunks of an odd kept length (here 128 / 4 / 32 = 1), which can't be
  halved, skip later chunks with ``cond`` (idle devices)."""
  kw = dict(segment_lengths=(64, 128), dilation_rates=rates, causal=True)
  q, k, v, cot, kpm, seg = _inputs()
  ring = _ring_in(4, layout, kw)
  grad = jax.grad(lambda q: jnp.sum(ring(q, k, v, kpm, seg) * cot))
  prims = {e.primitive.name for e in harness.eqns(jax.make_jaxpr(grad)(q).jaxpr)}
  assert "ppermute" in prims
  assert ("cond" in prims) == conds


@pytest.mark.parametrize("g,p", [(2, 2), (2, 4), (3, 3), (4, 4), (4, 8), (8, 8)])
def test_regroup_moves_contiguous_halves_into_the_zigzag_order_and_back(g, p):
  """Position c of each sub-ring of g devices holds half-chunks 2c, 2c + 1 of
  its segment; after the swap it holds c and 2g - 1 - c, and back again."""
  firsts, seconds = _schedule.regroup_permutations(g, p)
  for perm in (firsts, seconds):
    assert sorted(d for _, d in perm) == list(range(p))  # a permutation
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:p]), ("sp",))
  br = _plan.Branch(index=0, segment_length=0, rate=1, q_heads=(0, 1), kv_heads=(0,),
                    group=1, offsets=(0,), piece=4, ring_size=g, schedule="zigzag",
                    regroup=True)
  plan = _plan.Plan(rd.DilatedConfig((4,), (1,)), 4 * p, 1, 1, p, (br,))
  static = _ring.Static(plan, 1.0, 0.0, "sp")
  halves = np.arange(2 * p)[None, :, None].repeat(2, 2)  # [1, 2P, 2]: half-chunk ids
  x = jnp.asarray(halves.repeat(2, 1))  # [1, 4P, 2]: two tokens per half-chunk

  def swap(x, back):
    return jax.shard_map(lambda x: _ring._regroup(static, br, x, back), mesh=mesh,
                         in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))(x)

  there = np.asarray(swap(x, False))[0, ::2, 0].reshape(p // g, g, 2)
  for c in range(g):
    group = np.arange(p // g)[:, None] * 2 * g
    np.testing.assert_array_equal(there[:, c], group + [c, 2 * g - 1 - c])
  np.testing.assert_array_equal(swap(swap(x, False), True), x)


# ---------------------------------------------------------------------------
# Balance, counted from the static schedule.


def _balance(config, n, p, layout):
  """(worst per-step max/mean over devices, total of maxes / total of means)."""
  plan = _plan.make_plan(config.replace(layout=layout), n, 16, 16, p)
  return (*_schedule.balance(plan), plan, _schedule.step_work(plan))


BALANCE_CASES = [
    ("dense", rd.DilatedConfig((1 << 16,), (1,), causal=True), 1 << 16),
    ("longnet-16K", rd.DilatedConfig(**LONGNET, causal=True), 1 << 14),
    ("longnet-32K", rd.DilatedConfig(**LONGNET, causal=True), 1 << 15),
]


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("name,config,n", BALANCE_CASES, ids=[c[0] for c in BALANCE_CASES])
def test_causal_work_is_balanced_in_both_layouts(name, config, n, p):
  per_step, total, plan, work = _balance(config, n, p, "zigzag")
  assert any(br.ring_size > 1 for br in plan.branches)  # a real ring
  assert per_step <= 1.1 and total <= 1.1, (per_step, total)
  # Both layouts do the same work, the causal half of each segment's blocks.
  _, _, contiguous_plan, contiguous_work = _balance(config, n, p, "contiguous")
  for br, w, cw in zip(plan.branches, work, contiguous_work):
    want = n // br.segment_length * (br.segment_length // br.rate) ** 2 / 2
    assert w.sum() == cw.sum() == want
  # Contiguous chunks are balanced too (the pair's work is the zigzag ring's).
  assert _balance(config, n, p, "contiguous")[:2] == (per_step, total)
  if name == "dense":  # chunks that can't be halved: the last device works at every step
    odd = rd.DilatedConfig((n,), (n // p,), causal=True)  # one kept token per device
    assert _balance(odd, n, p, "contiguous")[:2] == (p, 2 - 1 / p)


def test_non_causal_rings_are_balanced_in_both_layouts():
  config = rd.DilatedConfig(**LONGNET)
  for layout in ("contiguous", "zigzag"):
    per_step, total, *_ = _balance(config, 1 << 14, 8, layout)
    assert per_step == total == 1.0


# ---------------------------------------------------------------------------
# Validation: layouts zigzag cannot schedule, before any tracing of the ring.


@pytest.mark.parametrize("p,n,w,r,match", [
    (4, 36, (36,), (1,),
     r"sequence length 36 must be divisible by 2 \* 4 devices for layout='zigzag'"),
    (2, 48, (8, 48), (1, 1),
     r"segment_lengths\[0\]=8 must divide the half-chunk length 12 "
     r"\(= 48 / \(2 \* 2 devices\)\) of layout='zigzag' or be a multiple of it"),
    (3, 24, (8, 24), (1, 1),
     r"segment_lengths\[0\]=8 spans 2 half-chunks .* segments of a divisor of 3"),
    (4, 64, (64,), (16,),
     r"the half-chunk length 8 .* must be divisible by dilation_rates\[0\]=16"),
], ids=["seq-len", "short-segment", "sub-ring-sizes", "rate"])
def test_zigzag_layout_it_cannot_schedule_raises(monkeypatch, p, n, w, r, match):
  kw = dict(segment_lengths=w, dilation_rates=r)
  calls = []
  monkeypatch.setattr(_ring, "attention", lambda *a: calls.append(a))
  x = jax.ShapeDtypeStruct((1, n, 2, 8), jnp.float32)

  def ring(layout):
    return jax.shard_map(
        lambda q, k, v: rd.dilated_attention(q, k, v, axis_name="sp", layout=layout, **kw),
        mesh=_mesh(p), in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))

  if n % p == 0 and n // p % max(r) == 0:  # valid contiguous: the error is zigzag's
    jax.eval_shape(ring("contiguous"), x, x, x)
    calls.clear()
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(ring("zigzag"), x, x, x)
  assert not calls


def test_unknown_layout_raises():
  q = jnp.ones((1, 16, 2, 8))
  with pytest.raises(ValueError, match=r"layout='striped' must be one of"):
    rd.dilated_attention(q, q, q, segment_lengths=(16,), dilation_rates=(1,),
                         layout="striped")


def test_docstring_examples_run():
  import doctest  # pylint: disable=g-import-not-at-top

  from ringdilated import _attention, _config, _layout, _schedule  # pylint: disable=g-import-not-at-top
  for module in (_layout, _attention, _config, _schedule):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0, module.__name__


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_dropout_on_a_ring_equals_dropout_on_one_device(layout):
  """Dropout masks hash global (head, query, key) positions: any ring, any
  layout, draws the single-device mask."""
  p = 4
  kw = dict(MIX, causal=True, dropout_rate=0.3)
  key = jax.random.key(0, impl="rbg")  # threefry compiles slowly on CPU
  q, k, v, cot, kpm, seg = _inputs()

  def single(q, k, v, kpm, seg):
    return rd.dilated_attention(q, k, v, key_padding_mask=kpm, segment_ids=seg,
                                dropout_rng=key, **kw)

  ring = jax.shard_map(
      lambda q, k, v, kpm, seg, key: rd.dilated_attention(
          q, k, v, key_padding_mask=kpm, segment_ids=seg, dropout_rng=key,
          axis_name="sp", layout=layout, **kw),
      mesh=_mesh(p), in_specs=(PS(None, "sp"),) * 5 + (PS(),), out_specs=PS(None, "sp"))

  def laid_out(*args):
    return rd.from_layout(ring(*(rd.to_layout(x, layout, p) for x in args), key), layout, p)

  want = _out_and_grads(single, q, k, v, cot, kpm, seg)
  got = _out_and_grads(laid_out, q, k, v, cot, kpm, seg)
  assert max(_max_errs(got, want)) < harness.RING_TOL, _max_errs(got, want)
  plain = _single_device("mix", True)
  assert max(_max_errs(want, plain)) > 0.1  # the dropout did something


def test_zigzag_ring_needs_no_more_memory_than_contiguous():
  """Compiled fwd+bwd temp memory per device, causal LongNet-like, P = 4."""
  n, p = 4096, 4
  kw = dict(segment_lengths=(256, 1024, 2048, 4096), dilation_rates=(2, 8, 16, 32),
            causal=True)
  x = jax.ShapeDtypeStruct((1, n, 2, 16), jnp.float32)
  temp = {}
  for layout in ("contiguous", "zigzag"):
    ring = jax.shard_map(
        lambda q, k, v: rd.dilated_attention(q, k, v, axis_name="sp", layout=layout, **kw),
        mesh=_mesh(p), in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))
    grad = jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v)), argnums=(0, 1, 2))
    temp[layout] = jax.jit(grad).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
  assert temp["zigzag"] <= 1.25 * temp["contiguous"], temp
