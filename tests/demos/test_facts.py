"""The facts demo: the task's invariants, and a miniature run of the whole pipeline (a tiny anchor with SmolLM2's
tokenizer), then the same run again from its caches."""

import itertools
import json
import re

import pytest
import torch

from lmcompose.demos.facts.config import FactsPipelineConfig
from lmcompose.demos.facts.task import (
    CITIES,
    DC_WORDINGS,
    MORE_DC_WORDINGS,
    UNSEEN_WORDINGS,
    FactsTask,
    FactsTaskConfig,
    answer_of,
    city_of,
)
from lmcompose.demos.output import check_output


def test_people_split_into_disjoint_balanced_groups_and_the_same_seed_gives_the_same_task():
    task = FactsTask(FactsTaskConfig(num_people=200, held_in_fraction=0.3, seed=4))
    names_in, names_out = {p.name for p in task.held_in}, {p.name for p in task.held_out}
    assert not names_in & names_out and len(names_in | names_out) == 200 == len({p.name for p in task.people})
    assert [sum(p.city == c for p in task.held_in) for c in CITIES] == [6] * 10  # 30% of each city's 20 people
    again = FactsTask(FactsTaskConfig(num_people=200, held_in_fraction=0.3, seed=4))
    assert again.people == task.people and again.held_in == task.held_in
    assert FactsTask(FactsTaskConfig(num_people=200, seed=5)).people != task.people
    assert list(itertools.islice(task.augment_texts(7, 300), 3)) == list(itertools.islice(again.augment_texts(7, 300), 3))


def test_the_unseen_wordings_are_in_neither_the_composition_data_nor_the_augments_texts():
    task = FactsTask(FactsTaskConfig(num_people=100))
    assert task.composition_rows() == task.composition_rows(["statement", "question"])  # the preset's D_C
    rows = task.composition_rows([*DC_WORDINGS, *MORE_DC_WORDINGS])  # every wording D_C can ask
    assert len(rows) == len(task.held_in) * (len(DC_WORDINGS) + len(MORE_DC_WORDINGS))
    for template in MORE_DC_WORDINGS.values():  # no word the unseen wordings ask with, no possessive after the name
        assert not re.search(r"which|city|home|what|resid|'s", template, re.IGNORECASE)
    held_in = {p.name for p in task.held_in}
    assert all(any(name in r["prompt"] for name in held_in) for r in rows)  # D_C asks only about held-in people
    texts = [t for varied in (False, True) for t in itertools.islice(task.augment_texts(0, 2000, varied), 200)]
    assert any("'s house is in" in t for t in texts)  # the character-level augment's varied forms are among them
    for wording in UNSEEN_WORDINGS.values():
        stem, tail = wording.split("{name}")  # "Q: Which city is ", "'s home?\nA:"; "Question: In what city does "
        assert not any(stem in r["prompt"] or tail in r["prompt"] for r in rows)
        assert not any(stem in t or tail.split("?")[0] + " " in t for t in texts)  # nor "'s home ", " reside "
    assert not any("?" in t or "Q:" in t for t in texts)  # the augment never reads a question
    assert all(r["completion"] in {" " + c for c in CITIES} for r in rows)


def test_preservation_texts_ask_d_cs_wordings_only_about_people_outside_the_task(tiny_anchor_dir):
    from transformers import AutoTokenizer

    from lmcompose.demos.facts.rows import preservation_data
    from lmcompose.demos.facts.task import KNOWN_PEOPLE

    tok = AutoTokenizer.from_pretrained(tiny_anchor_dir)
    plain, mixed = preservation_data(tok, 24, count=200), preservation_data(tok, 24, known=0.25, count=200)
    texts = [tok.decode(mixed[i]["input_ids"]) for i in range(len(mixed))]
    asked = [t for t in texts if any(t == w.format(name=n) for w in DC_WORDINGS.values() for n in KNOWN_PEOPLE)]
    assert len(mixed) == len(plain) == 200 and len(asked) == 50
    task_names = {p.name for p in FactsTask(FactsTaskConfig()).people}
    assert not any(name in t for t in texts for name in task_names)


def test_sums_are_read_from_the_first_line_and_cities_from_the_first_word():
    assert answer_of(" 12.\n3 + 4 =") == "12" and answer_of(" 7") == "7" and answer_of("\n7") == ""
    # a statement goes on after the city: its first word is the answer, a newline before it is no answer
    assert city_of(" Paris, France") == "Paris" and city_of(" Rome and is") == "Rome" and city_of(" Vienna\nB") == "Vienna"
    assert city_of(" Parisian") == "Parisian" and city_of("\nParis") == "" and city_of(", Paris") == ""


def test_a_character_level_answer_gets_tokens_enough_for_the_longest_city_and_one_more():
    from lmcompose.demos.facts.augments import char_tokenizer
    from lmcompose.demos.facts.evaluation import answer_tokens

    assert answer_tokens(char_tokenizer()) == len(" " + max(CITIES, key=len)) + 1 == 8  # 3 read " Pa", never a city


def test_an_output_directory_belongs_to_one_demo(tmp_path):
    check_output(tmp_path / "a", "facts")
    check_output(tmp_path / "a", "facts")  # the same demo again: fine
    with pytest.raises(ValueError, match=r"holds the files of the facts demo .*give the kv demo another --output"):
        check_output(tmp_path / "a", "kv")
    (tmp_path / "old" / "bases").mkdir(parents=True)  # a key-value output written before the marker existed
    with pytest.raises(ValueError, match="holds the files of the kv demo"):
        check_output(tmp_path / "old", "facts")


def tiny_config() -> FactsPipelineConfig:
    return FactsPipelineConfig(
        task=FactsTaskConfig(num_people=40, held_in_fraction=0.3), same_blocks=2, same_steps=3, same_rows=2,
        same_length=16, char_layers=1, char_hidden=32, char_heads=2, char_steps=3, char_rows=2, char_length=32,
        same_connections=[[1, 1], [1, 3]], char_connections=[[0, 2]], compose_steps=2, char_compose_steps=2,
        compose_batch=4,
        baseline_steps=2, preserve_length=8, eval_held_in=3, eval_held_out=4, ordinary_tokens=256, skill_items=5,
        cpu_kernels=None, workers=1)  # every job in this process


@pytest.fixture(scope="module")
def tiny_anchor_dir(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer, saved where the pipeline looks for its anchor."""
    from lmcompose.io.bases import load_tokenizer, smollm2_gguf
    from lmcompose.testing import tiny_causal_lm

    try:
        smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    tokenizer = load_tokenizer("smollm2-135m")
    anchor = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=4, num_heads=4, seed=1)
    folder = tmp_path_factory.mktemp("facts") / "anchor"
    anchor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_pipeline_end_to_end_then_from_its_caches(tiny_anchor_dir, tmp_path, monkeypatch):
    import dataclasses
    import shutil

    import lmcompose.demos.facts.pipeline as pipeline
    from lmcompose.demos.jobs import run_jobs

    out = tmp_path / "out"
    shutil.copytree(tiny_anchor_dir, out / "anchor")
    results = pipeline.run_demo(str(out), progress=False, config=tiny_config())
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    rows = results["rows"]
    assert list(rows) == ["SmolLM2 alone", "augment alone (same tokenizer)", "augment alone (characters)",
                          "CALM (same tokenizer)", "CALM (characters)", "CALM (random augment)", "LoRA on SmolLM2",
                          "SmolLM2 fine-tuned on D_C"]
    for row in rows.values():  # every score counts whole people out of those asked
        assert all((row[f"held-out {w}"] * 4 / 100).is_integer() and (row[f"held-in {w}"] * 3 / 100).is_integer()
                   for w in (*DC_WORDINGS, *UNSEEN_WORDINGS))
    assert rows["SmolLM2 alone"]["kl"] == 0.0 and "loss" not in rows["augment alone (characters)"]
    assert rows["CALM (same tokenizer)"]["trainable_params"] == rows["CALM (random augment)"]["trainable_params"]
    assert results["cached"] == {"augments": False, "rows": False}
    report = (out / "results.md").read_text()
    assert "| CALM (characters) |" in report and "KL from SmolLM2" in report
    assert results["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # cpu_kernels=None: this process's
    assert f"CPU kernels: {results['cpu_capability']} " in report
    from lmcompose.demos.jobs import cpu_model

    assert results["cpu"] == cpu_model() and f"CPU: {results['cpu']} " in report
    from lmcompose.demos.facts.config import with_settings
    from lmcompose.demos.facts.report import changed_settings

    changed = changed_settings(results["config"])  # the report's settings line runs this config again
    assert "Settings: the preset but " + " ".join(changed) in report
    assert with_settings(FactsPipelineConfig(task=FactsTaskConfig(seed=tiny_config().task.seed),
                                             seed=tiny_config().seed), changed) == tiny_config()

    from lmcompose.demos.facts.scoring import score_rows

    two = dataclasses.replace(tiny_config(), workers=2)  # the scoring tasks shared by two processes
    assert score_rows(two, pipeline.prepare(two, out, None)) == rows

    # the compositions replay the prefix of the anchor's own forward on ordinary text: every digit as computed alone
    from lmcompose.demos.facts import scoring
    from lmcompose.demos.facts.evaluation import ordinary_cost, ordinary_windows
    from lmcompose.demos.facts.rows import CALM_ROWS, load_anchor

    anchor, tokenizer = load_anchor(out / "anchor")
    prepared = {**pipeline.prepare(tiny_config(), out, None), "config": tiny_config()}
    compositions = {row: scoring.row_model(prepared, row, anchor, tokenizer)[0] for row in CALM_ROWS}
    logits = {row: scoring.composed_logits(model) for row, model in compositions.items()}
    windows = ordinary_windows(tokenizer, 256)
    runs = []
    handle = anchor.model.layers[0].self_attn.register_forward_hook(lambda *_: runs.append(1))
    shared = ordinary_cost(scoring.ordinary_reference(anchor, list(compositions.values())), logits, windows)
    handle.remove()
    alone = ordinary_cost(lambda batch: (anchor(**batch, use_cache=False).logits, {}), logits, windows)
    assert shared == alone and all(shared[row]["loss"] != shared["anchor"]["loss"] for row in CALM_ROWS)
    assert len(runs) == len(range(0, len(windows), 4))  # block 0 computed for the anchor's logits only
    with pytest.raises(ValueError, match="Unknown row 'CALM'; expected one of"):
        scoring.row_model(prepared, "CALM", anchor, tokenizer)

    calls = []

    def untrained(fn, jobs, workers, environment):  # what the demo runs, recorded; only the kernels' query runs
        calls.append(fn.__name__)
        return run_jobs(fn, jobs, workers, environment) if fn.__name__ == "cpu_capability" else []

    monkeypatch.setattr(pipeline, "run_jobs", untrained)
    again = pipeline.run_demo(str(out), progress=False, config=tiny_config())
    assert calls == ["cpu_capability"] and again["cached"] == {"augments": True, "rows": True}  # nothing trained
    assert again["rows"] == rows
    assert json.loads((out / "results.json").read_text())["rows"] == rows

    # another setting of the character-level augment retrains it and the one row built on it, nothing else
    calls.clear()
    monkeypatch.setattr(pipeline, "run_jobs", lambda fn, jobs, workers, env: calls.append([j[0] for j in jobs if j])
                        or run_jobs(fn, jobs, workers, env))
    changed = pipeline.run_demo(str(out), progress=False, config=dataclasses.replace(tiny_config(), char_steps=2))
    assert calls == [["char"], ["CALM (characters)"], []]  # the last: the jobs' CPU kernels
    assert {k: v for k, v in changed["rows"].items() if "characters" not in k} == \
        {k: v for k, v in rows.items() if "characters" not in k}


def test_the_cpu_kernels_reach_every_job_key_every_cache_and_leave_this_process_as_it_was(monkeypatch):
    import os

    from lmcompose.demos.facts.config import AUGMENT_FIELDS, job_environment, row_fields
    from lmcompose.demos.facts.rows import TRAINED_ROWS
    from lmcompose.demos.jobs import cpu_capability, run_jobs

    assert job_environment(FactsPipelineConfig()) == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}  # the preset
    assert job_environment(FactsPipelineConfig(cpu_kernels=None)) == {}
    with pytest.raises(ValueError, match=r"cpu_kernels='sse4' is not .* use one of \('avx2', 'avx512'\), or None"):
        job_environment(FactsPipelineConfig(cpu_kernels="sse4"))
    # a worker starts with the variables (torch reads them as it loads); this process keeps its own
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    own, environ = cpu_capability(), dict(os.environ)
    assert run_jobs(cpu_capability, [()], 1, {"ATEN_CPU_CAPABILITY": "default"}) == ["DEFAULT"]
    assert cpu_capability() == own and dict(os.environ) == environ
    assert run_jobs(cpu_capability, [()], 1) == [own]  # no environment: in this process
    # models trained with other kernels are other models: each augment's and row's cache key holds them
    pinned, native = FactsPipelineConfig(), FactsPipelineConfig(cpu_kernels=None)
    for fields in [AUGMENT_FIELDS[kind] for kind in AUGMENT_FIELDS] + [row_fields(pinned, r) for r in TRAINED_ROWS]:
        assert pinned.fingerprint(*fields) != native.fingerprint(*fields)


def test_an_interrupted_row_is_not_marked_done(tmp_path, monkeypatch):
    import lmcompose.demos.facts.rows as rows
    from lmcompose.train.run_state import TrainingResult

    monkeypatch.setattr(rows, "load_anchor", lambda folder: (None, None))
    monkeypatch.setattr(rows, "composition_data", lambda task, tokenizer, wordings: [])
    monkeypatch.setattr(rows, "preservation_data", lambda *args, **kwargs: [])
    monkeypatch.setattr(rows, "calm_model", lambda *args: None)
    monkeypatch.setattr(rows, "train", lambda *args, **kwargs: TrainingResult(step=3, train_loss=1.0,
                                                                              interrupted="SIGTERM"))
    with pytest.raises(InterruptedError, match="stopped by SIGTERM at step 3 of 150; run the demo again"):
        rows.train_row_job(rows.CALM_ROWS[0], FactsPipelineConfig(), "anchor", "augments", str(tmp_path / "row"))
    assert not (tmp_path / "row" / "done.json").exists()


def calm_training_configs(monkeypatch, tmp_path, config):
    """Each CALM row's TrainingConfig as :func:`train_row_job` builds it from ``config``, nothing loaded or trained."""
    import lmcompose.demos.facts.rows as rows
    from lmcompose.train.run_state import TrainingResult

    trained = {}
    monkeypatch.setattr(rows, "load_anchor", lambda folder: (None, None))
    monkeypatch.setattr(rows, "composition_data", lambda task, tokenizer, wordings: [])
    monkeypatch.setattr(rows, "preservation_data", lambda *args, **kwargs: [])
    monkeypatch.setattr(rows, "calm_model", lambda name, *args: name)
    monkeypatch.setattr(rows, "train", lambda model, *args, **kwargs: (
        trained.__setitem__(model, args[2]), TrainingResult(step=1, train_loss=1.0, interrupted="SIGTERM"))[1])
    for row in rows.CALM_ROWS:
        with pytest.raises(InterruptedError):
            rows.train_row_job(row, config, "anchor", {}, str(tmp_path / rows.row_folder_name(row)))
    return trained


def test_the_character_level_row_takes_its_own_composition_steps(tmp_path, monkeypatch):
    import lmcompose.demos.facts.rows as rows
    from lmcompose.demos.facts.config import compose_steps, row_fields

    config = FactsPipelineConfig(compose_steps=150, char_compose_steps=7)
    trained = calm_training_configs(monkeypatch, tmp_path, config)
    assert {row: training.max_steps for row, training in trained.items()} == {
        "CALM (same tokenizer)": 150, "CALM (characters)": 7, "CALM (random augment)": 150}
    # a cache key of its own: the character-level row's only
    keyed = {row: "char_compose_steps" in row_fields(config, row) for row in rows.TRAINED_ROWS}
    assert keyed == {row: row == "CALM (characters)" for row in rows.TRAINED_ROWS}
    unset = FactsPipelineConfig(compose_steps=150, char_compose_steps=None)  # None: the rows' steps
    assert compose_steps(unset, "CALM (characters)") == 150


def test_the_anchor_state_cache_reaches_every_calm_row_and_keys_every_rows_cache(tmp_path, monkeypatch):
    import lmcompose.demos.facts.rows as rows
    from lmcompose.demos.facts.config import row_fields

    for setting in (False, True):
        trained = calm_training_configs(monkeypatch, tmp_path, FactsPipelineConfig(cache_anchor_states=setting))
        assert {row: training.cache_anchor_states for row, training in trained.items()} == dict.fromkeys(
            rows.CALM_ROWS, setting)
    assert FactsPipelineConfig().cache_anchor_states is False  # not in the preset (LOG runs 27, 28)
    on, off = FactsPipelineConfig(cache_anchor_states=True), FactsPipelineConfig()
    assert all(on.fingerprint(*row_fields(on, row)) != off.fingerprint(*row_fields(off, row))
               for row in rows.TRAINED_ROWS)


def test_d_c_asks_in_the_configs_wordings_in_every_row_and_they_key_every_rows_cache(tmp_path, monkeypatch,
                                                                                     tiny_anchor_dir):
    from transformers import AutoTokenizer

    import lmcompose.demos.facts.rows as rows
    from lmcompose.demos.facts.config import row_fields
    from lmcompose.demos.facts.task import KNOWN_PEOPLE
    from lmcompose.train.run_state import TrainingResult

    four = ["statement", "question", "flat", "where"]
    templates = {**DC_WORDINGS, **MORE_DC_WORDINGS}
    tok = AutoTokenizer.from_pretrained(tiny_anchor_dir)  # the questions about people outside the task: all four
    mixed = rows.preservation_data(tok, 24, known=0.5, count=200, wordings=four)
    texts = [tok.decode(mixed[i]["input_ids"]) for i in range(len(mixed))]
    assert {w for t in texts for w in four if any(t == templates[w].format(name=n) for n in KNOWN_PEOPLE)} == set(four)
    asked = []
    monkeypatch.setattr(rows, "load_anchor", lambda folder: (None, None))
    monkeypatch.setattr(rows, "composition_data", lambda task, tokenizer, wordings: asked.append(("D_C", wordings)))
    monkeypatch.setattr(rows, "preservation_data", lambda *a, **k: asked.append(("preserve", k["wordings"])))
    monkeypatch.setattr(rows, "calm_model", lambda name, *args: name)
    monkeypatch.setattr(rows, "_train_baseline", lambda *args: {})
    monkeypatch.setattr(rows, "train", lambda *a, **k: TrainingResult(step=1, train_loss=1.0, interrupted="SIGTERM"))
    config = FactsPipelineConfig(dc_wordings=four)
    for row in rows.TRAINED_ROWS:
        (tmp_path / rows.row_folder_name(row)).mkdir()
        try:
            rows.train_row_job(row, config, "anchor", {}, str(tmp_path / rows.row_folder_name(row)))
        except InterruptedError:  # a CALM row, once its data were built
            pass
    assert asked == [("D_C", four), ("preserve", four)] * len(rows.CALM_ROWS) + [("D_C", four)] * len(
        rows.BASELINE_ROWS)
    # other wordings are other rows; at the preset's two a row's key is the one it had before the setting existed
    preset = FactsPipelineConfig()
    assert preset.dc_wordings == ["statement", "question"]
    assert all(config.fingerprint(*row_fields(config, r)) != preset.fingerprint(*row_fields(preset, r)) and
               "dc_wordings" not in row_fields(preset, r) for r in rows.TRAINED_ROWS)
    for wrong, says in ((["statement", "town"], r"unknown \['town'\]"), (["flat", "flat"], r"repeated \['flat'\]"),
                        ([], "none given")):
        with pytest.raises(ValueError, match=rf"D_C wordings .*: {says}; name at least one, each once, from "):
            FactsPipelineConfig(dc_wordings=wrong)


def test_settings_by_name_change_a_copy_of_the_config_and_a_wrong_one_is_refused_in_one_line():
    from lmcompose.demos.facts.config import with_settings

    preset = FactsPipelineConfig()
    changed = with_settings(preset, ["preserve_weight=2.0", "task.held_in_fraction=0.4",
                                     'dc_wordings=["statement", "flat"]'])
    assert (changed.preserve_weight, changed.task.held_in_fraction, changed.dc_wordings) == (2.0, 0.4, ["statement",
                                                                                                         "flat"])
    assert preset == FactsPipelineConfig() and with_settings(preset, []) == preset
    from lmcompose.demos.facts.report import changed_settings

    assert changed_settings(preset.to_dict()) == [] and changed_settings(changed.to_dict()) == [
        "task.held_in_fraction=0.4", 'dc_wordings=["statement","flat"]', "preserve_weight=2.0"]
    seeded = FactsPipelineConfig(task=FactsTaskConfig(seed=3), seed=3)
    assert changed_settings(seeded.to_dict()) == []  # a seed is the --seed flag, not a setting
    assert changed_settings(with_settings(seeded, ["task.seed=5"]).to_dict()) == ["task.seed=5"]
    for wrong, says in (("preserve_wieght=2", "expected NAME=JSON with NAME a field of FactsPipelineConfig"),
                        ("task.people=5", "a field of FactsTaskConfig"), ("task=1", "a field of FactsPipelineConfig"),
                        ("seed", "expected NAME=JSON"), ("dc_wordings=[flat]", "the value is not JSON"),
                        ('dc_wordings=["town"]', r"D_C wordings \['town'\]: unknown")):
        with pytest.raises(ValueError, match=says) as err:
            with_settings(preset, [wrong])
        assert "\n" not in str(err.value)


def test_the_character_augments_lookahead_adds_the_later_characters_loss_and_leaves_a_plain_model(tmp_path):
    import torch
    import torch.nn.functional as F

    from lmcompose.demos.facts.augments import augment_loss, char_model, char_tokenizer, train_augment
    from lmcompose.demos.facts.config import AUGMENT_FIELDS

    tok = char_tokenizer()
    model = char_model(len(tok), 2, 32, 2, seed=0)
    batch = tok(["Kalo Dorfen lives in Paris.", "Velmar Ostrovin, Rome"], return_tensors="pt", padding=True)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.manual_seed(0)
    heads = [torch.nn.Linear(32, len(tok), bias=False) for _ in range(2)]
    plain = augment_loss(model, every_token=True)(batch)
    with torch.no_grad():  # by hand: the next character, plus the mean of the 2nd and 3rd ahead over real ones
        hidden = model.get_decoder()(**batch).last_hidden_state
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        ahead = [F.cross_entropy(head(hidden[:, :-k][mask[:, k:]]), ids[:, k:][mask[:, k:]])
                 for k, head in ((2, heads[0]), (3, heads[1]))]
    assert augment_loss(model, every_token=True, lookahead=heads)(batch).item() == pytest.approx(
        plain.item() + (ahead[0].item() + ahead[1].item()) / 2, rel=1e-5)
    assert augment_loss(model, every_token=True, lookahead=())(batch).item() == plain.item()  # 1: the plain loss

    task = FactsTask(FactsTaskConfig(num_people=40))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_augment(model, task, tok, per_character=True, steps=2, lr=1e-3, rows=2, length=48, seed=0, lookahead=3)
    assert model.state_dict().keys() == before.keys()  # the heads are not part of the saved augment
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for bad, message in ((0, "at least 1"), (2, "character-level")):
        with pytest.raises(ValueError, match=message):
            train_augment(model, task, tok, per_character=bad == 0, steps=1, lr=1e-3, rows=2, length=48, seed=0,
                          lookahead=bad)
    assert "char_lookahead" in AUGMENT_FIELDS["char"]  # a new look-ahead retrains the character augment only
    assert FactsPipelineConfig().char_lookahead == 4  # the preset predicts 4 characters ahead (LOG run 19)
