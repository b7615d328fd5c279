"""io/locks.py: one run per output directory; the refusal names the holder; a dead holder's lock is taken over."""

import json
import multiprocessing
import os
import signal
import time

import pytest

from lmcompose.io.locks import OWNER_NAME, OutputInUseError, output_lock


def hold(directory, ready, done):
    with output_lock(directory, "training"):
        ready.set()
        done.wait(30)


def test_a_second_process_is_refused_naming_the_first_and_a_killed_holders_lock_is_taken_over(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    holder = context.Process(target=hold, args=(tmp_path, ready, done))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(OutputInUseError, match=rf"{tmp_path} is in use by process {holder.pid} on .* \(training since "):
        with output_lock(tmp_path, "evaluation"):
            pass
    assert json.loads((tmp_path / OWNER_NAME).read_text())["pid"] == holder.pid
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up at all: the kernel releases the lock
    holder.join()
    with output_lock(tmp_path, "training"):
        assert json.loads((tmp_path / OWNER_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / OWNER_NAME).exists()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with output_lock(tmp_path, "training"):
        with output_lock(tmp_path, "training"):  # the CLI holds it, then the recipe takes it again
            pass
        assert (tmp_path / OWNER_NAME).exists()  # still held by the outer block
    assert not (tmp_path / OWNER_NAME).exists()
    started = time.time()
    with output_lock(tmp_path, "again"):
        pass
    assert time.time() - started < 5
