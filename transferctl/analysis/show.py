"""show: one run at a glance, from the files `train` wrote: what differs from the defaults, the phases as
they ran, the best metrics and the time it took.

No torch here: like `runs`, `show` answers at once. A run without summary.json (still training or
interrupted) is shown from its metrics so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferctl.config import auto_metric
from transferctl.errors import CheckpointError, Problem
from transferctl.paths import checked
from transferctl.runs.listing import describe_run, metric_rows, read_run_config
from transferctl.runs.rundir import overall_images_per_second, read_json, read_json_mapping, total_data_seconds

# Paths differ from run to run by nature; show names them in its header instead of as changes.
NOT_COMPARED = ("data.root", "output.dir")


SUMMARY_NUMBERS = ("best_val_acc", "best_val_loss", "best_epoch", "final_val_acc", "epochs", "seconds", "train_seconds", "data_seconds", "images_per_second")


def show_run(run_dir: Path) -> dict[str, Any]:
    """Everything `transferctl show` prints, as plain data (the --json document)."""
    if not checked(run_dir, CheckpointError).is_dir():
        raise CheckpointError(Problem(str(run_dir), "no such run directory", "give a folder written by `transferctl train`; `transferctl runs` lists them"))
    config = read_run_config(run_dir)
    info = describe_run(run_dir)
    summary = _checked_summary(run_dir / "summary.json")
    env = read_json_mapping(run_dir / "env.json") or {}
    metrics = metric_rows(run_dir)
    rows = metrics.rows
    classes = read_json(run_dir / "classes.json", strict=False)
    metric = config.early_stopping.metric
    if metric == "auto":  # a config.yaml written by hand or from before runs recorded what auto came to
        metric = auto_metric(config.task == "multi_label")
    return {
        "run_dir": str(run_dir),
        "name": config.name,
        "status": info.status,
        "started": info.date,
        "backbone": config.backbone.name,
        "weights": config.backbone.weights,
        "strategy": config.strategy,
        "data_root": str(config.data.root),
        "classes": classes if isinstance(classes, list) else None,
        "changed": changes_from_defaults(config),
        "phases": phase_table(config, rows),
        "best": _best(summary, rows, metric),
        "evaluations": info.evaluations,
        "timing": _timing(summary, rows, env),
        "skipped_rows": metrics.skipped,
    }


def changes_from_defaults(config: Any) -> list[dict[str, Any]]:
    """[{field, value, default}] for every field the experiment set to something other than its default."""
    from transferctl.config import ExperimentConfig, default_schedule, flatten

    ours = config.model_dump(mode="json")
    defaults = ExperimentConfig.model_validate({"data": {"root": "."}}).model_dump(mode="json")
    resolved = auto_metric(ours["task"] == "multi_label")  # what auto came to (or comes to): no change
    defaults["early_stopping"]["metric"] = resolved
    if ours["early_stopping"]["metric"] == "auto":
        ours["early_stopping"]["metric"] = resolved
    ours_schedule, _ = ours.pop("schedule"), defaults.pop("schedule")
    before, after = flatten(defaults), flatten(ours)
    changed = [
        {"field": key, "value": after.get(key), "default": before.get(key)}
        for key in after.keys() | before.keys()
        if key not in NOT_COMPARED and after.get(key) != before.get(key)
    ]
    # The default schedule is the strategy's own: a feature_extract run on its defaults changed only the strategy.
    strategy_default = [phase.model_dump(mode="json") for phase in default_schedule(config.strategy)]
    if ours_schedule is not None and ours_schedule != strategy_default:
        changed.append({"field": "schedule", "value": f"{len(ours_schedule)} phases of its own", "default": f"{config.strategy}'s {len(strategy_default)} phases"})
    order = list(after)
    return sorted(changed, key=lambda c: order.index(c["field"]) if c["field"] in order else len(order))


def phase_table(config: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each phase as planned and as it ran: epochs, what trained, learning rates, best val_acc, time."""
    from transferctl.config import schedule_of

    phases = []
    for index, phase in enumerate(schedule_of(config)):
        ran = [row for row in rows if row.get("phase_index") == index]
        accuracies = [row["val_acc"] for row in ran if isinstance(row.get("val_acc"), (int, float))]
        maps = [row["val_map"] for row in ran if isinstance(row.get("val_map"), (int, float))]
        phases.append({
            "index": index,
            "name": phase.name,
            "epochs": phase.epochs,
            "epochs_run": len(ran),
            "train": phase.train,
            "trains": describe_train(phase.train),
            "lr_head": phase.lr,
            "lr_backbone": None if phase.train == "head" else phase.lr * phase.backbone_lr_mult,
            "bn": phase.bn,
            "best_val_acc": max(accuracies) if accuracies else None,
            **({"best_val_map": max(maps)} if maps else {}),  # multi-label runs
            "seconds": round(sum(row.get("seconds") or 0.0 for row in ran), 2),
        })  # fmt: skip
    return phases


def describe_train(spec: str | list[str]) -> str:
    if spec == "head":
        return "head only"
    if spec == "all":
        return "all layers"
    if isinstance(spec, str):
        return f"last {spec.split(':', 1)[1]} groups + head"
    return ", ".join([*spec, "head"])


def _best(summary: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    if "best_val_acc" in summary:
        return {
            "metric": summary.get("metric", metric),
            "val_acc": summary["best_val_acc"],
            **_multi_label_best(summary.get("best_val_map")),
            "val_loss": summary.get("best_val_loss"),
            "epoch": summary.get("best_epoch"),
            "phase": summary.get("best_phase"),
            "final_val_acc": summary.get("final_val_acc"),
        }
    from transferctl.training.early_stopping import METRIC_COLUMN

    column = METRIC_COLUMN.get(metric, metric)  # balanced_acc: the rows' val_balanced_acc
    scored = [row for row in rows if isinstance(row.get(column), (int, float))]
    if not scored:
        return None
    pick = min if metric == "val_loss" else max
    best = pick(scored, key=lambda row: row[column])
    return {
        "metric": metric,
        "val_acc": best.get("val_acc"),
        **_multi_label_best(best.get("val_map")),
        "val_loss": best.get("val_loss"),
        "epoch": best.get("global_epoch"),
        "phase": best.get("phase"),
        "final_val_acc": rows[-1].get("val_acc"),
    }


def _multi_label_best(val_map: float | None) -> dict[str, float]:
    """A multi-label run's best val_map, beside its val_acc (every label right); nothing for single-label runs."""
    return {} if val_map is None else {"val_map": val_map}


def _timing(summary: dict[str, Any], rows: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    return {
        "epochs": summary.get("epochs", len(rows)),
        "seconds": summary.get("seconds"),  # wall time, set up included; None until the run finishes
        "train_seconds": summary.get("train_seconds", round(sum(row.get("seconds") or 0.0 for row in rows), 2)),
        "data_seconds": summary.get("data_seconds", total_data_seconds(rows)),  # of train_seconds, waiting for batches
        "images_per_second": summary.get("images_per_second", overall_images_per_second(rows)),
        "device": summary.get("device", env.get("device")),
        "precision": summary.get("precision", env.get("precision")),
        "torch": env.get("torch"),
        "gpu": env.get("gpu"),
    }


def _checked_summary(path: Path) -> dict[str, Any]:
    """summary.json's mapping ({} while the run trains); a number that is not one is named, not printed."""
    summary = read_json_mapping(path) or {}
    for key in SUMMARY_NUMBERS:
        value = summary.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CheckpointError(Problem(str(path), f"{key} is {value!r}, not a number", "restore the file or re-run"))
    return summary
