"""MLflow tracking of a run (optional: pip install transferctl[mlflow]); see docs/experiment-file.md.

MLflowObserver opens an MLflow run when the run directory is known: the run's config.yaml as params
(dotted keys), every number of each epoch row as a metric (step: the global epoch, so a resumed run
continues its own MLflow run), and at the end summary.json, config.yaml and the plots as artifacts.
It logs to MLFLOW_TRACKING_URI, or MLflow's own default store. MLflow is a side channel: any error from
it (a tracking server that cannot be reached) becomes one notice, and training goes on without it.
log_evaluation adds evaluate's numbers and files to the MLflow run that trained a run directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import yaml

from transferctl.errors import ConfigError, Problem
from transferctl.training.observers import FanOutObserver

if TYPE_CHECKING:
    from transferctl.training.observers import TrainObserver
    from transferctl.training.phases import PhasePlan

INSTALL_HINT = "pip install transferctl[mlflow], or set logging.mlflow: false"
RUN_DIR_TAG = "transferctl.run_dir"  # finds the MLflow run of a resumed run directory
ARTIFACTS = ("summary.json", "config.yaml")  # with every *.png of the run directory
BATCH = 100  # MLflow takes at most 100 params and 1000 metrics in one log_batch call
EVAL_FOLDER = "eval"  # evaluate's files, in the MLflow run as in the run directory


def mlflow_available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def require_mlflow(where: str) -> None:
    """Fail before any work when the experiment asks for tracking that cannot happen."""
    if not mlflow_available():
        raise ConfigError(Problem(where, "needs MLflow, and the mlflow package is not installed", INSTALL_HINT))


def flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: {"schedule.0.lr": "0.01", ...}; an empty section or list stays one param."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None or not value:
        return {prefix: str(value)} if prefix else {}
    params: dict[str, str] = {}
    for key, item in items:
        params.update(flat_params(item, f"{prefix}.{key}" if prefix else str(key)))
    return params


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """Every number of an epoch row, or of an evaluation report's top level (not flags, which are numbers to Python only)."""
    return {key: float(value) for key, value in row.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


class MLflowObserver:
    """One MLflow run per run directory; after the first MLflow error it logs nothing more."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.client: Any = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.broken = False

    def notice(self, message: str) -> None:
        pass

    def run_started(self, run_dir: Path) -> None:
        self.finish("FINISHED")  # compare: the run before this one is done
        self.run_dir = run_dir
        self._guard(lambda: self._start(run_dir))

    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None:
        pass

    def batch_done(self, index: int, count: int, running_loss: float) -> None:
        pass

    def epoch_done(self, row: dict[str, Any]) -> None:
        if self.run_id is not None:
            self._guard(lambda: self._log_epoch(row))

    def finish(self, status: str) -> None:
        """The run's files as artifacts, and the MLflow run ended with `status` (FINISHED, FAILED, KILLED)."""
        if self.run_id is not None and self.run_dir is not None:
            self._guard(lambda: self._end(status))
        self.run_id = None

    def _guard(self, action: Callable[[], None]) -> None:
        """Run an MLflow call; any error (unreachable server, refused store, bad name) stops the tracking, not the training."""
        if self.broken:
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own, requests' and OS errors alike
            self.broken, self.run_id = True, None
            self.warn(f"{cannot_log(exc)}; training goes on without MLflow")

    def _start(self, run_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        self.client = MlflowClient()
        experiment_id = self._experiment_id(str(config.get("name", "experiment")))
        resumed = self._run_of(experiment_id, run_dir)
        if resumed is not None:
            self.run_id = resumed
            self.client.update_run(resumed, status="RUNNING")
            return  # its params were logged when it started; MLflow refuses to change a param
        run = self.client.create_run(experiment_id, tags={RUN_DIR_TAG: str(run_dir.resolve())}, run_name=run_dir.name)
        self.run_id = run.info.run_id
        params = [Param(key, value[:6000]) for key, value in flat_params(config).items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + BATCH])

    def _experiment_id(self, name: str) -> str:
        """MLFLOW_EXPERIMENT_NAME's experiment when set (MLflow's own convention), else one named as the experiment file's name."""
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def _run_of(self, experiment_id: str, run_dir: Path) -> str | None:
        return run_of(self.client, [experiment_id], run_dir)

    def _log_epoch(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(row["global_epoch"])
        metrics = [Metric(key, value, now, step) for key, value in epoch_metrics(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def _end(self, status: str) -> None:
        assert self.run_dir is not None and self.run_id is not None
        for path in [self.run_dir / name for name in ARTIFACTS] + sorted(self.run_dir.glob("*.png")):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "its default store"


def cannot_log(exc: Exception) -> str:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"logging.mlflow: cannot log to MLflow at {tracking_uri()} ({first_line[:300]})"


def run_of(client: Any, experiment_ids: list[str], run_dir: Path) -> str | None:
    """The MLflow run tagged with this run directory (RUN_DIR_TAG), if any."""
    path = str(run_dir.resolve())
    if "'" in path or not experiment_ids:  # a quote cannot be quoted in MLflow's filter language: no run is found
        return None
    runs = client.search_runs(experiment_ids, filter_string=f"tags.`{RUN_DIR_TAG}` = '{path}'", max_results=1)
    return runs[0].info.run_id if runs else None


def log_evaluation(run_dir: Path, stem: str, report: dict[str, Any], files: list[Path]) -> str | None:
    """evaluate's headline numbers as eval.<stem>.<name> metrics at the run's last epoch (TensorBoard's step too),
    and its files under eval/, on the MLflow run that trained run_dir (found by its tag in any experiment; none
    is made when there is none). A notice when nothing was logged: MLflow missing, failing or unreachable, or no such run."""
    if not mlflow_available():
        return f"logging.mlflow: the mlflow package is not installed, so this evaluation is not in MLflow ({INSTALL_HINT.split(',')[0]})"
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from transferctl.runs.listing import metric_rows

    try:
        client = MlflowClient()
        run_id = run_of(client, [found.experiment_id for found in client.search_experiments()], run_dir)
        if run_id is None:
            return (f"logging.mlflow: no MLflow run at {tracking_uri()} is tagged {RUN_DIR_TAG} = {run_dir.resolve()}, so this "
                    "evaluation is not in MLflow (set MLFLOW_TRACKING_URI to the store training logged to, or for MLflow's "
                    "default store run evaluate from the folder training ran in)")  # fmt: skip
        now, step = int(time.time() * 1000), len(metric_rows(run_dir).rows)
        metrics = [Metric(f"eval.{stem}.{name}", value, now, step) for name, value in epoch_metrics(report).items()]
        client.log_batch(run_id, metrics=metrics)
        for path in files:
            client.log_artifact(run_id, str(path), EVAL_FOLDER)
    except Exception as exc:  # noqa: BLE001 - as in MLflowObserver._guard: MLflow never costs the evaluation
        return f"{cannot_log(exc)}; the evaluation is written without MLflow"
    return None


@contextlib.contextmanager
def with_mlflow(observer: TrainObserver, enabled: bool, where: str = "logging.mlflow") -> Iterator[TrainObserver]:
    """`observer`, plus MLflow tracking when enabled; the MLflow run ends however training ends."""
    if not enabled:
        yield observer
        return
    require_mlflow(where)
    tracker = MLflowObserver(observer.notice)
    try:
        yield FanOutObserver(observer, tracker)
    except BaseException as exc:
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish("FINISHED")
