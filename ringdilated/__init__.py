"""ringdilated: exact dilated (LongNet-style) attention for JAX and Flax.

Runs on one device or sequence-parallel over a mesh axis as a ``ppermute``
ring, with memory linear in the sequence length. Flax NNX modules are in
``ringdilated.nnx`` (``from ringdilated import nnx``; not imported here).
"""

from ._attention import dilated_attention as dilated_attention
from ._attention_fn import make_attention_fn as make_attention_fn
from ._layout import from_layout as from_layout
from ._layout import to_layout as to_layout
from ._plan import DilatedConfig as DilatedConfig
from .linen import DilatedAttention as DilatedAttention
from .linen import MultiHeadDilatedAttention as MultiHeadDilatedAttention

__all__ = [
    "DilatedAttention",
    "DilatedConfig",
    "MultiHeadDilatedAttention",
    "dilated_attention",
    "from_layout",
    "make_attention_fn",
    "to_layout",
]

__version__ = "0.1.0"
