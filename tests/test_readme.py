"""The README's Python snippets run as written (so they never rot)."""

from __future__ import annotations

import linecache
import pathlib
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # runs the README's 8K-token examples

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippets():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_snippets_run_and_agree():
  blocks = _snippets()
  assert len(blocks) >= 3
  env: dict = {}
  for i, block in enumerate(blocks):
    # Named apart from README.md, with its own source in linecache: what
    # reads the source of a function a block defines (hypothesis does) then
    # reads the block, not README.md's lines at that offset.
    name = f"<README.md, python block {i}>"
    linecache.cache[name] = (len(block), None, block.splitlines(True), name)
    exec(compile(block, name, "exec"), env)  # pylint: disable=exec-used
  assert env["y"].shape == env["x"].shape
  # "equals the single-device result": the first snippet's `out`, on the
  # same q, k, v (a snippet that changed its call would fail here).
  single = np.asarray(env["out"])
  assert np.all(np.isfinite(single)) and np.max(np.abs(single)) > 0.1
  np.testing.assert_allclose(np.asarray(env["out_ring"]), single, atol=1e-5)
  np.testing.assert_allclose(np.asarray(env["out_zigzag"]), single, atol=1e-5)
  assert callable(env["test_my_attention"])  # "Testing your model" ran
