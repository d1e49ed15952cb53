"""Plots a results JSON: one GPU (bench.py) or several (bench_multi_gpu.py).

Usage: ``python benchmarks/plot.py benchmarks/results/h100.json`` writes the
PNG next to the JSON (``h100.png``): time and peak memory vs sequence length.
``python benchmarks/plot.py benchmarks/results/h200x2.json`` (records of
``bench_multi_gpu.py``) writes ``h200x2.png``: time vs ring size P (strong
and weak scaling) and vs N, and the scaling efficiencies. Needs matplotlib
(not a dependency of the library: ``pip install matplotlib``).
"""

from __future__ import annotations

import collections
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_targets  # noqa: E402  pylint: disable=g-import-not-at-top

GROUPS = {
    "dense causal": ("cudnn_dense", "ours_dense", "ours_mosaic_dense", "ours_dense_ring1",
                     "ours_dense_ring1_zigzag", "ringattention_pkg"),
    "LongNet mix": ("slice_cudnn_longnet_mix", "gather_cudnn_longnet_mix", "ours_longnet_mix",
                    "ours_mosaic_longnet_mix", "ours_cudnn_longnet_mix",
                    "ours_pallas_longnet_mix"),
    "LongNet partition": ("slice_cudnn_longnet_partition", "gather_cudnn_longnet_partition",
                          "ours_longnet_partition", "ours_mosaic_longnet_partition",
                          "ours_cudnn_longnet_partition", "ours_pallas_longnet_partition"),
    "LongNet mix, masks (issue 15)": (
        "ours_longnet_mix", "ours_docs64k_longnet_mix", "ours_docs8k_longnet_mix",
        "ours_pad10_longnet_mix", "ours_dropout_longnet_mix", "ours_xla_docs64k_longnet_mix"),
}


def _label(r) -> str:
  return f"{r['backend']} {r['layout']}"


def _by_devices(records, prefix: str) -> dict:
  """{"<prefix><backend> <layout>": [(P, fwd+bwd ms)]}; a one-device record
  stands for both layouts (on one device they are the same)."""
  series = collections.defaultdict(list)
  for r in records:
    for layout in ("contiguous", "zigzag") if r["devices"] == 1 else (r["layout"],):
      series[f"{prefix}{r['backend']} {layout}"].append((r["devices"], r["fwd_bwd_ms"]))
  return series


def _lines(ax, series: dict) -> None:
  """One line per label, points in x order."""
  for label, pts in sorted(series.items()):
    xs, ys = zip(*sorted(pts))
    ax.plot(xs, ys, "-o", label=label)


def plot_multi(records, out: str) -> None:
  """Time vs P (strong: N fixed; weak: N / P fixed), time vs N on the most
  devices, and the scaling efficiencies (check_targets.py's definitions)."""
  runs = [r for r in records if r.get("kind") == "timing" and "fwd_bwd_ms" in r
          and check_targets.xla_defaults(r)]
  if not runs:
    raise SystemExit("no timing records to plot")
  timing = list({r["name"]: r for r in runs}.values())  # each case's newest record
  pmax = max(r["devices"] for r in timing)
  fig, axes = plt.subplots(2, 3, figsize=(16, 9))
  for col, (workload, n, title) in enumerate(check_targets.STRONG):
    ax = axes[0, col]
    series = _by_devices([r for r in timing if (r["workload"], r["seq_len"]) == (workload, n)],
                         "")
    _lines(ax, series)
    one = min((ms for pts in series.values() for p, ms in pts if p == 1), default=None)
    if one:
      ps = sorted({p for pts in series.values() for p, _ in pts})
      ax.plot(ps, [one / p for p in ps], "k:", label="ideal (best 1-GPU / P)")
    ax.set_title(f"strong scaling: {title}")
    ax.set_xlabel("GPUs P")
    ax.set_ylabel("fwd+bwd ms")
  ax = axes[0, 2]
  for workload, n1, title in check_targets.WEAK:
    _lines(ax, _by_devices([r for r in timing if r["workload"] == workload
                            and r["seq_len"] == n1 * r["devices"]], f"{workload} "))
  ax.set_title("weak scaling: dense 64K, LongNet-ring 1M per GPU")
  ax.set_xlabel("GPUs P")
  ax.set_ylabel("fwd+bwd ms")
  for col, workload in enumerate(("dense", "longnet_ring")):
    ax = axes[1, col]
    series = collections.defaultdict(list)
    for r in timing:
      if r["workload"] == workload and r["devices"] == pmax:
        series[_label(r)].append((r["seq_len"], r["fwd_bwd_ms"]))
    _lines(ax, series)
    ax.set_xscale("log", base=2)
    ax.set_title(f"{workload} on {pmax} GPUs: time vs N")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("fwd+bwd ms")
  ax = axes[1, 2]
  bars = []
  for p in sorted({r["devices"] for r in timing} - {1}):
    for workload, n, title in check_targets.STRONG:
      bars.append((f"strong {title}, P={p}",
                   check_targets.strong_efficiency(runs, workload, n, p)))
    for workload, n1, title in check_targets.WEAK:
      bars.append((f"weak {workload}, P={p}",
                   check_targets.weak_efficiency(runs, workload, n1, p)))
  bars = [(label, v) for label, v in bars if v is not None]
  if bars:
    ax.barh([label for label, _ in bars], [v for _, v in bars])
    ax.axvline(0.97, color="k", linestyle=":", label="target 0.97")
  ax.set_xlim(0, 1.1)
  ax.set_title("efficiency, best layout and backend")
  for ax in axes.flat:
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  for ax in axes[0]:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
  kind = next((r["device_kind"] for r in timing if "device_kind" in r), "?")
  fig.suptitle(f"ringdilated rings, bf16 B=1 H=16 D=128, causal, fwd+bwd ({kind})")
  fig.tight_layout()
  fig.savefig(out, dpi=90)


def main(argv) -> int:
  path = argv[1]
  with open(path) as f:
    records = json.load(f)
  out = os.path.splitext(path)[0] + ".png"
  if any(r.get("suite") == "multi_gpu" for r in records):
    plot_multi(records, out)
    print(out)
    return 0
  records = [r for r in records
             if "error" not in r and "fwd_bwd_ms" in r and check_targets.xla_defaults(r)]
  newest = {(r["name"], r["seq_len"]): r for r in records}  # later runs win
  series = collections.defaultdict(list)
  for (name, n), r in newest.items():
    series[name].append((n, r["fwd_bwd_ms"], r["peak_bytes"] / 2**30))
  device = records[0]["device"] if records else "?"
  fig, axes = plt.subplots(2, len(GROUPS), figsize=(5 * len(GROUPS), 8), squeeze=False)
  for col, (title, names) in enumerate(GROUPS.items()):
    for name in names:
      pts = sorted(series.get(name, []))
      if not pts:
        continue
      n, ms, gib = zip(*pts)
      style = "-o" if name.startswith("ours") else "--s"
      axes[0, col].plot(n, ms, style, label=name)
      axes[1, col].plot(n, gib, style, label=name)
    axes[0, col].set_title(f"{title}: fwd+bwd time")
    axes[1, col].set_title(f"{title}: peak memory")
    axes[0, col].set_ylabel("ms")
    axes[1, col].set_ylabel("GiB")
    for ax in axes[:, col]:
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("sequence length")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle(f"ringdilated vs references, bf16 B=1 H=16 D=128 ({device})")
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
