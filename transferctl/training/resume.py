"""resume(run_dir) -> summary: continue a run where it stopped, with the run's own config.yaml.

The run's checkpoints/last.pt is the truth: model, optimizer, scheduler, grad scaler, early stopping, best
row, metric rows and RNG states at the end of the last completed epoch. A resumed run then computes what
the uninterrupted run would have computed. Only what cannot change its results may differ from the
config the run started with: the device and precision, workers, patience, where the data lives, and
phases that have not started yet. Anything else is refused, each change named. A run whose last.pt is
missing or damaged although epochs finished is refused too, unless the user asks to start over
(restart): what the earlier training left is then moved aside, never replaced. A `python:` backbone in
the run's config.yaml is rebuilt only with the user's opt-in (trust_code, transferctl/models/trust.py).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from transferctl.data.preprocessing import Preprocessing
from transferctl.config import ExperimentConfig, config_to_dict, dump_yaml, flatten, load_config, schedule_of
from transferctl.data.folders import changed_images, class_differences, split_fingerprint
from transferctl.training.distributed import from_main, is_main, process_group
from transferctl.training.engine import seed_everything
from transferctl.errors import CheckpointError, Problem
from transferctl.paths import checked
from transferctl.runs.checkpoint import Checkpoint, LastCheckpoint, load_run_checkpoint
from transferctl.runs.rundir import RunDir, metric_lines
from transferctl.models.trust import require_trusted
from transferctl.training.train import Experiment, Session, environment, prepare, resume_command, write_run_header
from transferctl.training.observers import SilentObserver, TrainObserver

# Fields a resume may change: none of them changes what the next epoch computes on a CPU.
CHANGEABLE = ("name", "device", "precision", "output.dir", "output.checkpoint_seconds", "data.root", "data.num_workers", "data.on_bad_image", "early_stopping.patience", "logging.tensorboard", "logging.mlflow")
RESUME_STATE = ("optimizer", "scheduler", "rng", "rows", "phase_done", "stale", "config", "phase_index", "epoch")
# What an earlier training of a run left that a restart would replace: moved into before-restart-<time>/.
EARLIER_TRAINING = ("checkpoints/best.pt", "checkpoints/last.pt", "metrics.jsonl", "metrics.csv", "summary.json", "eval")


def resume(
    run_dir: Path, overrides: list[str] | tuple[str, ...] = (), observer: TrainObserver | None = None, trust_code: bool = False, restart: bool = False
) -> dict[str, Any]:
    """Continue the run in run_dir from its last completed epoch; return the summary. trust_code: the user
    allows a python: backbone that the run's config.yaml names to be imported and called. restart: train
    from epoch 1 again, whatever last.pt holds, with the earlier training's files moved aside (set_aside)."""
    with process_group():
        return _resume(run_dir, overrides, (observer or SilentObserver()) if is_main() else SilentObserver(), trust_code, restart)


def _resume(run_dir: Path, overrides: list[str] | tuple[str, ...], observer: TrainObserver, trust_code: bool, restart: bool) -> dict[str, Any]:
    # Under torchrun rank 0 reads the run (its folder need not exist on other nodes) and hands it to the others.
    run = RunDir(from_main(lambda: _open_run(run_dir).path), writer=is_main())
    with run.lock():
        run.remove_stale_temp_files()
        config_file = run.path / "config.yaml"
        config = from_main(lambda: load_config(config_file, overrides))
        require_trusted(config.backbone.name, str(config_file), trust_code)
        if restart:
            kept = from_main(lambda: set_aside(run))
            aside = f"; the earlier checkpoints, metrics and summary are in {kept}" if kept else ""
            return _start_over(run, config, observer, f"{run.path}: starting over from epoch 1, as --restart asks{aside}")
        checkpoint = from_main(lambda: _last_checkpoint(run))
        if checkpoint is None:
            # Stopped before the first epoch ended: nothing to continue, so start over in the same folder.
            return _start_over(run, config, observer, f"{run.path}: no epoch had finished; starting from the beginning")
        start = resume_point(checkpoint, str(run.checkpoints / "last.pt"))
        problems = incompatibilities(checkpoint.config or {}, config_to_dict(config), start.phase_index + 1, str(config_file))
        if problems:
            raise CheckpointError(*problems)
        finished = from_main(lambda: dict(run.read_json("summary.json")) if (run.path / "summary.json").is_file() else None)
        if start.phase_done and start.phase_index == len(schedule_of(config)) - 1 and finished is not None:
            observer.notice(f"{run.path}: already finished all {len(start.rows)} epochs; nothing to resume")
            return finished
        experiment = prepare(config, load_weights=False)
        changed = changed_images(checkpoint.data, split_fingerprint(experiment.splits))
        if changed:
            observer.notice(changed)
        _restore_model(experiment, checkpoint, str(run.checkpoints / "last.pt"))
        session = Session.start(experiment)
        if overrides:  # the session's config, with the --set overrides (an `lr: auto` among them is found when its phase starts)
            run.write_text("config.yaml", dump_yaml(config_to_dict(session.experiment.config)))
        run.write_json("env.json", {**environment(session.runtime), "resumed_after_global_epoch": len(start.rows)})
        run.write_metrics(start.rows)  # drops a row whose epoch's last.pt was never written
        last = start.rows[-1]
        observer.notice(f"{run.path}: resuming after phase '{last['phase']}' epoch {last['epoch']} (global epoch {last['global_epoch']})")
        return session.train(run, observer, start)


def _start_over(run: RunDir, config: ExperimentConfig, observer: TrainObserver, notice: str) -> dict[str, Any]:
    seed_everything(config.seed)
    experiment = prepare(config)
    session = Session.start(experiment)
    write_run_header(run, experiment, session.runtime)
    run.write_metrics([])
    observer.notice(notice)
    return session.train(run, observer)


def _last_checkpoint(run: RunDir) -> Checkpoint | None:
    """last.pt; None only when no epoch finished. Missing after epochs finished, or damaged: refused, since
    starting over would replace best.pt and the metrics of the epochs that did finish."""
    last = run.checkpoints / "last.pt"
    hint = f"restore it to continue, or start over from epoch 1 with `{resume_command(run.path)} --restart`, which keeps the earlier files in before-restart-<time>/"
    if not last.exists() and not last.is_symlink():
        evidence = finished_epochs(run)
        if evidence:
            raise CheckpointError(Problem(str(last), f"missing, but epochs had finished ({'; '.join(evidence)})", hint))
        return None
    if not last.is_file():
        raise CheckpointError(Problem(str(last), "is not a checkpoint file (a folder, or a link to nothing)", hint))
    try:
        return load_run_checkpoint(run.path, "last")
    except CheckpointError as exc:
        raise CheckpointError(*(Problem(problem.where, problem.message, hint) for problem in exc.problems)) from None


def finished_epochs(run: RunDir) -> list[str]:
    """What in the run directory shows that epochs finished: best.pt, metric rows, summary.json."""
    evidence = ["checkpoints/best.pt is there"] if (run.checkpoints / "best.pt").exists() else []
    metrics = run.path / "metrics.jsonl"
    try:
        rows = sum(1 for _ in metric_lines(metrics)) if metrics.is_file() else 0
    except OSError:
        rows = 0
    if rows:
        evidence.append(f"metrics.jsonl has {rows} epoch row{'s' if rows > 1 else ''}")
    if (run.path / "summary.json").exists():
        evidence.append("summary.json is there")
    return evidence


def set_aside(run: RunDir) -> Path | None:
    """Move what an earlier training left (EARLIER_TRAINING) into a new before-restart-<time>/ in the run
    directory, where nothing writes; None when there was nothing to keep."""
    present = [name for name in EARLIER_TRAINING if (run.path / name).exists() or (run.path / name).is_symlink()]
    if not present:
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        folder = _new_folder(run.path, f"before-restart-{stamp}")
        for name in present:
            os.replace(run.path / name, folder / Path(name).name)
    except OSError as exc:
        raise CheckpointError(Problem(str(run.path), f"cannot keep the earlier training's files aside before restarting: {exc.strerror or exc}",
                                      "free disk space or fix permissions, then retry")) from None  # fmt: skip
    return folder


def _new_folder(parent: Path, name: str) -> Path:
    for attempt in range(1, 100):
        folder = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"too many folders named {name}")


def _open_run(run_dir: Path) -> RunDir:
    if not checked(run_dir, CheckpointError, "--resume").is_dir():
        raise CheckpointError(Problem("--resume", f"no such run directory: {run_dir}", "give a folder that `transferctl train` wrote"))
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(Problem("--resume", f"{run_dir} has no config.yaml: not a transferctl run directory", "give a folder that `transferctl train` wrote"))
    return RunDir(run_dir)


def resume_point(checkpoint: Checkpoint, where: str) -> LastCheckpoint:
    """last.pt, checked to hold everything a resume continues from (an older transferctl's may not)."""
    missing = [name for name in RESUME_STATE if getattr(checkpoint, name, None) is None]
    if missing:
        raise CheckpointError(Problem(where, f"has no resume state ({', '.join(missing)} missing)", "it was written by an older transferctl; start a new run"))
    assert isinstance(checkpoint, LastCheckpoint)  # it has an optimizer state, which only last.pt holds
    return checkpoint


def incompatibilities(trained: dict[str, Any], now: dict[str, Any], phases_started: int, where: str) -> list[Problem]:
    """Every change from the config a run trained with that a resume cannot honour, one Problem each."""
    hint = f"resume may change only {', '.join(CHANGEABLE)} and phases not yet started; start a new run for this"
    problems = []
    before, after = flatten(trained), flatten(now)
    for key in sorted(before.keys() | after.keys()):
        if key.startswith("schedule") or key in CHANGEABLE:
            continue
        if before.get(key) != after.get(key):
            problems.append(Problem(f"{where}: {key}", f"changed from {before.get(key)!r} to {after.get(key)!r} since the run started", hint))
    old_phases, new_phases = trained.get("schedule") or [], now.get("schedule") or []
    for index, old in enumerate(old_phases[:phases_started]):
        if index >= len(new_phases):
            problems.append(Problem(f"{where}: schedule[{index}]", f"phase '{old['name']}' was removed, but the run has already trained in it", hint))
            continue
        new = new_phases[index]
        for key in sorted(old.keys() | new.keys()):
            if _phase_field(old, key) != _phase_field(new, key):
                problems.append(
                    Problem(f"{where}: schedule[{index}].{key}", f"changed from {old.get(key)!r} to {new.get(key)!r}, but phase '{old['name']}' has already started", hint)
                )
    return problems


def _phase_field(phase: dict[str, Any], key: str) -> Any:
    """A phase's field, or its default where the run was written before the field existed (solver, min_steps)."""
    from transferctl.config import PhaseConfig

    field = PhaseConfig.model_fields.get(key)
    return phase.get(key, None if field is None or field.is_required() else field.default)


def _restore_model(experiment: Experiment, checkpoint: Checkpoint, where: str) -> None:
    """The checkpoint's classes, weights and preprocessing, into the freshly built (untrained) backbone."""
    classes, found = list(checkpoint.classes), experiment.splits.classes
    if found != classes:
        detail = class_differences(classes, found) or "a different order"
        raise CheckpointError(
            Problem("data.root", f"the classes in {experiment.splits.root} differ from the run's: {detail}", "restore the data the run trained on, or start a new run")
        )
    backbone = experiment.backbone
    try:
        backbone.model.load_state_dict(checkpoint.model, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(Problem(where, f"weights do not fit {backbone.name}: {detail}", "the checkpoint is damaged; start a new run")) from None
    backbone.preprocessing = Preprocessing.from_dict(checkpoint.preprocessing)
    backbone.weights = str(checkpoint.backbone.get("weights", backbone.weights))
