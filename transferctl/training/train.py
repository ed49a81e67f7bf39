"""train(config) -> summary: data, backbone and phases composed into a run directory.

Every epoch ends with a checkpoint (checkpoints/last.pt, written at once or soon after: checkpoint_timing.py)
that holds all an uninterrupted run would carry into the next epoch: model, optimizer, scheduler, grad
scaler, early-stopping state, best row, metric rows and random-number-generator states. The shuffle order
and augmentations of an epoch depend only on (seed, global epoch), so resuming from last.pt (resume.py)
continues exactly as if nothing had happened.
"""

from __future__ import annotations

import math
import platform
import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from transferctl import __version__
from transferctl.models.backbone import Backbone
from transferctl.models.build import build_backbone
from transferctl.training.checkpoint_timing import CheckpointSaver
from transferctl.config import ExperimentConfig, config_for_task, config_to_dict, dump_yaml
from transferctl.data.folders import (
    DatasetSplits,
    ImageDataset,
    build_transform,
    data_notices,
    make_loader,
    resolve_workers,
    set_loader_epoch,
    spare_cores,
    split_fingerprint,
    transform_names,
    worker_error,
)
from transferctl.data.label_files import discover_data
from transferctl.training.distributed import (
    TrainingModule,
    agreed_stop,
    device_spec,
    from_main,
    is_lost_contact,
    is_main,
    lost_contact,
    per_rank_batch,
    process_group,
    reduce_stats,
    shard,
)
from transferctl.training.engine import EpochStats, NonFiniteLossError, TrainingStopped, evaluate, make_grad_scaler, restore_rng_states, rng_states, seed_everything, train_one_epoch
from transferctl.training.runtime import Runtime, cpu_has_bf16_units, make_runtime, prepare_model
from transferctl.errors import ConfigError, DataError, Problem, TrainingError, TrainingInterrupted
from transferctl.training.feature_cache import FrozenBodyShortcut, head_for_features
from transferctl.training.head_solver import HeadSolver, Objective, solvable
from transferctl.data.decoded_cache import DecodeOnce
from transferctl.training.interrupts import StopRequest, stop_on_signals
from transferctl.training.lr_finder import END_LR, START_LR, STEPS, LrFinding, auto_phases, lr_range_test, phase_at, with_lrs
from transferctl.training.phases import (
    PhasePlan,
    Stage,
    apply_freezing,
    build_optimizer,
    build_scheduler,
    describe_phase,
    load_optimizer_state,
    optimizer_param_groups,
    plan_phases,
    refuse_single_image_batches,
    set_train_mode,
    stage_at,
    stages_of,
)
from transferctl.runs.checkpoint import CHECKPOINT_FORMAT, Checkpoint, LastCheckpoint
from transferctl.runs.rundir import RunDir, claim_run_dir, create_run_dir
from transferctl.training.early_stopping import EarlyStopping, is_better
from transferctl.training.observers import SilentObserver, TrainObserver
from transferctl.training.run_records import current_lrs, epoch_row, run_summary, tuned_thresholds
from transferctl.data.imbalance import balanced_sample_weights, imbalance_notices
from transferctl.training.loss import build_loss
from transferctl.training.ema import averaged_columns, better_weights, weight_average
from transferctl.training.mixing import batch_mixer, mixing_of, refuse_cached_mixing


@dataclass
class Experiment:
    """Everything built from a config before the first step: what `check` shows and `train` runs."""

    config: ExperimentConfig
    splits: DatasetSplits
    backbone: Backbone
    plans: list[PhasePlan]
    loss: torch.nn.Module  # the training loss (loss.py), built from the training labels


def prepare(config: ExperimentConfig, load_weights: bool = True) -> Experiment:
    """Data, backbone and phases; load_weights=False when a checkpoint will provide every weight."""
    splits = discover_data(config.data.root, config.data.val_fraction, config.seed, config.data.on_bad_image, labels=config.data.labels, task=config.task)
    config = config_for_task(config, splits.multi_label)  # a multi-label run records task: multi_label and its metric
    # Before the backbone: a class_weights list that does not fit fails fast.
    loss = build_loss(config.loss, [label for _, label in splits.train], splits.classes, splits.multi_label)
    pretrained = load_weights and config.loads_pretrained_weights
    backbone = build_backbone(config.backbone, len(splits.classes), config.data.image_size, pretrained=pretrained)
    plans = plan_phases(config, backbone.group_names, math.ceil(len(splits.train) / config.data.batch_size))
    refuse_single_image_batches(backbone.model, backbone.groups, plans, per_rank_batch(config.data.batch_size), shard().world)
    refuse_cached_mixing(config, plans, backbone.group_names)
    return Experiment(config, splits, backbone, plans, loss)


def describe(experiment: Experiment) -> dict[str, Any]:
    """The resolved plan, as `transferctl check` prints it: with the device and precision train would use
    on this machine, so a device it lacks (or fp16 on a CPU) is refused here as train would refuse it."""
    config, backbone, splits = experiment.config, experiment.backbone, experiment.splits
    runtime = make_runtime(config.device, config.precision, backbone.model, config.compile)
    return {
        "name": config.name,
        "strategy": config.strategy,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "cut": backbone.cut,
        "layer_groups": backbone.group_names,
        "preprocessing": backbone.preprocessing.to_dict(),
        "data": {
            "root": str(splits.root), "layout": splits.layout, "classes": splits.classes, **splits.counts(),
            "task": "multi_label" if splits.multi_label else "single_label",
            "skipped": len(splits.skipped), "notices": [*data_notices(splits), *imbalance_notices(config, splits)],
        },  # fmt: skip
        "phases": [
            {**describe_phase(backbone.model, backbone.groups, plan, config.optimizer.weight_decay, config.early_stopping.patience),
             "head_solved": solves_head(config, backbone, plan)}
            for plan in experiment.plans
        ],  # fmt: skip
        "augmentation": describe_augmentation(config, backbone, experiment.plans),
        "kit": describe_kit(config, backbone, experiment.plans),
    }


def describe_kit(config: ExperimentConfig, backbone: Backbone, plans: list[PhasePlan]) -> dict[str, Any]:
    """The loss, the sampler, the weight average and each phase's mixing, as `check` shows them; a phase whose
    head trains on cached features does not mix (mixing.py)."""
    mixing = {}
    for plan in plans:
        mixes = mixing_of(config, plan.index)
        cached = config.data.cache != "off" and all(stage.plan.backbone_frozen for stage in stages_of(plan, backbone.group_names))
        if not cached and (mixes.mixup is not None or mixes.cutmix is not None):
            mixing[plan.name] = {"mixup": mixes.mixup, "cutmix": mixes.cutmix}
    return {"label_smoothing": config.loss.label_smoothing, "class_weights": config.loss.class_weights, "sampler": config.data.sampler,
            "ema_decay": config.ema.decay if config.ema is not None else None, "mixing": mixing}  # fmt: skip


def describe_augmentation(config: ExperimentConfig, backbone: Backbone, plans: list[PhasePlan]) -> dict[str, Any]:
    """The training transform's steps, and what the feature cache makes of them: the phases whose head
    trains on cached features see `cached_views` fixed views per image, each one forward pass to compute."""
    data = config.data
    transform = build_transform(backbone.preprocessing, data.augment, train=True, random_erasing=data.random_erasing)
    cached = [plan.name for plan in plans if data.cache != "off" and stages_of(plan, backbone.group_names)[0].plan.backbone_frozen]
    return {"augment": data.augment, "random_erasing": data.random_erasing, "train": transform_names(transform), "random": data.random_views,
            "cached_phases": cached, "cached_views": data.cached_views if data.random_views else 1}  # fmt: skip


def solves_head(config: ExperimentConfig, backbone: Backbone, plan: PhasePlan) -> bool:
    """Whether the phase starts by solving its head (head_solver.py): its first stage trains the head alone,
    on cached features, and the head is a linear layer. The run still falls back to minibatch steps, with a
    note, when the network's head output turns out not to be its output (the features cannot be cached)."""
    first = stages_of(plan, backbone.group_names)[0].plan
    return plan.solver == "auto" and config.data.cache != "off" and first.backbone_frozen and solvable(backbone.model.get_submodule(backbone.head_path))


def train(config: ExperimentConfig, run_dir: Path | None = None, observer: TrainObserver | None = None) -> dict[str, Any]:
    """Train as the config says; write everything into a new run directory; return the summary.

    Under torchrun every rank calls this; rank 0 names and writes the run directory (see distributed.py).
    """
    with process_group():
        seed_everything(config.seed)
        experiment = prepare(config)
        session = Session.start(experiment)
        # From the run directory's making on, a stop signal waits for its files, then stops at the first step:
        # the folder is then one that --resume takes.
        with stop_on_signals():
            path = from_main(lambda: claim_run_dir(run_dir) if run_dir else create_run_dir(config.output.dir, config.name))
            run = RunDir(path, writer=is_main())
            with run.lock():
                write_run_header(run, experiment, session.runtime)
                return session.train(run, observer or SilentObserver())


@dataclass
class Session:
    """The experiment placed on a device, with its loaders: ready to train from the start or a resume point."""

    experiment: Experiment
    runtime: Runtime
    model: torch.nn.Module
    loaders: dict[str, Any]

    @classmethod
    def start(cls, experiment: Experiment) -> Session:
        """The model on its device, with its loaders; `lr: auto` phases are resolved when each starts (_Trainer)."""
        config = experiment.config
        phases = auto_phases(config)
        if phases and shard().world > 1:  # each process would find its own lr on its own share of the images
            raise ConfigError(Problem(f"schedule[{phases[0]}].lr", "auto is not available with several processes",
                                      f"run `transferctl lr-find EXPERIMENT --phase {phases[0]}` and set the lr it prints"))  # fmt: skip
        runtime = make_runtime(device_spec(config.device), config.precision, experiment.backbone.model, config.compile)
        model = prepare_model(experiment.backbone.model, runtime)
        return cls(experiment, runtime, model, _loaders(config, experiment, runtime))

    def train(self, run: RunDir, observer: TrainObserver, start: LastCheckpoint | None = None) -> dict[str, Any]:
        observer = observer if is_main() else SilentObserver()  # one progress display, rank 0's
        observer.run_started(run.path)
        for line in data_notices(self.experiment.splits):
            observer.notice(line)
        return _Trainer(self, run, observer, start).run()


def find_lr(config: ExperimentConfig, phase: int, start_lr: float = START_LR, end_lr: float = END_LR, steps: int = STEPS) -> tuple[LrFinding, PhasePlan, bool]:
    """`transferctl lr-find`: the range test of schedule[phase] on the experiment's model and training images,
    as a run would start; with whether that phase solves its head instead (its lr then unused)."""
    seed_everything(config.seed)
    experiment = prepare(config)
    plan = phase_at(experiment.plans, phase, "--phase")
    session = Session.start(experiment)
    finding = lr_range_test(
        session.model, experiment.backbone.groups, plan, config.optimizer, session.loaders["train"], session.runtime, start_lr, end_lr, steps,
        experiment.loss.to(session.runtime.device),
    )
    return finding, plan, solves_head(config, experiment.backbone, plan)


def _loaders(config: ExperimentConfig, experiment: Experiment, runtime: Runtime) -> dict[str, Any]:
    pre = experiment.backbone.preprocessing
    splits = experiment.splits
    workers = resolve_workers(config.data.num_workers, len(splits.train))
    pin = runtime.device.type == "cuda"
    multi_hot = len(splits.classes) if splits.multi_label else None
    train_set = ImageDataset(splits.train, build_transform(pre, config.data.augment, train=True, random_erasing=config.data.random_erasing), multi_hot)
    val_set = ImageDataset(splits.val, build_transform(pre, config.data.augment, train=False), multi_hot)
    batch, part = per_rank_batch(config.data.batch_size), shard()  # this rank's share of each global batch
    return {
        "train": make_loader(train_set, batch, True, workers, config.seed, pin, part, weights=sampler_weights(config, splits)),
        "val": make_loader(val_set, batch, False, workers, config.seed, pin, part),
    }


def sampler_weights(config: ExperimentConfig, splits: DatasetSplits) -> Any:
    """Each training image's draw weight under data.sampler: balanced (None: shuffle, each image once an epoch)."""
    return balanced_sample_weights([label for _, label in splits.train]) if config.data.sampler == "balanced" else None


DATA_WAIT_SHARE = 0.3  # of an epoch's training time spent waiting for images: above it, a notice says what may help
DATA_WAIT_MIN_SECONDS = 2.0  # shorter epochs are too noisy to judge


def data_wait_advice(workers: int, images_kept: bool, cache: str) -> str:
    """What may make images arrive faster, in the order worth trying."""
    if workers < spare_cores():
        return f"more data.num_workers may help (now {workers}; {spare_cores()} cores could prepare images)"
    if not images_kept:
        setting = "raise data.cache_memory_mb" if cache != "off" else "set data.cache: auto"
        return f"{setting}, so that the decoded images are kept in memory instead of decoded every epoch"
    return "every spare core already prepares images from the decoded ones in memory"


def crops_inline(config: ExperimentConfig, runtime: Runtime) -> bool:
    """Whether images kept decoded are cropped in the training process rather than in a worker: on a
    two-core CPU, where the worker would take a core from the model's two threads. Only `num_workers: auto`."""
    return runtime.device.type == "cpu" and config.data.num_workers == "auto" and spare_cores() == 1


def write_run_header(run: RunDir, experiment: Experiment, runtime: Runtime, **env_extra: Any) -> None:
    run.write_text("config.yaml", dump_yaml(config_to_dict(experiment.config)))
    run.write_json("classes.json", experiment.splits.classes)
    run.write_json("env.json", {**environment(runtime), **env_extra})


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


def resume_command(run_dir: Path) -> str:
    return f"transferctl train --resume {shlex.quote(str(run_dir))}"


class _Trainer:
    """The loop over phases and epochs; holds the state a checkpoint must capture."""

    def __init__(self, session: Session, run: RunDir, observer: TrainObserver, start: LastCheckpoint | None) -> None:
        self.experiment = session.experiment
        self.config = session.experiment.config
        self.runtime = session.runtime
        self.model = session.model
        self.stepped = TrainingModule(self.model, session.runtime.device)  # DDP over what trains now, under torchrun
        self.loaders = session.loaders
        self.loss = session.experiment.loss.to(session.runtime.device)
        stop = lambda: self.stop()  # noqa: E731 - late: run() replaces self.stop once it listens for signals
        self.shortcut = FrozenBodyShortcut(self.config, self.experiment.backbone, self.model, self.loaders, self.runtime, observer.notice, stop)
        self.decode_once = DecodeOnce(self.config.data, self.experiment.backbone.preprocessing, self.loaders, observer.notice, crops_inline(self.config, self.runtime))
        self.run_dir = run
        self.saver = CheckpointSaver(run, self.config.output.checkpoint_seconds, f"free disk space, then: {resume_command(run.path)}")
        self.observer = observer
        self.start = start
        self.rows: list[dict[str, Any]] = list(start.rows) if start else []
        self.best: dict[str, Any] | None = start.best if start else None
        self.earlier_seconds = (start.elapsed or 0.0) if start else 0.0
        self.started = time.perf_counter()
        self.stop = StopRequest()
        self.position: tuple[PhasePlan, int] = (self.experiment.plans[0], 1)
        self.data_wait_told = False
        self.solver_told = False
        self.full_epochs = 0  # epochs that ran the backbone on images (not on cached features)
        self.data_fingerprint = split_fingerprint(self.experiment.splits)  # in every checkpoint: resume compares it
        self.average = weight_average(self.config, self.model, start.ema if start else None)  # ema: (ema.py)
        self.mixer = None  # the phase's mixup and cutmix (mixing.py)

    def run(self) -> dict[str, Any]:
        start = self.start
        first = 0 if start is None else start.phase_index + int(start.phase_done)
        with stop_on_signals() as request:
            self.stop = agreed_stop(request)  # under torchrun: a signal to any rank stops all at the same step
            if start is not None:
                # Last: nothing between here and the first step may draw random numbers.
                restore_rng_states(start.rng)
            try:
                for plan in self.experiment.plans[first:]:
                    resuming = start is not None and plan.index == start.phase_index
                    self._run_phase(plan, start if resuming else None)
            except KeyboardInterrupt:  # a second Ctrl-C: stop now; atomic writes left every file whole
                raise self._interrupted(*self.position) from None
            except RuntimeError as exc:
                if not is_lost_contact(exc):
                    raise
                raise lost_contact(exc, resume_command(self.run_dir.path)) from None  # another rank or node is gone
            finally:
                self.saver.flush()  # stopped, diverged or failed: the last finished epoch still reaches the disk
            summary = self._summary()  # still listening: a signal now is too late to stop anything
            self.run_dir.write_json("summary.json", summary)
        return summary

    def _run_phase(self, plan: PhasePlan, start: LastCheckpoint | None) -> None:
        if plan.lr_auto:
            plan = self._choose_lr(plan)
        backbone = self.experiment.backbone
        stages = stages_of(plan, backbone.group_names)  # one, unless the phase unfreezes gradually
        scaler = make_grad_scaler(self.runtime)
        self.mixer = batch_mixer(self.config, plan.index, len(self.experiment.splits.classes))
        # The phase's own until_plateau.patience overrides early_stopping.patience.
        stopping = EarlyStopping(self.config.early_stopping.metric, plan.patience if plan.patience is not None else self.config.early_stopping.patience)
        first_epoch = 1
        if start is not None:
            if scaler is not None and start.scaler:
                scaler.load_state_dict(start.scaler)
            stopping.best, stopping.stale, first_epoch = start.phase_best, start.stale, start.epoch + 1
        self.observer.phase_started(plan, len(self.loaders["train"]))
        stage: Stage | None = None
        for epoch in range(first_epoch, plan.epochs + 1):
            self.position = (plan, epoch)
            if self.stop():
                raise self._interrupted(plan, epoch)
            if stage is None or epoch > stage.last_epoch:
                stage = stage_at(stages, epoch)
                if len(stages) > 1 and stage.first_epoch == epoch:
                    self.observer.notice(f"phase '{plan.name}' epoch {epoch}: training {', '.join(stage.plan.trainable)}")
                try:
                    cached = self.shortcut.path_for(stage.plan)  # a frozen body: the head trains on cached features
                except TrainingStopped:
                    raise self._interrupted(plan, epoch) from None
                if cached is None:
                    self._decode_once()
                optimizer, scheduler, solver = self._stage_optimizer(stage, cached)
                # Resumed in the middle of this stage. A head that an earlier version trained with minibatch steps
                # has no solver state: it is solved from where its weights are.
                resumed_here = start is not None and epoch == first_epoch and epoch > stage.first_epoch
                if resumed_here and (solver is None or "solved" in start.optimizer["param_groups"][0]):
                    load_optimizer_state(optimizer, start.optimizer)
                    scheduler.load_state_dict(start.scheduler)
            set_train_mode(self.model, backbone.groups, stage.plan)
            lrs = current_lrs(optimizer) if solver is None else {}  # a solved head has no learning rate
            set_loader_epoch(self.loaders["train"], len(self.rows) + 1)
            stats = self._train_epoch(plan, epoch, optimizer, scheduler, scaler, cached) if solver is None else self._solve_epoch(plan, epoch, solver)
            if cached is None:
                self.full_epochs += 1
                self._notice_data_wait(plan, epoch, stats)
            val = self._evaluate(plan, epoch, cached)
            row = epoch_row(plan, epoch, len(self.rows) + 1, lrs, stats, val)
            if solver is not None:
                row["head_weight_decay"] = solver.weight_decay
            averaged = self._evaluate_average(plan, epoch, cached) if self.average is not None else None
            if averaged is not None:
                row.update(averaged_columns(averaged))
            done = stopping.update(row) or epoch == plan.epochs
            self._save_epoch(plan, epoch, row, done, stopping, optimizer, scheduler, scaler, {"raw": val, "ema": averaged})
            self.observer.epoch_done(row)
            if done:
                break

    def _choose_lr(self, plan: PhasePlan) -> PhasePlan:
        """An `lr: auto` phase's lr: the range test's suggestion (lr_finder.py) on the model as the earlier phases
        left it (a body phase is tested with the head they trained), on the batches of the epoch it starts with.
        config.yaml then records the number, so that a resume, `show` and the checkpoints see what the phase used."""
        set_loader_epoch(self.loaders["train"], len(self.rows) + 1)
        finding = lr_range_test(self.model, self.experiment.backbone.groups, plan, self.config.optimizer, self.loaders["train"], self.runtime,
                                loss_fn=self.loss)  # fmt: skip
        plan = replace(plan, lr=finding.suggestion, lr_auto=False)
        self.experiment.plans[plan.index] = plan
        self.config = self.experiment.config = with_lrs(self.config, {plan.index: finding.suggestion})
        if self.run_dir.writer:
            self.run_dir.write_text("config.yaml", dump_yaml(config_to_dict(self.config)))
        self.observer.notice(
            f"schedule[{plan.index}].lr: auto chose {finding.suggestion:.3g} (the range test's steepest descent {finding.steepest_lr:.3g}, "
            f"a tenth of its lowest loss's lr {finding.min_loss_lr:.3g}: the smaller; `transferctl lr-find` plots it)"
        )
        return plan

    def _notice_data_wait(self, plan: PhasePlan, epoch: int, stats: EpochStats) -> None:
        """Once a run: say when training spent much of an epoch waiting for images, and what may help. Not in
        the first such epoch, whose wait includes starting the loader's workers, nor where kept images are
        cropped in the training process on purpose (two cores: crops_inline)."""
        if self.data_wait_told or self.full_epochs < 2 or stats.seconds < DATA_WAIT_MIN_SECONDS or stats.data_seconds < DATA_WAIT_SHARE * stats.seconds:
            return
        kept = any(record["split"] == "train" for record in self.decode_once.records)
        if kept and self.decode_once.inline:
            return
        self.data_wait_told = True
        advice = data_wait_advice(self.loaders["train"].num_workers, kept, self.config.data.cache)
        self.observer.notice(f"phase '{plan.name}' epoch {epoch}: training waited for images {stats.data_seconds / stats.seconds:.0%} of the time; {advice}")

    def _decode_once(self) -> None:
        try:
            self.decode_once.prepare()
        except DataError as exc:
            raise worker_error(exc) from None

    def _stage_optimizer(self, stage: Stage, cached: tuple[Any, Any] | None) -> tuple[Any, Any, HeadSolver | None]:
        """A fresh optimizer and schedule over exactly what this stage trains (the whole phase, or one unfreezing
        step): the configured optimizer, or, for a linear head on cached features, its L-BFGS solver."""
        backbone = self.experiment.backbone
        apply_freezing(self.model, backbone.groups, stage.plan)
        head = self.model.get_submodule(backbone.head_path)
        if cached is not None and stage.plan.solver == "auto" and solvable(head):
            store = cached[1]["train"].store
            objective = Objective.of(self.loss, balanced_sample_weights(store.labels) if self.config.data.sampler == "balanced" else None)
            solver = HeadSolver(head, store.features, store.labels, self.runtime.device, self.config.seed, objective, self._fine_tuned_after(stage))
            if not self.solver_told:
                self.solver_told = True
                self.observer.notice(f"phase '{stage.plan.name}': the head is solved to convergence in its first epoch (L-BFGS on the cached features; "
                                     "lr unused; solver: minibatch trains it with the optimizer instead)")
            return solver.optimizer, solver.scheduler, solver
        optimizer = build_optimizer(self.config.optimizer, optimizer_param_groups(self.model, backbone.groups, stage.plan, self.config.optimizer.weight_decay))
        return optimizer, build_scheduler(optimizer, self.config.scheduler, stage.epochs, len(self.loaders["train"])), None

    def _fine_tuned_after(self, stage: Stage) -> bool:
        """Whether a later stage of the run (of this phase, or a later one) trains the body through the head."""
        names = self.experiment.backbone.group_names
        stages = [each for plan in self.experiment.plans[stage.plan.index:] for each in stages_of(plan, names)]
        position = (stage.plan.index, stage.first_epoch)
        return any(not each.plan.backbone_frozen for each in stages if (each.plan.index, each.first_epoch) > position)

    def _solve_epoch(self, plan: PhasePlan, epoch: int, solver: HeadSolver) -> EpochStats:
        """An epoch of a solved head. Every rank holds every cached row and solves the same problem, so the
        stats need no reduction across ranks."""
        choosing = solver.weight_decay is None
        try:
            stats = solver.train_epoch(self.stop)
            if self.average is not None:
                self.average.follow()
        except TrainingStopped:
            raise self._interrupted(plan, epoch) from None
        except NonFiniteLossError as exc:
            raise self._diverged(plan, epoch, str(exc)) from None
        if choosing and solver.selection is not None:
            self.observer.notice(f"phase '{plan.name}': head {solver.selection.describe()}")
        return stats

    def _train_epoch(self, plan: PhasePlan, epoch: int, optimizer: Any, scheduler: Any, scaler: Any, cached: tuple[Any, Any] | None = None) -> EpochStats:
        model, loaders = cached or (self.stepped(), self.loaders)
        try:
            stats = train_one_epoch(model, loaders["train"], optimizer, scheduler, self.runtime, scaler, self.observer.batch_done, self.stop,
                                    mix=self.mixer.for_epoch(len(self.rows) + 1) if self.mixer and cached is None else None,  # features cannot be mixed
                                    after_step=self.average.update if self.average else None, loss_fn=self.loss)  # fmt: skip
        except TrainingStopped:
            raise self._interrupted(plan, epoch) from None
        except DataError as exc:
            raise worker_error(exc) from None
        except NonFiniteLossError as exc:
            raise self._diverged(plan, epoch, str(exc)) from None
        return reduce_stats(stats)  # every rank's images: the metrics one process would report

    def _evaluate(self, plan: PhasePlan, epoch: int, cached: tuple[Any, Any] | None = None) -> EpochStats:
        # Validation finishes even when a stop is requested: the epoch's checkpoint is moments away.
        model, loaders = cached or (self.model, self.loaders)
        try:
            val = reduce_stats(evaluate(model, loaders["val"], self.runtime, self.experiment.splits.multi_label))  # every rank's shard
        except DataError as exc:
            raise worker_error(exc) from None
        if val.images and not math.isfinite(val.loss):
            # The weights themselves have gone bad: this epoch must not become the "last good" checkpoint.
            raise self._diverged(plan, epoch, f"validation loss became {val.loss}")
        return val

    def _evaluate_average(self, plan: PhasePlan, epoch: int, cached: tuple[Any, Any] | None) -> EpochStats:
        """The averaged weights on the validation images; on the cached features in a frozen-body phase, where the
        average's body is the model's (ema.py copies what does not train)."""
        assert self.average is not None
        if cached is None:
            return self._evaluate(plan, epoch, (self.average.module, self.loaders))
        return self._evaluate(plan, epoch, (head_for_features(self.average.module, self.experiment.backbone.head_path), cached[1]))

    def _diverged(self, plan: PhasePlan, epoch: int, what: str) -> TrainingError:
        last = self.run_dir.checkpoints / "last.pt"
        kept = f"the last good checkpoint is {last}" if self.rows else "no epoch finished, so no checkpoint was written"
        hint = f"lower schedule[{plan.index}].lr (now {plan.lr:g}) and train again"
        if self.rows and self.rows[-1]["phase_index"] < plan.index:
            # The phase had not saved an epoch yet, so a resume may still change its learning rate.
            hint = f"lower schedule[{plan.index}].lr (now {plan.lr:g}), e.g. {resume_command(self.run_dir.path)} --set schedule.{plan.index}.lr={plan.lr / 10:g}"
        return TrainingError(Problem(f"schedule[{plan.index}] ({plan.name}), epoch {epoch}", f"{what}; {kept}", hint))

    def _interrupted(self, plan: PhasePlan, epoch: int) -> TrainingInterrupted:
        path = self.run_dir.path
        if self.rows:
            last = self.rows[-1]
            saved = f"checkpoints/last.pt holds the last completed epoch ({last['phase']} epoch {last['epoch']}, global epoch {last['global_epoch']})"
        else:
            saved = "no epoch had finished, so a resume starts from the beginning"
        return TrainingInterrupted(
            Problem(str(path), f"stopped by {self.stop.name or 'SIGINT'} during phase '{plan.name}' epoch {epoch}; {saved}", f"resume with: {resume_command(path)}")
        )

    def _save_epoch(
        self, plan: PhasePlan, epoch: int, row: dict[str, Any], done: bool, stopping: EarlyStopping, optimizer: Any, scheduler: Any, scaler: Any,
        validations: dict[str, EpochStats | None],
    ) -> None:  # fmt: skip
        """Record a finished epoch and hand its checkpoints to the saver: best.pt when it is the best so far,
        last.pt with all a resume needs. The saver writes them now or soon (checkpoint_timing.py). A multi-label
        run's best row carries the per-class thresholds tuned on the validation (raw or averaged weights) it kept."""
        self.rows.append(row)
        kept = better_weights(row, self.config.early_stopping.metric) if self.average is not None else row  # ema: the better weights
        improved = self.best is None or is_better(kept, self.best, self.config.early_stopping.metric)
        if improved:
            tuned = tuned_thresholds(validations[kept.get("weights", "raw")])
            self.best = kept if tuned is None else {**kept, "thresholds": tuned}
        if not self.run_dir.writer:
            return
        best = self._checkpoint(plan, epoch)
        last = LastCheckpoint(
            **vars(best),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            rng=rng_states(),
            phase_done=done,
            phase_best=dict(stopping.best) if stopping.best else None,
            stale=stopping.stale,
            rows=[dict(r) for r in self.rows],
            elapsed=self._elapsed(),
            ema=self.average.state_dict() if self.average is not None else None,
        )
        self.saver.save(last.to_payload(), self._best_weights(best).to_payload() if improved else None, phase_done=done)

    def _best_weights(self, checkpoint: Checkpoint) -> Checkpoint:
        """best.pt: the epoch's checkpoint with the weights that selection kept (the average's where they did better), and which."""
        if self.average is not None and self.best is not None and self.best.get("weights") == "ema":
            return replace(checkpoint, model=self.average.module.state_dict(), weights="ema")
        return replace(checkpoint, weights="raw")

    def _checkpoint(self, plan: PhasePlan, epoch: int) -> Checkpoint:
        backbone = self.experiment.backbone
        return Checkpoint(
            format=CHECKPOINT_FORMAT,
            model=self.model.state_dict(),  # live tensors: the saver copies or converts them (checkpoint_timing.on_cpu)
            classes=list(self.experiment.splits.classes),
            data=self.data_fingerprint,
            backbone={"name": backbone.name, "weights": backbone.weights, "head": backbone.head_path, "cut": self.config.backbone.cut},
            preprocessing=backbone.preprocessing.to_dict(),
            phase_index=plan.index,
            epoch=epoch,
            global_epoch=len(self.rows),
            best=dict(self.best) if self.best else None,
            config=config_to_dict(self.config),
        )

    def _elapsed(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.started

    def _summary(self) -> dict[str, Any]:
        assert self.best is not None, "a schedule always has at least one epoch"
        return run_summary(
            self.run_dir.path, self.config, self.experiment.backbone.name, self.rows, self.best, seconds=self._elapsed(), device=str(self.runtime.device),
            precision=self.runtime.precision, feature_cache=self.shortcut.records, decoded_images=self.decode_once.records,
            skipped_images=[str(item.path) for item in self.experiment.splits.skipped], classes=self.experiment.splits.classes,
        )  # fmt: skip
