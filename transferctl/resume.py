"""resume(run_dir) -> summary: continue a run where it stopped, with the run's own config.yaml.

The run's checkpoints/last.pt is the truth: model, optimizer, scheduler, grad scaler, early stopping, best
row, metric rows and RNG states at the end of the last completed epoch. A resumed run then computes what
the uninterrupted run would have computed. Only what cannot change its results may differ from the
config the run started with: the device and precision, workers, patience, where the data lives, and
phases that have not started yet. Anything else is refused, each change named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferctl.backbones import Preprocessing
from transferctl.config import config_to_dict, dump_yaml, flatten, load_config, schedule_of
from transferctl.data import changed_images, class_differences, split_fingerprint
from transferctl.distributed import from_main, is_main, process_group
from transferctl.engine import seed_everything
from transferctl.errors import CheckpointError, Problem
from transferctl.rundir import RunDir, load_run_checkpoint
from transferctl.train import (
    Experiment,
    ResumePoint,
    Session,
    SilentObserver,
    TrainObserver,
    environment,
    prepare,
    write_run_header,
)

# Fields a resume may change: none of them changes what the next epoch computes on a CPU.
CHANGEABLE = ("name", "device", "precision", "output.dir", "output.checkpoint_seconds", "data.root", "data.num_workers", "data.on_bad_image", "early_stopping.patience", "logging.tensorboard")
RESUME_STATE = ("optimizer", "scheduler", "rng", "rows", "phase_done", "stale", "config", "phase_index", "epoch")


def resume(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), observer: TrainObserver | None = None) -> dict[str, Any]:
    """Continue the run in run_dir from its last completed epoch; return the summary."""
    with process_group():
        return _resume(run_dir, overrides, (observer or SilentObserver()) if is_main() else SilentObserver())


def _resume(run_dir: Path, overrides: list[str] | tuple[str, ...], observer: TrainObserver) -> dict[str, Any]:
    # Under torchrun rank 0 reads the run (its folder need not exist on other nodes) and hands it to the others.
    run = RunDir(from_main(lambda: _open_run(run_dir).path), writer=is_main())
    with run.lock():
        run.remove_stale_temp_files()
        config_file = run.path / "config.yaml"
        config = from_main(lambda: load_config(config_file, overrides))
        checkpoint = from_main(lambda: load_run_checkpoint(run.path, "last") if (run.checkpoints / "last.pt").is_file() else None)
        if checkpoint is None:
            # Stopped before the first epoch ended: nothing to continue, so start over in the same folder.
            seed_everything(config.seed)
            experiment = prepare(config)
            session = Session.start(experiment)
            write_run_header(run, experiment, session.runtime)
            run.write_metrics([])
            observer.notice(f"{run.path}: no epoch had finished; starting from the beginning")
            return session.train(run, observer)
        start = resume_point(checkpoint, str(run.checkpoints / "last.pt"))
        problems = incompatibilities(checkpoint["config"], config_to_dict(config), start.phase_index + 1, str(config_file))
        if problems:
            raise CheckpointError(*problems)
        finished = from_main(lambda: dict(run.read_json("summary.json")) if (run.path / "summary.json").is_file() else None)
        if start.phase_done and start.phase_index == len(schedule_of(config)) - 1 and finished is not None:
            observer.notice(f"{run.path}: already finished all {len(start.rows)} epochs; nothing to resume")
            return finished
        experiment = prepare(config, load_weights=False)
        changed = changed_images(checkpoint.get("data"), split_fingerprint(experiment.splits))
        if changed:
            observer.notice(changed)
        _restore_model(experiment, checkpoint, str(run.checkpoints / "last.pt"))
        session = Session.start(experiment)
        if overrides:
            run.write_text("config.yaml", dump_yaml(config_to_dict(config)))
        run.write_json("env.json", {**environment(session.runtime), "resumed_after_global_epoch": len(start.rows)})
        run.write_metrics(start.rows)  # drops a row whose epoch's last.pt was never written
        last = start.rows[-1]
        observer.notice(f"{run.path}: resuming after phase '{last['phase']}' epoch {last['epoch']} (global epoch {last['global_epoch']})")
        return session.train(run, observer, start)


def _open_run(run_dir: Path) -> RunDir:
    if not run_dir.is_dir():
        raise CheckpointError(Problem("--resume", f"no such run directory: {run_dir}", "give a folder that `transferctl train` wrote"))
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(Problem("--resume", f"{run_dir} has no config.yaml: not a transferctl run directory", "give a folder that `transferctl train` wrote"))
    return RunDir(run_dir)


def resume_point(checkpoint: dict[str, Any], where: str) -> ResumePoint:
    missing = [key for key in RESUME_STATE if key not in checkpoint]
    if missing:
        raise CheckpointError(Problem(where, f"has no resume state ({', '.join(missing)} missing)", "it was written by an older transferctl; start a new run"))
    return ResumePoint(
        phase_index=int(checkpoint["phase_index"]),
        epoch=int(checkpoint["epoch"]),
        phase_done=bool(checkpoint["phase_done"]),
        phase_best=checkpoint.get("phase_best"),
        stale=int(checkpoint["stale"]),
        rows=list(checkpoint["rows"]),
        best=checkpoint.get("best"),
        elapsed=float(checkpoint.get("elapsed", 0.0)),
        optimizer=checkpoint["optimizer"],
        scheduler=checkpoint["scheduler"],
        scaler=checkpoint.get("scaler"),
        rng=checkpoint["rng"],
    )


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
            if old.get(key) != new.get(key):
                problems.append(
                    Problem(f"{where}: schedule[{index}].{key}", f"changed from {old.get(key)!r} to {new.get(key)!r}, but phase '{old['name']}' has already started", hint)
                )
    return problems


def _restore_model(experiment: Experiment, checkpoint: dict[str, Any], where: str) -> None:
    """The checkpoint's classes, weights and preprocessing, into the freshly built (untrained) backbone."""
    classes, found = list(checkpoint["classes"]), experiment.splits.classes
    if found != classes:
        detail = class_differences(classes, found) or "a different order"
        raise CheckpointError(
            Problem("data.root", f"the classes in {experiment.splits.root} differ from the run's: {detail}", "restore the data the run trained on, or start a new run")
        )
    backbone = experiment.backbone
    try:
        backbone.model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(Problem(where, f"weights do not fit {backbone.name}: {detail}", "the checkpoint is damaged; start a new run")) from None
    backbone.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
    backbone.weights = str(checkpoint.get("backbone", {}).get("weights", backbone.weights))
