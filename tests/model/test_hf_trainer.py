import torch

from lmcompose import ComposedModel
from lmcompose.io.collate import Collator
from lmcompose.io.datasets import TokenizedDataset

from helpers import VOCAB, tiny_pair


def test_composed_model_trains_inside_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    anchor, augment = tiny_pair()
    model = ComposedModel(anchor, augment)
    bases = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("connections.")}
    before = {n: p.clone() for n, p in model.connections.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    data = TokenizedDataset.from_token_ids(torch.randint(4, VOCAB, (12, 10), generator=gen).tolist())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=Collator(pad_token_id=2))
    result = trainer.train()

    # Trainer's own checkpoint holds model.state_dict(), bases included (a Trainer convention; save_composition
    # writes the connections only)
    assert (tmp_path / "checkpoint-3").is_dir()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    for name, p in model.named_parameters():
        if name in bases:
            assert torch.equal(p, bases[name]), f"Trainer changed base weight {name}"
    for name, p in model.connections.named_parameters():
        assert not torch.equal(p, before[name]), f"composition weight {name} did not move"
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.composition_parameters()}
