"""metrics.jsonl as a crash leaves it: a last row cut short is dropped (and a resumed run rewrites the file
without it); any other unreadable row is an error naming the file and line."""

import json

import pytest

from resnet_jax.training.metrics_log import METRICS_FILE, MetricsLog, read_metrics

ROWS = [{"step": 4, "epoch": 0.5, "split": "train", "loss": 2.0, "accuracy": 0.3},
        {"step": 8, "epoch": 1.0, "split": "train", "loss": 1.5, "accuracy": 0.5}]


def write(workdir, text):
    (workdir / METRICS_FILE).write_text(text)


def lines(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_a_last_row_cut_short_is_left_out_and_rewritten_away_on_resume(tmp_path):
    write(tmp_path, lines(ROWS) + '{"step": 12, "spl')
    assert read_metrics(tmp_path) == ROWS
    MetricsLog(tmp_path, resume_step=8).close()
    assert (tmp_path / METRICS_FILE).read_text() == lines(ROWS)


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    write(tmp_path, lines(ROWS)[:-1])
    assert read_metrics(tmp_path) == ROWS


def test_an_unreadable_row_elsewhere_names_the_file_and_line(tmp_path):
    write(tmp_path, json.dumps(ROWS[0]) + "\n{oops\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a JSON row"):
        read_metrics(tmp_path)


def test_a_resume_that_cannot_write_keeps_every_row(tmp_path):
    """The resume's rewrite truncated the file and then wrote it: a full disk (here a file-size limit) in between
    lost rows the resumed run was meant to keep. The old file stays until the new one is whole."""
    from conftest import run_python

    many = [{**ROWS[0], "step": s, "note": "x" * 200} for s in range(1, 41)]
    write(tmp_path, lines(many))
    proc = run_python(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))
        from resnet_jax.training.metrics_log import MetricsLog
        MetricsLog({str(tmp_path)!r}, resume_step=30)
    """, check=False)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert read_metrics(tmp_path) == many
