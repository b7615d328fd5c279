"""Run by tests/test_distributed.py under `accelerate launch`: `lmcompose train` with a spy on how DDP wraps the model.

Each rank writes OUT/rank{r}.json: what DDP synchronises, and whether the bases were kept out of it.
Usage: accelerate launch ... distributed_train.py OUT -- <lmcompose train arguments>
"""

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lmcompose.train.engine as engine  # noqa: E402
from lmcompose.cli import main  # noqa: E402

out = Path(sys.argv[1])
argv = sys.argv[sys.argv.index("--") + 1 :]
report = {}
prepare = engine.prepare_model


def spy(accelerator, model):
    wrapped = prepare(accelerator, model)
    synced = [n for n, p in model.named_parameters() if n not in wrapped.parameters_to_ignore]
    report.update(
        wrapper=type(wrapped).__name__,
        num_processes=accelerator.num_processes,
        synced=synced,
        synced_require_grad=all(p.requires_grad for n, p in model.named_parameters() if n in synced),
        composition=sorted(n for n, p in model.named_parameters() if n.startswith("connections.")),
        find_unused_parameters=wrapped.find_unused_parameters,
        attribute_left_on_model=hasattr(model, "_ddp_params_and_buffers_to_ignore"),
    )
    return wrapped


engine.prepare_model = spy
code = main(argv)
report["exit_code"] = code
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))
sys.exit(code)
