"""train(config) -> summary: data, backbone and phases composed into a run directory."""

from __future__ import annotations

import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from transferctl import __version__
from transferctl.backbones import Backbone, build_backbone
from transferctl.config import ExperimentConfig, config_to_dict, dump_yaml
from transferctl.data import DatasetSplits, ImageDataset, build_transform, discover, make_loader, resolve_workers
from transferctl.engine import (
    EpochStats,
    NonFiniteLossError,
    Runtime,
    cpu_has_bf16_units,
    evaluate,
    make_grad_scaler,
    make_runtime,
    prepare_model,
    seed_everything,
    train_one_epoch,
)
from transferctl.errors import Problem, TrainingError
from transferctl.phases import (
    HEAD,
    PhasePlan,
    apply_freezing,
    build_optimizer,
    build_scheduler,
    describe_phase,
    optimizer_param_groups,
    plan_phases,
    set_train_mode,
)
from transferctl.rundir import RunDir, claim_run_dir, create_run_dir


class TrainObserver(Protocol):
    """How the CLI watches training; library code never prints."""

    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None: ...

    def batch_done(self, index: int, count: int, running_loss: float) -> None: ...

    def epoch_done(self, row: dict[str, Any]) -> None: ...


class SilentObserver:
    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None:
        pass

    def batch_done(self, index: int, count: int, running_loss: float) -> None:
        pass

    def epoch_done(self, row: dict[str, Any]) -> None:
        pass


@dataclass
class Experiment:
    """Everything built from a config before the first step: what `check` shows and `train` runs."""

    config: ExperimentConfig
    splits: DatasetSplits
    backbone: Backbone
    plans: list[PhasePlan]


def prepare(config: ExperimentConfig) -> Experiment:
    splits = discover(config.data.root, config.data.val_fraction, config.seed)
    backbone = build_backbone(config.backbone, len(splits.classes), config.data.image_size, pretrained=config.loads_pretrained_weights)
    plans = plan_phases(config, backbone.group_names)
    return Experiment(config, splits, backbone, plans)


def describe(experiment: Experiment) -> dict[str, Any]:
    """The resolved plan, as `transferctl check` prints it."""
    config, backbone = experiment.config, experiment.backbone
    return {
        "name": config.name,
        "strategy": config.strategy,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "layer_groups": backbone.group_names,
        "preprocessing": backbone.preprocessing.to_dict(),
        "data": {"root": str(experiment.splits.root), "layout": experiment.splits.layout, "classes": experiment.splits.classes, **experiment.splits.counts()},
        "phases": [describe_phase(backbone.model, backbone.groups, plan, config.optimizer.weight_decay) for plan in experiment.plans],
    }


def train(config: ExperimentConfig, run_dir: Path | None = None, observer: TrainObserver | None = None) -> dict[str, Any]:
    """Train as the config says; write everything into a new run directory; return the summary."""
    observer = observer or SilentObserver()
    seed_everything(config.seed)
    experiment = prepare(config)
    runtime = make_runtime(config.device, config.precision, experiment.backbone.model)
    model = prepare_model(experiment.backbone.model, runtime)
    loaders = _loaders(config, experiment, runtime)
    run = RunDir(claim_run_dir(run_dir) if run_dir else create_run_dir(config.output.dir, config.name))
    _write_run_header(run, experiment, runtime)
    return _Trainer(experiment, runtime, model, loaders, run, observer).run()


def _loaders(config: ExperimentConfig, experiment: Experiment, runtime: Runtime) -> dict[str, Any]:
    pre = experiment.backbone.preprocessing
    splits = experiment.splits
    workers = resolve_workers(config.data.num_workers, len(splits.train))
    pin = runtime.device.type == "cuda"
    train_set = ImageDataset(splits.train, build_transform(pre, config.data.augment, train=True))
    val_set = ImageDataset(splits.val, build_transform(pre, config.data.augment, train=False))
    return {
        "train": make_loader(train_set, config.data.batch_size, True, workers, config.seed, pin),
        "val": make_loader(val_set, config.data.batch_size, False, workers, config.seed, pin),
    }


def _write_run_header(run: RunDir, experiment: Experiment, runtime: Runtime) -> None:
    run.write_text("config.yaml", dump_yaml(config_to_dict(experiment.config)))
    run.write_json("classes.json", experiment.splits.classes)
    run.write_json("env.json", environment(runtime))


def environment(runtime: Runtime) -> dict[str, Any]:
    import torchvision

    info = {
        "transferctl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "device": str(runtime.device),
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "cpu_threads": torch.get_num_threads(),
        "cpu_bf16_units": cpu_has_bf16_units(),
    }
    if runtime.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    return info


def rng_states() -> dict[str, Any]:
    # numpy's state holds an ndarray; a list keeps the checkpoint loadable with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


class _Trainer:
    """The loop over phases and epochs; holds the state a checkpoint must capture."""

    def __init__(self, experiment: Experiment, runtime: Runtime, model: torch.nn.Module, loaders: dict[str, Any], run: RunDir, observer: TrainObserver) -> None:
        self.experiment = experiment
        self.config = experiment.config
        self.runtime = runtime
        self.model = model
        self.loaders = loaders
        self.run_dir = run
        self.observer = observer
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.started = time.perf_counter()

    def run(self) -> dict[str, Any]:
        for plan in self.experiment.plans:
            self._run_phase(plan)
        summary = self._summary()
        self.run_dir.write_json("summary.json", summary)
        return summary

    def _run_phase(self, plan: PhasePlan) -> None:
        backbone = self.experiment.backbone
        apply_freezing(self.model, backbone.groups, plan)
        # A fresh optimizer per phase, over exactly what this phase trains.
        optimizer = build_optimizer(self.config.optimizer, optimizer_param_groups(self.model, backbone.groups, plan, self.config.optimizer.weight_decay))
        scheduler = build_scheduler(optimizer, self.config.scheduler, plan.epochs, len(self.loaders["train"]))
        scaler = make_grad_scaler(self.runtime)
        self.observer.phase_started(plan, len(self.loaders["train"]))
        best_in_phase, stale = None, 0
        for epoch in range(1, plan.epochs + 1):
            set_train_mode(self.model, backbone.groups, plan)
            lrs = _current_lrs(optimizer)
            stats = self._train_epoch(plan, epoch, optimizer, scheduler, scaler)
            val = evaluate(self.model, self.loaders["val"], self.runtime)
            row = self._record(plan, epoch, lrs, stats, val)
            self._checkpoint(plan, epoch, row, optimizer, scheduler, scaler)
            self.observer.epoch_done(row)
            if best_in_phase is None or self._better(row, best_in_phase):
                best_in_phase, stale = row, 0
            else:
                stale += 1
            patience = self.config.early_stopping.patience
            if patience is not None and stale >= patience:
                break

    def _train_epoch(self, plan: PhasePlan, epoch: int, optimizer: Any, scheduler: Any, scaler: Any) -> EpochStats:
        try:
            return train_one_epoch(self.model, self.loaders["train"], optimizer, scheduler, self.runtime, scaler, self.observer.batch_done)
        except NonFiniteLossError as exc:
            last = self.run_dir.checkpoints / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no epoch finished, so no checkpoint was written"
            raise TrainingError(
                Problem(f"schedule[{plan.index}] ({plan.name}), epoch {epoch}", f"{exc}; {kept}", f"lower schedule[{plan.index}].lr (now {plan.lr:g})")
            ) from None

    def _record(self, plan: PhasePlan, epoch: int, lrs: dict[str, float], stats: EpochStats, val: EpochStats) -> dict[str, Any]:
        row = {
            "phase": plan.name,
            "phase_index": plan.index,
            "epoch": epoch,
            "global_epoch": len(self.rows) + 1,
            "lr_head": lrs.get(HEAD),
            "lr_backbone": lrs.get("backbone"),
            "train_loss": stats.loss,
            "train_acc": stats.accuracy,
            "val_loss": val.loss,
            "val_acc": val.accuracy,
            "seconds": round(stats.seconds + val.seconds, 3),
            "images_per_second": round(stats.images_per_second, 1),
        }
        self.rows.append(row)
        self.run_dir.write_metrics(self.rows)
        return row

    def _better(self, row: dict[str, Any], than: dict[str, Any]) -> bool:
        metric = self.config.early_stopping.metric
        if metric == "val_loss":
            return row[metric] < than[metric]
        return row[metric] > than[metric]

    def _checkpoint(self, plan: PhasePlan, epoch: int, row: dict[str, Any], optimizer: Any, scheduler: Any, scaler: Any) -> None:
        improved = self.best is None or self._better(row, self.best)
        if improved:
            self.best = row
        payload = self._payload(plan, epoch)
        if improved:
            self.run_dir.save_checkpoint("best", payload)
        payload["optimizer"] = optimizer.state_dict()
        payload["scheduler"] = scheduler.state_dict()
        payload["scaler"] = scaler.state_dict() if scaler is not None else None
        payload["rng"] = rng_states()
        self.run_dir.save_checkpoint("last", payload)

    def _payload(self, plan: PhasePlan, epoch: int) -> dict[str, Any]:
        backbone = self.experiment.backbone
        return {
            "format": 1,
            "model": {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.model.state_dict().items()},
            "classes": list(self.experiment.splits.classes),
            "backbone": {"name": backbone.name, "weights": backbone.weights, "head": backbone.head_path, "cut": self.config.backbone.cut},
            "preprocessing": backbone.preprocessing.to_dict(),
            "phase_index": plan.index,
            "epoch": epoch,
            "global_epoch": len(self.rows),
            "best": dict(self.best) if self.best else None,
            "config": config_to_dict(self.config),
        }

    def _summary(self) -> dict[str, Any]:
        assert self.best is not None, "a schedule always has at least one epoch"
        train_seconds = sum(r["seconds"] for r in self.rows)
        mean_speed = sum(r["images_per_second"] for r in self.rows) / len(self.rows)
        return {
            "run_dir": str(self.run_dir.path),
            "name": self.config.name,
            "backbone": self.experiment.backbone.name,
            "strategy": self.config.strategy,
            "metric": self.config.early_stopping.metric,
            "best_val_acc": self.best["val_acc"],
            "best_val_loss": self.best["val_loss"],
            "best_epoch": self.best["global_epoch"],
            "best_phase": self.best["phase"],
            "final_val_acc": self.rows[-1]["val_acc"],
            "epochs": len(self.rows),
            "seconds": round(time.perf_counter() - self.started, 2),
            "train_seconds": round(train_seconds, 2),
            "images_per_second": round(mean_speed, 1),
            "device": str(self.runtime.device),
            "precision": self.runtime.precision,
            "checkpoints": {"best": str(self.run_dir.checkpoints / "best.pt"), "last": str(self.run_dir.checkpoints / "last.pt")},
        }


def _current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The head's lr and the backbone's (the largest of its groups) at the start of an epoch."""
    lrs: dict[str, float] = {}
    for group in optimizer.param_groups:
        key = HEAD if group["name"].split("/")[0] == HEAD else "backbone"
        lrs[key] = max(lrs.get(key, 0.0), group["lr"])
    return lrs
