"""recommend's race: short real training runs of the end-to-end strategies, by successive halving.

Whether `scratch`, `fine_tune` or `pretrained_init` trains best on a user's data is an empirical question
(the four-case rule is a prior: He et al. 2019, Kornblith et al. 2019), so data mode trains them. Successive
halving (Jamieson & Talwalkar 2016): every candidate trains a short schedule, the better half trains one twice
as long, and so on until one is left, which then trains the largest share of its default schedule that the time
budget pays for, up to all of it; a round the budget cannot pay for is not started. A round's schedule is the strategy's default scaled by a fraction (an
eighth, a quarter, ... all of it): every phase's epochs, and its min_steps where the default sets one, so that the
last round trains what training with the defaults will train. (compare.derive_schedule serves another end:
it stretches every strategy to one epoch count and drops min_steps.) Each round starts from the beginning: a
short cosine schedule that ends is a better estimate than a long one cut off.

Every run is a normal `train()` of an ExperimentConfig built here: the user's data as training will split it
(train on the train split, validation accuracy on the val split or a flat tree's seeded held-out share, never
on the images it fitted), seeded, in a temporary folder removed afterwards. Runs are ranked by what early
stopping follows by default: val_acc, or val_map where the data is multi-label (a run's summary says which).
"""

from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transferctl.config import BackboneConfig, ExperimentConfig, PhaseConfig, config_from_dict, default_schedule
from transferctl.errors import Problem, TrainingError, TrainingInterrupted

# Cheapest first, which wins ties: fine_tune's head period trains on cached features. pretrained_init and scratch
# cost the same; on an exact tie scratch, which depends on no base network (the base then added nothing).
END_TO_END = ("fine_tune", "scratch", "pretrained_init")
FIRST_FRACTION = 1 / 8  # of each default schedule in the first round: a few epochs, enough to drop clear losers
CHECKPOINT_SECONDS = 3600.0  # a race run writes its checkpoints at phase ends only: nobody resumes it
Progress = Callable[[str], None]
METRIC_WORDS = {"val_acc": "val acc", "val_map": "val mAP"}  # what a RaceRun's best_val_acc measures, in words


@dataclass(frozen=True)
class RaceSetup:
    """What every run of the race shares: the data as training splits it, the network, the machine, the budget."""

    data_root: Path
    val_fraction: float
    seed: int
    backbone: BackboneConfig
    image_size: int | None
    device: str
    precision: str
    budget_seconds: float
    augment: str = "standard"  # data.augment: none where a flip or crop changes a label
    labels: Path | None = None  # data.labels: the label file measured on; None: class folders


@dataclass
class RaceRun:
    """One candidate trained once: `epochs` of its default schedule's phases, scaled."""

    strategy: str
    round: int  # 0: the first round, every candidate
    fraction: float  # of the strategy's default schedule
    epochs: int  # trained (min_steps may have added some to the schedule's)
    schedule: str  # e.g. 'head 1 + body 1 (at least 75 steps)'
    best_val_acc: float | None  # of `metric` (val_map on multi-label data); None: training diverged (see failure)
    final_val_acc: float | None  # the last epoch's val_acc (single-label); None on multi-label data
    seconds: float  # wall time, building the network and writing checkpoints included
    epoch_seconds: float  # of which training and validating epochs
    failure: str | None = None
    metric: str = "val_acc"  # what best_val_acc measures: val_acc, or val_map (mean average precision) for multi-label data


@dataclass
class RaceResult:
    runs: list[RaceRun]
    ended: str  # why the race stopped, in words
    seconds: float
    budget_seconds: float
    notes: list[str] = field(default_factory=list)

    def last_run(self, strategy: str) -> RaceRun:
        """A strategy's longest run: its estimate."""
        return [run for run in self.runs if run.strategy == strategy][-1]

    @property
    def strategies(self) -> list[str]:
        return list(dict.fromkeys(run.strategy for run in self.runs))

    def to_dict(self) -> dict[str, Any]:
        return {"runs": [asdict(run) for run in self.runs], "ended": self.ended, "seconds": round(self.seconds, 2),
                "budget_seconds": self.budget_seconds, "notes": self.notes}  # fmt: skip


Trainer = Callable[[ExperimentConfig, Path], dict[str, Any]]


def race(setup: RaceSetup, strategies: tuple[str, ...], say: Progress, trainer: Trainer | None = None) -> RaceResult:
    """Successive halving over `strategies` (cheapest first, which wins ties) within setup.budget_seconds.

    Every candidate trains FIRST_FRACTION of its default schedule; while several are left, the better half
    trains twice as much; the last one left trains the largest share that fits the time left, up to its whole
    default schedule. The first round always runs, whatever the budget: without it no candidate has an
    estimate. A later round runs only when its runs, predicted from each candidate's previous one, fit.
    """
    trainer = trainer or _train
    started = time.perf_counter()
    alive, fraction, runs = list(strategies), FIRST_FRACTION, []
    ended = "one candidate left, trained with its whole default schedule"
    with tempfile.TemporaryDirectory(prefix="transferctl-race-") as folder:
        for index in itertools.count():
            if index:
                left = setup.budget_seconds - (time.perf_counter() - started)
                fraction, predicted = next_fraction([_last(runs, s) for s in alive], left)
                if fraction is None:
                    ended = f"budget: round {index + 1} ({', '.join(alive)}) would take about {predicted:.0f}s, {max(left, 0):.0f}s of --budget {setup.budget_seconds:g}s were left"
                    break
            for strategy in alive:
                say(f"race round {index + 1}: {strategy}, {describe(race_schedule(strategy, fraction))}")
                runs.append(_run_one(setup, strategy, index, fraction, Path(folder), trainer))
                say(f"race round {index + 1}: {strategy}: {_outcome(runs[-1])} ({runs[-1].seconds:.0f}s)")
            if fraction >= 1.0:
                ended = "whole default schedules trained" if len(alive) > 1 else ended
                break
            alive = survivors([_last(runs, s) for s in alive])
            if not alive:
                ended = "every candidate diverged"
                break
    result = RaceResult(runs, ended, time.perf_counter() - started, setup.budget_seconds)
    first_round = sum(run.seconds for run in runs if run.round == 0)
    if first_round > setup.budget_seconds:
        result.notes.append(f"the first round alone took {first_round:.0f}s of --budget {setup.budget_seconds:g}s; "
                            "a lower --race-size (or a GPU) makes the race fit")  # fmt: skip
    return result


def next_fraction(latest: list[RaceRun], left: float) -> tuple[float | None, float]:
    """The share of the default schedule the next round trains, and its predicted seconds; None when it does not
    fit the `left` seconds. Several candidates: twice the last share. One: the largest doubling that fits, up to 1."""
    fraction = latest[0].fraction
    steps = [min(1.0, fraction * 2**k) for k in range(1, 64) if fraction * 2 ** (k - 1) < 1.0]
    if len(latest) > 1:
        steps = steps[:1]
    fitting = [(f, sum(predict_seconds(run, f) for run in latest)) for f in steps]
    fits = [(f, seconds) for f, seconds in fitting if seconds <= left]
    if not fits:
        return None, fitting[0][1]
    return fits[-1]


def race_schedule(strategy: str, fraction: float) -> list[PhaseConfig]:
    """The strategy's default schedule scaled by `fraction`: each phase's epochs and, where set, min_steps."""
    scaled = []
    for phase in default_schedule(strategy):
        update: dict[str, Any] = {"epochs": max(1, int(phase.epochs * fraction + 0.5))}
        if getattr(phase, "min_steps", None):
            update["min_steps"] = max(1, int(phase.min_steps * fraction + 0.5))
        scaled.append(phase.model_copy(update=update))
    return scaled


def describe(schedule: list[PhaseConfig]) -> str:
    """'head 1 + body 1 (at least 75 steps)'."""
    parts = []
    for phase in schedule:
        steps = getattr(phase, "min_steps", None)
        parts.append(f"{phase.name} {phase.epochs}" + (f" (at least {steps} steps)" if steps else ""))
    return " + ".join(parts) + " epochs"


def predict_seconds(previous: RaceRun, fraction: float) -> float:
    """A run of `fraction` of the default schedule, from the same candidate's previous run: its fixed cost plus
    its epochs' time, scaled."""
    fixed = max(previous.seconds - previous.epoch_seconds, 0.0)
    return fixed + previous.epoch_seconds * fraction / previous.fraction


def survivors(latest: list[RaceRun]) -> list[str]:
    """The better half (rounded up) by best validation accuracy; on a tie the earlier (cheaper) candidate.
    Diverged runs never survive."""
    finished = [run for run in latest if run.best_val_acc is not None]
    ranked = sorted(finished, key=lambda run: -run.best_val_acc)  # type: ignore[operator] - filtered above; stable: ties keep the order
    return [run.strategy for run in ranked[: math.ceil(len(latest) / 2)]]


def _last(runs: list[RaceRun], strategy: str) -> RaceRun:
    return [run for run in runs if run.strategy == strategy][-1]


def _outcome(run: RaceRun) -> str:
    return f"failed: {run.failure}" if run.best_val_acc is None else f"best {METRIC_WORDS[run.metric]} {run.best_val_acc:.3f}"


def _run_one(setup: RaceSetup, strategy: str, index: int, fraction: float, folder: Path, trainer: Trainer) -> RaceRun:
    schedule = race_schedule(strategy, fraction)
    config = race_config(setup, strategy, schedule, folder)
    run_dir = folder / f"{strategy}-round{index + 1}"
    described = describe(schedule)
    planned = sum(phase.epochs for phase in schedule)
    started = time.perf_counter()
    try:
        summary = trainer(config, run_dir)
    except TrainingInterrupted:
        raise TrainingInterrupted(Problem("recommend", f"stopped during the race ({strategy}, round {index + 1}); its runs were temporary", "run recommend again")) from None
    except TrainingError as exc:  # diverged: this candidate has no estimate, the others go on
        return RaceRun(strategy, index, fraction, planned, described, None, None, time.perf_counter() - started, 0.0, str(exc).splitlines()[0])
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints weigh tens of MB; only the numbers are needed
    epoch_seconds = float(summary["train_seconds"])
    wall = max(time.perf_counter() - started, epoch_seconds)
    if summary.get("task") == "multi_label":  # its val_acc is subset accuracy (every label right): mAP ranks the runs
        return RaceRun(strategy, index, fraction, int(summary["epochs"]), described, summary["best_val_map"], None, wall, epoch_seconds, metric="val_map")
    return RaceRun(strategy, index, fraction, int(summary["epochs"]), described, summary["best_val_acc"], summary["final_val_acc"], wall, epoch_seconds)


def race_config(setup: RaceSetup, strategy: str, schedule: list[PhaseConfig], folder: Path) -> ExperimentConfig:
    """The experiment a race run trains: the defaults a written config would have, but for the schedule."""
    raw: dict[str, Any] = {
        "name": f"race-{strategy}",
        "seed": setup.seed,
        "backbone": setup.backbone.model_dump(mode="json"),
        "data": {"root": str(setup.data_root), "val_fraction": setup.val_fraction, "image_size": setup.image_size, "augment": setup.augment,
                 "labels": str(setup.labels.resolve()) if setup.labels else None},  # fmt: skip
        "strategy": strategy,
        "schedule": [phase.model_dump(mode="json") for phase in schedule],
        "device": setup.device,
        "precision": setup.precision,
        "output": {"dir": str(folder), "checkpoint_seconds": CHECKPOINT_SECONDS},
    }
    return config_from_dict(raw, source=f"recommend's race ({strategy})")


def _train(config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    from transferctl.training.train import train

    return train(config, run_dir=run_dir)
