"""io/atomic.py: a reader finds the old file or the new one; leftovers of a kill are recognised and cleared."""

import os

import pytest

from lmcompose.io.atomic import (
    atomic_write,
    atomic_write_text,
    publish_directory,
    remove_stale_temporaries,
    remove_unpublished,
)


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("new but torn")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_publishing_a_directory_replaces_the_old_one_whole(tmp_path):
    final, tmp = tmp_path / "composition", tmp_path / ".composition.tmp-1"
    final.mkdir()
    (final / "a").write_text("old a")
    (final / "b").write_text("old b")
    tmp.mkdir()
    (tmp / "a").write_text("new a")
    publish_directory(tmp, final)
    assert sorted(os.listdir(final)) == ["a"] and (final / "a").read_text() == "new a" and not tmp.exists()


def test_what_a_kill_left_behind_is_removed_and_nothing_else(tmp_path):
    for name in (".composition.tmp-7", ".composition.old-7", "composition", ".other.tmp-7"):
        (tmp_path / name).mkdir()
    for name in (".metrics.jsonl.abc.tmp", "metrics.jsonl"):
        (tmp_path / name).write_text("x")
    remove_unpublished(tmp_path, "composition")
    remove_stale_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-7", "composition", "metrics.jsonl"]
