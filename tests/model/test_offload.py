"""An anchor dispatched with a device_map, its embeddings and first block offloaded to disk: the composition is
placed where each anchor block computes, gives the in-memory composition's logits, trains only its connections
and saves and loads exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.core import introspect
from lmcompose.io.datasets import TokenizedDataset
from lmcompose.train import train

from helpers import composition_weights, randomize_composition, tiny_pair
from helpers import train_config as config

pytestmark = pytest.mark.usefixtures("one_thread")
CONNECTIONS = [[0, -1], [1, 0], [3, 1]]  # the embeddings and the offloaded block 0 are connected too


@pytest.fixture()
def anchors(tmp_path):
    """The tiny anchor in memory, and the same weights loaded with its embeddings and block 0 on disk."""
    anchor, _ = tiny_pair()
    anchor.save_pretrained(tmp_path / "anchor")
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "anchor", device_map=device_map,
                                                     offload_folder=tmp_path / "offload").eval()
    assert offloaded.get_input_embeddings().weight.device.type == "meta"  # really not in memory
    return anchor, offloaded


def composed_pair(anchors):
    anchor, offloaded = anchors
    config = CompositionConfig(connections=CONNECTIONS)
    in_memory = ComposedModel(anchor, tiny_pair()[1], config)
    randomize_composition(in_memory)
    on_disk = ComposedModel(offloaded, tiny_pair()[1], config)
    on_disk.connections.load_state_dict(in_memory.connections.state_dict())
    return in_memory, on_disk


def test_an_offloaded_anchor_gives_the_in_memory_logits(anchors):
    in_memory, on_disk = composed_pair(anchors)
    assert all(p.device.type == "cpu" for p in on_disk.composition_parameters())  # not meta: where block 0 computes
    assert on_disk.device == torch.device("cpu")
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = in_memory(ids, attention_mask=mask).logits
    assert torch.allclose(on_disk(ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
    with on_disk.disable_composition(), in_memory.disable_composition():
        assert torch.allclose(on_disk(ids).logits, in_memory(ids).logits, atol=1e-6, rtol=0)
    greedy = in_memory.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(on_disk.generate(ids[:1], max_new_tokens=4, do_sample=False), greedy)


def test_fingerprints_read_offloaded_weights_so_a_composition_moves_between_them(anchors, tmp_path):
    anchor, offloaded = anchors
    assert introspect.weights_digest(offloaded) == introspect.weights_digest(anchor)
    assert introspect.weight_signature(offloaded) == introspect.weight_signature(anchor)
    changed = AutoModelForCausalLM.from_pretrained(tmp_path / "anchor", device_map={"": "cpu"})
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    assert introspect.weights_digest(changed) != introspect.weights_digest(offloaded)

    in_memory, on_disk = composed_pair(anchors)
    on_disk.save_composition(tmp_path / "from-disk")
    loaded = ComposedModel.from_composition(tmp_path / "from-disk", anchor, tiny_pair()[1])  # strict: same bases
    assert all(torch.equal(loaded.composition_state_dict()[k], v) for k, v in on_disk.composition_state_dict().items())
    back = ComposedModel.from_composition(tmp_path / "from-disk", offloaded, tiny_pair()[1])
    assert all(torch.equal(back.composition_state_dict()[k], v) for k, v in in_memory.composition_state_dict().items())


def test_training_with_an_offloaded_anchor_moves_only_the_connections(anchors, tmp_path):
    _, offloaded = anchors
    model = ComposedModel(offloaded, tiny_pair()[1], CompositionConfig(connections=CONNECTIONS))
    bases = {**{n: t.clone() for n, t in introspect.offloaded_tensors(offloaded).items()},
             **{n: p.detach().clone() for n, p in offloaded.named_parameters() if p.device.type != "meta"}}
    before = composition_weights(model)
    data = TokenizedDataset.from_token_ids(torch.randint(4, 40, (8, 10), generator=torch.Generator().manual_seed(1)).tolist())
    train(model, data, None, config(max_steps=3), tmp_path / "run")
    after = model.composition_state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in before)
    current = {**introspect.offloaded_tensors(offloaded),
               **{n: p.detach() for n, p in offloaded.named_parameters() if p.device.type != "meta"}}
    assert current.keys() == bases.keys() and all(torch.equal(current[n], bases[n]) for n in bases)
    loaded = ComposedModel.from_composition(tmp_path / "run" / "composition", offloaded, tiny_pair()[1])
    assert all(torch.equal(loaded.composition_state_dict()[k], v) for k, v in after.items())


def test_a_connected_block_that_is_nowhere_is_refused_naming_it():
    anchor, augment = tiny_pair()
    anchor.model.layers[1].to("meta")  # what a device_map that leaves the block out leaves behind
    with pytest.raises(ValueError, match=r"anchor block 1 has no weights on any device .*device_map that places every "
                                         r"block"):
        ComposedModel(anchor, augment, CompositionConfig(connections=[[3, 1]]))
