"""MLflow tracking: params and metrics from real tiny runs read back with MLflow's own client from a real
local store (MLflow's default store in a temporary folder), the missing-package error, and a tracking
server that cannot be reached, which must not cost the training run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import experiment, write_experiment
from transferctl.cli import app
from transferctl.training.mlflow_logging import epoch_metrics, flat_params

runner = CliRunner()
NEEDS_MLFLOW = "the mlflow package is not installed (pip install transferctl[mlflow])"


def mlflow_experiment(data: Path, tmp_path: Path) -> Path:
    return write_experiment(tmp_path / "e.yaml", experiment(data, tmp_path / "runs", logging={"mlflow": True}))


@pytest.fixture
def local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MLflow's default store, made in a folder of the test's own."""
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.chdir(store)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    return store


def test_params_are_dotted_keys_and_metrics_the_numbers_of_a_row() -> None:
    config = {"name": "x", "schedule": [{"lr": 0.01}, {"lr": None}], "data": {"root": "d", "mean": []}, "logging": {}}
    assert flat_params(config) == {"name": "x", "schedule.0.lr": "0.01", "schedule.1.lr": "None", "data.root": "d", "data.mean": "[]", "logging": "{}"}
    assert epoch_metrics({"phase": "head", "epoch": 1, "val_acc": 0.5, "improved": True, "lr_head": None}) == {"epoch": 1.0, "val_acc": 0.5}


@pytest.mark.parametrize("command", ["train", "check"])
def test_missing_package_is_one_line_naming_the_extra(command: str, tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("transferctl.training.mlflow_logging.mlflow_available", lambda: False)
    config = mlflow_experiment(tiny_split_data, tmp_path)
    result = runner.invoke(app, [command, str(config), *(["--quiet"] if command == "train" else [])])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "logging.mlflow" in lines[0] and "needs MLflow" in lines[0] and "pip install transferctl[mlflow]" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_run_is_read_back_from_the_store(tiny_split_data: Path, tmp_path: Path, local_store: Path) -> None:
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(mlflow_experiment(tiny_split_data, tmp_path)), "--run-dir", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    found = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(found) == 1
    logged = found[0]
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.data.params["backbone.name"] == "resnet18" and logged.data.params["schedule.1.backbone_lr_mult"] == "0.1"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    for key in ("train_loss", "val_loss", "val_acc", "images_per_second"):
        history = [(m.step, m.value) for m in client.get_metric_history(logged.info.run_id, key)]
        assert history == [(row["global_epoch"], pytest.approx(row[key])) for row in rows], key
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"summary.json", "config.yaml"} | {png.name for png in run.glob("*.png")} == artifacts


def test_a_resumed_run_directory_continues_its_mlflow_run(tmp_path: Path, local_store: Path) -> None:
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    from mlflow.tracking import MlflowClient

    from transferctl.training.mlflow_logging import MLflowObserver

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: tiny\nseed: 3\n")
    warnings: list[str] = []
    for epoch in (1, 2):  # the first process stops after epoch 1; --resume trains epoch 2
        tracker = MLflowObserver(warnings.append)
        tracker.run_started(run)
        tracker.epoch_done({"global_epoch": epoch, "val_acc": epoch / 10})
        tracker.finish("FINISHED")
    client = MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(logged.info.run_id, "val_acc")] == [(1, 0.1), (2, 0.2)]
    assert logged.data.params == {"name": "tiny", "seed": "3"} and warnings == []


def test_one_observer_makes_one_mlflow_run_per_run_directory(tmp_path: Path, local_store: Path) -> None:
    """As compare uses it: the next run's start ends the one before, with its files as artifacts."""
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    from mlflow.tracking import MlflowClient

    from transferctl.training.mlflow_logging import MLflowObserver

    tracker = MLflowObserver(pytest.fail)
    for index, name in enumerate(("scratch-seed0", "fine_tune-seed0")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text("name: cmp\n")
        (run / "curves.png").write_bytes(b"png")
        tracker.run_started(run)
        tracker.epoch_done({"global_epoch": 1, "val_acc": index / 2})
    tracker.finish("KILLED")
    client = MlflowClient()
    runs = {run.info.run_name: run for run in client.search_runs([client.get_experiment_by_name("cmp").experiment_id])}
    assert {name: run.info.status for name, run in runs.items()} == {"scratch-seed0": "FINISHED", "fine_tune-seed0": "KILLED"}
    assert runs["fine_tune-seed0"].data.metrics == {"global_epoch": 1.0, "val_acc": 0.5}
    for run in runs.values():
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "curves.png"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_costs_one_warning_not_the_run(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once rather than retry for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(mlflow_experiment(tiny_split_data, tmp_path)), "--run-dir", str(run)])  # notes show without --quiet
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and "logging.mlflow: cannot log to MLflow at http://127.0.0.1:" in warnings[0] and "training goes on" in warnings[0]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


# ---------------------------------------------------------------------------------------------
# evaluate adds its numbers and files to the MLflow run that trained the run directory


def use_store(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tracked_run(module_tmp_path: Path) -> tuple[Path, str]:
    """A tiny run trained with logging.mlflow into a sqlite store of its own (artifacts in ./mlruns beside it)."""
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    from transferctl.testing.synthetic import tiny_dataset

    store = f"sqlite:///{module_tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(module_tmp_path)
        use_store(patch, store)
        data = tiny_dataset(module_tmp_path / "data", n_classes=3, layout="split", test=True)
        run = module_tmp_path / "run"
        result = runner.invoke(app, ["train", str(mlflow_experiment(data, module_tmp_path)), "--run-dir", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    return run, store


def evaluate(run: Path, *options: str):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, ["evaluate", str(run), "--split", "val", "--device", "cpu", "--json", *options])


def test_evaluate_logs_its_numbers_and_files_on_the_training_runs_mlflow_run(tracked_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    run, store = tracked_run
    use_store(monkeypatch, store)
    result = evaluate(run)
    assert result.exit_code == 0, result.output
    assert "MLflow" not in result.stderr
    report = json.loads(result.stdout)
    client = MlflowClient()
    (logged,) = client.search_runs([e.experiment_id for e in client.search_experiments()])  # no second run made
    assert logged.info.run_name == "run" and logged.info.status == "FINISHED"
    for name in ("accuracy", "macro_f1", "weighted_f1", "loss", "ece", "images", "misclassified"):
        (metric,) = client.get_metric_history(logged.info.run_id, f"eval.val.{name}")
        assert (metric.step, metric.value) == (2, pytest.approx(report[name])), name  # at the run's last epoch
    assert "val_acc" in logged.data.metrics  # training's metrics are still there
    eval_files = {Path(a.path).name for a in client.list_artifacts(logged.info.run_id, "eval")}
    written = {"val.json", "val-confusion.png", "val-misclassified.csv"} | ({"val-top-losses.png"} if report["top_losses_png"] else set())
    assert eval_files == written and {Path(p).name for p in (run / "eval").iterdir()} == written


def test_evaluate_says_once_when_no_mlflow_run_is_found_and_makes_none(tracked_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    run, _ = tracked_run
    monkeypatch.chdir(tmp_path)
    use_store(monkeypatch, f"sqlite:///{tmp_path / 'other.db'}")
    result = evaluate(run)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:") and "MLflow" in line]  # not MLflow's own INFO log
    assert len(notes) == 1 and "no MLflow run at sqlite:///" in notes[0] and f"transferctl.run_dir = {run.resolve()}" in notes[0]
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_evaluate_without_mlflow_or_its_server_still_succeeds(tracked_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = tracked_run
    monkeypatch.setattr("transferctl.training.mlflow_logging.mlflow_available", lambda: False)
    result = evaluate(run)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:") and "MLflow" in line]
    assert len(notes) == 1 and "mlflow package is not installed" in notes[0] and "pip install transferctl[mlflow]" in notes[0]

    monkeypatch.undo()
    use_store(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    result = evaluate(run)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:") and "MLflow" in line]
    assert len(notes) == 1 and "cannot log to MLflow at http://127.0.0.1:" in notes[0] and "written without MLflow" in notes[0]
    assert json.loads(result.stdout)["accuracy"] >= 0


def test_evaluate_of_a_run_without_mlflow_touches_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runs_helpers import train_tiny_run

    run = train_tiny_run(tmp_path / "plain")
    monkeypatch.chdir(tmp_path)
    use_store(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = evaluate(run)
    assert result.exit_code == 0, result.output
    assert "MLflow" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
