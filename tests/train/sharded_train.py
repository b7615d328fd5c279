"""Run by tests/train/test_sharding.py under torchrun: `lmcompose train`, reporting what each rank holds.

Each rank writes OUT/rank{r}.json: the bytes of the bases' parameters it holds before and after sharding (FSDP2's
or DeepSpeed ZeRO-3's), and whether it built them empty. With
``--kill-after-step K`` rank 1 SIGKILLs itself once step K is done (its checkpoint written, if one was due); with
``--empty-on-rank-1`` rank 1 builds the bases empty whatever the layout.
Usage: torchrun ... sharded_train.py OUT [--kill-after-step K] [--empty-on-rank-1] -- <lmcompose train arguments>
"""

import importlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lmcompose.train.recipe as recipe  # noqa: E402
from lmcompose.core import introspect  # noqa: E402
import lmcompose.train.sharding as sharding  # noqa: E402
import lmcompose.train.zero3 as zero3  # noqa: E402
from lmcompose.cli import main  # noqa: E402

out = Path(sys.argv[1])
ours = sys.argv[2 : sys.argv.index("--")]
argv = sys.argv[sys.argv.index("--") + 1 :]
kill_after = int(ours[ours.index("--kill-after-step") + 1]) if "--kill-after-step" in ours else None
rank = int(os.environ.get("RANK", "0"))
report = {}
shard, partition = sharding.shard_model, zero3.initialize


def bases_bytes(model):
    return sum(sharding.local_bytes(m) for m in (model.anchor, *model.augments))


def before(model):
    report["bases_bytes_before"] = bases_bytes(model)
    report["bases_empty_before"] = sharding.bases_empty(model)
    report["whole_bytes"] = sum(p.numel() * p.element_size() for m in (model.anchor, *model.augments)
                                for p in (*m.parameters(), *m.buffers()))
    report["augment_blocks_run"] = [0] * len(introspect.decoder_blocks(model.augments[0]))
    for i, block in enumerate(introspect.decoder_blocks(model.augments[0])):
        block.register_forward_pre_hook(lambda *_, i=i: report["augment_blocks_run"].__setitem__(
            i, report["augment_blocks_run"][i] + 1))


def spy(model, device, processes):
    before(model)
    sharded = shard(model, device, processes)
    report["bases_bytes_after"] = bases_bytes(sharded)
    report["connection_params_sharded"] = all(sharding.is_sharded(p) for p in sharded.composition_parameters())
    return sharded


def spy_zero3(model, optimizer, config):
    before(model)
    engine, ds_optimizer = partition(model, optimizer, config)
    report["bases_bytes_after"] = bases_bytes(model)
    report["connection_params_sharded"] = all(hasattr(p, "ds_tensor") for p in model.composition_parameters())
    return engine, ds_optimizer


after_step = recipe.Recipe.after_step


def killing_after_step(self):
    stop = after_step(self)
    if kill_after is not None and rank == 1 and self.state.step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return stop


sharding.shard_model, zero3.initialize = spy, spy_zero3
if "--empty-on-rank-1" in ours and rank == 1:
    cli = importlib.import_module("lmcompose.cli.main")  # the module (the package exports its main function)
    load = cli._load
    cli._load = lambda opts, empty=False: load(opts, empty=True)
recipe.Recipe.after_step = killing_after_step
code = main(argv)
report["exit_code"] = code
(out / f"rank{rank}.json").write_text(json.dumps(report))
sys.exit(code)
