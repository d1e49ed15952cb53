"""benchmarks/check_targets.py: the gate on the recorded GPU results.

It must pass the committed H100 results, and fail when any target it checks
is missed or cannot be evaluated, in particular the 1M LongNet targets that
are evaluated on ``backend="pallas"``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "h100.json"


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


@pytest.fixture(name="records")
def _records():
  with open(RESULTS) as f:
    return json.load(f)


def _find(records, name, n):
  return next(r for r in records if (r["name"], r["seq_len"]) == (name, n))


def test_committed_results_pass(records, tmp_path, capsys):
  assert _run(records, tmp_path) == 0
  assert "0 target(s) missed" in capsys.readouterr().out


def test_peak_over_limit_fails(records, tmp_path, capsys):
  bad = copy.deepcopy(records)
  r = _find(bad, "ours_pallas_longnet_partition", 1 << 20)
  r["peak_bytes"] = int(1.2 * r["qkv_out_grad_bytes"])
  assert _run(bad, tmp_path) == 1
  assert "FAIL  LongNet partition 1M peak (pallas)" in capsys.readouterr().out


def test_missing_case_fails(records, tmp_path, capsys):
  bad = [r for r in records if r["name"] != "ours_pallas_longnet_mix"]
  assert _run(bad, tmp_path) == 1
  out = capsys.readouterr().out
  assert "FAIL  LongNet mix 1M peak (pallas)" in out and "missing" in out


def test_out_of_memory_baseline_passes_only_when_ours_ran(records, tmp_path, capsys):
  # The mix baseline does not fit on an H100 at 1M: the target line says so.
  assert _run(records, tmp_path) == 0
  assert "[baseline out of memory: gather_cudnn_remat_longnet_mix" in capsys.readouterr().out
  # Without our own record there is nothing to compare: the target fails.
  no_ours = [r for r in records
             if (r["name"], r["seq_len"]) != ("ours_pallas_longnet_mix", 1 << 20)]
  assert _run(no_ours, tmp_path) == 1
  # A baseline that failed for another reason is not an excuse either.
  other = copy.deepcopy(records)
  _find(other, "gather_cudnn_remat_longnet_mix", 1 << 20)["error"] = "ValueError: bad"
  assert _run(other, tmp_path) == 1


def test_slower_than_baseline_fails(records, tmp_path, capsys):
  bad = copy.deepcopy(records)
  base = _find(bad, "gather_cudnn_longnet_partition", 1 << 20)["fwd_bwd_ms"]
  _find(bad, "ours_pallas_longnet_partition", 1 << 20)["fwd_bwd_ms"] = 1.1 * base
  assert _run(bad, tmp_path) == 1
  assert "FAIL  LongNet partition 1M throughput (pallas)" in capsys.readouterr().out
