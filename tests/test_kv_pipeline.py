"""The key-value experiment end to end on a handful of keys: files, rows, caching of the bases."""

import json

import torch

from lmcompose.tasks.kv import KVTaskConfig
from lmcompose.tasks.kv_pipeline import KVPipelineConfig, lora_rank_for, paper_config, quick_config, run_demo


def tiny_config() -> KVPipelineConfig:
    return KVPipelineConfig(
        task=KVTaskConfig(num_keys=30, value_max=3, min_operands=2, max_operands=2, num_eval=20),
        anchor_layers=2, anchor_hidden=32, anchor_heads=2, anchor_steps=30,
        augment_layers=1, augment_hidden=32, augment_heads=2, augment_steps=30,
        batch_size=16, connections=[[0, 0], [0, 1]], compose_steps=15, baseline_steps=10, compose_heads=4, threads=0,
    )


def test_pipeline_end_to_end_then_cached(tmp_path):
    results = run_demo(str(tmp_path), progress=False, config=tiny_config())
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
    rows = results["rows"]
    assert set(rows) == {"m_A", "m_B", "CALM", "CALM (random m_A)", "LoRA on m_B", "m_B fine-tuned on D_C"}
    for row in rows.values():
        assert all(0.0 <= row[d] <= 100.0 for d in ("KV-SUBS", "NUM-MATH", "KV-MATH"))
    assert rows["CALM"]["trainable_params"] == rows["CALM (random m_A)"]["trainable_params"]
    assert results["bases"]["cached"] is False
    assert "| CALM |" in (tmp_path / "results.md").read_text()

    bases = next((tmp_path / "bases").iterdir())
    anchor_file = bases / "anchor" / "model.safetensors"
    before = anchor_file.read_bytes()
    again = run_demo(str(tmp_path), progress=False, config=tiny_config())
    assert again["bases"]["cached"] is True  # the second run skips base training
    assert again["rows"]["m_B"] == results["rows"]["m_B"]  # the cached anchor is the same model
    assert anchor_file.read_bytes() == before  # training CALM, LoRA and fine-tuning never touched the saved bases


def test_lora_rank_matches_the_budget_and_presets_differ():
    from lmcompose.models import tiny_causal_lm

    model = tiny_causal_lm("llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=2)
    per_rank = lora_rank_for(model, 10**9) and sum(
        m.in_features + m.out_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    )
    assert lora_rank_for(model, 3 * per_rank) == 3 and lora_rank_for(model, 1) == 1
    assert paper_config().task.num_keys == 25_000 and quick_config().task.num_keys < 1000
    assert quick_config().base_fingerprint() != paper_config().base_fingerprint()
    assert quick_config().base_fingerprint() == quick_config().base_fingerprint()
