"""The Pallas backend: strided in-place kernels, run here in interpret mode.

On CPU ``backend="pallas"`` runs the same kernels through Pallas' interpreter
(``benchmarks/check_gpu.py pallas`` checks the Triton build on a GPU). These
tests compare it with the dense oracle of ``rd.reference``, check that the
kernels write only what their branch keeps (the in-place contract the fused
path relies on), that the fused path is the one taken, that ring steps can
use the kernels as blocks, and the fallbacks.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import re

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _harness import cuda_text, eqns, gpu_mesh, inputs, mesh, out_and_grads
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import ringdilated as rd
from ringdilated import _backends
from ringdilated._backends import pallas as _pallas
from ringdilated.reference import dilated_attention_reference

TOL = 2e-5


def _errs(got, want):
  return [float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want)]


@pytest.mark.parametrize("mode,causal,h,hkv,segs,rates", [
    ("mix", True, 4, 2, (32, 64, 128), (1, 2, 4)),      # GQA, three local branches
    ("mix", False, 4, 4, (64, 128), (2, 4)),            # offsets kv mod r, r > 1 only
    ("partition", True, 6, 2, (32, 128), (1, 4)),       # GQA groups of 3 per branch
    ("partition", False, 4, 2, (64, 64, 128), (1, 2, 4)),  # groups cut a GQA group
    ("mix", True, 2, 1, (24, 96), (1, 2)),              # 24, 48 kept: no 16-tile
])
def test_matches_dense_oracle(mode, causal, h, hkv, segs, rates):
  """Outputs and q/k/v gradients equal the dense masked softmax, float32.

  The last two cases also take the generic path (a partition group that cuts
  a GQA group; segments of kept lengths without a tile of 16) next to the
  fused one.
  """
  q, k, v, cot, _, _ = inputs(1, 384 if 24 in segs else 256, h, hkv, 16, masks=False)
  kw = dict(segment_lengths=segs, dilation_rates=rates, mode=mode, causal=causal)
  got = out_and_grads(lambda q, k, v, *_: rd.dilated_attention(
      q, k, v, backend="pallas", **kw), q, k, v, cot, None, None)
  want = out_and_grads(lambda q, k, v, *_: dilated_attention_reference(
      q, k, v, **kw), q, k, v, cot, None, None)
  assert max(_errs(got, want)) < TOL
  # negative control: the oracle of another pattern is far off
  other = out_and_grads(lambda q, k, v, *_: dilated_attention_reference(
      q, k, v, **{**kw, "causal": not causal}), q, k, v, cot, None, None)
  assert max(_errs(got, other)) > 1e-2


@st.composite
def _configs(draw):
  """Single-device configurations whose branches mostly take the fused path
  (kept lengths of 16 or more), some the generic one (kept lengths 8, GQA
  groups cut by partition mode)."""
  n = 256
  h = draw(st.sampled_from([4, 6, 2]))
  hkv = draw(st.sampled_from([d for d in (2, 1, 3, 6, 4) if h % d == 0]))
  mode = draw(st.sampled_from(["mix", "partition"]))
  k = draw(st.integers(1, min(3, h) if mode == "partition" else 3))
  segs, rates = [], []
  for _ in range(k):
    w = draw(st.sampled_from([64, 128, 256, 32]))
    segs.append(w)
    rates.append(draw(st.sampled_from([r for r in (1, 2, 4) if w % r == 0])))
  return dict(n=n, h=h, hkv=hkv, mode=mode, causal=draw(st.booleans()),
              segment_lengths=tuple(segs), dilation_rates=tuple(rates))


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(_configs())
def test_random_configs_match_dense_oracle(cfg):
  cfg = dict(cfg)
  n, h, hkv = cfg.pop("n"), cfg.pop("h"), cfg.pop("hkv")
  q, k, v, cot, _, _ = inputs(1, n, h, hkv, 16, masks=False, seed=n + h)
  got = out_and_grads(lambda q, k, v, *_: rd.dilated_attention(
      q, k, v, backend="pallas", **cfg), q, k, v, cot, None, None)
  want = out_and_grads(lambda q, k, v, *_: dilated_attention_reference(
      q, k, v, **cfg), q, k, v, cot, None, None)
  assert max(_errs(got, want)) < TOL, cfg


def _pallas_calls(fn, *args, in_place: bool = False) -> collections.Counter:
  """How often each kernel is called in the jaxpr of ``fn`` (nested too);
  with ``in_place``, keyed by (kernel, rate, whether it adds into its
  inputs) instead."""
  calls = collections.Counter()
  for eqn in eqns(jax.make_jaxpr(fn)(*args).jaxpr):
    if eqn.primitive.name == "pallas_call":  # ringdilated_<kernel>_r<rate>_t<kept>...
      kernel, rate = re.findall(r"ringdilated_([a-z]+)_r(\d+)", str(eqn.params))[0]
      key = f"ringdilated_{kernel}"
      if in_place:
        key = (kernel, int(rate), bool(eqn.params["input_output_aliases"]))
      calls[key] += 1
  return calls


def test_fused_path_reads_branches_in_place():
  """A mix of three local branches is three forward, three dq and three
  dk/dv kernels on the whole arrays: no compaction, no per-branch output."""
  q, k, v, cot, _, _ = inputs(1, 256, 4, 2, 16, masks=False)
  kw = dict(segment_lengths=(32, 64, 128), dilation_rates=(1, 2, 4), causal=True,
            backend="pallas")

  def fwd_bwd(q, k, v, cot):
    _, pull = jax.vjp(functools.partial(rd.dilated_attention, **kw), q, k, v)
    return pull(cot)
  calls = _pallas_calls(fwd_bwd, q, k, v, cot)
  assert calls == {"ringdilated_fwd": 3, "ringdilated_dq": 3, "ringdilated_dkv": 3}, calls


@pytest.mark.parametrize("rates", [(1, 2, 4), (2, 1, 4)])
def test_a_first_branch_keeping_everything_writes_fresh_buffers(rates):
  """Read first, a rate-1 branch writes the output and the gradients fresh
  (no zeros to add into: XLA folds the equal zeros of dk and dv into one
  buffer and copies it, a full-size tensor more); a branch after it, or a
  first one of rate > 1, adds in place."""
  q, k, v, cot, _, _ = inputs(1, 256, 4, 4, 16, masks=False)
  kw = dict(segment_lengths=tuple(32 * r for r in rates), dilation_rates=rates, causal=True,
            backend="pallas")

  def fwd_bwd(q, k, v, cot):
    _, pull = jax.vjp(functools.partial(rd.dilated_attention, **kw), q, k, v)
    return pull(cot)
  calls = _pallas_calls(fwd_bwd, q, k, v, cot, in_place=True)
  fresh = rates[0] == 1  # the plan keeps the given order
  want = collections.Counter({(kernel, r, not (fresh and i == 0)): 1
                              for kernel in ("fwd", "dq", "dkv")
                              for i, r in enumerate(rates)})
  assert calls == want


def _branch_case(seed: int, offset):
  """(rng, q, k, v, dout, branch of rate 2 on heads 2, 3 (kv head 1), Triton
  kernels interpreted, no masks) on 128 tokens, 4 heads, 2 kv heads."""
  b, n, h, hkv, d = 1, 128, 4, 2, 16
  rng = np.random.default_rng(seed)
  q, k, v, dout = (jnp.asarray(rng.standard_normal((b, n, x, d)), jnp.float32)
                   for x in (h, hkv, hkv, h))
  geo = _backends.StridedBranch(kept=32, rate=2, heads=(2, 4), group=2, offset=offset,
                                causal=True, scale=0.25)
  return (rng, q, k, v, dout, geo, _pallas.Pallas(interpret=True),
          _backends.Visibility(None, None, None, True))


@pytest.mark.parametrize("offset", [None, 1])
def test_kernels_touch_only_kept_positions(offset):
  """The forward merges into (out, lse) and the backward adds into the
  gradients at the branch's positions and heads only; the rest is bitwise
  unchanged (the fused path chains branches through these buffers)."""
  rng, q, k, v, dout, geo, run, no_masks = _branch_case(1, offset)
  (_, n, h, _), hkv, r = q.shape, k.shape[2], geo.rate
  out0 = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  lse0 = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
  out, lse = jax.jit(functools.partial(run.branch_forward, geo))(
      q, k, v, no_masks, None, out0, lse0)
  # kept: heads 2, 3 (kv head 1) at positions with p % 2 == offset(1)
  off = 1 % r if offset is None else offset
  kept = np.zeros((n, h), bool)
  kept[off::r, 2:4] = True
  np.testing.assert_array_equal(np.asarray(out)[0][~kept], np.asarray(out0)[0][~kept])
  np.testing.assert_array_equal(np.asarray(lse)[0][~kept], np.asarray(lse0)[0][~kept])
  assert np.all(np.asarray(lse)[0][kept] >= np.asarray(lse0)[0][kept])  # a merge adds mass

  grads0 = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (q, k, v))
  grads, _ = jax.jit(functools.partial(run.branch_backward, geo))(
      q, k, v, no_masks, None, dout, lse, out, grads0)
  kv_kept = np.zeros((n, hkv), bool)
  kv_kept[off::r, 1] = True
  for g, g0, m in zip(grads, grads0, (kept, kv_kept, kv_kept)):
    g, g0 = np.asarray(g)[0], np.asarray(g0)[0]
    np.testing.assert_array_equal(g[~m], g0[~m])
    assert np.max(np.abs(g[m] - g0[m])) > 1e-3


@pytest.mark.parametrize("offset", [None, 1])
def test_alone_branch_writes_every_row_of_its_heads(offset):
  """An ``alone`` branch's contract (the Hopper kernels are checked against
  this on the GPU by benchmarks/mosaic_probe.py's ``alone`` cases): over any
  accumulators, its heads hold its own result at the positions it keeps
  and (0, -inf) / 0 at the others; other heads are bitwise unchanged."""
  rng, q, k, v, dout, geo, run, no_masks = _branch_case(2, offset)
  (_, n, h, _), hkv, r = q.shape, k.shape[2], geo.rate
  alone = dataclasses.replace(geo, alone=True)
  out0 = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  lse0 = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
  out, lse = jax.jit(functools.partial(run.branch_forward, alone))(
      q, k, v, no_masks, None, out0, lse0)
  own, own_lse = jax.jit(functools.partial(run.branch_forward, geo))(
      q, k, v, no_masks, None, jnp.zeros_like(q), jnp.full(q.shape[:3], -jnp.inf))
  off = 1 % r if offset is None else offset
  kept = np.zeros((n, h), bool)
  kept[off::r, 2:4] = True
  mine = np.zeros((n, h), bool)
  mine[:, 2:4] = True
  out, lse, own, own_lse, out0, lse0 = (np.asarray(x)[0] for x in
                                        (out, lse, own, own_lse, out0, lse0))
  np.testing.assert_array_equal(out[~mine], out0[~mine])
  np.testing.assert_array_equal(lse[~mine], lse0[~mine])
  np.testing.assert_array_equal(out[kept], own[kept])
  np.testing.assert_array_equal(lse[kept], own_lse[kept])
  assert np.all(out[mine & ~kept] == 0) and np.all(lse[mine & ~kept] == -np.inf)

  grads0 = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (q, k, v))
  grads, _ = jax.jit(functools.partial(run.branch_backward, alone))(
      q, k, v, no_masks, None, dout, lse[None], out[None], grads0)
  own, _ = jax.jit(functools.partial(run.branch_backward, geo))(
      q, k, v, no_masks, None, dout, lse[None], out[None], tuple(map(jnp.zeros_like, grads0)))
  kv_mine = np.zeros((n, hkv), bool)
  kv_mine[:, 1] = True
  for g, g0, w, m in zip(grads, grads0, own, (mine, kv_mine, kv_mine)):
    g, g0, w = (np.asarray(x)[0] for x in (g, g0, w))
    np.testing.assert_array_equal(g[~m], g0[~m])
    np.testing.assert_array_equal(g[m], w[m])  # (0 at the positions it does not keep)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_uses_kernels_as_blocks(layout):
  """A ring of 2 with branches spanning both devices and local ones equals
  one device. Local branches and the spanning branches' own blocks are read
  in place (kernels that add into their inputs); the blocks between devices
  are kernels on compacted chunks. Contiguous: the 256 branch's causal pair
  (half the later chunk's queries visit the earlier device)."""
  q, k, v, cot, _, _ = inputs(1, 256, 4, 2, 16, masks=False)
  kw = dict(segment_lengths=(32, 128, 256), dilation_rates=(1, 2, 4), causal=True)
  want = out_and_grads(lambda q, k, v, *_: rd.dilated_attention(
      q, k, v, backend="xla", **kw), q, k, v, cot, None, None)

  def attend(q, k, v, cot):
    return out_and_grads(lambda q, k, v, *_: rd.dilated_attention(
        q, k, v, backend="pallas", axis_name="sp", layout=layout, **kw),
                         q, k, v, cot, None, None, compile=False)
  # Pallas' interpreter mistypes its grid loop under shard_map's varying-axes
  # check (jax 0.10); the Triton build runs with the check (check_gpu.py).
  spec = P(None, "sp")
  ring = jax.shard_map(attend, mesh=mesh(2), in_specs=spec, out_specs=spec, check_vma=False)
  args = [rd.to_layout(x, layout, 2) for x in (q, k, v, cot)]
  got = [rd.from_layout(x, layout, 2) for x in jax.jit(ring)(*args)]
  assert max(_errs(got, want)) < TOL
  calls = _pallas_calls(ring, *args, in_place=True)
  for kernel in ("fwd", "dq", "dkv"):
    assert calls[(kernel, 4, True)] == 1, calls  # the own blocks, in place
    # rate 1, fresh: the first branch (w = 32), and blocks between devices
    assert calls[(kernel, 1, False)] >= 2, calls


def test_bf16_close_to_float32():
  q, k, v, cot, _, _ = inputs(1, 256, 4, 2, 32, masks=False)
  kw = dict(segment_lengths=(64, 128), dilation_rates=(1, 2), causal=True)
  lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = out_and_grads(lambda q, k, v, *_: rd.dilated_attention(
      q, k, v, backend="pallas", **kw), *lo, cot.astype(jnp.bfloat16), None, None)
  want = out_and_grads(lambda q, k, v, *_: rd.dilated_attention(
      q, k, v, backend="xla", **kw), *(x.astype(jnp.float32) for x in lo), cot, None, None)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
    assert rel < 2e-2


def test_masks_and_dropout_run_in_the_kernels(caplog):
  """Padding, segment ids and dropout no longer send a call to the XLA block:
  the masked kernel variants run, and nothing falls back."""
  q, k, v, _, kpm, seg = inputs(1, 128, 4, 2, 16)
  kw = dict(segment_lengths=(32, 64), dilation_rates=(1, 2), causal=True,
            key_padding_mask=kpm, segment_ids=seg, dropout_rate=0.1,
            dropout_rng=jax.random.key(0), backend="pallas")
  with caplog.at_level(logging.WARNING, logger="ringdilated"):
    jaxpr = str(jax.make_jaxpr(functools.partial(rd.dilated_attention, **kw))(q, k, v))
  assert "unavailable" not in caplog.text
  assert "ringdilated_fwd_r1_t32_md" in jaxpr and "ringdilated_fwd_r2_t32_md" in jaxpr


def test_selection_off_gpu_is_interpret_mode(caplog):
  with caplog.at_level(logging.WARNING, logger="ringdilated"):
    got = _backends.select("pallas", _request())
  assert got == _pallas.Pallas(interpret=True) and got.interpret
  assert "interpret mode" in caplog.text
  assert _backends.select("auto", _request()) is _backends.REGISTRY["xla"]


def _request(dtype=jnp.float32, head_dim=64, masks=False, dropout=False):
  return _backends.Request(jax.default_backend(), jnp.dtype(dtype), head_dim, masks, dropout)


@pytest.mark.parametrize("args,needle", [
    ((jnp.float32, 24, False, False), "head dim 24"),
    ((jnp.float32, 512, False, False), "head dim 512"),
    ((jnp.int8, 64, False, False), "dtype int8"),
])
def test_unavailable_says_why(args, needle):
  backend = _backends.REGISTRY["pallas"]
  assert needle in _backends.problem(backend, _request(*args))
  assert _backends.problem(backend, _request(jnp.bfloat16, 128)) is None


def test_tiles():
  assert _pallas.tile(2048, 128) == 128
  assert _pallas.tile(48, 128) == 16
  assert _pallas.tile(96, 64) == 32
  assert _pallas.tile(24, 128) is None
  assert "24 kept tokens" in _backends.REGISTRY["pallas"].block_problem(24)


def test_detached_weights_take_the_generic_path_with_kernel_blocks():
  """``detach_weights`` needs each branch's own output: the branches run on
  the generic path, with the kernels as blocks, and equal the XLA backend."""
  q, k, v, cot, _, _ = inputs(1, 128, 4, 2, 16, masks=False)
  kw = dict(segment_lengths=(32, 64), dilation_rates=(1, 2), causal=True,
            detach_weights=True)
  run = lambda backend: out_and_grads(lambda q, k, v, *_: rd.dilated_attention(
      q, k, v, backend=backend, **kw), q, k, v, cot, None, None)
  assert max(_errs(run("pallas"), run("xla"))) < TOL


def test_linen_module_passes_the_backend():
  """``rd.MultiHeadDilatedAttention(backend="pallas")``: the kernels run in
  the module (its jaxpr calls them; head dim 64 / 4 = 16) and the result
  equals ``backend="xla"``."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 128, 64)), jnp.float32)
  kw = dict(num_heads=4, num_kv_heads=2, segment_lengths=(32, 64),
            dilation_rates=(1, 2), causal=True)
  params = jax.jit(rd.MultiHeadDilatedAttention(**kw).init)(jax.random.key(0), x)

  @functools.partial(jax.jit, static_argnums=0)  # one program per backend
  def out_and_grad(backend, params):
    def loss(params):
      out = rd.MultiHeadDilatedAttention(**kw, backend=backend).apply(params, x)
      return jnp.sum(out ** 2), out
    (_, out), grad = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grad

  (out, grad), (want, want_grad) = (out_and_grad(b, params) for b in ("pallas", "xla"))
  np.testing.assert_allclose(out, want, atol=TOL)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  calls = _pallas_calls(lambda x: rd.MultiHeadDilatedAttention(**kw, backend="pallas")
                        .apply(params, x), x)
  assert calls["ringdilated_fwd"] == 2


@pytest.mark.parametrize("backend,layout,docs", [("pallas", "contiguous", False),
                                                 ("pallas", "zigzag", False),
                                                 ("mosaic", "contiguous", False),
                                                 ("mosaic", "contiguous", True)])
def test_a_ring_beside_in_place_kernels_hands_shardy_no_empty_operand(monkeypatch, backend,
                                                                      layout, docs):
  """A zero-size constant among a ``shard_map``'s operands segfaults XLA's
  Shardy partitioner, jax's default (jax 0.11.2: ``jnp.zeros_like(x).at[:].set(x)``
  in a ``shard_map`` does; benchmarks/repro_pallas_ring_crash.py). Merging a
  spanning branch back over all heads made one (a scatter with an empty
  index), which crashed every GPU ring beside kernels read in place. Lowered
  for CUDA here, forward and backward: the kernels read the local branch in
  place, and nothing in the program has a zero-size dimension. With
  packed documents (segment ids) the Hopper kernels also run the ring's
  blocks, masked: every kernel is theirs."""
  from ringdilated._backends import mosaic  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_backends, "_platform_problem", lambda backend, request: None)
  monkeypatch.setattr(mosaic, "_hopper_problem", lambda: None)
  n, d = 1024, 128 if backend == "mosaic" else 16
  kw = dict(segment_lengths=(128, 1024), dilation_rates=(1, 2), causal=True)

  def attend(q, k, v, cot, seg):
    return out_and_grads(lambda q, k, v, *_: rd.dilated_attention(
        q, k, v, backend=backend, axis_name="sp", layout=layout,
        segment_ids=seg if docs else None, **kw), q, k, v, cot, None, None, compile=False)
  spec = P(None, "sp")
  # (the masked ring under jax's default check_vma=True, the others without)
  ring = jax.shard_map(attend, mesh=gpu_mesh(2), in_specs=(spec,) * 4 + (spec,),
                       out_specs=spec, check_vma=docs)
  x = jax.ShapeDtypeStruct((1, n, 4, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, n), jnp.int32)
  shardy = jax.config.jax_use_shardy_partitioner
  try:
    jax.config.update("jax_use_shardy_partitioner", True)
    text = cuda_text(ring, x, x, x, x, seg, devices=2)
  finally:
    jax.config.update("jax_use_shardy_partitioner", shardy)
  assert "sdy.manual_computation" in text
  kernels = re.findall(r"custom_call @(?:__gpu\$xla\.gpu\.triton|mosaic_gpu\w*)\([^\n]*", text)
  assert sum("output_operand_alias" in c for c in kernels) == 3  # fwd, dq, dk/dv in place
  if docs:  # blocks between devices (forward, dq, dk/dv) on the Hopper kernels too
    assert len(kernels) > 3 and all("@mosaic_gpu" in c for c in kernels)
  assert re.search(r"tensor<(\d+x)*0x", text) is None


@pytest.mark.parametrize("mode,segments,shards,alone,new,backend", [
    ("partition", ((32, 64), (1, 2)), 1, [True, True], True, "mosaic"),  # a head group each
    ("mix", ((32, 64), (1, 2)), 1, [False, False], True, "mosaic"),  # shared; rate 1 first
    ("mix", ((64, 128), (2, 4)), 1, [False, False], False, "mosaic"),
    ("mix", ((64,), (2,)), 1, [True], True, "mosaic"),  # one branch
    ("partition", ((32, 256), (1, 2)), 2, [True, False], False, "mosaic"),  # a ring branch
    # kernels that merge would write the heads twice (clear, then merge)
    ("partition", ((32, 64), (1, 2)), 1, [False, False], False, "pallas"),
    ("mix", ((32, 64), (1, 2)), 1, [False, False], True, "pallas"),
])
def test_alone_branches_write_their_heads(mode, segments, shards, alone, new, backend):
  """Under a backend whose kernels write whole heads, a branch read in place
  that shares no head with another (and is no ring) writes every row of its
  heads; where all do, or the first keeps every position of every head, the
  outputs start as the first branch's new ones instead of zeros."""
  from ringdilated import _plan, _ring  # pylint: disable=g-import-not-at-top
  from ringdilated._backends import mosaic  # pylint: disable=g-import-not-at-top
  plan = _plan.make_plan(rd.DilatedConfig(*segments, mode=mode), 256, 4, 2, shards)
  kernels = {"mosaic": mosaic.Mosaic, "pallas": _pallas.Pallas}[backend](interpret=True)
  static = _ring.Static(plan, 0.25, 0.0, "sp" if shards > 1 else None, kernels)
  generic, strided = _ring._split(static)
  assert [view.alone for _, view in strided] == alone
  assert _ring._starts_new(strided, generic, jnp.zeros((1, 256 // shards, 4, 8))) == new
