"""A composition as a transformers model: its config (:class:`ComposedConfig`), ``save_pretrained`` and
``from_pretrained``.

A composed model's directory holds the composition only, never the bases: ``model.safetensors`` (the connections,
named as in the composed model's state dict, so transformers' Trainer resumes from it) and ``composition_config.json``
(the files of :mod:`lmcompose.io.composition_files`, with the bases' fingerprints),
``config.json`` (a :class:`ComposedConfig`: where the bases were loaded from, the anchor's vocabulary, special tokens
and context length) and ``generation_config.json`` (the anchor's generation defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from transformers import PretrainedConfig

from ..core import introspect
from ..io.atomic import atomic_write_text
from ..io.composition_files import CONFIG_NAME as COMPOSITION_CONFIG_NAME, read_metadata
from ..io.safe_files import read_json

MODEL_TYPE = "lmcompose"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"


class ComposedConfig(PretrainedConfig):
    """The transformers config of a composed model.

    Args:
        composition: the :class:`~lmcompose.CompositionConfig` as a dict.
        anchor_source: where the anchor was loaded from (a directory, a ``.gguf`` file, ``smollm2-135m``).
        augment_sources: the same for each augment.
        vocab_size, max_position_embeddings: the anchor's (what tools read from ``model.config``).
        **kwargs: transformers' own fields (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ...).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        composition: Optional[dict] = None,
        anchor_source: str = "",
        augment_sources: Optional[Sequence[str]] = None,
        vocab_size: Optional[int] = None,
        max_position_embeddings: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        self.composition = dict(composition or {})
        self.anchor_source = anchor_source
        self.augment_sources = list(augment_sources or [])
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("tie_word_embeddings", False)  # the anchor ties its own embeddings
        super().__init__(**kwargs)

    @classmethod
    def describe(cls, anchor: Any, augments: Sequence[Any], composition: Any) -> "ComposedConfig":
        """The config of composing ``anchor`` with ``augments`` as ``composition`` (a CompositionConfig)."""
        text = introspect.text_config(anchor)
        return cls(
            composition=composition.to_dict(),
            anchor_source=_source(anchor),
            augment_sources=[_source(m) for m in augments],
            vocab_size=introspect.vocab_size(anchor),
            max_position_embeddings=getattr(text, "max_position_embeddings", None),
            bos_token_id=getattr(text, "bos_token_id", None),
            eos_token_id=getattr(text, "eos_token_id", None),
            pad_token_id=getattr(text, "pad_token_id", None),
        )


def _source(model: Any) -> str:
    return str(getattr(model.config, "_name_or_path", "") or "")


def save_pretrained(model: Any, path: Union[str, Path], is_main_process: bool = True) -> None:
    """Write ``model``'s composition to directory ``path``: the composition files, ``config.json`` and
    ``generation_config.json``, each atomically; never the bases."""
    from ..io.composition_files import PRETRAINED_WEIGHTS_NAME, save_composition

    if not is_main_process:
        return
    path = Path(path)
    save_composition(model, path, PRETRAINED_WEIGHTS_NAME, prefix="connections.")
    atomic_write_text(path / CONFIG_NAME, model.config.to_json_string())
    if getattr(model, "generation_config", None) is not None:
        atomic_write_text(path / GENERATION_CONFIG_NAME, model.generation_config.to_json_string())


def base_sources(path: Path) -> tuple[str, list[str]]:
    """Where the bases of the composition at ``path`` were loaded from: its ``config.json``, or for a directory
    written by ``save_composition`` the fingerprints' ``name_or_path``."""
    if (path / CONFIG_NAME).is_file():
        config = read_json(path / CONFIG_NAME)
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path / CONFIG_NAME} is not a composition's config (model_type "
                             f"{config.get('model_type')!r}, not {MODEL_TYPE!r}); load a plain model with transformers")
        return str(config.get("anchor_source") or ""), [str(s or "") for s in config.get("augment_sources") or []]
    meta = read_metadata(path)
    return meta["anchor"].get("name_or_path", ""), [m.get("name_or_path", "") for m in meta["augments"]]


def load_pretrained(
    cls: type,
    path: Union[str, Path],
    anchor: Any = None,
    augment: Any = None,
    *,
    tokenizer: Any = None,
    augment_tokenizer: Any = None,
    dtype: Any = None,
    strict: bool = True,
    **kwargs: Any,
) -> Any:
    """Build ``cls`` from the composition at ``path`` on the given bases, or on the bases it records.

    Raises:
        CompositionMismatchError: the bases are not those the composition was trained on (unless ``strict=False``).
        ValueError: no base given and none recorded, or a recorded base cannot be loaded.
    """
    from ..io.bases import load_base
    from ..io.composition_files import load_composition

    path = Path(path)
    if not (path / COMPOSITION_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} holds no composition ({COMPOSITION_CONFIG_NAME} is missing); write one with "
                                "save_pretrained")
    anchor_source, augment_sources = base_sources(path)

    def load(source: str, role: str) -> tuple[Any, Any]:
        if not source:
            raise ValueError(f"The composition at {path} does not record where its {role} was loaded from: pass "
                             f"{role.split()[0]}= to from_pretrained")
        try:
            return load_base(source, dtype=dtype)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"The {role} recorded by {path} cannot be loaded ({err}); pass "
                             f"{role.split()[0]}= to from_pretrained") from None

    if anchor is None:
        anchor, loaded_tokenizer = load(anchor_source, "anchor")
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if augment is None:
        loaded = [load(s, "augment" if len(augment_sources) == 1 else f"augment {a}")
                  for a, s in enumerate(augment_sources)]
        augment = [m for m, _ in loaded]
        if augment_tokenizer is None and tokenizer is not None:
            augment_tokenizer = [t for _, t in loaded]
    return load_composition(cls, path, anchor, augment, strict=strict, tokenizer=tokenizer,
                            augment_tokenizer=augment_tokenizer, **kwargs)
