"""Composition files: ``composition_config.json`` + ``composition.safetensors``, written atomically."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import introspect
from ..core.config import CompositionConfig
from ..version import __version__
from .atomic import atomic_write, atomic_write_text
from .safe_files import bytes_digest, file_digest, read_json

CONFIG_NAME = "composition_config.json"
WEIGHTS_NAME = "composition.safetensors"
PRETRAINED_WEIGHTS_NAME = "model.safetensors"  # save_pretrained's name: transformers' Trainer resumes from it
WEIGHTS_NAMES = (WEIGHTS_NAME, PRETRAINED_WEIGHTS_NAME)
FORMAT_VERSION = 1


class CompositionMismatchError(ValueError):
    """A saved composition does not fit the base models it is being loaded onto."""


def composition_metadata(model: Any) -> dict[str, Any]:
    """The JSON side of a composition: config, resolved connections, dimensions, base fingerprints."""
    return {
        "format_version": FORMAT_VERSION,
        "lmcompose_version": __version__,
        "config": model.composition_config.to_dict(),
        "connections": [[list(p) for p in pairs] for pairs in model.resolved_connections],
        "anchor_hidden_size": introspect.hidden_size(model.anchor),
        "augment_hidden_sizes": [introspect.hidden_size(m) for m in model.augments],
        "num_heads": model.connections[0][0].num_heads,
        "dtype": str(model.dtype).replace("torch.", ""),
        "anchor": introspect.fingerprint(model.anchor),
        "augments": [introspect.fingerprint(m) for m in model.augments],
    }


WEIGHT_FIELDS = ("weights_bytes", "weights_sha256")  # what the JSON says of the weights file, known only after it


def description_digest(meta: dict[str, Any]) -> str:
    """The sha256 of a composition's JSON without what it records of the weights file: stored in the weights'
    metadata, so a config and weights from two different saves are told apart."""
    described = {k: v for k, v in meta.items() if k not in WEIGHT_FIELDS}
    return bytes_digest(json.dumps(described, sort_keys=True).encode())


def save_composition(model: Any, path: Union[str, Path], weights_name: str = WEIGHTS_NAME, prefix: str = "",
                     weights: Optional[dict[str, Any]] = None, metadata: Optional[dict[str, Any]] = None) -> None:
    """Write ``model``'s composition to directory ``path`` (never the base models).

    The weights are written first, carrying the digest of the JSON that describes them; then the JSON, recording the
    weights' size and sha256. Each file is written atomically; loading checks both ways.

    Args:
        weights_name: the weights file, one of :data:`WEIGHTS_NAMES`.
        prefix: put before every tensor name (``"connections."``: the names in the composed model's state dict).
        weights: the composition's weights as full tensors (default: the model's own), e.g. gathered from shards.
        metadata: :func:`composition_metadata` of the model (default: read now), e.g. taken before it was sharded.
    """
    path = Path(path)
    weights = model.composition_state_dict() if weights is None else weights
    state = {prefix + k: v.detach().contiguous().cpu() for k, v in weights.items()}
    meta = dict(composition_metadata(model) if metadata is None else metadata)
    meta["tensors"] = {k: list(v.shape) for k, v in state.items()}
    if weights_name != WEIGHTS_NAME or prefix:
        meta["weights_file"], meta["key_prefix"] = weights_name, prefix
    metadata = {"format": "pt", "composition_sha256": description_digest(meta)}
    size = sum(v.numel() * v.element_size() for v in state.values())
    atomic_write(path / weights_name, lambda tmp: save_file(state, tmp, metadata=metadata), size)
    meta["weights_bytes"] = os.path.getsize(path / weights_name)
    meta["weights_sha256"] = file_digest(path / weights_name)
    atomic_write_text(path / CONFIG_NAME, json.dumps(meta, indent=2))


def read_metadata(path: Union[str, Path]) -> dict[str, Any]:
    """Read and check a composition directory's JSON; errors say which file and what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No composition directory at {path}")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} holds no {CONFIG_NAME}: is it a composition saved by lmcompose?")
    meta = read_json(config_file, "composition config")
    for key in ("config", "connections", "anchor", "augments"):
        if not isinstance(meta, dict) or key not in meta:
            raise ValueError(f"{config_file} has no {key!r} entry; it is not an lmcompose composition config")
    if meta.get("weights_file", WEIGHTS_NAME) not in WEIGHTS_NAMES or not isinstance(meta.get("key_prefix", ""), str):
        raise ValueError(f"{config_file}: 'weights_file' must be one of {', '.join(WEIGHTS_NAMES)}, got "
                         f"{meta.get('weights_file')!r:.80}; the file is damaged or not written by lmcompose")
    if not weights_path(path, meta).is_file():
        raise FileNotFoundError(f"{path} holds no {weights_path(path, meta).name}: the composition weights are missing")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{config_file}: format_version must be an integer, got {version!r}; the file is damaged")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{config_file} was written by a newer lmcompose (format {meta['format_version']}); upgrade lmcompose"
        )
    _check_metadata_types(meta, config_file)
    return meta


def weights_path(path: Path, meta: dict[str, Any]) -> Path:
    """The weights file of the composition at ``path`` whose JSON is ``meta``."""
    return path / meta.get("weights_file", WEIGHTS_NAME)


def _check_metadata_types(meta: dict[str, Any], config_file: Path) -> None:
    """Each entry has the type lmcompose writes; anything else is a damaged or foreign file, said so here."""

    def refuse(what: str, value: Any) -> None:
        raise ValueError(f"{config_file}: {what}, got {value!r:.80}; the file is damaged or not written by lmcompose")

    if not isinstance(meta["config"], dict):
        refuse("'config' must be a mapping", meta["config"])
    if not isinstance(meta["connections"], list):
        refuse("'connections' must be a list (per augment) of [augment_layer, anchor_layer] pairs", meta["connections"])
    if not isinstance(meta["augments"], list) or not meta["augments"]:
        refuse("'augments' must be a non-empty list of base-model fingerprints", meta["augments"])
    for role, fingerprint in [("anchor", meta["anchor"])] + [("augments", f) for f in meta["augments"]]:
        if not isinstance(fingerprint, dict):
            refuse(f"each {role!r} fingerprint must be a mapping", fingerprint)
        digest = fingerprint.get("weights_digest")
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
            refuse(f"the {role} weights_digest must be the 64 hex digits of a sha256", digest)
        signature = fingerprint.get("weight_signature")
        if signature is not None and not (
            isinstance(signature, list)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in signature)
        ):
            refuse(f"the {role} weight_signature must be a list of numbers", signature)
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        refuse("'weights_sha256' must be the 64 hex digits of a sha256", digest)
    size = meta.get("weights_bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        refuse("'weights_bytes' must be a non-negative integer", size)
    tensors = meta.get("tensors")
    if tensors is not None and not (
        isinstance(tensors, dict)
        and all(isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
                for shape in tensors.values())
    ):
        refuse("'tensors' must map tensor names to shapes (lists of integers)", tensors)


def compare_fingerprints(saved: dict[str, Any], current: dict[str, Any], role: str) -> tuple[list[str], list[str]]:
    """Differences between a saved fingerprint and a model's: (errors, warnings), each a readable line."""
    errors, notes = [], []
    for key in ("model_type", "hidden_size", "num_layers", "vocab_size"):
        if key in saved and saved[key] != current[key]:
            errors.append(f"{role} {key}: saved {saved[key]!r}, given {current[key]!r}")
    old_sig, new_sig = saved.get("weight_signature"), current["weight_signature"]
    if old_sig is not None and not errors:
        close = len(old_sig) == len(new_sig) and all(
            math.isclose(x, y, rel_tol=2e-2, abs_tol=2e-3) for x, y in zip(old_sig, new_sig)
        )
        if not close:
            errors.append(f"{role} weights differ from those the composition was trained on (embedding sample)")
    if not errors and saved.get("weights_digest") is not None and saved["weights_digest"] != current["weights_digest"]:
        errors.append(f"{role} weights differ from those the composition was trained on (a digest of every tensor)")
    if saved.get("name_or_path") and saved["name_or_path"] != current["name_or_path"]:
        notes.append(f"{role} was loaded from {saved['name_or_path']!r}, now from {current['name_or_path']!r}")
    return errors, notes


def load_composition(
    cls: type,
    path: Union[str, Path],
    anchor: nn.Module,
    augment: Union[nn.Module, Sequence[nn.Module]],
    *,
    strict: bool = True,
    fingerprints: Optional[tuple[dict[str, Any], list[dict[str, Any]]]] = None,
    **kwargs: Any,
) -> Any:
    """Build ``cls(anchor, augment, config)`` from a saved composition and load its weights.

    ``fingerprints`` (the anchor's and the augments') stand in for reading them from the bases, when they were read
    elsewhere: by rank 0 of a sharded run whose other ranks hold the bases empty until they are sharded.
    """
    path = Path(path)
    meta = read_metadata(path)
    augments = list(augment) if isinstance(augment, (list, tuple)) else [augment]
    if len(augments) != len(meta["augments"]):
        raise CompositionMismatchError(
            f"{path} composes {len(meta['augments'])} augment model(s) but {len(augments)} were given"
        )
    if fingerprints is None:
        fingerprints = introspect.fingerprint(anchor), [introspect.fingerprint(m) for m in augments]
    errors, notes = compare_fingerprints(meta["anchor"], fingerprints[0], "anchor")
    for a, (saved, current) in enumerate(zip(meta["augments"], fingerprints[1])):
        role = "augment" if len(augments) == 1 else f"augment {a}"
        e, n = compare_fingerprints(saved, current, role)
        errors += e
        notes += n
    if errors:
        message = f"The composition at {path} was made for other base models:\n  " + "\n  ".join(errors)
        if strict:
            raise CompositionMismatchError(message + "\nLoad the bases it was trained on, or pass strict=False.")
        warnings.warn(message)
    for note in notes:
        warnings.warn(note)

    config_data = dict(meta["config"])
    config_data["num_connections"] = None
    config_data["connections"] = meta["connections"]
    config_data["num_heads"] = meta.get("num_heads", config_data.get("num_heads"))
    try:
        config = CompositionConfig.from_dict(config_data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG_NAME}: its composition config is not valid ({err})") from None
    try:
        model = cls(anchor, augments, config, **kwargs)
    except TypeError as err:  # a damaged config that passed the checks above (e.g. connections of the wrong shape)
        raise ValueError(f"{path / CONFIG_NAME}: its composition config is not valid ({err})") from None

    state = read_weights(path, meta)
    own = {k: tuple(v.shape) for k, v in model.connections.state_dict().items()}
    details = _differences(own, state, "the model needs")
    if details:
        raise ValueError(f"{weights_path(path, meta)} does not match {CONFIG_NAME}: " + "; ".join(details))
    model.connections.load_state_dict(state)
    return model


def read_weights(path: Union[str, Path], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a composition directory, after every check its JSON allows.

    Refused (ValueError naming the file): a size or sha256 other than the JSON records (truncated, damaged, or from
    another save), a JSON other than the one the weights were saved with (the digest in their metadata), a file
    safetensors cannot read, tensor names or shapes other than those the JSON records.
    """
    path = Path(path)
    weights_file = weights_path(path, meta)
    expected_bytes = meta.get("weights_bytes")
    if expected_bytes is not None and os.path.getsize(weights_file) != expected_bytes:
        raise ValueError(
            f"{weights_file} has {os.path.getsize(weights_file)} bytes but {CONFIG_NAME} records {expected_bytes}: "
            "the file is truncated or belongs to another save"
        )
    if meta.get("weights_sha256") is not None and file_digest(weights_file) != meta["weights_sha256"]:
        raise ValueError(f"{weights_file} does not have the sha256 {CONFIG_NAME} records: the file is damaged or "
                         "belongs to another save")
    try:
        with safe_open(str(weights_file), "pt") as f:
            stored = (f.metadata() or {}).get("composition_sha256")
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_file} cannot be read as safetensors ({err}); the file is damaged") from err
    if stored is not None and stored != description_digest(meta):
        raise ValueError(f"{path / CONFIG_NAME} is not the one {weights_file} was saved with (the digest the weights "
                         "carry differs): the two files come from different saves, or the JSON was edited")
    recorded = meta.get("tensors")  # the names and shapes the save wrote: the two files must agree
    if recorded is not None:
        details = _differences({k: tuple(v) for k, v in recorded.items()}, state, f"{CONFIG_NAME} records")
        if details:
            raise ValueError(f"{weights_file} does not match {CONFIG_NAME}: " + "; ".join(details))
    prefix = meta.get("key_prefix", "")
    if any(not k.startswith(prefix) for k in state):
        raise ValueError(f"{weights_file}: a tensor name lacks the prefix {prefix!r} {CONFIG_NAME} records")
    return {k[len(prefix):]: v for k, v in state.items()}


def _differences(expected: dict[str, tuple], state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Readable lines on how the tensors of a file differ from the names and shapes ``source`` expects."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    details = []
    if missing:
        details.append(f"missing tensors {missing[:5]}")
    if unexpected:
        details.append(f"unexpected tensors {unexpected[:5]}")
    for k in [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])][:5]:
        details.append(f"{k}: file has {tuple(state[k].shape)}, {source} {tuple(expected[k])}")
    return details
