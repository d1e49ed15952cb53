"""Attention block backends, public for tuning and for writing new ones.

``REGISTRY`` maps the names ``backend=`` accepts to backend objects;
``AUTO`` is the order in which ``backend="auto"`` tries them. A backend is a
frozen dataclass (hashable), so a tuned copy is a value passed as
``backend=``::

  import dataclasses, ringdilated as rd
  from ringdilated import backends
  tiles = backends.KernelTiles(fwd=backends.Tiles(64, 64, 4, 3))
  fast = dataclasses.replace(backends.REGISTRY["pallas"], tiles=tiles)
  rd.dilated_attention(q, k, v, ..., backend=fast)

To write a backend, subclass :class:`Backend` (see ``ringdilated/_backends``).
"""

from ._backends import AUTO as AUTO
from ._backends import REGISTRY as REGISTRY
from ._backends import Backend as Backend
from ._backends import Capabilities as Capabilities
from ._backends import Dropout as Dropout
from ._backends import Request as Request
from ._backends import StridedBranch as StridedBranch
from ._backends import Visibility as Visibility
from ._backends import select as select
from ._backends.mosaic import MosaicTiles as MosaicTiles
from ._backends.pallas import KernelTiles as KernelTiles
from ._backends.pallas import Tiles as Tiles

__all__ = ["AUTO", "REGISTRY", "Backend", "Capabilities", "Dropout", "KernelTiles",
           "MosaicTiles", "Request", "StridedBranch", "Tiles", "Visibility", "select"]
