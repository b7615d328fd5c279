import json
import os

import pytest
import torch

from lmcompose import ComposedModel, CompositionConfig, CompositionMismatchError
from lmcompose.io.composition_files import CONFIG_NAME, WEIGHTS_NAME
from lmcompose.testing import tiny_causal_lm

from helpers import randomize_composition


def bases(anchor_seed=1, augment_seed=2, **anchor_sizes):
    anchor = tiny_causal_lm("llama", hidden_size=48, num_heads=6, seed=anchor_seed, **anchor_sizes)
    augment = tiny_causal_lm("gpt2", hidden_size=32, num_layers=8, seed=augment_seed)
    return anchor, augment


@pytest.fixture
def saved(tmp_path):
    anchor, augment = bases()
    model = ComposedModel(anchor, augment, CompositionConfig(num_connections=2, rotary=True))
    randomize_composition(model)
    model.save_composition(tmp_path / "comp")
    return model, tmp_path / "comp"


def test_save_then_load_gives_identical_logits(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporary files left behind
    anchor, augment = bases()
    loaded = ComposedModel.from_composition(path, anchor, augment)
    assert loaded.resolved_connections == model.resolved_connections
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_composition_file_holds_only_the_composition(saved):
    model, path = saved
    composition_bytes = sum(p.numel() * 4 for p in model.composition_parameters())
    assert os.path.getsize(path / WEIGHTS_NAME) < composition_bytes + 4096
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["anchor"]["model_type"] == "llama" and meta["augments"][0]["model_type"] == "gpt2"
    assert meta["connections"] == [[[3, 1], [7, 3]]]


def test_loading_onto_other_bases_names_what_differs(saved):
    _, path = saved
    anchor, augment = bases(num_layers=6)
    with pytest.raises(CompositionMismatchError, match="anchor num_layers: saved 4, given 6"):
        ComposedModel.from_composition(path, anchor, augment)
    anchor, augment = bases(anchor_seed=7)  # same shapes, other weights
    with pytest.raises(CompositionMismatchError, match="anchor weights differ"):
        ComposedModel.from_composition(path, anchor, augment)
    with pytest.warns(UserWarning, match="anchor weights differ"):
        ComposedModel.from_composition(path, anchor, augment, strict=False)
    anchor, _ = bases()
    with pytest.raises(CompositionMismatchError, match="augment model_type: saved 'gpt2', given 'llama'"):
        ComposedModel.from_composition(path, anchor, tiny_causal_lm("llama", num_layers=8))
    with pytest.raises(CompositionMismatchError, match="composes 1 augment model"):
        ComposedModel.from_composition(path, anchor, [bases()[1], bases()[1]])


def test_missing_truncated_and_malformed_files_are_refused(saved, tmp_path):
    _, path = saved
    anchor, augment = bases()
    with pytest.raises(FileNotFoundError, match="No composition directory"):
        ComposedModel.from_composition(tmp_path / "nowhere", anchor, augment)
    weights = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="truncated"):
        ComposedModel.from_composition(path, anchor, augment)
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta.pop("weights_bytes")
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not have the sha256 composition_config.json records"):
        ComposedModel.from_composition(path, anchor, augment)
    meta.pop("weights_sha256")  # a file of an older lmcompose, which recorded no digest
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        ComposedModel.from_composition(path, anchor, augment)
    (path / CONFIG_NAME).write_text('{"config": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        ComposedModel.from_composition(path, anchor, augment)
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    os.remove(path / WEIGHTS_NAME)  # the JSON names the weights file it needs
    with pytest.raises(FileNotFoundError, match="weights are missing"):
        ComposedModel.from_composition(path, anchor, augment)


def test_weights_that_disagree_with_the_config_are_refused(saved, tmp_path):
    model, path = saved
    anchor, augment = bases()
    other = ComposedModel(anchor, augment, CompositionConfig(num_connections=1))
    other.save_composition(tmp_path / "other")
    os.replace(tmp_path / "other" / WEIGHTS_NAME, path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="has 44480 bytes but composition_config.json records|truncated or belongs"):
        ComposedModel.from_composition(path, anchor, augment)
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta.pop("weights_bytes")
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not have the sha256 composition_config.json records"):
        ComposedModel.from_composition(path, anchor, augment)
    meta["weights_sha256"] = json.loads((tmp_path / "other" / CONFIG_NAME).read_text())["weights_sha256"]
    (path / CONFIG_NAME).write_text(json.dumps(meta))  # the other save's digest: the weights' own digest tells
    with pytest.raises(ValueError, match="is not the one .* was saved with .* come from different saves"):
        ComposedModel.from_composition(path, anchor, augment)
    for key in ("weights_sha256",):  # a JSON of an older lmcompose, without the digests: the tensor names tell
        meta.pop(key)
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    import safetensors.torch

    state = safetensors.torch.load_file(path / WEIGHTS_NAME)
    safetensors.torch.save_file(state, path / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match composition_config.json: missing tensors"):
        ComposedModel.from_composition(path, anchor, augment)


def test_a_failed_write_keeps_the_previous_composition(saved, monkeypatch):
    model, path = saved
    before = (path / WEIGHTS_NAME).read_bytes()
    import lmcompose.io.composition_files as checkpoint

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with torch.no_grad():
        model.connections[0][0].out.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_composition(path)
    assert (path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_bfloat16_composition_round_trip(tmp_path):
    anchor, augment = bases()
    anchor = anchor.to(torch.bfloat16)
    model = ComposedModel(anchor, augment)
    randomize_composition(model)
    model.save_composition(tmp_path / "bf16")
    loaded = ComposedModel.from_composition(tmp_path / "bf16", anchor, augment)
    for a, b in zip(model.composition_parameters(), loaded.composition_parameters()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)


def test_a_weights_file_outside_the_known_names_is_refused(saved):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["weights_file"] = "../../elsewhere.safetensors"
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    anchor, augment = bases()
    with pytest.raises(ValueError, match="'weights_file' must be one of composition.safetensors, model.safetensors"):
        ComposedModel.from_composition(path, anchor, augment)
