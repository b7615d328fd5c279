"""The benchmarks' exact memory count (benchmarks/common.TensorMemory)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from common import TensorMemory  # noqa: E402

MB = 1000 * 1000 * 4  # bytes of a (1000, 1000) float32 tensor


def test_counts_the_largest_set_of_tensors_alive_at_once_and_nothing_that_aliases():
    x = torch.randn(1000, 1000)  # made before: not counted
    weight = torch.nn.Parameter(torch.randn(1000, 1000))
    with TensorMemory() as memory:
        y = x @ x
        z = y + 1  # y and z alive: the peak
        del y
        w = z * 2  # y freed first: still two alive
        view = w.view(-1)  # a view is no new memory
        with torch.no_grad():
            weight.add_(1.0)  # an in-place update of a weight is no new memory
    assert memory.peak == 2 * MB and memory.live == 2 * MB
    del z, w, view
    assert memory.live == 0  # frees after the context are still subtracted


def test_counts_what_autograd_keeps_for_backward():
    a = torch.randn(1000, 1000, requires_grad=True)
    with TensorMemory() as kept:
        loss = (a * a).exp().sum()  # keeps exp's output (mul keeps only ``a``, made before)
    with TensorMemory() as freed, torch.no_grad():
        (a * a).exp().sum()
    assert MB <= kept.live < 2 * MB and freed.live < MB
    loss.backward()
