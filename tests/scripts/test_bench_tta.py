"""scripts/bench_tta.py: its plain and flip numbers are evaluate's and evaluate --tta flip's; it writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from runs_helpers import ONE_EPOCH, train_tiny_run
from test_bench import load_script
from transferctl.inference.evaluate import evaluate_run


def test_plain_and_flip_are_what_evaluate_reports(tmp_path: Path, capsys) -> None:  # noqa: ANN001 - pytest's fixture
    run = train_tiny_run(tmp_path, schedule=ONE_EPOCH)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = load_script("bench_tta").main([str(run), "--json"])
    assert json.loads(capsys.readouterr().out) == result
    row = result["runs"][str(run)]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written into the run
    assert 0.0 <= row["five_crops"] <= 1.0
    assert row["plain"] == evaluate_run(run, split="val", device="cpu").report["accuracy"]
    assert row["flip"] == evaluate_run(run, split="val", device="cpu", tta="flip").report["accuracy"]
