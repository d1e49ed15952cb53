"""benchmarks/check_targets.py: the gate on the recorded GPU results.

A complete synthetic H200 run (every record the targets read, each meeting
its target) must pass, and the check must fail when any target it checks is
missed or cannot be evaluated: the 1M LongNet targets (on
``backend="pallas"``, against the strongest strided-slice baseline), the
Hopper-kernel targets of issue 17, the masked targets of issue 15, and the
multi-GPU targets of a ``bench_multi_gpu.py`` file; ratios only compare
records of one run. The committed results are read without error
(the H100 file is history: it predates the slice baselines and fails).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
M = 1 << 20


def _check_targets():
  spec = importlib.util.spec_from_file_location(
      "check_targets", ROOT / "benchmarks" / "check_targets.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(records, tmp_path) -> int:
  path = tmp_path / "results.json"
  path.write_text(json.dumps(records))
  return _check_targets().main(["check_targets.py", str(path)])


def _rec(name, n, ms, peak=1.10):
  """A bench.py record: ``ms`` fwd+bwd, peak ``peak`` x the bytes of q,k,v,out,dq,dk,dv."""
  qkv = 7 * n * 16 * 128 * 2
  return dict(name=name, seq_len=n, fwd_bwd_ms=ms, peak_bytes=int(peak * qkv),
              qkv_out_grad_bytes=qkv, device="NVIDIA H200")


@pytest.fixture(name="records")
def _records():
  """A synthetic one-GPU H200 run that meets every target."""
  recs = [
      _rec("cudnn_dense", 32768, 28.0, 1.43), _rec("ours_dense", 32768, 28.5, 1.43),
      _rec("ours_dense_ring1", 32768, 28.4, 1.43),
      _rec("ours_dense_ring1_zigzag", 32768, 28.5, 1.43),
      _rec("ringattention_pkg", 32768, 518.0, 3.3),
      _rec("gather_cudnn_longnet_mix", M, 474.0, 2.0),
      _rec("gather_cudnn_longnet_partition", M, 149.0, 1.5),
  ]
  for mode, base, ours, default in (("mix", 200.0, 190.0, 170.0),
                                    ("partition", 50.0, 48.0, 38.0)):
    recs += [_rec(f"slice_cudnn_longnet_{mode}", M, base, 1.6),
             _rec(f"ours_pallas_longnet_{mode}", M, ours, 1.147),
             _rec(f"ours_pallas_longnet_{mode}", M // 2, ours / 2, 1.147),
             _rec(f"ours_longnet_{mode}", M, default, 1.147),
             _rec(f"ours_cudnn_longnet_{mode}", M, default / 0.85, 1.8)]
  recs.append(_rec("ours_mosaic_dense", 32768, 27.5, 1.0))
  # run with --isolate, bench.py also records the runtime peak (memory_stats())
  _find(recs, "ours_longnet_mix", M)["runtime_peak_bytes"] = int(1.149 * 7 * M * 16 * 128 * 2)
  recs.append(_rec("slice_cudnn_set_longnet_partition", M, 52.0, 1.6))
  recs += [_rec("ours_docs64k_longnet_mix", M, 180.0, 1.15),
           _rec("ours_pad10_longnet_mix", M, 175.0, 1.15),
           _rec("ours_dropout_longnet_mix", M, 220.0, 1.15),
           _rec("ours_docs8k_longnet_mix", M, 120.0, 1.15),
           _rec("ours_xla_docs64k_longnet_mix", M, 2500.0, 3.0)]
  return recs


def _find(records, name, n):
  return next(r for r in records if (r["name"], r["seq_len"]) == (name, n))


def test_complete_results_pass(records, tmp_path, capsys):
  assert _run(records, tmp_path) == 0
  out = capsys.readouterr().out
  assert "0 target(s) missed" in out
  assert "PASS  LongNet partition 1M throughput (pallas) vs slice+cuDNN >= 1.0x: 1.042" in out
  assert "PASS  Hopper kernels: LongNet partition 1M throughput vs slice+cuDNN >= 1.3x" in out


@pytest.mark.parametrize("name", ["h100.json", "h200.json"])
def test_committed_results_are_read(name, tmp_path, capsys):
  with open(RESULTS / name) as f:
    records = json.load(f)
  assert _run(records, tmp_path) in (0, 1)
  out = capsys.readouterr().out
  assert "target(s) missed" in out
  if name == "h100.json":  # history: measured before the slice baselines existed
    assert "FAIL  LongNet partition 1M throughput (pallas) vs slice+cuDNN >= 1.0x: missing" in out


def test_peak_over_limit_fails(records, tmp_path, capsys):
  bad = copy.deepcopy(records)
  r = _find(bad, "ours_pallas_longnet_partition", M)
  r["peak_bytes"] = int(1.2 * r["qkv_out_grad_bytes"])
  assert _run(bad, tmp_path) == 1
  assert "FAIL  LongNet partition 1M peak (pallas)" in capsys.readouterr().out


def test_missing_case_fails(records, tmp_path, capsys):
  bad = [r for r in records if r["name"] != "ours_pallas_longnet_mix"]
  assert _run(bad, tmp_path) == 1
  out = capsys.readouterr().out
  assert "FAIL  LongNet mix 1M peak (pallas)" in out and "missing" in out


def test_gather_baseline_is_history_not_a_target(records, tmp_path):
  assert _run([r for r in records if not r["name"].startswith("gather")], tmp_path) == 0
  # ... but a slice baseline is needed.
  no_slice = [r for r in records if r["name"] != "slice_cudnn_longnet_mix"]
  assert _run(no_slice, tmp_path) == 1


def test_out_of_memory_baseline_passes_only_when_ours_ran(records, tmp_path, capsys):
  oom = [r for r in records if (r["name"], r["seq_len"]) != ("slice_cudnn_longnet_mix", M)]
  oom.append(dict(name="slice_cudnn_longnet_mix", seq_len=M,
                  error="JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying "
                  "to allocate 45.0GiB"))
  assert _run(oom, tmp_path) == 0
  assert "[baseline out of memory: slice_cudnn_longnet_mix" in capsys.readouterr().out
  # Without our own record there is nothing to compare: the target fails.
  no_ours = [r for r in oom if (r["name"], r["seq_len"]) != ("ours_pallas_longnet_mix", M)]
  assert _run(no_ours, tmp_path) == 1
  # A baseline that failed for another reason is not an excuse either.
  other = copy.deepcopy(oom)
  _find(other, "slice_cudnn_longnet_mix", M)["error"] = "ValueError: bad"
  assert _run(other, tmp_path) == 1


def test_slower_than_baseline_fails(records, tmp_path, capsys):
  bad = copy.deepcopy(records)
  _find(bad, "ours_pallas_longnet_partition", M)["fwd_bwd_ms"] = 51.0  # slice set: 52, pad: 50
  assert _run(bad, tmp_path) == 1
  assert "FAIL  LongNet partition 1M throughput (pallas)" in capsys.readouterr().out


def test_strongest_baseline_is_the_reference(records, tmp_path, capsys):
  bad = copy.deepcopy(records)
  _find(bad, "slice_cudnn_set_longnet_partition", M)["fwd_bwd_ms"] = 45.0  # ours: 48
  assert _run(bad, tmp_path) == 1
  assert "FAIL  LongNet partition 1M throughput (pallas) vs slice+cuDNN >= 1.0x: 0.938" in \
      capsys.readouterr().out


@pytest.mark.parametrize("name,key,value,line", [
    ("ours_docs64k_longnet_mix", "fwd_bwd_ms", 1.2 * 170,
     "FAIL  masked: LongNet mix 1M segment_ids (64K-token documents) fwd+bwd <= 1.15x"),
    ("ours_pad10_longnet_mix", "fwd_bwd_ms", 1.2 * 170,
     "FAIL  masked: LongNet mix 1M key padding (last 10%) fwd+bwd <= 1.15x"),
    ("ours_docs64k_longnet_mix", "peak", 1.25,
     "FAIL  masked: LongNet mix 1M segment_ids (64K-token documents) peak <= 1.2x"),
    ("ours_pad10_longnet_mix", "peak", 1.25,
     "FAIL  masked: LongNet mix 1M key padding (last 10%) peak <= 1.2x"),
    ("ours_dropout_longnet_mix", "fwd_bwd_ms", 1.4 * 170,
     "FAIL  masked: LongNet mix 1M dropout 0.1 fwd+bwd <= 1.35x"),
    ("ours_docs8k_longnet_mix", "fwd_bwd_ms", 171.0,
     "FAIL  masked: LongNet mix 1M 8K-token documents faster than unmasked"),
])
def test_masked_target_missed_fails(records, tmp_path, capsys, name, key, value, line):
  _assert_missed(records, tmp_path, capsys, name, M, key, value, line)


def _assert_missed(records, tmp_path, capsys, name, n, key, value, line):
  """Setting ``key`` (or the peak ratio) of one record fails the check at ``line``."""
  bad = copy.deepcopy(records)
  r = _find(bad, name, n)
  if key == "peak":
    r["peak_bytes"] = int(value * r["qkv_out_grad_bytes"])
  else:
    r[key] = value
  assert _run(bad, tmp_path) == 1
  assert line in capsys.readouterr().out


@pytest.mark.parametrize("name,n,key,value,line", [
    ("ours_mosaic_dense", 32768, "fwd_bwd_ms", 29.0,
     "FAIL  Hopper kernels: dense causal 32K fwd+bwd throughput vs cuDNN >= 1.0x"),
    ("ours_longnet_mix", M, "fwd_bwd_ms", 185.0,
     "FAIL  Hopper kernels: LongNet mix 1M fwd+bwd time <= 0.9x the cuDNN path"),
    ("ours_longnet_mix", M, "peak", 1.2,
     "FAIL  Hopper kernels: LongNet mix 1M peak <= 1.15x"),
    ("ours_longnet_partition", M, "fwd_bwd_ms", 40.0,
     "FAIL  Hopper kernels: LongNet partition 1M throughput vs slice+cuDNN >= 1.3x"),
])
def test_hopper_target_missed_fails(records, tmp_path, capsys, name, n, key, value, line):
  _assert_missed(records, tmp_path, capsys, name, n, key, value, line)


def test_ratios_compare_records_of_one_run(records, tmp_path, capsys):
  """A newer run that timed only ours is not divided by an older baseline:
  the ratio comes from the newest run that timed both."""
  newer = copy.deepcopy(records) + [dict(_rec("ours_longnet_partition", M, 20.0), run="later")]
  assert _run(newer, tmp_path) == 0
  assert "Hopper kernels: LongNet partition 1M throughput vs slice+cuDNN >= 1.3x: 1.316" in \
      capsys.readouterr().out
  newer.append(dict(_rec("slice_cudnn_longnet_partition", M, 30.0), run="later"))
  assert _run(newer, tmp_path) == 0
  assert ">= 1.3x: 1.500" in capsys.readouterr().out


def test_one_gpu_targets_leave_out_runs_under_xla_flags(records, tmp_path, capsys):
  """A run under XLA_FLAGS never counts for a target, however fast."""
  flagged = [dict(_rec(name, M, ms), run="flagged", xla_flags="--xla_some_flag=true")
             for name, ms in (("ours_longnet_partition", 1.0),
                              ("slice_cudnn_longnet_partition", 30.0))]
  assert _run(copy.deepcopy(records) + flagged, tmp_path) == 0
  assert "Hopper kernels: LongNet partition 1M throughput vs slice+cuDNN >= 1.3x: 1.316" in \
      capsys.readouterr().out


def test_runtime_peak_comes_from_the_newest_record_that_has_one(records, tmp_path, capsys):
  """Runs without --isolate record no runtime peak: the target reads the
  newest isolated one, and fails when it is over 1.15x (or there is none)."""
  later = copy.deepcopy(records) + [dict(_rec("ours_longnet_mix", M, 170.0), run="later")]
  assert _run(later, tmp_path) == 0
  assert "runtime peak (bench.py --isolate) <= 1.15x bytes of q,k,v,out,dq,dk,dv: 1.149" in \
      capsys.readouterr().out
  next(r for r in later if "runtime_peak_bytes" in r)["runtime_peak_bytes"] = int(
      1.16 * 7 * M * 16 * 128 * 2)
  assert _run(later, tmp_path) == 1
  assert "FAIL  Hopper kernels: LongNet mix 1M runtime peak" in capsys.readouterr().out
  none = [r for r in records if "runtime_peak_bytes" not in r]
  assert _run(none, tmp_path) == 1
  assert "FAIL  Hopper kernels: LongNet mix 1M runtime peak (bench.py --isolate) <= 1.15x " \
      "bytes of q,k,v,out,dq,dk,dv: missing" in capsys.readouterr().out


def test_portable_block_must_run(records, tmp_path, capsys):
  bad = [r for r in records if r["name"] != "ours_xla_docs64k_longnet_mix"]
  bad.append(dict(name="ours_xla_docs64k_longnet_mix", seq_len=M,
                  error="JaxRuntimeError: RESOURCE_EXHAUSTED: out of memory"))
  assert _run(bad, tmp_path) == 1
  assert "FAIL  masked: portable block (backend='xla')" in capsys.readouterr().out


def test_skipped_cases_are_reported_not_measured(records, tmp_path, capsys):
  bad = [r for r in records if r["name"] != "ours_dropout_longnet_mix"]
  bad.append(dict(name="ours_dropout_longnet_mix", seq_len=M, skipped="time budget"))
  assert _run(bad, tmp_path) == 1
  out = capsys.readouterr().out
  assert "info  ours_dropout_longnet_mix N=1048576 not run: time budget" in out
  assert "FAIL  masked: LongNet mix 1M dropout 0.1 fwd+bwd <= 1.35x unmasked: missing" in out


def test_packed_documents_are_context_from_one_run(records, tmp_path, capsys):
  """``bench.py --only packed``: throughput and peak ratios against cuDNN's
  packed layout from one run, its out-of-memory failure with ours' time;
  context lines, never a failure."""
  n, big = 262144, 524288
  records += [_rec("ours_docs8k_dense", n, 64.0, 1.0),
              _rec("cudnn_packed_docs8k_dense", n, 72.0, 10.0),
              dict(_rec("cudnn_packed_docs8k_dense", n, 1.0, 1.0), run="old"),
              _rec("ours_docsvar_dense", big, 230.0, 1.0),
              dict(name="cudnn_packed_docsvar_dense", seq_len=big,
                   error="JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory")]
  assert _run(records, tmp_path) == 0
  out = capsys.readouterr().out
  assert ("info  packed: dense 256K 8K-token documents vs cuDNN packed layout fwd+bwd "
          "throughput: 1.125") in out
  assert "info  packed: dense 256K 8K-token documents peak vs cuDNN packed layout: 0.100" in out
  assert ("info  packed: dense 512K varied documents: cuDNN packed layout failed "
          "[cudnn_packed_docsvar_dense: RESOURCE_EXHAUSTED: Out of memory]; ours ms: 230.000"
          ) in out
  assert "cuDNN per document" not in out


# ----------------------------------------------------------------------------
# Multi-GPU results (bench_multi_gpu.py).
# ----------------------------------------------------------------------------


def _timing(workload, n, p, layout, backend, ms, flops):
  return dict(suite="multi_gpu", kind="timing", name=f"{workload}_{layout}_{backend}_P{p}",
              workload=workload, seq_len=n, devices=p, layout=layout, backend=backend,
              fwd_bwd_ms=ms, flops=flops, device_kind="NVIDIA H200")


def _flops(workload, n):
  return n * n / 2 if workload == "dense" else 4000.0 * n


@pytest.fixture(name="multi")
def _multi():
  """A synthetic 2-GPU run that meets every multi-GPU target."""
  recs = []
  for workload, n1 in (("dense", 65536), ("longnet_ring", M)):
    for n in (n1, 2 * n1):
      for backend in ("auto", "pallas"):
        t1 = (1.0 if backend == "auto" else 1.3) * _flops(workload, n) / 1e6
        recs.append(_timing(workload, n, 1, "contiguous", backend, t1, _flops(workload, n)))
        if n == 2 * n1:
          recs.append(_timing(workload, n, 2, "zigzag", backend, t1 / 2 / 0.99,
                              _flops(workload, n)))
          recs.append(_timing(workload, n, 2, "contiguous", backend, t1 / 2 / 0.7,
                              _flops(workload, n)))
  recs.append(_timing("longnet_ring", 8 * M, 2, "zigzag", "pallas", 900.0,
                      _flops("longnet_ring", 8 * M)))
  for backend in ("auto", "pallas"):
    for layout in ("contiguous", "zigzag"):
      recs.append(dict(suite="multi_gpu", kind="correctness", name="check", workload="dense",
                       seq_len=32768, devices=2, layout=layout, backend=backend,
                       max_rel_err=4e-3))
  return recs


def test_multi_gpu_results_pass(multi, tmp_path, capsys):
  assert _run(multi, tmp_path) == 0
  out = capsys.readouterr().out
  assert "0 target(s) missed" in out
  assert "PASS  strong scaling P=2 dense causal 128K, best layout and backend" in out
  assert "info  strong scaling P=2 dense causal 128K, auto contiguous: 0.700" in out


def test_multi_gpu_poor_scaling_fails(multi, tmp_path, capsys):
  bad = [r for r in multi if not (r["kind"] == "timing" and r["devices"] == 2
                                  and r["layout"] == "zigzag" and r["seq_len"] == 2 * M)]
  assert _run(bad, tmp_path) == 1
  out = capsys.readouterr().out
  assert "FAIL  strong scaling P=2 LongNet-ring 2M" in out
  assert "FAIL  weak scaling P=2 LongNet-ring, 1M tokens per GPU" in out


def test_multi_gpu_pallas_ring_must_match(multi, tmp_path, capsys):
  bad = copy.deepcopy(multi)
  next(r for r in bad if r["kind"] == "correctness" and r["backend"] == "pallas")[
      "max_rel_err"] = 0.05
  assert _run(bad, tmp_path) == 1
  assert "FAIL  Pallas ring of 2 GPUs equals one GPU" in capsys.readouterr().out
  crashed = [r for r in multi if r["kind"] != "correctness" or r["backend"] != "pallas"]
  crashed.append(dict(suite="multi_gpu", kind="correctness", name="check", seq_len=32768,
                      devices=2, layout="zigzag", backend="pallas", error="XlaRuntimeError"))
  assert _run(crashed, tmp_path) == 1


def test_multi_gpu_8m_must_run(multi, tmp_path, capsys):
  bad = [r for r in multi if r["seq_len"] != 8 * M]
  assert _run(bad, tmp_path) == 1
  assert "FAIL  8M tokens fwd+bwd on 2 GPUs ran" in capsys.readouterr().out


def test_multi_gpu_scaling_divides_records_of_one_run(multi, tmp_path, capsys):
  """A later run that timed only the ring is not divided by an older one-GPU
  time; once it times both, its own pair counts."""
  runs = [dict(r, run="first") for r in multi]
  t1 = next(r["fwd_bwd_ms"] for r in multi if r["workload"] == "longnet_ring"
            and r["seq_len"] == 2 * M and r["devices"] == 1 and r["backend"] == "auto")
  flops = _flops("longnet_ring", 2 * M)
  runs.append(dict(_timing("longnet_ring", 2 * M, 2, "zigzag", "auto", t1 / 2 / 0.9, flops),
                   run="second"))
  assert _run(runs, tmp_path) == 0
  assert "strong scaling P=2 LongNet-ring 2M, best layout and backend (run first)" in \
      capsys.readouterr().out
  runs.append(dict(_timing("longnet_ring", 2 * M, 1, "contiguous", "auto", t1, flops),
                   run="second"))
  assert _run(runs, tmp_path) == 1
  assert ("FAIL  strong scaling P=2 LongNet-ring 2M, best layout and backend (run second): "
          "t1 / (P tP) >= 0.97: 0.900") in capsys.readouterr().out


def test_multi_gpu_targets_read_default_settings_only(multi, tmp_path, capsys):
  """A newer run under XLA_FLAGS (recorded in ``xla_flags``) is context: the
  targets keep dividing the newest run made with XLA's defaults."""
  runs = [dict(r, run="default") for r in multi]
  flags = "--xla_gpu_enable_latency_hiding_scheduler=true"
  flops = _flops("longnet_ring", 2 * M)
  for p, ms in ((1, 100.0), (2, 100.0 / 2 / 0.5)):  # efficiency 0.5 under the flag
    runs.append(dict(_timing("longnet_ring", 2 * M, p, "contiguous" if p == 1 else "zigzag",
                             "auto", ms, flops), run="flagged", xla_flags=flags))
  assert _run(runs, tmp_path) == 0
  out = capsys.readouterr().out
  assert "PASS  strong scaling P=2 LongNet-ring 2M, best layout and backend (run default)" in out
  assert (f"info  strong scaling P=2 LongNet-ring 2M, best layout and backend (run flagged) "
          f"with XLA_FLAGS={flags!r}: 0.500") in out
