"""lmcompose: compose frozen language models with trained cross-attention (CALM, Bansal et al. 2024)."""

__version__ = "0.1.0"

from .checkpoint import CompositionMismatchError
from .composed import ComposedModel
from .config import CompositionConfig
from .cross_attention import CrossAttention

__all__ = ["ComposedModel", "CompositionConfig", "CompositionMismatchError", "CrossAttention", "__version__"]
