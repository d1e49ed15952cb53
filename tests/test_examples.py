"""Smoke tests of the examples: tiny training runs (one device and a 2-device
ring) and the attention-pattern plot (only where matplotlib is installed)."""

import importlib.util
import os
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains small models, runs the demo

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

TINY = ["--steps", "30", "--seq-len", "128", "--batch", "4", "--first-segment", "32",
        "--key-window", "16", "--d-model", "32", "--heads", "4", "--layers", "1",
        "--eval-batches", "2", "--quiet"]


def _load(name):
  spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


def _check_run(result, out_dir):
  losses = np.asarray(result["losses"])
  assert losses.shape == (30,) and np.all(np.isfinite(losses))
  print(f"loss first 8 steps {losses[:8].mean():.3f}, last 8 {losses[-8:].mean():.3f}")
  assert losses[-8:].mean() < losses[:8].mean(), losses
  assert os.path.exists(result["checkpoint"])
  leaves = jax.tree.leaves(result["params"])
  restored = jax.tree.leaves(result["restored"])
  assert jax.tree.structure(result["params"]) == jax.tree.structure(result["restored"])
  for a, b in zip(leaves, restored):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert 0.0 <= result["accuracy"] <= 1.0
  assert str(out_dir) in result["checkpoint"]


def test_train_long_context_single_device(tmp_path):
  train = _load("train_long_context")
  result = train.main(TINY + ["--out-dir", str(tmp_path)])
  _check_run(result, tmp_path)


def test_train_long_context_ring(tmp_path):
  """A 2-device zigzag ring (the contiguous layout's rings: test_ring)."""
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (conftest asks XLA for 8 CPU devices)")
  train = _load("train_long_context")
  argv = TINY + ["--mesh", "2", "--layout", "zigzag", "--out-dir", str(tmp_path)]
  result = train.main(argv)
  _check_run(result, tmp_path)
  # The ring model computes the same logits as the single-device model.
  args = train.parse_args(argv)
  tokens, _ = train.make_batch(np.random.default_rng(1), 2, args.seq_len, args.num_values,
                               args.vocab, args.key_window, args.repeat)
  _, single = train.build_logits_fn(args, 1)
  _, ring = train.build_logits_fn(args, 2)
  np.testing.assert_allclose(np.asarray(jax.jit(ring)(result["params"], tokens)),
                             np.asarray(jax.jit(single)(result["params"], tokens)),
                             rtol=1e-4, atol=1e-4)


def test_train_long_context_packed_documents(tmp_path):
  """--docs 2: two passkey documents per row, a loss at each one's query."""
  train = _load("train_long_context")
  result = train.main(TINY + ["--docs", "2", "--out-dir", str(tmp_path)])
  _check_run(result, tmp_path)


@pytest.mark.parametrize("mesh", [1, 2])
def test_packed_documents_do_not_see_each_other(mesh):
  """With --docs 2 the logits of one document do not depend on the tokens of
  the other (segment_ids reach attention, positions restart), on one device
  and on a 2-device zigzag ring, which equals one device."""
  if len(jax.devices()) < mesh:
    pytest.skip(f"needs {mesh} devices")
  train = _load("train_long_context")
  args = train.parse_args(TINY + ["--docs", "2", "--mesh", str(mesh), "--layout", "zigzag"])
  model, logits_fn = train.build_logits_fn(args, mesh)
  tokens, answers = train.make_batch(np.random.default_rng(0), 2, args.seq_len,
                                     args.num_values, args.vocab, args.key_window,
                                     args.repeat, args.docs)
  assert tokens.shape == (2, 128) and answers.shape == (2, 2)
  params = model.init(jax.random.key(0), tokens, tokens)
  half = args.seq_len // 2
  other = tokens.copy()
  other[:, :half] = np.random.default_rng(1).permutation(other[:, :half], axis=1)
  assert np.any(other[:, :half] != tokens[:, :half])
  logits = np.asarray(jax.jit(logits_fn)(params, tokens))
  changed = np.asarray(jax.jit(logits_fn)(params, other))
  np.testing.assert_allclose(changed[:, half:], logits[:, half:], rtol=1e-5, atol=1e-5)
  assert np.abs(changed[:, :half] - logits[:, :half]).max() > 1e-3  # the first one did change
  # The second document's first token sits at position 0, like the first's.
  first = np.asarray(jax.jit(logits_fn)(params, np.concatenate([tokens[:, :half]] * 2, 1)))
  np.testing.assert_allclose(first[:, half], first[:, 0], rtol=1e-5, atol=1e-5)
  if mesh > 1:
    _, single = train.build_logits_fn(args, 1)
    np.testing.assert_allclose(logits, np.asarray(jax.jit(single)(params, tokens)),
                               rtol=1e-4, atol=1e-4)


def test_train_long_context_rejects_documents_that_do_not_fit():
  train = _load("train_long_context")
  with pytest.raises(SystemExit):
    train.parse_args(TINY + ["--docs", "3"])  # 128 tokens are not 3 documents
  with pytest.raises(SystemExit):
    train.parse_args(TINY + ["--docs", "8"])  # 16-token documents, a 16-token key window


def test_plot_pattern(tmp_path):
  pytest.importorskip("matplotlib")
  plot = _load("plot_pattern")
  out = tmp_path / "pattern.png"
  assert plot.main(["--causal", "--out", str(out)]) == str(out)
  assert out.stat().st_size > 1000


def test_ring_demo_and_its_zigzag_ring(monkeypatch, capsys):
  """README command 1's script, small: both rings equal one device."""
  demo = _load("ring_demo")
  monkeypatch.setattr(sys, "argv", [
      "ring_demo.py", "--seq-len", "1024", "--devices", "4",
      "--segment-lengths", "256,512,1024", "--dilation-rates", "1,2,4"])
  demo.main()
  text = capsys.readouterr().out
  ring = [float(x) for x in re.findall(r"^  (?:out|dq|dk|dv)\s+(\S+)", text, flags=re.M)]
  zigzag = [float(x) for x in re.findall(r"max \|zigzag ring - single device\|.*: (\S+)", text)]
  assert len(ring) == 4 and max(ring) < 1e-5, text
  assert len(zigzag) == 1 and zigzag[0] < 1e-5, text
  assert re.search(r"zigzag\s+worst step 1\.00, whole pass 1\.00", text), text
  # contiguous chunks are balanced per branch (pairs of devices share the
  # later chunk's queries, larger rings swap halves into the zigzag order)
  assert re.search(r"contiguous\s+worst step 1\.00, whole pass 1\.00", text), text
