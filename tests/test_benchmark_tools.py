"""The GPU measuring tools' logic, on CPU.

``benchmarks/profile_kernels.py``: only the kernels on a device's streams
count (a device's "XLA Ops" line repeats their time, the host's lines are not
device time); a profile with no stream is an error, not zero time; masked
kernels line up with their unmasked twins.

``benchmarks/ab_kernels.py``: another version of a module loads beside it
(relative imports resolve), and two programs count as the same exactly when
they differ only in source locations.

``benchmarks/memory_report.py --ring``: per-device sizes of a ring.

``benchmarks/profile_mosaic.py``: a program's time splits into a fixed part
and a part per step, from the on-device profiler's ranges;
``benchmarks/kept_sweep.py`` fits the same from times at several lengths.

``benchmarks/mock_rings.py``: each ring size's cases once, most wanted
first; a record holds the compiled peak and bytes sent, or the error.

``benchmarks/mosaic_probe.py``: its ring-block cases build the blocks they
name (own or visiting chunks, per-kv-head documents) and compare like with
like.

``benchmarks/bench_competitors.py``: each implementation gets the same
documents in its own form, and its check against float32 attention fails
one that does not.

``benchmarks/bench.py``: records of earlier runs stay; the SM clock and
power-cap share sampled while a case runs come from what nvidia-smi printed,
its mean power from the energy counter.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import pathlib
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import ringdilated as rd

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _module(name: str = "profile_kernels"):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def _write_trace(root: pathlib.Path, events: list) -> None:
  run = root / "plugins" / "profile" / "run"
  run.mkdir(parents=True)
  with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)


def _meta(pid, name, tid=None):
  if tid is None:
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
  return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def _kernel(pid, tid, name, dur):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": 0.0, "dur": dur, "name": name}


def test_only_device_stream_kernels_count(tmp_path):
  pk = _module()
  _write_trace(tmp_path, [
      _meta(1, "/host:CPU"), _meta(1, "python", tid=10),
      _meta(2, "/device:GPU:0"), _meta(2, "Stream #13(Compute)", tid=20),
      _meta(2, "XLA Ops", tid=21), _meta(2, "Stream #14", tid=22),
      _kernel(1, 10, "PjitFunction(fwd_bwd)", 900.0),
      _kernel(2, 20, "ringdilated_mgpu_dkv_r1_t2048_m_mosaic_gpu_kernel", 30.0),
      _kernel(2, 21, "custom-call.3", 30.0),
      _kernel(2, 22, "loop_fusion", 2.5),
  ])
  got = pk.device_events(str(tmp_path))
  assert sorted(got) == [("loop_fusion", 2.5),
                         ("ringdilated_mgpu_dkv_r1_t2048_m_mosaic_gpu_kernel", 30.0)]


def test_a_profile_without_device_streams_is_an_error(tmp_path):
  pk = _module()
  _write_trace(tmp_path, [_meta(1, "/host:CPU"), _meta(1, "python", tid=10),
                          _kernel(1, 10, "PjitFunction(fwd_bwd)", 900.0)])
  with pytest.raises(RuntimeError, match="no kernels on a device stream"):
    pk.device_events(str(tmp_path))


def test_masked_kernels_group_with_their_unmasked_twins():
  pk = _module()
  group = pk._group  # pylint: disable=protected-access
  assert (group("ringdilated_mgpu_dq_r2_t2048_m_p_f_mosaic_gpu_kernel")
          == "ringdilated_mgpu_dq_r2_t2048_p_f_mosaic_gpu_kernel")
  assert (group("ringdilated_mgpu_fwd_r1_t2048_mosaic_gpu_kernel")
          == "ringdilated_mgpu_fwd_r1_t2048_mosaic_gpu_kernel")
  assert group("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") != group("loop_fusion")
  assert group("loop_fusion") == group("input_reduce_fusion_3")


def test_ab_tells_programs_apart_by_what_they_compute(tmp_path):
  ab = _module("ab_kernels")
  from ringdilated import _merge  # pylint: disable=import-outside-toplevel
  source = (ROOT / "ringdilated" / "_merge.py").read_text()
  (tmp_path / "same.py").write_text("\n\n" + source)  # other lines, same program
  assert "weight = jnp.exp(lse_b - new)" in source
  (tmp_path / "other.py").write_text(
      source.replace("weight = jnp.exp(lse_b - new)", "weight = jnp.exp(lse_b - new) * 0.5"))
  rows = jnp.zeros((4, 8), jnp.float32), jnp.zeros((4,), jnp.float32)

  def digest(module):
    return ab._digest(jax.jit(module.merge).lower(*rows, *rows))  # pylint: disable=protected-access

  same = ab.load_base(str(tmp_path / "same.py"), "ringdilated._merge")
  other = ab.load_base(str(tmp_path / "other.py"), "ringdilated._merge")
  assert same is not _merge and same.merge is not _merge.merge
  assert digest(same) == digest(_merge)
  assert digest(other) != digest(_merge)


def test_ring_memory_report_is_per_device_and_takes_the_varying_axes_choice():
  """``memory_report.py --ring``: sizes are a device's (its arguments are the
  local shards of q, k, v, dout), and ``--no-check-vma`` reaches the ring."""
  report = _module("memory_report")
  for check_vma in (True, False):
    label, mem, tensor = report.ring_memory("longnet_ring", 16384, 2, "zigzag", "xla",
                                            check_vma)
    assert tensor == 16384 // 2 * 16 * 128 * 2
    assert mem.argument_size_in_bytes == 4 * tensor
    assert f"check_vma={check_vma}" in label


def test_ring_profile_splits_each_gpu_into_busy_compute_and_idle():
  """``benchmarks/profile_ring.py``: per GPU, overlapping kernels count once
  as busy, NCCL's not as compute, and the gaps between kernels as idle."""
  pr = _module("profile_ring")
  assert pr.busy_us([(0.0, 10.0), (5.0, 10.0), (20.0, 5.0)]) == 20.0
  events = [("/device:GPU:0", "s1", "ringdilated_mgpu_fwd_r1_t2048_mosaic_gpu_kernel", 0.0, 600.0),
            ("/device:GPU:0", "s2", "ncclDevKernel_SendRecv", 100.0, 1000.0),
            ("/device:GPU:0", "s1", "input_reduce_fusion.1", 1500.0, 500.0),
            ("/device:GPU:1", "s1", "input_reduce_fusion", 0.0, 400.0)]
  got = pr.summarize(events, steps=1)
  gpu0 = got["/device:GPU:0"]
  assert gpu0["span_ms"] == 2.0 and gpu0["busy_ms"] == 1.6 and gpu0["idle_ms"] == 0.4
  assert gpu0["compute_ms"] == 1.1
  assert gpu0["groups_ms"] == {"ringdilated_mgpu_fwd_r1_t2048_mosaic_gpu_kernel": 0.6,
                               "nccl": 1.0, "xla input_reduce_fusion": 0.5}
  assert got["/device:GPU:1"]["groups_ms"] == {"xla input_reduce_fusion": 0.4}

  # The NCCL kernel runs 100-1100 us; the fused kernel covers 100-600 of it.
  line = pr.timeline(events)["/device:GPU:0"]
  assert [row[0] for row in line["kernels"]] == [0.0, 0.1, 1.5]
  (wait,) = line["nccl"]
  assert wait["alone_ms"] == 0.5 and wait["ms"] == 1.0
  assert wait["before"] is None and wait["after"] == "xla input_reduce_fusion"


def test_compiled_permute_bytes_count_loops_and_what_xla_merges():
  """``bench_multi_gpu.compiled_permute_bytes`` reads the compiled program: a
  permute in a scan of 3 counts 3 times, and two equal permutes, which XLA
  merges into one, count once (the traced census counts both)."""
  bmg = _module("bench_multi_gpu")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  perm = [(0, 1), (1, 0)]

  def f(a):
    c, _ = jax.lax.scan(lambda c, _: (jax.lax.ppermute(c, "x", perm) * 2, None), a, None,
                        length=3)
    return c + jax.lax.ppermute(a, "x", perm) * jax.lax.ppermute(a, "x", perm)

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=PS("x"), out_specs=PS("x")))
  x = jnp.ones(16, jnp.float32)  # 8 floats, 32 bytes, per device
  assert bmg.census_totals(bmg.ppermute_census(jax.make_jaxpr(fn)(x).jaxpr))[0] == 5 * 32
  assert bmg.compiled_permute_bytes(fn.lower(x).compile().as_text()) == 4 * 32


def test_multi_gpu_records_of_earlier_runs_stay(tmp_path):
  """``bench_multi_gpu.merge``: a case's record replaces that of the same
  run only; a skipped case is not recorded over a measured one."""
  bmg = _module("bench_multi_gpu")
  path = str(tmp_path / "r.json")
  bmg.merge(path, dict(name="a", run="1", fwd_bwd_ms=1.0))
  bmg.merge(path, dict(name="a", run="2", error="started"))
  bmg.merge(path, dict(name="a", run="2", fwd_bwd_ms=2.0))
  bmg.merge(path, dict(name="a", run="3", skipped="budget"), keep_measured=True)
  assert bmg.load(path) == [dict(name="a", run="1", fwd_bwd_ms=1.0),
                            dict(name="a", run="2", fwd_bwd_ms=2.0)]
  rec = bmg._stub(bmg.Case.parse("timing/dense/N1024/P2/zigzag/xla"), skipped="x")  # pylint: disable=protected-access
  assert rec["run"] == bmg.RUN and rec["kind"] == "timing"


def test_multi_gpu_cases_carry_the_varying_axes_choice():
  """``--no-check-vma`` travels in each case (planned or parsed from its
  name in a worker), not in module state; the name stays the identity."""
  bmg = _module("bench_multi_gpu")
  for vma in (True, False):
    cases = bmg.plan({"strong"}, [1, 2], ["xla"], ["zigzag"], vma=vma)
    assert cases and all(c.vma is vma and bmg.check_vma(c) is vma for c in cases)
    parsed = [bmg.Case.parse(c.name, vma) for c in cases]
    assert parsed == cases and "vma" not in cases[0].name


def test_multi_gpu_local_cases_are_the_ring_config_without_its_ring():
  """``--only local``: LongNet-ring without its last (spanning) branch, on
  one GPU and on P in the contiguous layout, where no branch spans devices."""
  bmg = _module("bench_multi_gpu")
  n = bmg.STRONG[1][1]
  ring, local = bmg.config("longnet_ring", n), bmg.config("longnet_local", n)
  assert local["segment_lengths"] == ring["segment_lengths"][:-1]
  assert local["dilation_rates"] == ring["dilation_rates"][:-1]
  cases = bmg.plan({"local"}, [1, 2], ["mosaic"], ["zigzag", "contiguous"])
  assert [c.name for c in cases] == [f"timing/longnet_local/N{n}/P{p}/contiguous/mosaic"
                                     for p in (1, 2)]
  assert "local" not in bmg.DEFAULT_GROUPS
  cfg = rd.DilatedConfig(local["segment_lengths"], local["dilation_rates"], "mix", True)
  assert rd.ring_balance(cfg, n, 2) == (1.0, 1.0)


def test_multi_gpu_docs_cases_mask_by_global_position(monkeypatch):
  """``--only docs``: dense causal over 8K-token documents, checked at 32K
  and timed at 128K in both layouts; each device's segment ids come from
  its tokens' global positions, so a ring of 2 (zigzag, the XLA blocks, on
  CPU) gives one device's result."""
  bmg = _module("bench_multi_gpu")
  assert "docs" not in bmg.DEFAULT_GROUPS and bmg.doc_length("dense") is None
  cases = bmg.plan({"docs"}, [1, 2], ["pallas", "mosaic"], ["zigzag", "contiguous"])
  names = [c.name for c in cases]
  assert names[:4] == [f"correctness/dense_docs/N32768/P2/{layout}/{backend}"
                       for backend in ("pallas", "mosaic") for layout in ("zigzag", "contiguous")]
  assert "timing/dense_docs/N131072/P2/zigzag/mosaic" in names
  # FLOPs of the visible pairs: 16 causal documents of 8K in 128K
  np.testing.assert_allclose(bmg.flops("dense_docs", 131072) / bmg.flops("dense", 131072),
                             8192 / 131072, rtol=1e-3)
  monkeypatch.setattr(bmg, "SCALE", 64)  # (as --smoke: documents of 128 tokens)
  n, doc = 1024, bmg.doc_length("dense_docs")
  case = bmg.Case("correctness", "dense_docs", n, 2, "zigzag", "xla")
  rng = np.random.default_rng(0)
  data = [rng.standard_normal((1, n, 2, 32)).astype(np.float32) for _ in range(4)]
  ring = bmg.ring_attention(case, jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",)))
  got = rd.from_layout(np.asarray(ring(*(rd.to_layout(x, "zigzag", 2) for x in data[:3]))),
                       "zigzag", 2)
  want = rd.dilated_attention(*data[:3], segment_lengths=(n,), dilation_rates=(1,),
                              causal=True, backend="xla",
                              segment_ids=jnp.arange(n)[None] // doc)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert doc < n  # (several documents, so the ids matter)


def test_mock_rings_plan_each_case_once_and_record_compiles_or_errors(monkeypatch):
  """``mock_rings.cases``: the Hopper kernels' LongNet-ring first, the weak
  case that equals the strong one (P=2) once; ``compile_case`` records the
  compiled peak and the bytes sent, and an error as a record, not a raise."""
  bmg = _module("bench_multi_gpu")
  mr = _module("mock_rings")
  m = bmg.M
  two = [c.name for c in mr.cases(2)]
  assert len(two) == len(set(two)) == 8
  assert two[:4] == [f"mock/longnet_ring/N{n}/P2/{lay}/mosaic"
                     for n in (2 * m, 8 * m) for lay in ("zigzag", "contiguous")]
  assert f"mock/longnet_ring/N{32 * m}/P8/contiguous/mosaic" in [c.name for c in mr.cases(8)]
  monkeypatch.setattr(bmg, "H", 2)
  monkeypatch.setattr(bmg, "D", 16)
  rec = mr.compile_case(bmg.Case("mock", "dense", 1024, 2, "zigzag", "xla"))
  assert "error" not in rec and rec["partitioner"] in ("shardy", "gspmd")
  chunk = 512 * 2 * 16 * 2  # one device's k (or v): [1, N / 2, H, D] bf16
  assert rec["qkv_out_grad_bytes_per_device"] == 7 * chunk
  assert rec["peak_bytes_per_device"] >= 7 * chunk
  assert rec["compiled_ppermute_bytes"] >= 2 * chunk  # k and v cross at least once
  bad = mr.compile_case(bmg.Case("mock", "dense", 1026, 2, "zigzag", "xla"))
  assert bad["error"].startswith("ValueError") and "peak_bytes_per_device" not in bad


def test_bench_records_of_earlier_runs_stay():
  """``bench.merge_record``: a case timed again replaces its record of the
  same run and its unmeasured ones, never another run's measurement (the
  one-run ratios of check_targets.py need both sides of older runs)."""
  bench = _module("bench")
  old = dict(name="a", seq_len=8, run="1", fwd_bwd_ms=1.0)
  other = dict(name="b", seq_len=8, run="1", fwd_bwd_ms=3.0)
  skipped = dict(name="a", seq_len=8, skipped="budget")
  records = bench.merge_record([old, other, skipped], dict(name="a", seq_len=8, run="2",
                                                           fwd_bwd_ms=2.0))
  assert records == [old, other, dict(name="a", seq_len=8, run="2", fwd_bwd_ms=2.0)]
  again = bench.merge_record(records, dict(name="a", seq_len=8, run="2", fwd_bwd_ms=2.5))
  assert again == [old, other, dict(name="a", seq_len=8, run="2", fwd_bwd_ms=2.5)]
  longer = bench.merge_record(again, dict(name="a", seq_len=16, run="2", fwd_bwd_ms=9.0))
  assert len(longer) == 4


def test_clock_medians_skip_what_nvidia_smi_could_not_measure():
  bench = _module("bench")
  lines = ["1980, 0x0000000000000000\n", "[N/A], 0x0000000000000004\n",
           "1755, 0x0000000000000004\n", "1830, [N/A]\n", "garbage\n",
           "1830, 0x0000000000000005\n"]
  assert bench.clock_medians(lines) == dict(sm_clock_mhz=1830.0, power_capped=2 / 3)
  assert bench.clock_medians(["[N/A], [N/A]\n"]) == {}


def test_sampled_clocks_record_the_samples_taken_while_the_block_runs(tmp_path, monkeypatch):
  """With a stand-in ``nvidia-smi`` on PATH (it prints two samples of the
  GPU it was asked for, then waits to be stopped) and a stand-in energy
  counter (700 mJ over the block) the record gets the clock's median, the
  share of samples under the power cap and the mean power, but no power
  from a block shorter than the counter's window; on CPU devices nothing is
  sampled."""
  bench = _module("bench")
  smi = tmp_path / "nvidia-smi"
  smi.write_text('#!/bin/sh\n[ "$2" = 3 ] || exit 1\necho "1500, 0x4"\necho "1700, 0x0"\n'
                 "exec sleep 30\n")
  smi.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
  counter = iter([5000.0, 5700.0])
  monkeypatch.setattr(bench, "nvml_energy", lambda index: (lambda: next(counter))
                      if index == 3 else None)
  gpu = types.SimpleNamespace(platform="gpu", id=3)
  rec = {}
  t0 = time.perf_counter()
  with bench.sampled_clocks(gpu, rec, power_window_s=0.5):
    time.sleep(1.0)  # (the stand-in prints at once)
  elapsed = time.perf_counter() - t0
  assert rec.pop("power_w") == pytest.approx(0.7 / elapsed, rel=0.1)
  assert rec == dict(sm_clock_mhz=1600.0, power_capped=0.5)
  counter = iter([5000.0, 5700.0])
  short = {}
  with bench.sampled_clocks(gpu, short, power_window_s=5.0):
    time.sleep(1.0)
  assert short == dict(sm_clock_mhz=1600.0, power_capped=0.5)
  cpu = {}
  with bench.sampled_clocks(jax.devices()[0], cpu):
    pass
  assert cpu == {}


def test_check_gpu_settings_are_explicit():
  """``check_gpu.Settings``: sizes and the varying-axes choice travel as one
  frozen value (no module state switched by the CLI)."""
  cg = _module("check_gpu")
  st = cg.SMOKE
  assert st.n == 16384 // st.scale
  assert st.config("two_branch") == dict(segment_lengths=(2048 // st.scale, st.n),
                                         dilation_rates=(1, 2))
  assert st.config("three_branch")["segment_lengths"][-1] == st.n
  assert cg.Settings().vma("xla") and not cg.Settings(check_vma=False).vma("xla")
  assert not cg.Settings().vma("pallas")  # interpret mode off a GPU
  with pytest.raises(dataclasses.FrozenInstanceError):
    st.scale = 1


def test_kernel_profile_splits_programs_into_fixed_cost_and_steps():
  """Programs of 1-4 steps of 2.0k cycles, 3.0k before the first step (2.0k
  of it waiting for the own rows) and 1.5k after the last (the memory
  warpgroup's trace carries no steps): program = 4.5k + 2.0k x steps."""
  summarize = _module("profile_mosaic").summarize
  events, tid = [], 0
  for program, n in enumerate((1, 2, 3, 4, 4, 1)):
    t0 = 100.0 * program
    for wg in range(2):
      tid += 1
      rng = [("fwd_begin", t0, t0 + 0.1), ("fwd_own", t0 + 0.5, t0 + 2.5)]
      rng += [("fwd_step", t0 + 3.0 + 2.0 * i, t0 + 5.0 + 2.0 * i) for i in range(n)]
      rng += [("fwd_end", t0 + 3.0 + 2.0 * n, t0 + 4.5 + 2.0 * n)]
      for name, b, e in rng:
        events += [dict(name=name, ph="B", ts=b, pid=1 + program % 2, tid=tid),
                   dict(name=name, ph="E", ts=e, pid=1 + program % 2, tid=tid)]
    tid += 1
    events += [dict(name="memory_begin", ph=ph, ts=t0 + dt, pid=1 + program % 2, tid=tid)
               for ph, dt in (("B", 0.0), ("E", 0.2))]
  rec = summarize(events)
  assert rec["kernel"] == "fwd" and rec["warpgroups"] == 12 and rec["sms"] == 2
  assert rec["fixed_kcycles"] == pytest.approx(4.5) and rec["per_step_kcycles"] == pytest.approx(2.0)
  assert rec["begin_kcycles"] == pytest.approx(3.0) and rec["end_kcycles"] == pytest.approx(1.5)
  assert rec["step_kcycles"] == pytest.approx(2.0)
  assert rec["scopes"]["fwd_own"] == dict(kcycles=pytest.approx(2.0), per_warpgroup=1.0)
  assert rec["scopes"]["fwd_step"] == dict(kcycles=pytest.approx(2.0), per_warpgroup=2.5)
  assert "memory_begin" not in rec["scopes"]  # compute warpgroups only
  assert summarize(events[-2:])["kernel"] is None  # no steps: nothing to fit


def test_kept_sweep_fit_gives_the_fixed_part_and_a_step_per_tile_and_sm():
  """Times built as 264 tiles per SM of 3 us fixed + 2 us a step (ms):
  the fit returns those, per tile and SM."""
  fit = _module("kept_sweep").fit
  steps = [2.5, 4.5, 8.5, 16.5]
  ms = [264 * (3.0 + 2.0 * s) / 1e3 for s in steps]
  assert fit(steps, ms, 264) == dict(fixed_us=pytest.approx(3.0), step_us=pytest.approx(2.0))


def test_mosaic_probe_ring_blocks_compare_like_with_like(monkeypatch):
  """Every ``block:`` case, shortened, with the Triton kernels (interpreted)
  on both sides: no error; a visiting block of documents leaves most of its
  queries without a key, an own (causal) block none."""
  probe = _module("mosaic_probe")
  interpreted = probe.pallas.Pallas
  triton = lambda mosaic=None: interpreted(interpret=True)  # noqa: E731
  monkeypatch.setattr(probe.mosaic, "Mosaic", triton)
  monkeypatch.setattr(probe.pallas, "Pallas", triton)
  monkeypatch.setattr(probe, "BLOCKS", {n: (512,) + c[1:] for n, c in probe.BLOCKS.items()})
  recs = {name: probe.block(name) for name in probe.BLOCKS}
  for name, rec in recs.items():
    assert rec["lse_inf_equal"] and not rec["nan"], name
    assert all(rec[x] == 0.0 for x in ("out", "lse", "dq", "dk", "dv")), (name, rec)
  total = 512 * 4  # (row, head) pairs of the 4-head cases
  assert recs["visiting_docs_unseen"]["rows_unseen"] > total // 2
  assert recs["diagonal_docs"]["rows_unseen"] == 0  # a causal diagonal: every query its own key


def test_packed_document_baselines_compute_what_ours_does(monkeypatch):
  """``bench.py``'s packed group: its three forms of the same documents
  (``segment_ids``, cuDNN's lengths and offsets, equal documents reshaped
  into the batch) compute one function, so their times compare like with
  like. On CPU the packed baseline is its XLA stand-in fed the offsets the
  cuDNN call gets; the lengths fill the sequence exactly and vary; the
  FLOPs are the visible pairs'. Fails if ids and offsets disagree by a token."""
  bench = _module("bench")
  monkeypatch.setattr(bench, "CUDNN", None)
  monkeypatch.setattr(bench, "SCALE", 32)  # varied lengths 4 to 1024, mean 128
  n, d, h = 1024, 16, 2
  monkeypatch.setattr(bench, "H", h)
  monkeypatch.setattr(bench, "D", d)
  varied = bench.doc_lengths(n, None)
  assert varied.sum() == n and varied.min() >= 1 and len(set(varied.tolist())) > 3
  q, k, v = (jax.random.normal(key, (1, n, h, d)) for key in jax.random.split(
      jax.random.key(0), 3))
  for doc in (128, None):
    (ids,) = bench._documents(doc)(n)
    seqlen, offsets = bench._packed_layout(doc)(n)
    np.testing.assert_array_equal(bench._packed_ids(jnp.asarray(offsets), n), ids)
    ours = bench.ours_docs(q, k, v, jnp.asarray(ids), segment_lengths=(n,),
                           dilation_rates=(1,), backend="xla")
    packed = bench.cudnn_packed(q, k, v, seqlen, jnp.asarray(offsets))
    np.testing.assert_allclose(packed, ours, atol=2e-5)
    ls = bench.doc_lengths(n, doc)
    assert bench.packed_flops(n, doc) == 4 * h * d * sum(x * (x + 1) / 2 for x in ls)
  per_doc = bench.cudnn_per_doc(q, k, v, doc=128)
  np.testing.assert_allclose(per_doc, bench.cudnn_packed(q, k, v, *bench._packed_layout(128)(n)),
                             atol=2e-5)


def test_competitors_check_catches_an_implementation_given_other_documents(monkeypatch):
  """``bench_competitors.py``: every implementation of a documents group
  gets the same documents in its own form (segment ids, cuDNN's offsets,
  tokamax's ``k_start``), so its check against float32 attention passes;
  with ``k_start`` of one document instead (no boundary) the check fails
  that one. The partition baseline on another kernel (``attend``) computes
  what the cuDNN one does. On CPU XLA stands in for cuDNN and tokamax."""
  bc = _module("bench_competitors")
  for name, value in (("CUDNN", None), ("SCALE", 128), ("H", 4), ("D", 16)):
    monkeypatch.setattr(bc.bench, name, value)
  device = jax.devices()[0]
  for group in ("docs8k", "docsvar"):
    errors = bc.check(group, device)
    assert set(errors) == {"cudnn_packed", "ours", "tokamax"}
    assert all(e < bc.TOLERANCE for e in errors.values()), errors
  monkeypatch.setattr(bc, "doc_starts", lambda n, doc: np.zeros((1, n), np.int32))
  errors = bc.check("docs8k", device)
  assert errors["tokamax"] > 10 * bc.TOLERANCE and errors["ours"] < bc.TOLERANCE, errors
  n, h, d = 512, 4, 16
  q, k, v = (jax.random.normal(key, (1, n, h, d)) for key in jax.random.split(
      jax.random.key(1), 3))
  cfg = dict(segment_lengths=(64, 128), dilation_rates=(1, 2))
  np.testing.assert_allclose(
      bc.bench.slice_cudnn_partition(q, k, v, attend=bc.tokamax_attend, **cfg),
      bc.bench.slice_cudnn_partition(q, k, v, **cfg), atol=1e-6)
