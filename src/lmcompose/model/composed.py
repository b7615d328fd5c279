"""ComposedModel: a frozen anchor, frozen augmenting models, and trainable connections between them, as a
transformers model (``PreTrainedModel`` + ``GenerationMixin``: ``generate``, ``pipeline``, ``Trainer`` use it)."""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from ..core import introspect
from ..core.alignment import align_batch, align_ids, require_fast
from ..core.config import CompositionConfig, resolve_connections
from ..core.masking import cross_mask, positions_from_mask, same_position_limit
from ..core.tokens import same_vocabulary
from .anchor_prefix import AnchorPrefix, check_prefix_anchor, compute_prefix, prefix_layer, replayed_prefix
from .connections import augment_name, build_connection, check_vocabularies, on_device_of, place_connections
from .decoding_cache import ComposedCache, as_composed_cache
from .cached_forward import cached_forward
from .hooks import capture_outputs, residual_updates
from .pretrained import ComposedConfig
from .transformers_model import TransformersModel

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # one (keys, values) pair per connection, each (b, h, s, d)


class ComposedModel(TransformersModel, PreTrainedModel, GenerationMixin):
    """An anchor LM composed with one or more augmenting LMs through trained cross-attention (CALM).

    Both kinds of base model stay frozen; only :meth:`composition_parameters` are trainable. The
    output projection of every connection starts at zero, so a fresh composition computes exactly
    the anchor's logits. It is a transformers model: ``generate`` is transformers' own (every decoding
    strategy, logits processor, stopping criterion and streamer), driven through one
    :class:`~lmcompose.model.decoding_cache.ComposedCache`; ``save_pretrained`` writes the composition only.

    Args:
        anchor: the transformers causal LM that produces the output (m_B).
        augment: one augmenting causal LM (m_A), or a list of them.
        config: which layers to connect and how; the paper's defaults when None.
        tokenizer: the anchor's tokenizer (optional; used by :meth:`tokenize` and stop strings).
        augment_tokenizer: the augment's tokenizer, one per augment, when it differs from the anchor's.
        checkpoint_connections: in training, keep only each connection's inputs and recompute its
            cross-attention in the backward pass (less activation memory, a little more time).
    """

    config_class = ComposedConfig
    base_model_prefix = ""  # model.base_model is the composition itself, never the bare anchor
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(
        self,
        anchor: nn.Module,
        augment: Union[nn.Module, Sequence[nn.Module]],
        config: Optional[CompositionConfig] = None,
        *,
        tokenizer: Any = None,
        augment_tokenizer: Any = None,
        checkpoint_connections: bool = False,
    ) -> None:
        augments = list(augment) if isinstance(augment, (list, tuple)) else [augment]
        if not augments:
            raise ValueError("Give at least one augment model")
        introspect.check_causal_lm(anchor, "anchor")
        for a, model in enumerate(augments):
            introspect.check_causal_lm(model, augment_name(a, len(augments)))
        composition_config = config if config is not None else CompositionConfig()
        super().__init__(ComposedConfig.describe(anchor, augments, composition_config))
        if getattr(anchor, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(anchor.generation_config)  # the anchor's decoding defaults
        self.checkpoint_connections = checkpoint_connections
        self.checkpoint_anchor = 0  # activation_checkpointing_enable(): recompute every n-th anchor block in backward
        self.gradient_checkpointing_kwargs: dict[str, Any] = {"use_reentrant": False}
        self.composition_config = composition_config
        self.anchor = anchor
        self.augments = nn.ModuleList(augments)
        self.tokenizer = tokenizer
        self.augment_tokenizers = [
            None if same_vocabulary(tokenizer, t) else t for t in _per_augment(augment_tokenizer, len(augments))
        ]
        if tokenizer is None and any(t is not None for t in self.augment_tokenizers):
            raise ValueError("An augment tokenizer was given without the anchor's: pass tokenizer= as well")
        for t in self.augment_tokenizers:
            if t is not None:
                require_fast(t, "augment")
        if self.composition_config.rotary and any(t is not None for t in self.augment_tokenizers):
            raise ValueError(
                "rotary=True needs anchor and augment to share a tokenizer (positions must agree); "
                "use rotary=False with different tokenizers"
            )
        check_vocabularies(anchor, augments, self.augment_tokenizers)
        for model in (anchor, *augments):
            model.requires_grad_(False)
            model.eval()

        self._anchor_blocks = tuple(introspect.decoder_blocks(anchor))
        self._augment_blocks = [tuple(introspect.decoder_blocks(m)) for m in augments]
        self.resolved_connections = resolve_connections(
            self.composition_config, [len(b) for b in self._augment_blocks], len(self._anchor_blocks)
        )
        self.connections = nn.ModuleList(
            nn.ModuleList(build_connection(anchor, model, self.composition_config) for _ in pairs)
            for model, pairs in zip(augments, self.resolved_connections)
        )
        place_connections(self.connections, self.resolved_connections, self._anchor_blocks,
                          introspect.model_dtype(anchor))
        # the bases' tensors, never in a checkpoint: a Trainer resuming a composition does not miss them
        self._keys_to_ignore_on_save = [k for k in self.state_dict() if not k.startswith("connections.")]
        self._composition_enabled = True

    def shares_tokenizer(self, a: int = 0) -> bool:
        """Whether augment ``a`` reads the anchor's token ids."""
        return self.augment_tokenizers[a] is None

    # ----------------------------------------------------------------- parameters and modes

    def composition_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: those of the connections, nothing of the base models."""
        return list(self.connections.parameters())

    def composition_state_dict(self) -> dict[str, torch.Tensor]:
        """The connections' weights, keyed ``"{augment}.{connection}.{name}"``."""
        return {k: v.detach() for k, v in self.connections.state_dict().items()}

    def train(self, mode: bool = True) -> "ComposedModel":
        """Set the connections' training mode; the base models always stay in eval mode."""
        super().train(mode)
        self.anchor.eval()
        self.augments.eval()
        return self

    @contextmanager
    def disable_composition(self) -> Iterator["ComposedModel"]:
        """Inside this block the model computes exactly what the anchor alone computes."""
        previous = self._composition_enabled
        self._composition_enabled = False
        try:
            yield self
        finally:
            self._composition_enabled = previous

    @property
    def composition_enabled(self) -> bool:
        """False inside :meth:`disable_composition`."""
        return self._composition_enabled

    @property
    def device(self) -> torch.device:
        """Where the anchor's input embeddings compute (inputs go there), under a ``device_map`` too."""
        return introspect.execution_device(self.anchor.get_input_embeddings(), "the anchor's input embeddings")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the anchor (and of the connections)."""
        return introspect.model_dtype(self.anchor)

    # ----------------------------------------------------------------- building blocks

    def augment_hidden(
        self,
        a: int,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Any = None,
    ) -> dict[int, torch.Tensor]:
        """Run augment ``a`` (no graph) up to its highest connected block and capture block outputs.

        Args:
            a: index of the augment model.
            input_ids: (b, s) the augment's token ids (new tokens only when ``cache`` holds the past).
            attention_mask: (b, s_total) over past and new tokens, or None.
            position_ids: (b, s) or None.
            cache: the augment's own KV cache, advanced in place; None for a plain forward.
        Returns:
            {augment_layer: (b, s, D_A)} for every connected layer of augment ``a``.
        """
        model = self.augments[a]
        kwargs = introspect.forward_kwargs(model, attention_mask, position_ids)
        if cache is not None:
            kwargs.update({introspect.cache_argument(model): cache, "use_cache": True})
        else:
            kwargs["use_cache"] = False

        def run() -> None:
            with torch.no_grad():
                model(input_ids=input_ids, **kwargs)

        return capture_outputs(self._augment_blocks[a], [i for i, _ in self.resolved_connections[a]], run)

    def project(
        self, a: int, states: dict[int, torch.Tensor], positions: Optional[torch.Tensor] = None
    ) -> KeyValues:
        """Keys and values of every connection of augment ``a`` from its captured block outputs.

        Args:
            states: {augment_layer: (b, s, D_A)} from :meth:`augment_hidden`.
            positions: (b, s) augment positions (used by rotary connections).
        Returns:
            one (keys, values) pair per connection, each (b, h, s, d).
        """
        if positions is None and self.composition_config.rotary:
            some = next(iter(states.values()))
            positions = torch.arange(some.shape[1], device=some.device)[None].expand(some.shape[0], -1)
        return [
            self._maybe_recompute(connection.project, *on_device_of(connection, states[i], positions))
            for connection, (i, _) in zip(self.connections[a], self.resolved_connections[a])
        ]

    def _maybe_recompute(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, under activation checkpointing when ``checkpoint_connections`` applies to this call."""
        if self.checkpoint_connections and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @contextmanager
    def attach(
        self,
        key_values: Sequence[KeyValues],
        masks: Sequence[Optional[torch.Tensor]],
        positions: Optional[torch.Tensor] = None,
    ) -> Iterator[None]:
        """While active, each connected anchor block adds its cross-attention update to its output (connections
        at anchor layer -1 add theirs to the first block's input: the embeddings as that block receives them).

        Args:
            key_values: per augment, the (keys, values) of each connection.
            masks: per augment, a (b, 1, t, s) bool mask, or None for causal same-position attention.
            positions: (b, t) anchor query positions (rotary connections).
        """
        if positions is None and self.composition_config.rotary:
            raise ValueError("rotary connections need the anchor's query positions")
        by_layer: dict[int, list] = {}
        for a, pairs in enumerate(self.resolved_connections):
            for c, (_, j) in enumerate(pairs):
                keys, values = key_values[a][c]
                mask = masks[a]
                if mask is not None and mask.device != keys.device:  # a block of a split or offloaded anchor
                    mask = mask.to(keys.device)
                by_layer.setdefault(j, []).append((self.connections[a][c], keys, values, mask))

        def update_of(entries: list) -> Callable[[torch.Tensor], torch.Tensor]:
            def update(hidden: torch.Tensor) -> torch.Tensor:  # (b, t, D_B) -> the sum of every connection's update
                delta = None
                for connection, keys, values, mask in entries:
                    where = positions if positions is None else positions.to(hidden.device)  # a no-op on one device
                    d = self._maybe_recompute(connection, hidden, keys, values, mask, where)
                    delta = d if delta is None else delta + d
                return delta

            return update

        with residual_updates(self._anchor_blocks, {j: update_of(e) for j, e in by_layer.items()}):
            yield

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[ComposedCache] = None,
        past_key_values: Optional[ComposedCache] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        inputs_embeds: Optional[torch.Tensor] = None,
        augment_input_ids: Optional[Sequence[torch.Tensor]] = None,
        augment_attention_mask: Optional[Sequence[Optional[torch.Tensor]]] = None,
        augment_limits: Optional[Sequence[torch.Tensor]] = None,
        augment_states: Optional[Sequence[dict[int, torch.Tensor]]] = None,
        anchor_prefix: Optional[AnchorPrefix] = None,
        backbone_only: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Composed forward pass; returns the anchor's output (``.logits``, ``.loss`` when ``labels``, ``.cache``).

        Args:
            input_ids: (b, t) anchor token ids (only the new ones when ``cache`` holds the past).
            attention_mask: (b, t) 1 for tokens, 0 for padding (left or right); with a cache (b, past + t).
            labels: (b, t) targets as in transformers (shifted inside; -100 ignored).
            position_ids: (b, t); derived from ``attention_mask`` when None, so padding does not move positions.
            cache: a :class:`ComposedCache` from an earlier call (``past_key_values`` is the same argument): every
                model advances by the new tokens. Any other cache is refused.
            use_cache: return the cache in ``.cache`` (default: the anchor config's, outside training).
            logits_to_keep: compute the logits of the last this many positions only (0: all), as transformers does.
            inputs_embeds: refused: the augments read token ids.
            augment_input_ids: per augment, (b, s) ids of the same text in the augment's tokenizer.
                None: the augments share the anchor's tokenizer and read ``input_ids``.
            augment_attention_mask: per augment, (b, s) padding mask of ``augment_input_ids``.
            augment_limits: per augment, (b, t) long: anchor token t may read augment tokens < limit.
            augment_states: per augment, precomputed {augment_layer: (b, s, D_A)}; skips the augments.
            anchor_prefix: the anchor's output of a block at or below its lowest connection, precomputed for this
                batch (:meth:`anchor_prefix`); the blocks up to it are not run.
            backbone_only: return the anchor backbone's output (``.last_hidden_state``, before the LM head), as
                :attr:`base_model` does (tools that apply the head themselves, e.g. TRL's fused loss).
            **kwargs: passed to the anchor's forward.
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds cannot drive a composition: the augments read token ids; pass input_ids")
        if input_ids is None:
            raise ValueError("Pass input_ids: (batch, length) anchor token ids")
        cache = as_composed_cache(cache, past_key_values)
        if anchor_prefix is not None:
            if cache is not None or use_cache:
                raise ValueError("anchor_prefix replays the anchor's lower blocks of a whole text: pass no cache and "
                                 "use_cache=False")
            if anchor_prefix.layer > self.anchor_prefix_layer:
                raise ValueError(f"anchor_prefix is block {anchor_prefix.layer}'s output, above the lowest "
                                 f"connection (anchor layer {self.anchor_prefix_layer}); compute it with "
                                 f"ComposedModel.anchor_prefix")
            use_cache = False
        if backbone_only:
            if labels is not None or cache is not None or use_cache:
                raise ValueError("backbone_only returns hidden states: pass no labels and no cache")
            use_cache = False
        if logits_to_keep and introspect.accepts(self.anchor, "logits_to_keep"):
            kwargs["logits_to_keep"] = logits_to_keep
        if use_cache is None:
            use_cache = bool(getattr(self.anchor.config, "use_cache", True)) and not self.training and labels is None
        if cache is None and use_cache and augment_states is None and augment_input_ids is None:
            cache = ComposedCache.for_model(self)
        if cache is not None:
            return cached_forward(self, cache, input_ids, attention_mask, position_ids, labels, kwargs)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        anchor_kwargs = {**kwargs, "use_cache": False, **introspect.forward_kwargs(self.anchor, attention_mask,
                                                                                    position_ids)}
        if backbone_only:
            anchor_kwargs.pop("logits_to_keep", None)
            run = self.anchor.base_model
        else:
            anchor_kwargs["labels"] = labels
            run = self.anchor
        if not self._composition_enabled:
            with self._replaying(anchor_prefix):
                return run(input_ids=input_ids, **anchor_kwargs)

        b, t = input_ids.shape
        key_values, masks = self._augment_reads(input_ids, attention_mask, position_ids, augment_input_ids,
                                                augment_attention_mask, augment_limits, augment_states)
        query_positions = position_ids
        if query_positions is None and self.composition_config.rotary:
            query_positions = torch.arange(t, device=input_ids.device)[None].expand(b, -1)
        with self.attach(key_values, masks, query_positions), self._checkpointing_anchor(), \
                self._replaying(anchor_prefix):
            return run(input_ids=input_ids, **anchor_kwargs)

    def _replaying(self, prefix: Optional[AnchorPrefix]) -> Any:
        """Replay ``prefix`` instead of running the anchor's blocks up to it (nothing when None)."""
        return nullcontext() if prefix is None else replayed_prefix(self._anchor_blocks, prefix)

    @property
    def anchor_prefix_layer(self) -> int:
        """The lowest anchor layer a connection adds to: blocks up to it compute what the anchor alone does."""
        return prefix_layer(self.resolved_connections)

    def anchor_prefix(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> AnchorPrefix:
        """The anchor's output of block :attr:`anchor_prefix_layer` on a batch (no graph), for ``forward``'s
        ``anchor_prefix``: the same on every step, since no connection acts below it and the anchor is frozen.

        Args:
            input_ids: (b, t) anchor ids.
            attention_mask: (b, t) 1 for tokens, 0 for padding.
        """
        check_prefix_anchor(self.anchor, self.anchor_prefix_layer)
        return compute_prefix(self.anchor, self.anchor_prefix_layer, input_ids, attention_mask)

    def _augment_reads(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       position_ids: Optional[torch.Tensor], augment_input_ids: Any, augment_attention_mask: Any,
                       augment_limits: Any, augment_states: Any) -> tuple[list, list]:
        """Per augment, the keys and values of its connections and the mask of what each anchor token reads (the
        arguments are :meth:`forward`'s)."""
        b, t = input_ids.shape
        if augment_input_ids is None and augment_states is None and not all(map(self.shares_tokenizer,
                                                                                 range(len(self.augments)))):
            if self.tokenizer is None:
                raise ValueError("An augment has its own tokenizer: pass augment_input_ids and augment_limits, or "
                                 "give the composition the anchor's tokenizer (tokenizer=) to align the texts itself")
            augment_input_ids, augment_attention_mask, augment_limits = align_ids(
                input_ids, attention_mask, self.tokenizer, self.augment_tokenizers)
        key_values, masks = [], []
        for a in range(len(self.augments)):
            if self.shares_tokenizer(a):
                ids, mask, positions, limit = input_ids, attention_mask, position_ids, None
            else:
                if augment_input_ids is None or augment_limits is None or augment_input_ids[a] is None:
                    raise ValueError(
                        f"{augment_name(a, len(self.augments))} has its own tokenizer: pass augment_input_ids and "
                        "augment_limits (model.tokenize(texts) builds them)"
                    )
                ids = augment_input_ids[a]
                mask = augment_attention_mask[a] if augment_attention_mask is not None else None
                positions, limit = positions_from_mask(mask), augment_limits[a]
            if augment_states is not None:
                states = augment_states[a]
            else:
                states = self.augment_hidden(a, ids, mask, positions)
            key_values.append(self.project(a, states, positions))
            s = ids.shape[1]
            if limit is None and mask is None:
                masks.append(None)  # plain causal: anchor t reads augment 0..t
            else:
                if limit is None:
                    limit = same_position_limit(b, t, 0, input_ids.device)
                masks.append(cross_mask(limit, mask, s))
        return key_values, masks

    # ----------------------------------------------------------------- text in

    def tokenize(
        self, texts: Union[str, Sequence[str]], padding_side: str = "right", add_special_tokens: bool = True
    ) -> dict[str, Any]:
        """Tokenize texts for every model and align them: the keyword arguments of forward and generate.

        Args:
            texts: one text or a list of texts.
            padding_side: "right" for training and scoring, "left" for generation.
            add_special_tokens: let the anchor's tokenizer add BOS/EOS as it does by default.
        Returns:
            input_ids, attention_mask (b, t) for the anchor, and per augment augment_input_ids,
            augment_attention_mask (b, s) and augment_limits (b, t) (None for augments sharing the
            anchor's tokenizer). See :mod:`lmcompose.core.alignment`.
        """
        from accelerate.utils import send_to_device

        if self.tokenizer is None:
            raise ValueError("tokenize() needs the anchor's tokenizer: ComposedModel(..., tokenizer=...)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        anchor_ids = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return send_to_device(align_batch(anchor_ids, self.tokenizer, self.augment_tokenizers, padding_side), self.device)


def _per_augment(value: Any, count: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"Got {len(value)} augment tokenizers for {count} augment models")
        return list(value)
    return [value] * count
