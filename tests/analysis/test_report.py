"""report: learning curves of existing runs; hand-written run directories, plus one really trained run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from runs_helpers import train_tiny_run
from transferctl.cli import app
from transferctl.errors import CheckpointError, DataError
from transferctl.analysis.plots import PHASE_LABEL, learning_curves_figure
from transferctl.analysis.curves import phase_ends
from transferctl.analysis.report import find_run_dirs, load_run_curves, report_runs, summarize_run

runner = CliRunner()


def row(global_epoch: int, phase: str, phase_index: int, val_acc: float) -> dict[str, object]:
    return {
        "phase": phase, "phase_index": phase_index, "epoch": global_epoch, "global_epoch": global_epoch,
        "train_loss": 1.0 / global_epoch, "train_acc": val_acc + 0.05, "val_loss": 1.2 / global_epoch, "val_acc": val_acc,
        "seconds": 1.5, "images_per_second": 100.0,
    }  # fmt: skip


TWO_PHASES = [row(1, "head", 0, 0.5), row(2, "head", 0, 0.6), row(3, "body", 1, 0.8), row(4, "body", 1, 0.7)]
ONE_PHASE = [row(1, "all", 0, 0.3), row(2, "all", 0, 0.4)]


def write_run(path: Path, rows: list[dict[str, object]], strategy: str = "fine_tune", finished: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"name": "x", "backbone": {"name": "resnet18"}, "strategy": strategy}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (path / "summary.json").write_text(json.dumps({"strategy": strategy, "backbone": "resnet18", "epochs": len(rows)}))
    return path


def test_phase_ends_are_where_the_phase_changes() -> None:
    assert phase_ends(TWO_PHASES) == [2]
    assert phase_ends(ONE_PHASE) == []
    assert phase_ends([]) == []


def test_summary_of_a_run(tmp_path: Path) -> None:
    summary = summarize_run(load_run_curves(write_run(tmp_path / "a", TWO_PHASES)))
    assert summary["best_val_acc"] == 0.8 and summary["best_epoch"] == 3
    assert summary["final_val_acc"] == 0.7 and summary["final_train_acc"] == pytest.approx(0.75)
    assert summary["min_val_loss"] == pytest.approx(0.3)
    assert summary["val_acc_auc"] == pytest.approx((0.55 + 0.7 + 0.75) / 3)
    assert summary["phases"] == ["head", "body"] and summary["phase_ends"] == [2]
    assert summary["seconds"] == 6.0 and summary["status"] == "finished"


def test_the_figure_has_train_and_val_lines_per_run_and_phase_boundaries(tmp_path: Path) -> None:
    runs = [load_run_curves(write_run(tmp_path / name, rows)) for name, rows in (("a", TWO_PHASES), ("b", ONE_PHASE))]
    loss_axes, acc_axes = learning_curves_figure(runs).axes
    for axes in (loss_axes, acc_axes):
        curves = [line for line in axes.get_lines() if line.get_label() != PHASE_LABEL]
        boundaries = [line for line in axes.get_lines() if line.get_label() == PHASE_LABEL]
        assert sorted(line.get_label() for line in curves) == ["a (train)", "a (val)", "b (train)", "b (val)"]
        assert [line.get_xdata()[0] for line in boundaries] == [2.5]
    val_acc = next(line for line in acc_axes.get_lines() if line.get_label() == "a (val)")
    assert list(val_acc.get_ydata()) == [0.5, 0.6, 0.8, 0.7]


def test_folders_of_runs_expand_and_unfinished_runs_are_included(tmp_path: Path) -> None:
    a = write_run(tmp_path / "runs" / "a", TWO_PHASES)
    b = write_run(tmp_path / "runs" / "b", ONE_PHASE, finished=False)
    (tmp_path / "runs" / "not-a-run").mkdir()
    assert find_run_dirs([tmp_path / "runs", a]) == [a, b]
    result = report_runs([tmp_path / "runs"])
    assert result.png == tmp_path / "runs" / "learning-curves.png" and result.png.stat().st_size > 0
    assert [run["status"] for run in result.runs] == ["finished", "unfinished"]


def test_a_run_given_twice_by_different_paths_is_reported_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path / "runs" / "a", TWO_PHASES)
    monkeypatch.chdir(tmp_path)
    assert find_run_dirs([Path("runs/a"), tmp_path / "runs" / "a", Path("runs")]) == [Path("runs/a")]


def test_bad_arguments_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such run directory"):
        find_run_dirs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds none"):
        find_run_dirs([tmp_path / "empty"])
    write_run(tmp_path / "fresh", [], finished=False)
    with pytest.raises(CheckpointError, match="no run has finished an epoch"):
        report_runs([tmp_path / "fresh"])
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such run directory" in result.output


@pytest.mark.parametrize(
    ("line", "expected"),
    [("{not json", "damaged JSON: Expecting property name enclosed in double quotes"),
     ("[1, 2]", "not a metrics row: each line is a JSON object"),
     (json.dumps({**row(3, "body", 1, 0.5), "val_acc": "high"}), "not a metrics row: global_epoch, train_loss, train_acc, val_loss, val_acc must be numbers")],
)  # fmt: skip
def test_a_damaged_metrics_row_is_named_by_its_line(tmp_path: Path, line: str, expected: str) -> None:
    run = write_run(tmp_path / "run", TWO_PHASES[:2])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(line + "\n")
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 1
    assert f"metrics.jsonl:3: {expected}" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_report_cli_on_a_trained_run(tmp_path: Path) -> None:
    run = train_tiny_run(tmp_path)
    other = write_run(tmp_path / "other", ONE_PHASE)
    png = tmp_path / "plots" / "both.png"
    result = runner.invoke(app, ["report", str(run), str(other), "--out", str(png), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["png"] == str(png) and png.read_bytes().startswith(b"\x89PNG")
    trained = document["runs"][0]
    assert trained["status"] == "finished" and trained["epochs"] == 2 and trained["phases"] == ["head", "body"]
    table = runner.invoke(app, ["report", str(run)])
    assert table.exit_code == 0 and "best val acc" in table.output and (run / "learning-curves.png").is_file()


def test_report_does_not_import_torch(tmp_path: Path) -> None:
    write_run(tmp_path / "a", TWO_PHASES)
    code = (
        "import sys\nfrom transferctl.cli import main\nsys.argv = ['transferctl', 'report', sys.argv[1], '--json']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "sys.stderr.write('TORCH=' + str('torch' in sys.modules) + '\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "TORCH=False"


def test_a_multi_label_run_is_summed_up_by_its_map_too(tmp_path: Path) -> None:
    rows = [{**r, "val_map": m} for r, m in zip(TWO_PHASES, (0.6, 0.9, 0.7, 0.8))]
    write_run(tmp_path / "runs" / "multi", rows)
    write_run(tmp_path / "runs" / "single", ONE_PHASE, strategy="scratch")
    summary = summarize_run(load_run_curves(tmp_path / "runs" / "multi"))
    assert (summary["best_val_map"], summary["best_map_epoch"], summary["final_val_map"]) == (0.9, 2, 0.8)
    assert summary["val_map_auc"] == pytest.approx((0.75 + 0.8 + 0.75) / 3) and summary["best_val_acc"] == 0.8
    assert "best_val_map" not in summarize_run(load_run_curves(tmp_path / "runs" / "single"))
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    assert "best val mAP (epoch)" in result.stderr and "0.9000 (2)" in result.stderr


def test_a_multi_label_runs_val_map_is_drawn_beside_its_accuracy(tmp_path: Path) -> None:
    rows = [{**r, "val_map": m} for r, m in zip(TWO_PHASES, (0.6, 0.9, 0.7, 0.8))]
    runs = [load_run_curves(write_run(tmp_path / "multi", rows)), load_run_curves(write_run(tmp_path / "single", ONE_PHASE))]
    _, acc_axes = learning_curves_figure(runs).axes
    mapped = [line for line in acc_axes.get_lines() if line.get_label().endswith("(val mAP)")]
    assert [line.get_label() for line in mapped] == ["multi (val mAP)"] and list(mapped[0].get_ydata()) == [0.6, 0.9, 0.7, 0.8]
    assert "val mAP" in acc_axes.get_title() and "mAP" in acc_axes.get_ylabel()
