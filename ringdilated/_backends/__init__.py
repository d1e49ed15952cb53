"""Attention block backends: one module each, chosen from what they declare.

To add a backend: write a module here with a frozen-dataclass subclass of
:class:`Backend` that sets ``name`` and ``capabilities`` and implements
``forward`` / ``backward`` (``problem`` and ``block_problem`` refuse what it
cannot run; ``in_place`` backends add ``branch_forward`` / ``branch_backward``),
then add one line to :data:`REGISTRY` (and its name to :data:`AUTO` if
``backend="auto"`` should consider it). Nothing else names a backend.
"""

from __future__ import annotations

import dataclasses
import logging
import types

from . import cudnn, mosaic, pallas, xla
from .base import Backend, Capabilities, Dropout, Request, StridedBranch, Visibility

__all__ = ["AUTO", "Backend", "Capabilities", "Dropout", "REGISTRY", "Request",
           "StridedBranch", "Visibility", "check_name", "portable", "select"]

REGISTRY = types.MappingProxyType({
    "xla": xla.XLA(),
    "cudnn": cudnn.CuDNN(),
    "pallas": pallas.Pallas(),
    "mosaic": mosaic.Mosaic(),
})

# backend="auto" takes the first of these that can run a call natively:
# fastest first, as measured by benchmarks/bench.py on an H200. The Hopper
# kernels beat cuDNN blocks on dilated attention (and take masks) at the
# least memory; elsewhere cuDNN blocks beat the Triton kernels, which alone
# take masks and dropout there. The last runs anything.
AUTO = ("mosaic", "cudnn", "pallas", "xla")

_log = logging.getLogger("ringdilated")


def check_name(choice) -> None:
  """Raises unless ``choice`` is ``"auto"``, a registered name or a Backend."""
  if isinstance(choice, Backend):
    return
  names = ("auto", *REGISTRY)
  if not isinstance(choice, str) or choice not in names:
    raise ValueError(f"backend={choice!r} must be one of {names} or a "
                     "ringdilated Backend object")


def portable() -> Backend:
  """The backend that runs every call: the fallback of all others."""
  return REGISTRY[AUTO[-1]]


def _platform_problem(backend: Backend, request: Request) -> str | None:
  platforms = backend.capabilities.platforms
  if platforms and request.platform not in platforms:
    wanted = " or ".join(repr(p) for p in platforms)
    return f"platform is {request.platform!r}, not {wanted}"
  return None


def problem(backend: Backend, request: Request) -> str | None:
  """Why ``backend`` can't run ``request`` (its platform aside), or None."""
  caps = backend.capabilities
  if request.masks and not caps.masks:
    return f"key_padding_mask/segment_ids (the {backend.name} blocks take causal masks only)"
  if request.dropout and not caps.dropout:
    return f"dropout (the {backend.name} blocks have none)"
  return backend.problem(request)


def select(choice, request: Request) -> Backend:
  """Resolves ``backend=`` at trace time.

  ``"auto"`` takes the first backend of :data:`AUTO` that runs ``request``
  natively and is not measured slower there (``Backend.auto_problem``;
  reasons for passing others over go to the debug log). An
  explicit backend that can't run it falls back to :func:`portable` with a
  warning saying why (results are the same; only speed and memory differ);
  one that can run only off its platforms in an interpreter runs there, with
  a warning (exact but slow: for tests).
  """
  check_name(choice)
  if choice == "auto":
    def cannot(backend: Backend) -> str | None:  # why it can't run request natively
      return _platform_problem(backend, request) or problem(backend, request)

    def runs(name: str) -> bool:
      return cannot(REGISTRY[name]) is None

    for name in AUTO:
      backend = REGISTRY[name]
      why = cannot(backend) or backend.auto_problem(request, runs)
      if why is None:
        return backend
      _log.debug("backend='auto' passes %r over: %s", name, why)
    return portable()
  backend = REGISTRY[choice] if isinstance(choice, str) else choice
  elsewhere = _platform_problem(backend, request)
  why = problem(backend, request)
  if elsewhere and not backend.capabilities.interpret:
    why = elsewhere
  elif why is None:
    if elsewhere is None:
      return backend
    _log.warning("backend=%r on %r runs in interpret mode (slow)", backend.name,
                 request.platform)
    return dataclasses.replace(backend, interpret=True)
  _log.warning("backend=%r unavailable (%s); using the %s block", backend.name, why,
               portable().name.upper())
  return portable()
