"""train/run_log.py: metrics appended and read back (a torn last line skipped), truncated on resume, plotted."""

from lmcompose.train.run_log import append_metrics, plot_losses, read_metrics, truncate_metrics


def test_records_read_back_a_torn_line_is_skipped_and_resume_truncates_after_its_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    for step in (1, 2, 3):
        append_metrics(path, {"kind": "train", "step": step, "loss": 1.0 / step})
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # a kill mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    truncate_metrics(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    append_metrics(path, {"kind": "eval", "step": 2, "eval_loss": 0.7})
    plot_losses(read_metrics(path), tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
