"""Exploration helper: prepend an identity decoder block to a Llama anchor (a connection after it writes into the embeddings)."""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def with_entry_block(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A copy of ``model`` with one extra block in front whose attention and MLP outputs are zero (identity)."""
    cfg = LlamaConfig.from_dict(model.config.to_dict())
    cfg.num_hidden_layers += 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[0]] + list(cfg.layer_types)
    new = LlamaForCausalLM(cfg)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            state[f"model.layers.{int(i) + 1}.{rest}"] = v
        else:
            state[k] = v
    for k, v in model.state_dict().items():
        if k.startswith("model.layers.0."):
            state[k] = v.clone()
    state["model.layers.0.self_attn.o_proj.weight"].zero_()
    state["model.layers.0.mlp.down_proj.weight"].zero_()
    new.load_state_dict(state)
    return new.eval()


if __name__ == "__main__":
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    n = with_entry_block(m)
    x = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        print("max diff", (m(x).logits - n(x).logits).abs().max().item())
    n.save_pretrained(sys.argv[2])
