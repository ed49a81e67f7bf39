"""What a run records as it trains: one metrics row an epoch (metrics.jsonl and .csv, whose columns are
runs/rundir.py's METRIC_COLUMNS) and, at the end, summary.json.

Pure functions of numbers the loop (train.py) hands over, so that what a file holds can be read here at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transferctl.config import ExperimentConfig
from transferctl.runs.rundir import CHECKPOINTS, overall_images_per_second, total_data_seconds
from transferctl.training.engine import EpochStats
from transferctl.training.multi_label_metrics import tune_thresholds
from transferctl.training.phases import HEAD, PhasePlan


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The head's lr and the backbone's (the largest of its groups) at the start of an epoch."""
    lrs: dict[str, float] = {}
    for group in optimizer.param_groups:
        key = HEAD if group["name"].split("/")[0] == HEAD else "backbone"
        lrs[key] = max(lrs.get(key, 0.0), group["lr"])
    return lrs


def epoch_row(plan: PhasePlan, epoch: int, global_epoch: int, lrs: dict[str, float], stats: EpochStats, val: EpochStats) -> dict[str, Any]:
    """An epoch's metrics row: the phase, the learning rates it started with, its training and validation."""
    return {
        "phase": plan.name,
        "phase_index": plan.index,
        "epoch": epoch,
        "global_epoch": global_epoch,
        "lr_head": lrs.get(HEAD),
        "lr_backbone": lrs.get("backbone"),
        "train_loss": stats.loss,
        "train_acc": stats.accuracy,
        **val.validation_columns(),
        "seconds": round(stats.seconds + val.seconds, 3),
        "images_per_second": round(stats.images_per_second, 1),
        "data_seconds": round(stats.data_seconds, 3),  # of the training's seconds, waiting for batches
        "train_seconds": round(stats.seconds, 3),  # of `seconds`, training (the rest validates)
    }


def tuned_thresholds(val: EpochStats | None) -> list[float] | None:
    """A multi-label validation's per-class thresholds, each the one with the best F1 on these images
    (multi_label_metrics.tune_thresholds); None for a single-label run."""
    if val is None or val.scores is None or val.targets is None or not val.images:
        return None
    return [round(float(value), 6) for value in tune_thresholds(val.targets, val.scores)]


def run_summary(
    run_dir: Path, config: ExperimentConfig, backbone: str, rows: list[dict[str, Any]], best: dict[str, Any], *, seconds: float, device: str, precision: str,
    feature_cache: list[dict[str, Any]], decoded_images: list[dict[str, Any]], skipped_images: list[str], classes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """summary.json: the best row's metrics, the run's timings and where its caches and checkpoints are.
    `seconds`: wall time, all sessions together."""
    checkpoints = run_dir / CHECKPOINTS
    return {
        "run_dir": str(run_dir),
        "name": config.name,
        "backbone": backbone,
        "strategy": config.strategy,
        "metric": config.early_stopping.metric,
        "best_val_acc": best["val_acc"],
        "best_val_loss": best["val_loss"],
        "best_epoch": best["global_epoch"],
        "best_phase": best["phase"],
        "best_weights": best.get("weights", "raw"),  # ema: where the weight average did better (best.pt holds it)
        **({"task": "multi_label", "best_val_map": best.get("val_map"), "thresholds": dict(zip(classes, best["thresholds"]))} if "thresholds" in best else {}),
        "final_val_acc": rows[-1]["val_acc"],
        "epochs": len(rows),
        "seconds": round(seconds, 2),
        "train_seconds": round(sum(r["seconds"] for r in rows), 2),
        "data_seconds": total_data_seconds(rows),
        "images_per_second": overall_images_per_second(rows),
        "device": device,
        "precision": precision,
        "feature_cache": feature_cache,
        "decoded_images": decoded_images,
        "skipped_images": skipped_images,
        "checkpoints": {"best": str(checkpoints / "best.pt"), "last": str(checkpoints / "last.pt")},
    }
