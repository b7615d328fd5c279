"""The key-value experiment end to end on a handful of keys: files, rows, caching of the bases."""

import json

import torch

from lmcompose.demos.jobs import cpu_model
from lmcompose.demos.kv.config import KVPipelineConfig, paper_config, quick_config
from lmcompose.demos.kv.pipeline import evaluation_sets, load_bases, lora_rank_for, plain_generate, run_demo, score_all
from lmcompose.demos.kv.task import KVRepository, KVTaskConfig


def tiny_config(workers: int = 2) -> KVPipelineConfig:
    return KVPipelineConfig(
        task=KVTaskConfig(num_keys=30, value_max=3, min_operands=2, max_operands=2, num_eval=20),
        anchor_layers=2, anchor_hidden=32, anchor_heads=2, anchor_steps=30,
        augment_layers=1, augment_hidden=32, augment_heads=2, augment_steps=30,
        batch_size=16, connections=[[0, -1], [0, 1]], compose_steps=15, baseline_steps=10, compose_heads=4, threads=1,
        workers=workers,
    )


def test_pipeline_end_to_end_then_cached(tmp_path):
    results = run_demo(str(tmp_path), progress=False, config=tiny_config())
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
    rows = results["rows"]
    assert set(rows) == {"m_A", "m_B", "CALM", "CALM (random m_A)", "LoRA on m_B", "m_B fine-tuned on D_C"}
    for row in rows.values():  # each score counts whole expressions out of the 20 evaluated
        assert all((row[d] * 20 / 100).is_integer() for d in ("KV-SUBS", "NUM-MATH", "KV-MATH"))
    bases_dir = next((tmp_path / "bases").iterdir())
    anchor, augment, tok = load_bases(bases_dir)  # the saved bases score what the table says
    evals = evaluation_sets(KVRepository(tiny_config().task))
    assert score_all(plain_generate(augment, tok), evals, tok) == {d: rows["m_A"][d] for d in evals}
    assert score_all(plain_generate(anchor, tok), evals, tok) == {d: rows["m_B"][d] for d in evals}
    assert rows["CALM"]["trainable_params"] == rows["CALM (random m_A)"]["trainable_params"]
    assert results["bases"]["cached"] is False
    report = (tmp_path / "results.md").read_text()
    assert "| CALM |" in report
    ceiling = KVRepository(tiny_config().task).key_blind_ceiling()
    assert results["key_blind_kv_math"] == ceiling and f"can expect at most {ceiling:.1f}% on KV-MATH" in report
    assert results["cpu"] == cpu_model() and results["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"CPU: {results['cpu']}, kernels {results['cpu_capability']} " in report

    bases = next((tmp_path / "bases").iterdir())
    anchor_file = bases / "anchor" / "model.safetensors"
    before = anchor_file.read_bytes()
    assert results["workers"] == 2
    again = run_demo(str(tmp_path), progress=False, config=tiny_config(workers=1))
    assert again["bases"]["cached"] is True  # the second run skips base training
    # every row is the same whether its training ran in a worker process or in this one
    assert again["rows"] == results["rows"]
    assert anchor_file.read_bytes() == before  # training CALM, LoRA and fine-tuning never touched the saved bases


def test_the_anchor_reads_every_key_as_unknown(tmp_path):
    from lmcompose.demos.kv.pipeline import load_or_train_bases
    from lmcompose.demos.kv.task import KVRepository

    config = tiny_config(workers=1)
    repo = KVRepository(config.task)
    anchor, augment, tok, _ = load_or_train_bases(config, repo, tmp_path)
    vocab = tok.get_vocab()
    anchor_rows, augment_rows = anchor.get_input_embeddings().weight, augment.get_input_embeddings().weight
    keys = [vocab[k] for k in repo.keys]
    assert torch.equal(anchor_rows[keys], anchor_rows[tok.unk_token_id].expand(len(keys), -1))  # still, after training
    assert not torch.equal(augment_rows[keys[0]], augment_rows[keys[1]])  # the augment tells keys apart
    with torch.no_grad():  # so the anchor alone cannot tell two expressions apart that differ only in their keys
        a, b = (anchor(torch.tensor([[tok.bos_token_id] + [vocab[w] for w in text.split()]])).logits
                for text in (f"{repo.keys[0]} + {repo.keys[1]} =", f"{repo.keys[2]} + {repo.keys[3]} ="))
    assert torch.equal(a, b)


def test_bases_are_the_same_trained_side_by_side_or_in_turn(tmp_path):
    from lmcompose.demos.kv.pipeline import load_or_train_bases
    from lmcompose.demos.kv.task import KVRepository

    configs = {w: tiny_config(workers=w) for w in (1, 2)}
    repo = KVRepository(configs[1].task)
    infos = {w: load_or_train_bases(c, repo, tmp_path / str(w))[3] for w, c in configs.items()}
    assert infos[1]["cached"] is False and infos[2]["cached"] is False
    folder = configs[2].base_fingerprint()
    assert configs[1].base_fingerprint() == folder  # workers are not part of the bases' fingerprint
    for part in ("anchor/model.safetensors", "augment/model.safetensors", "tokenizer/tokenizer.json"):
        assert (tmp_path / "1" / folder / part).read_bytes() == (tmp_path / "2" / folder / part).read_bytes(), part


def test_lora_rank_matches_the_budget_and_presets_differ():
    from lmcompose.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=2)
    per_rank = lora_rank_for(model, 10**9) and sum(
        m.in_features + m.out_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    )
    assert lora_rank_for(model, 3 * per_rank) == 3 and lora_rank_for(model, 1) == 1
    assert paper_config().task.num_keys == 25_000 and quick_config().task.num_keys < 1000
    assert quick_config().base_fingerprint() != paper_config().base_fingerprint()
    assert quick_config().base_fingerprint() == quick_config().base_fingerprint()


def test_worker_count_follows_cores_and_threads(monkeypatch):
    from lmcompose.demos.kv.pipeline import workers_for

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert workers_for(KVPipelineConfig(threads=1)) == 4  # one per D_C row at most
    assert workers_for(KVPipelineConfig(threads=4)) == 2
    assert workers_for(KVPipelineConfig(threads=0)) == 1  # one process already uses every core
    assert workers_for(KVPipelineConfig(threads=0, workers=3)) == 3
    assert workers_for(paper_config()) == 1


def test_embedding_noise_only_while_training_and_gone_once_removed():
    from lmcompose.demos.kv.pipeline import embedding_noise
    from lmcompose.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=2)
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        clean = model(ids).logits
        handle = embedding_noise(model, 0.5, seed=0)
        assert torch.equal(model.eval()(ids).logits, clean)
        noisy = model.train()(ids).logits
        assert (noisy - clean).abs().max() > 1e-3
        handle.remove()
        assert torch.equal(model.eval()(ids).logits, clean)


def test_demo_seed_seeds_the_task_and_the_models(tmp_path, monkeypatch):
    import lmcompose.demos.kv.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_experiment", lambda config, cache_dir, log=None: seen.append(config) or {
        "rows": {}, "config": config.to_dict(), "seconds": {}, "bases": {}})
    monkeypatch.setattr("lmcompose.demos.kv.report.write_report", lambda results, out: None)
    for preset in ("quick", "paper"):
        run_demo(str(tmp_path), preset=preset, progress=False, seed=3)
    run_demo(str(tmp_path), progress=False)
    assert [(c.seed, c.task.seed) for c in seen] == [(3, 3), (3, 3), (0, 0)]
    assert seen[1].task.num_keys == paper_config().task.num_keys


def test_cpu_model_names_the_vendor_and_model_or_falls_back(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n\n"
                    "processor\t: 1\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n")
    assert cpu_model(str(info)) == "AuthenticAMD, AMD EPYC 9B14"  # the first processor's, once
    import platform

    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert cpu_model(str(tmp_path / "missing")) == "arm"  # no cpuinfo (macOS, Windows): the platform's name
