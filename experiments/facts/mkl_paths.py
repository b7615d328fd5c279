"""One forward and backward of SmolLM2 (a saved demo anchor) on a fixed random batch of 4 x 64 tokens, one thread:
prints the CPU knobs from the environment, torch's capability, a SHA-256 of the logits and every gradient, and the
median seconds of three (LOG.md run 25). Run it under several settings and compare, e.g.

    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE python mkl_paths.py DEMO/anchor

    python mkl_paths.py ANCHOR_DIR
"""
import argparse
import hashlib
import os
import statistics
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("anchor", type=Path, help="a demo's anchor/ folder (SmolLM2 saved from its GGUF)")
args = p.parse_args()

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(args.anchor).train()
ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
seconds = []
for _ in range(3):
    model.zero_grad()
    started = time.time()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    seconds.append(time.time() - started)
digest = hashlib.sha256(out.logits.detach().numpy().tobytes())
for param in model.parameters():
    digest.update(param.grad.numpy().tobytes())
print(f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')} MKL_CBWR={os.environ.get('MKL_CBWR')} "
      f"capability {torch.backends.cpu.get_cpu_capability()} sha256 {digest.hexdigest()[:16]} "
      f"seconds {statistics.median(seconds):.2f}")
