"""The input-pipeline benchmark runs end to end (smoke mode) and writes the JSON it reports."""

import json

import pytest

from conftest import run_python

pytestmark = pytest.mark.long  # the input-pipeline benchmark runs end to end with worker processes


@pytest.mark.slow
@pytest.mark.multiprocess
def test_input_pipeline_benchmark_smoke(tmp_path):
    pytest.importorskip("tensorflow")
    out = tmp_path / "input_pipeline.json"
    run = run_python(module="benchmarks.input_pipeline", args=["--quick", "--workers", "0", "--json", out])
    report = json.loads(out.read_text())
    assert {"date", "cpu", "versions", "command"} <= set(report)
    rows = {(r["recipe"], r["pipeline"]): r for r in report["results"]}
    assert set(rows) == {("cifar", "grain workers=0"), ("cifar", "tf.data"), ("imagenet", "grain workers=0"),
                         ("imagenet", "tf.data full decode"), ("imagenet", "tf.data crop-decode")}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert "vs tf.data" in run.stdout
