"""ringdilated: exact dilated (LongNet-style) attention for JAX and Flax.

Runs on one device or sequence-parallel over a mesh axis as a ``ppermute``
ring, with memory linear in the sequence length. Flax NNX modules are in
``ringdilated.nnx`` (``from ringdilated import nnx``; not imported here),
block backends in ``ringdilated.backends``, test helpers in
``ringdilated.testing`` (needs hypothesis).
"""

from . import backends as backends
from ._attention import dilated_attention as dilated_attention
from ._attention_fn import make_attention_fn as make_attention_fn
from ._config import DilatedConfig as DilatedConfig
from ._layout import from_layout as from_layout
from ._layout import to_layout as to_layout
from ._schedule import ring_balance as ring_balance
from .linen import DilatedAttention as DilatedAttention
from .linen import MultiHeadDilatedAttention as MultiHeadDilatedAttention

__all__ = [
    "DilatedAttention",
    "DilatedConfig",
    "MultiHeadDilatedAttention",
    "backends",
    "dilated_attention",
    "from_layout",
    "make_attention_fn",
    "ring_balance",
    "to_layout",
]

__version__ = "0.1.0"
