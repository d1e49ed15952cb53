"""The ring: sequence-parallel execution over simulated CPU devices.

Every comparison is ring (``axis_name="sp"`` under ``jax.shard_map`` or
``jax.pmap``) against the same call on one device (``axis_name=None``), for
outputs and for ``jax.grad`` of q, k and v. Structural tests read the
compiled HLO (only ``collective-permute``, of compacted chunks, inside
sub-rings) and the jaxpr (local branches communicate nothing, ring middle
steps are a ``scan`` that stacks nothing); the memory test reads the compiled
program's per-device temporary buffer size.

``tests/conftest.py`` provides 8 CPU devices. Compiles dominate the run time,
so one configuration serves every ring size: with ``N = 128`` the branches
of :data:`MIX` are, for ``P = 2, 4, 8`` (``L = N / P``), every kind the ring
distinguishes -- ``w < L``, ``w = L``, ``w = g L`` with ``1 < g < P``
(``P > 2``) and ``w = N`` -- so single-device results are computed once per
option set and shared.

Shape legend: B batch, N global sequence length, P ring size, L = N / P,
H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import functools
import re

import _harness as harness
import jax
import jax.extend.core
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
B, H, D = 2, 4, 8
# LongNet-like: segment lengths double, rates grow; valid for P = 2, 4, 8.
MIX = dict(segment_lengths=(8, 16, 32, 64, 128), dilation_rates=(1, 2, 2, 4, 4))
# "partition" needs a head per branch (H = 4): four branches, offsets 0..3.
PARTITION = dict(segment_lengths=(8, 32, 64, 128), dilation_rates=(1, 2, 4, 4))
CONFIG = {"mix": MIX, "partition": PARTITION}


@pytest.fixture(autouse=True)
def _exact_matmuls():
  # No TF32/bf16 passes on accelerators; a no-op on CPU.
  with jax.default_matmul_precision("highest"):
    yield


@functools.lru_cache(maxsize=None)
def _inputs(hkv=2, masks=True, seed=0):
  """q, k, v [B, N, ., D] float32, cotangent, key_padding_mask, segment_ids."""
  return harness.inputs(B, N, H, hkv, D, masks=masks, seed=seed)


def _local(axis_name, kw):
  return harness.attention(axis_name=axis_name, **kw)


def _shard_map(p, kw, check_vma=True):
  """Global [B, N, ...] -> [B, N, H, D] through a ring of ``p`` devices."""
  return harness.ring(_local("sp", kw), p, check_vma=check_vma)


def _pmap(p, kw):
  """Same as :func:`_shard_map` via ``jax.pmap`` over a leading shard axis."""
  ring = jax.pmap(_local("sp", kw), axis_name="sp", devices=jax.devices()[:p])

  def shard(x):  # [B, N, ...] -> [P, B, L, ...]
    if x is None:
      return None
    return jnp.swapaxes(x.reshape(x.shape[0], p, -1, *x.shape[2:]), 0, 1)

  def f(*args):
    out = ring(*map(shard, args))
    return jnp.swapaxes(out, 0, 1).reshape(out.shape[1], -1, *out.shape[3:])
  return f


@functools.lru_cache(maxsize=None)
def _single_device(mode, causal, hkv, masks):
  kw = dict(CONFIG[mode], mode=mode, causal=causal)
  return _out_and_grads(_local(None, kw), *_inputs(hkv, masks))


def _check_ring(p, mode, causal, hkv=2, masks=True, how="shard_map", check_vma=True):
  kw = dict(CONFIG[mode], mode=mode, causal=causal)
  fn = _shard_map(p, kw, check_vma) if how == "shard_map" else _pmap(p, kw)
  got = _out_and_grads(fn, *_inputs(hkv, masks))
  want = _single_device(mode, causal, hkv, masks)
  assert got[0].shape == want[0].shape == (B, N, H, D)
  # Not vacuous: every output and gradient has signal.
  assert all(float(jnp.max(jnp.abs(w))) > 0.1 for w in want)
  errs = _max_errs(got, want)
  assert max(errs) < harness.RING_TOL, harness.named(errs)


def test_config_covers_every_branch_kind():
  """The shared configuration has, per P, the branch kinds the tests claim."""
  for p in (2, 4, 8):
    plan = _plan.make_plan(rd.DilatedConfig(**MIX), N, H, 2, p)
    local = N // p
    widths = {br.segment_length for br in plan.branches}
    assert {local // 2, local, N} <= widths
    rings = {br.ring_size for br in plan.branches}
    assert rings == {g for g in (1, 2, 4, 8) if g <= p}


# Every value pair of (ring size, mode), (ring size, causality) and (mode,
# causality) at least once: 6 of the 12 combinations. Four of the six left out run
# below through the same ring code: (4, mix, causal) and (8, partition,
# full) under pmap, (8, mix, causal) without the vma check and without
# masks, (4, partition, full) without masks and with one kv head.
PAIRWISE = [(2, "mix", True), (2, "partition", False), (4, "mix", False),
            (4, "partition", True), (8, "mix", False), (8, "partition", True)]


@harness.ring_cases(PAIRWISE)
def test_shard_map_ring_matches_single_device(p, mode, causal):
  """GQA (H=4, K=2), key padding and packed segments, outputs and grads."""
  _check_ring(p, mode, causal)


@pytest.mark.parametrize("p,mode,causal,hkv", [
    (8, "mix", True, 4),          # no masks, no GQA
    (4, "partition", False, 1),   # multi-query; partition groups cut it
])
def test_shard_map_ring_without_masks(p, mode, causal, hkv):
  """The mask-free path, and kv-head layouts other than K = 2."""
  _check_ring(p, mode, causal, hkv=hkv, masks=False)


@pytest.mark.parametrize("p,mode,causal", [(4, "mix", True), (8, "partition", False)])
def test_pmap_ring_matches_single_device(p, mode, causal):
  _check_ring(p, mode, causal, how="pmap")


def test_shard_map_ring_without_vma_check():
  _check_ring(8, "mix", True, check_vma=False)


def test_negative_control_ring_without_rotation_fails(monkeypatch):
  """A ring whose ppermute does not move chunks is caught by the comparison."""
  monkeypatch.setattr(_ring.jax.lax, "ppermute", lambda x, axis_name, perm: x)
  kw = dict(MIX, causal=False)
  q, k, v, _, kpm, seg = _inputs()
  wrong = jax.jit(_shard_map(4, kw))(q, k, v, kpm, seg)
  want = _single_device("mix", False, 2, True)[0]
  assert float(jnp.max(jnp.abs(wrong - want))) > 1e-2


# ---------------------------------------------------------------------------
# Dropout inside the ring.


def test_dropout_in_ring_is_deterministic_and_differentiable():
  p = 4
  # local, sub-rings of 2 and a ring of 4 (fewer branches: threefry compiles slowly)
  kw = dict(segment_lengths=(16, 64, 128), dilation_rates=(1, 2, 4), causal=True)
  q, k, v, cot, *_ = _inputs(4, False)

  @functools.partial(jax.jit, static_argnums=5)
  def _run(q, k, v, cot, key, rate):
    ring = jax.shard_map(
        lambda q, k, v, key: rd.dilated_attention(
            q, k, v, dropout_rate=rate, dropout_rng=key, axis_name="sp", **kw),
        mesh=_mesh(p), in_specs=(PS(None, "sp"),) * 3 + (PS(),),
        out_specs=PS(None, "sp"))

    def loss(q):
      out = ring(q, k, v, key)
      return jnp.sum(out * cot), out
    return jax.value_and_grad(loss, has_aux=True)(q)

  def run(q, key, rate):
    return _run(q, k, v, cot, key, rate)

  key = jax.random.key(0)
  (_, a), g = run(q, key, 0.3)
  (_, b), g_b = run(q, key, 0.3)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(g), np.asarray(g_b))
  assert not np.allclose(np.asarray(a), np.asarray(run(q, jax.random.key(1), 0.3)[0][1]))
  assert not np.allclose(np.asarray(a), np.asarray(run(q, key, 0.0)[0][1]), atol=1e-3)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0
  # The backward regenerates each block's mask (a hash of the key, the head
  # and the global positions): it is the derivative of the dropped forward.
  direction = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  eps = 1e-3
  fd = (run(q + eps * direction, key, 0.3)[0][0]
        - run(q - eps * direction, key, 0.3)[0][0]) / (2 * eps)
  assert abs(float(jnp.sum(g * direction)) - float(fd)) < 2e-3 * max(1.0, abs(float(fd)))


# ---------------------------------------------------------------------------
# Structure of the compiled program and of the jaxpr.

_PERMUTE = re.compile(
    r"=\s*(\w+)\[([\d,]*)\][^=]*?\scollective-permute(?:-start)?\(.*?"
    r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def _collective_permutes(hlo: str):
  """[(dtype, shape, frozenset of (source, target))] of every collective-permute."""
  found = []
  for line in hlo.splitlines():
    m = _PERMUTE.search(line)
    if m:
      shape = tuple(int(x) for x in m.group(2).split(",") if x)
      pairs = frozenset(tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}", m.group(3)))
      found.append((m.group(1), shape, pairs))
  return found


def _sub_rings(p, g):
  return frozenset((d, d - d % g + (d % g + 1) % g) for d in range(p))


def test_hlo_has_only_collective_permutes_of_compacted_chunks():
  """fwd+bwd: K/V (+ masks, dK/dV) rotate as [B, L/r, K, .] chunks in the
  sub-ring of 4; its causal ring first swaps half-chunks [B, L/2r, K, .]
  (the query side [B, L/2r, K, G, .] too) into the zigzag order, and the
  results back. In the pairs (sub-rings of 2) the chunk [B, L/r, K, .] goes
  up (0 -> 1) and its dK/dV come down; half the query side [B, L/2r, K, G, .]
  goes down and its results come up."""
  p, hkv = 4, 2
  local = N // p
  # w < L (local), w = 2 L (rate 2, sub-rings of 2), w = N (rate 4, ring of 4).
  kw = dict(segment_lengths=(16, 64, 128), dilation_rates=(1, 2, 4), causal=True)
  ring = _shard_map(p, kw)
  q, k, v, cot, kpm, seg = _inputs()

  def f(q, k, v, kpm, seg):
    return jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v, kpm, seg) * cot),
                    argnums=(0, 1, 2))(q, k, v)

  hlo = jax.jit(f).lower(q, k, v, kpm, seg).compile().as_text()
  for op in ("all-gather", "all-to-all", "all-reduce", "reduce-scatter"):
    assert op not in hlo
  permutes = _collective_permutes(hlo)
  assert len(permutes) == len(re.findall(r"\scollective-permute(?:-start)?\(", hlo)) > 0
  rotation = (local // 4, _sub_rings(p, 4))
  swaps = set()
  for perm in _schedule.regroup_permutations(4, p):
    swaps |= {(local // 8, frozenset(perm)), (local // 8, frozenset((j, i) for i, j in perm))}
  up, down = map(frozenset, _schedule.pair_permutations(p))
  chunks, halves = {(local // 2, up), (local // 2, down)}, {(local // 4, up), (local // 4, down)}
  g_q = H // hkv
  for dtype, shape, pairs in permutes:
    assert dtype in ("f32", "pred", "s32")
    assert shape[0] == B and shape[2] == hkv and shape[3:] in ((), (D,), (g_q,), (g_q, D))
    assert (shape[1], pairs) in {rotation} | swaps | chunks | halves, (shape, pairs)
  seen = {(dtype, shape[1], len(shape), pairs) for dtype, shape, pairs in permutes}
  # K, V (f32 4-d), key padding (pred) and segment ids (s32) of both rings.
  for t, pairs in (rotation, (local // 2, up)):
    assert {("f32", t, 4, pairs), ("pred", t, 3, pairs), ("s32", t, 3, pairs)} <= seen
  # dK/dV come home in the pairs; queries (f32 5-d) swapped in the ring of 4,
  # half of them sent down in the pairs, their outputs and dQ up.
  assert ("f32", local // 2, 4, down) in seen
  assert {(t, pairs) for t, pairs in swaps} == {
      (t, pairs) for dtype, t, n, pairs in seen if n == 5 and (t, pairs) in swaps}
  assert {("f32", local // 4, 5, up), ("f32", local // 4, 5, down),
          ("s32", local // 4, 3, down)} <= seen


def _count_ppermutes(kw, p=4):
  q, k, v, _, kpm, seg = _inputs()
  jaxpr = jax.make_jaxpr(_shard_map(p, kw))(q, k, v, kpm, seg)
  return str(jaxpr).count("ppermute[")


def test_local_branches_communicate_nothing():
  """Forward jaxpr: branches with w <= L add no ppermute; ring branches do."""
  p = 4  # L = 32
  assert _count_ppermutes(dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4)), p) == 0
  ring_only = _count_ppermutes(dict(segment_lengths=(128,), dilation_rates=(4,)), p)
  assert ring_only > 0
  mixed = _count_ppermutes(dict(segment_lengths=(8, 16, 32, 128),
                                dilation_rates=(1, 2, 4, 4)), p)
  assert mixed == ring_only
  two_rings = _count_ppermutes(dict(segment_lengths=(8, 64, 128),
                                    dilation_rates=(1, 2, 4)), p)
  assert two_rings > ring_only


def test_ring_middle_steps_are_a_scan_that_saves_nothing_per_step():
  """grad jaxpr: the g - 2 middle steps of each ring are one scan with no
  stacked outputs, in the forward and in the backward (custom_vjp)."""
  p = 8
  kw = dict(MIX, causal=True)  # ring sizes g = 2, 4, 8
  ring = _shard_map(p, kw)
  q, k, v, cot, kpm, seg = _inputs()
  grad = jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v, kpm, seg) * cot),
                  argnums=(0, 1, 2))
  jaxpr = jax.make_jaxpr(grad)(q, k, v).jaxpr
  scans = [e for e in harness.eqns(jaxpr) if e.primitive.name == "scan"]
  # forward and backward of each ring branch: lengths g - 2 (none for g = 2)
  assert sorted(e.params["length"] for e in scans) == [2, 2, 6, 6]
  for e in scans:  # outputs are carry, then what is stacked (one more dim)
    body = e.params["jaxpr"].jaxpr.outvars
    assert [o.aval.shape for o in e.outvars] == [o.aval.shape for o in body], (
        "scan stacks per-step outputs")


# ---------------------------------------------------------------------------
# Per-device memory of the compiled program.

MEM_N, MEM_H, MEM_D = 4096, 2, 16
# LongNet: w / r = 128 kept tokens per segment in every branch, w up to N.
MEM_CONFIG = dict(segment_lengths=(256, 512, 1024, 2048, 4096),
                  dilation_rates=(2, 4, 8, 16, 32), causal=True)


def _grad_memory(p):
  ring = _shard_map(p, MEM_CONFIG)
  x = jax.ShapeDtypeStruct((1, MEM_N, MEM_H, MEM_D), jnp.float32)

  def f(q, k, v):
    return jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v, None, None)),
                    argnums=(0, 1, 2))(q, k, v)

  # (memory_analysis is the same at any LLVM optimization level.)
  return jax.jit(f).lower(x, x, x).compile().memory_analysis()


def test_per_device_memory_halves_when_ring_doubles():
  mems = {p: _grad_memory(p) for p in (2, 4, 8)}
  temp = {p: m.temp_size_in_bytes for p, m in mems.items()}
  for p, m in mems.items():
    # memory_analysis is per device: arguments are the local shards.
    assert m.argument_size_in_bytes == 3 * MEM_N // p * MEM_H * MEM_D * 4
  for p in (2, 4):
    assert 1.6 < temp[p] / temp[2 * p] < 2.6, temp
  # Far below dense attention's [H, N, N] float32 scores: even the sum over
  # the devices of the ring is a small fraction of one such tensor.
  scores = MEM_N * MEM_N * MEM_H * 4
  for p in (2, 4, 8):
    assert p * temp[p] < scores / 4, (temp, scores)


# ---------------------------------------------------------------------------
# Validation: errors name the value, before the ring is traced.


def _raises_before_ring(monkeypatch, p, n, match, **kw):
  calls = []
  monkeypatch.setattr(_ring, "attention", lambda *a: calls.append(a))
  q = jax.ShapeDtypeStruct((1, n, 4, 8), jnp.float32)
  k = jax.ShapeDtypeStruct((1, n, 2, 8), jnp.float32)
  ring = jax.shard_map(lambda q, k, v: rd.dilated_attention(q, k, v, **kw),
                       mesh=_mesh(p), in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(ring, q, k, k)
  assert not calls


@pytest.mark.parametrize("p,n,w,r,match", [
    (8, 128, (16, 128), (1, 32),
     r"local sequence length 16 \(= 128 / 8 devices\) must be divisible by "
     r"dilation_rates\[1\]=32"),
    (8, 96, (8, 96), (1, 1),
     r"segment_lengths\[0\]=8 must divide the local sequence length 12 "
     r"\(= 96 / 8 devices\) or be a multiple of it"),
    (8, 96, (12, 32), (1, 1),
     r"segment_lengths\[1\]=32 must be a multiple of the local sequence length 12 "
     r"spanning a divisor of the 8 devices"),
], ids=["rate", "short-segment", "long-segment"])
def test_layout_the_ring_cannot_run_raises(monkeypatch, p, n, w, r, match):
  kw = dict(segment_lengths=w, dilation_rates=r)
  # Valid on one device: the error is about the ring layout.
  x = jax.ShapeDtypeStruct((1, n, 4, 8), jnp.float32)
  y = jax.ShapeDtypeStruct((1, n, 2, 8), jnp.float32)
  jax.eval_shape(functools.partial(rd.dilated_attention, **kw), x, y, y)
  _raises_before_ring(monkeypatch, p, n, match, axis_name="sp", **kw)


def test_unbound_axis_name_raises(monkeypatch):
  kw = dict(segment_lengths=(16, 128), dilation_rates=(1, 4))
  q, k, v, *_ = _inputs()
  with pytest.raises(ValueError, match="axis_name='sp' is not bound"):
    rd.dilated_attention(q, k, v, axis_name="sp", **kw)
  # Inside shard_map, but over another axis name.
  _raises_before_ring(monkeypatch, 4, N, "axis_name='tp' is not bound",
                      axis_name="tp", **kw)
