"""lmcompose: compose frozen language models with trained cross-attention (CALM, Bansal et al. 2024)."""

from . import _moved
from .core.config import CompositionConfig
from .core.cross_attention import CrossAttention
from .io.composition_files import CompositionMismatchError
from .model.composed import ComposedModel
from .model.decoding_cache import ComposedCache
from .model.pretrained import ComposedConfig
from .version import __version__

_moved.install()

ComposedForCausalLM = ComposedModel  # the transformers-style name of the same class

__all__ = ["ComposedCache", "ComposedConfig", "ComposedForCausalLM", "ComposedModel", "CompositionConfig", "CompositionMismatchError", "CrossAttention", "__version__"]
