"""Augment-state cache: the frozen augments' connected-layer outputs, computed once per example, memory-mapped.

Layout of a cache directory::

    manifest.json                 what the cache was computed from (data, augments, layers, precision)
    offsets.npy                   (N + 1,) int64: example i owns rows offsets[i]:offsets[i+1]
    augment{a}_layer{l}.npy       (total_tokens, D_A): the unpadded states of every example, back to back
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core import introspect
from ..core.masking import positions_from_mask
from ..version import __version__
from .atomic import atomic_write_text
from .collate import Collator
from .datasets import data_fingerprint

MANIFEST_NAME = "manifest.json"
OFFSETS_NAME = "offsets.npy"
_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
                 torch.bfloat16: np.int16}  # bf16 as raw bits


def cache_key(model: Any, dataset: Dataset, precision: str) -> dict[str, Any]:
    """What a cache depends on: the data, each augment and its connected layers, the autocast precision."""
    return {
        "lmcompose_version": __version__,
        "num_examples": len(dataset),
        "data_sha256": data_fingerprint(dataset),
        "augments": [introspect.fingerprint(m) for m in model.augments],
        "layers": [sorted({i for i, _ in pairs}) for pairs in model.resolved_connections],
        "precision": precision,
    }


def _layer_file(a: int, layer: int) -> str:
    return f"augment{a}_layer{layer}.npy"


class AugmentStateCache:
    """Read side of a cache directory: the states of one example as tensors.

    Args:
        directory: a directory written by :func:`build_augment_cache`.
    """

    def __init__(self, directory: Union[str, Path]) -> None:
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        self.offsets = np.load(self.directory / OFFSETS_NAME)
        self.dtypes = [getattr(torch, name) for name in self.manifest["dtypes"]]  # per augment
        self.arrays = [
            {layer: np.load(self.directory / _layer_file(a, layer), mmap_mode="r") for layer in layers}
            for a, layers in enumerate(self.manifest["layers"])
        ]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def states(self, index: int) -> list[dict[int, torch.Tensor]]:
        """Per augment, ``{layer: (T_i, D_A)}`` for example ``index`` (a copy out of the memory map)."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        out = []
        for layers, dtype in zip(self.arrays, self.dtypes):
            tensors = {}
            for layer, array in layers.items():
                x = torch.from_numpy(np.array(array[start:end]))  # (T_i, D_A), copied out of the map
                tensors[layer] = x.view(torch.bfloat16) if dtype == torch.bfloat16 else x
            out.append(tensors)
        return out


@torch.no_grad()
def build_augment_cache(
    model: Any, dataset: Dataset, directory: Union[str, Path], key: dict[str, Any], batch_size: int = 16, pad_token_id: int = 0
) -> AugmentStateCache:
    """Run every augment once over ``dataset`` and store its connected-layer outputs per example.

    Examples are batched with right padding and positions from the mask, so each example's states
    are those it gets alone. The directory is built under a temporary name and renamed when complete.

    Args:
        model: a ComposedModel whose augments share the anchor's tokenizer.
        dataset: items with ``input_ids``.
        directory: where the cache lives (replaced when it exists).
        key: from :func:`cache_key`; stored as the manifest.
        batch_size: examples per augment forward.
        pad_token_id: id put on padding.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    collate = Collator(pad_token_id, "right")
    device = model.device
    arrays: list[dict[int, np.ndarray]] = []  # per augment, {layer: (total_tokens, D_A) memory map}
    dtypes: list[torch.dtype] = []  # per augment
    try:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            batch = collate([dataset[i] for i in indices])
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, T) each
            for a in range(len(model.augments)):
                states = model.augment_hidden(a, ids, mask, positions_from_mask(mask))  # {layer: (B, T, D_A)}
                if len(arrays) <= a:
                    dtypes.append(next(iter(states.values())).dtype)
                    arrays.append(
                        {
                            layer: np.lib.format.open_memmap(
                                tmp / _layer_file(a, layer),
                                mode="w+",
                                dtype=_NUMPY_DTYPES[dtypes[a]],
                                shape=(int(offsets[-1]), x.shape[-1]),
                            )
                            for layer, x in states.items()
                        }
                    )
                for layer, x in states.items():
                    x = x.to(dtypes[a]).cpu()
                    raw = x.view(torch.int16) if dtypes[a] == torch.bfloat16 else x
                    for row, i in enumerate(indices):
                        arrays[a][layer][offsets[i] : offsets[i + 1]] = raw[row, : lengths[i]].numpy()
        for layers in arrays:
            for array in layers.values():
                array.flush()
        del arrays
        np.save(tmp / OFFSETS_NAME, offsets)
        manifest = dict(key, dtypes=[str(d).replace("torch.", "") for d in dtypes], total_tokens=int(offsets[-1]))
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return AugmentStateCache(directory)


def open_or_build_cache(
    model: Any, dataset: Dataset, directory: Union[str, Path], precision: str = "no", batch_size: int = 16, pad_token_id: int = 0
) -> tuple[AugmentStateCache, bool]:
    """The cache in ``directory`` when it was computed from this data, these augments and precision; else a new one.

    Returns:
        (cache, built): built is False when an existing cache was reused.
    """
    for a in range(len(model.augments)):
        if not model.shares_tokenizer(a):
            raise NotImplementedError("The augment-state cache needs augments that share the anchor's tokenizer")
    key = cache_key(model, dataset, precision)
    manifest_file = Path(directory) / MANIFEST_NAME
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        if {k: manifest.get(k) for k in key} == json.loads(json.dumps(key)):
            return AugmentStateCache(directory), False
    return build_augment_cache(model, dataset, directory, key, batch_size, pad_token_id), True


class WithAugmentStates(Dataset):
    """A dataset whose items also carry their cached augment states (``"augment_states"``).

    Args:
        dataset: the tokenized examples.
        cache: their states, in the same order.
    """

    def __init__(self, dataset: Dataset, cache: AugmentStateCache) -> None:
        if len(dataset) != len(cache):
            raise ValueError(f"The cache holds {len(cache)} examples but the dataset has {len(dataset)}")
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["augment_states"] = self.cache.states(index)
        return item


def with_cached_states(model: Any, train_dataset: Dataset, eval_dataset: Optional[Dataset], directory: Union[str, Path],
                       precision: str = "no", batch_size: int = 16, pad_token_id: int = 0
                       ) -> tuple[Dataset, Optional[Dataset], bool]:
    """The training (and evaluation) data with their augment states, from ``directory/train`` and ``directory/eval``.

    Returns:
        (train data, eval data or None, whether the training cache was built rather than reused).
    """
    cache, built = open_or_build_cache(model, train_dataset, Path(directory) / "train", precision, batch_size, pad_token_id)
    eval_data = None
    if eval_dataset is not None:
        eval_cache, _ = open_or_build_cache(model, eval_dataset, Path(directory) / "eval", precision, batch_size,
                                            pad_token_id)
        eval_data = WithAugmentStates(eval_dataset, eval_cache)
    return WithAugmentStates(train_dataset, cache), eval_data, built
