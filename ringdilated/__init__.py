"""ringdilated: exact dilated (LongNet-style) attention for JAX and Flax.

Runs on one device or sequence-parallel over a mesh axis as a ``ppermute``
ring, with memory linear in the sequence length.
"""

from ._attention import dilated_attention as dilated_attention
from ._plan import DilatedConfig as DilatedConfig
from .linen import DilatedAttention as DilatedAttention
from .linen import MultiHeadDilatedAttention as MultiHeadDilatedAttention

__all__ = [
    "DilatedAttention",
    "DilatedConfig",
    "MultiHeadDilatedAttention",
    "dilated_attention",
]

__version__ = "0.1.0"
