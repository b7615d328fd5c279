"""What makes a composition a transformers model beyond its forward: transformers' ``generate`` over one
:class:`~lmcompose.model.decoding_cache.ComposedCache`, the backbone without the LM head (``base_model``), the
anchor's embeddings, activation checkpointing of the anchor blocks, and ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..io.composition_files import load_composition, save_composition
from . import pretrained
from .decoding_cache import ComposedCache, as_composed_cache
from .generation import checked_generate_arguments, seeded
from .hooks import checkpointed_blocks


class TransformersModel:
    """The transformers side of :class:`~lmcompose.ComposedModel` (placed before ``PreTrainedModel`` in its bases)."""

    # ----------------------------------------------------------------- generation

    def generate(self, inputs: Optional[torch.Tensor] = None, generation_config: Any = None, *,
                 seed: Optional[int] = None, **kwargs: Any) -> Any:
        """transformers' ``generate`` over the composition (every decoding strategy, logits processor, stopping
        criterion and streamer it has), each step advancing one :class:`ComposedCache`.

        Args:
            inputs: (b, t) prompt ids (``input_ids=`` works too); left-pad prompts of different lengths.
            generation_config, **kwargs: as transformers' ``generate`` takes them; ``stop_strings`` uses the
                anchor's tokenizer unless ``tokenizer=`` is given.
            seed: seed torch's generator for this call (reproducible sampling); None leaves it as it is.
        Returns:
            what transformers' ``generate`` returns: (b, t + n) ids, or its output object with
            ``return_dict_in_generate=True``.
        """
        if isinstance(generation_config, torch.Tensor):
            raise ValueError("generate()'s second positional argument is generation_config: pass the mask by name, "
                             "generate(input_ids, attention_mask=mask, ...)")
        kwargs = checked_generate_arguments(self, inputs, kwargs)
        with seeded(seed, self.device):
            return super().generate(generation_config=generation_config, **kwargs)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, generation_mode: Any,
                                      batch_size: int, max_cache_length: int) -> None:
        """One :class:`ComposedCache` per ``generate`` call (a cache given by the caller must be one)."""
        given = model_kwargs.get("cache", model_kwargs.pop("past_key_values", None))
        if given is not None:
            model_kwargs["cache"] = as_composed_cache(given, None)
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} cannot hold a "
                             "composition (it decodes with its own cache); leave cache_implementation unset")
        model_kwargs["cache"] = ComposedCache.for_model(self, max_cache_length)

    # ----------------------------------------------------------------- transformers model

    @property
    def base_model(self) -> Callable[..., Any]:
        """The composition without the anchor's LM head: called like the model, it returns the anchor backbone's
        output (``.last_hidden_state``) with every connection applied (never the bare anchor's)."""
        return functools.partial(self.forward, backbone_only=True)

    def get_input_embeddings(self) -> nn.Module:
        """The anchor's input embeddings."""
        return self.anchor.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        """The anchor's output head."""
        return self.anchor.get_output_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Refused: the bases stay untouched."""
        raise ValueError("A composition keeps its bases untouched: change the anchor's embeddings before composing")

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to tie: the bases tie their own weights, the connections share none."""

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the anchor blocks the backward pass goes through (less activation memory); bases stay frozen.

        Args:
            activation_checkpointing_kwargs: passed to ``torch.utils.checkpoint.checkpoint`` (default
                ``use_reentrant=False``).
            every_n_layers: checkpoint every n-th anchor block only.
            offload: refused (the activations stay on the anchor's device).
        """
        if offload:
            raise ValueError("offload=True is not supported by a composition's activation checkpointing")
        if every_n_layers < 1:
            raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
        self.checkpoint_anchor = every_n_layers
        self.gradient_checkpointing_kwargs = dict(activation_checkpointing_kwargs or {"use_reentrant": False})

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      **kwargs: Any) -> None:
        """:meth:`activation_checkpointing_enable` under its older name."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Stop recomputing the anchor blocks."""
        self.checkpoint_anchor = 0

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether :meth:`activation_checkpointing_enable` is on."""
        return bool(self.checkpoint_anchor)

    is_gradient_checkpointing = is_activation_checkpointing

    def summary(self) -> str:
        """One line: trainable composition parameters vs all parameters."""
        trainable = sum(p.numel() for p in self.composition_parameters())
        total = sum(p.numel() for p in self.parameters())
        count = sum(len(c) for c in self.resolved_connections)
        return (
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
            f"{100 * trainable / total:.4f} || connections: {count}"
        )

    def print_trainable_parameters(self) -> None:
        """Print :meth:`summary`."""
        print(self.summary())

    @contextmanager
    def _checkpointing_anchor(self) -> Iterator[None]:
        """Recompute each anchor block in the backward pass, when :meth:`gradient_checkpointing_enable` asked."""
        if self.checkpoint_anchor and self.training and torch.is_grad_enabled():
            with checkpointed_blocks(self._anchor_blocks[:: self.checkpoint_anchor], self.gradient_checkpointing_kwargs):
                yield
        else:
            yield

    # ----------------------------------------------------------------- files

    def save_pretrained(self, save_directory: Union[str, Any], is_main_process: bool = True, **kwargs: Any) -> None:
        """Write the composition to ``save_directory`` (composition weights and config with the bases'
        fingerprints and sources, ``config.json``, ``generation_config.json``); never the bases.

        Args:
            is_main_process: only the main process writes (as in transformers).
            **kwargs: transformers' other arguments (``state_dict``, ``safe_serialization``, ...) are accepted and
                have no effect: the composition is always its own safetensors file.
        """
        pretrained.save_pretrained(self, save_directory, is_main_process)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Any], anchor: Optional[nn.Module] = None,
                        augment: Union[None, nn.Module, Sequence[nn.Module]] = None, **kwargs: Any
                        ) -> Any:
        """Load a composition saved by :meth:`save_pretrained` (or :meth:`save_composition`) onto ``anchor`` and
        ``augment``, or, when they are not given, onto the bases it records; refuses bases that do not match.

        Args:
            pretrained_model_name_or_path: the composition's directory.
            **kwargs: ``tokenizer=``, ``augment_tokenizer=``, ``dtype=`` (for bases it loads), ``strict=``
                (False: a base mismatch is a warning), ``checkpoint_connections=``.
        """
        return pretrained.load_pretrained(cls, pretrained_model_name_or_path, anchor, augment, **kwargs)

    def save_composition(self, path: str) -> None:
        """Write the composition (config, base fingerprints, connection weights) to directory ``path``."""
        save_composition(self, path)

    @classmethod
    def from_composition(
        cls,
        path: str,
        anchor: nn.Module,
        augment: Union[nn.Module, Sequence[nn.Module]],
        *,
        strict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Load a saved composition onto ``anchor`` and ``augment``; refuses bases that do not match.

        Args:
            strict: when False, a base-model mismatch is a warning instead of an error.
            **kwargs: ``tokenizer=``, ``augment_tokenizer=`` as in the constructor.
        """
        return load_composition(cls, path, anchor, augment, strict=strict, **kwargs)
