"""Checks of single user-facing values, each raising an error that names the
argument and the value. Shared by the settings, the plan and the modules, so
every entry point accepts the same things (numpy scalars included)."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Hashable, Iterable

import numpy as np


def positive_int(name: str, x) -> int:
  """``x`` as an int (numpy ints too, not bools) or an error naming ``name``."""
  try:
    if isinstance(x, (bool, np.bool_)):
      raise TypeError
    x = operator.index(x)
  except TypeError:
    raise TypeError(f"{name}={x!r} must be an int") from None
  if x <= 0:
    raise ValueError(f"{name}={x} must be positive")
  return x


def positive_ints(name: str, values: Iterable[int]) -> tuple[int, ...]:
  """A non-string sequence of positive ints as a tuple."""
  if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
    raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
  return tuple(positive_int(f"{name}[{i}]", x) for i, x in enumerate(values))


def positive_count(name: str, x, *, optional: bool = False) -> int | None:
  """A count given as a module field: a positive int (numpy ints too), or
  None if ``optional``; a ``ValueError`` otherwise."""
  if x is None and optional:
    return None
  try:
    return positive_int(name, x)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={x!r} must be a positive int"
                     + (" or None" if optional else "")) from None


def boolean(name: str, x) -> bool:
  """A Python or numpy bool as ``bool``."""
  if not isinstance(x, (bool, np.bool_)):
    raise TypeError(f"{name}={x!r} must be a bool")
  return bool(x)


def one_of(name: str, x, options: tuple) -> None:
  if not isinstance(x, Hashable) or x not in options:
    raise ValueError(f"{name}={x!r} must be one of {options}")


def positive_real(name: str, x) -> float:
  """A positive finite real (numpy scalars too) as ``float``."""
  if not (isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))
          and math.isfinite(x) and x > 0):
    raise ValueError(f"{name}={x!r} must be a positive finite number")
  return float(x)


def probability(name: str, x) -> float:
  """A real in ``[0, 1)`` (numpy scalars too) as ``float``."""
  if not (isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))
          and 0.0 <= x < 1.0):
    raise ValueError(f"{name}={x!r} must be in [0, 1)")
  return float(x)


def hashable(name: str, x) -> None:
  try:
    hash(x)
  except TypeError:
    raise TypeError(f"{name}={x!r} must be hashable (a mesh axis name)") from None
