"""Tools that take a transformers causal LM take a composed one: Trainer, lm-evaluation-harness, TRL."""

import json

import pytest
import torch

from lmcompose import ComposedModel
from lmcompose.testing import tiny_causal_lm

from helpers import VOCAB, char_tokenizer, randomize_composition


def composed(randomize=False):
    anchor = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=48, num_heads=6, seed=1)
    augment = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=4, seed=2)
    model = ComposedModel(anchor, augment, tokenizer=char_tokenizer())
    if randomize:
        randomize_composition(model)
    return model


def texts():
    return ["abc def " * (i % 3 + 1) for i in range(16)]


def changed(before, model):
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_trainer_trains_checkpoints_resumes_and_predicts_the_composition_only(tmp_path):
    from transformers import Trainer, TrainingArguments

    tokenizer = char_tokenizer()
    data = [{"input_ids": ids, "labels": ids} for ids in tokenizer(texts())["input_ids"]]

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full_like(ids, -100)
        for i, b in enumerate(batch):
            ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
            labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
        return {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}

    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6, save_steps=3,
                             learning_rate=1e-2, report_to=[], use_cpu=True, gradient_checkpointing=True)
    model = composed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    moved = changed(before, model)
    assert moved and all(k.startswith("connections.") for k in moved)  # the bases never move
    checkpoint = tmp_path / "out" / "checkpoint-3"
    weights = checkpoint / "model.safetensors"
    assert weights.stat().st_size < 1.1 * sum(p.numel() * 4 for p in model.composition_parameters())
    resumed = Trainer(model=composed(), args=args, train_dataset=data, data_collator=collate)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final = model.state_dict()
    assert all(torch.equal(resumed.model.state_dict()[k], final[k]) for k in final)  # exact resume
    predictions = trainer.predict(data[:4]).predictions
    batch = collate(data[:4])
    expected = model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(torch.as_tensor(predictions), expected.detach())
    loaded = ComposedModel.from_pretrained(checkpoint, anchor=composed().anchor, augment=composed().augments[0])
    assert set(loaded.composition_state_dict()) == set(model.composition_state_dict())


def test_lm_eval_scores_a_local_task_with_the_composition(tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = composed(randomize=True)
    tokenizer = model.tokenizer
    docs = [{"q": "abc", "choices": [" def", " xyz"], "gold": 0}, {"q": "rev ab =>", "choices": [" ba", " ab"], "gold": 1}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\ntest_split: test\n"
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n')
    (tmp_path / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + 'output_type: generate_until\ndoc_to_text: "{{q}}"\n'
        'doc_to_target: "{{choices[gold]}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=64)
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    with torch.no_grad():
        for sample in results["samples"]["tiny_mc"]:
            for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
                context_ids = lm.tok_encode(context)
                whole = torch.tensor([lm.tok_encode(context + continuation)])
                logprobs = model(whole).logits.log_softmax(-1)[0, len(context_ids) - 1 : -1]
                expected = logprobs.gather(-1, whole[0, len(context_ids):, None]).sum()
                assert response[0][0] == pytest.approx(float(expected), abs=1e-4)  # a composed forward's
        for sample in results["samples"]["tiny_gen"]:
            ids = torch.tensor([lm.tok_encode(sample["arguments"][0][0])])
            new = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
            assert sample["resps"][0][0] == tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]


def test_trl_sft_trainer_moves_only_the_composition():
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = composed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = SFTConfig(output_dir="unused", max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                       report_to=[], use_cpu=True, save_strategy="no", max_length=32, bf16=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list([{"text": t} for t in texts()]),
                         processing_class=model.tokenizer)
    trainer.train()
    moved = changed(before, model)
    assert moved and all(k.startswith("connections.") for k in moved)
    assert trainer.state.log_history[-1]["train_loss"] > 0
