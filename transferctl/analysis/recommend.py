"""recommend: which strategy (and backbone) for this data, from two facts or measured on the data itself.

The four cases of transfer learning, by dataset size and similarity to the pretraining data:

| size  | similar | strategy        | why                                                                  |
| small | yes     | feature_extract | fine-tuning a small set overfits and destroys the pretrained features |
| small | no      | scratch         | the pretrained features do not fit, and too little data to adapt them |
| large | yes     | fine_tune       | enough data to adapt the pretrained layers, gently, after the head    |
| large | no      | pretrained_init | enough data to learn the task; pretrained weights still start faster  |

Rule mode (`advise`) maps the two facts to a case and must stay instant: this module imports no torch at import
time, and rule mode never imports it. Data mode (`measure`) looks at the images as training will: probes fit
on the training images and scored on the validation images, the size from the training images a class. It
measures both facts with one forward pass per backbone (transferctl.analysis.probe_features, transferctl.analysis.probes), then,
since the rule is only a prior, measures every candidate like with like: each frozen body (whole, and cut
after every earlier layer group: `backbone.cut`) by its converged probe's validation accuracy, and the
end-to-end strategies by short real training runs (transferctl.analysis.race). The pick is the best estimate or,
within one standard error of it, the cheapest. `--fast` keeps the forward pass and the rule alone.

Multi-label data (a label file giving images several labels) is measured the same way with mAP for accuracy:
LogME averages its evidence over the label columns, the probes are one-vs-rest and scored by mAP, the race
ranks by val_map, and the size counts images per label (an image once for each of its labels). What has no
multi-label meaning (the source head's agreement, AMI) is left out, and the report's notes say so.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferctl.errors import ConfigError, DataError, Problem, clip

if TYPE_CHECKING:
    from transferctl.config import BackboneConfig

SIZES = ("small", "large")
Progress = Callable[[str], None]

_CASES: dict[tuple[str, bool], tuple[str, str]] = {
    ("small", True): (
        "feature_extract",
        "small data, similar task: keep the pretrained body frozen and train only a new head; fine-tuning "
        "a small set overfits and destroys the pretrained features",
    ),
    ("small", False): (
        "scratch",
        "small data, different task: the pretrained features fit poorly and there is too little data to adapt "
        "them, so train from random initialisation (a small network suits a small set)",
    ),
    ("large", True): (
        "fine_tune",
        "large data, similar task: train a new head on the frozen body, then unfreeze and train every layer, "
        "the pretrained ones at a lower learning rate; optionally unfreeze only the later groups first "
        "(a phase with train: last:2 before train: all)",
    ),
    ("large", False): (
        "pretrained_init",
        "large data, different task: train every layer from the start; there is enough data to learn the "
        "task, and pretrained weights still converge faster than random ones",
    ),
}
_DATA_MODE_HINT = (
    "`transferctl recommend --data DIR` measures whether the pretrained network's earlier layers still help "
    "(then: a frozen body cut after that stage, backbone.cut)"
)


@dataclass(frozen=True)
class Thresholds:
    """Where the measured values switch the answer. Accuracy thresholds are in percentage points."""

    small_below: int = 100  # median images per class below this: small
    large_from: int = 1000  # median images per class from this: large; in between the probe decides
    gain_points: float = 2.0  # a probe still gaining more than this from half to all of the data: effectively small
    depth_points: float = 5.0  # an earlier stage's probe beating the penultimate layer's by more: a different task
    worth_points: float = 5.0  # pretrained features must beat a random network's by more than this to count
    ami_min: float = 0.10  # agreement of the source head's predictions with the labels, below which: different

    def check(self) -> None:
        problems = []
        if self.small_below < 1 or self.large_from < self.small_below:
            problems.append(Problem("--small-below/--large-from", f"need 1 <= small ({self.small_below}) <= large ({self.large_from})"))
        for name in ("gain_points", "depth_points", "worth_points"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN too: every comparison with it is false
                problems.append(Problem(f"--{name.replace('_', '-')}", f"must be a number of points >= 0, got {getattr(self, name)}"))
        if not -1.0 <= self.ami_min <= 1.0:
            problems.append(Problem("--ami-min", f"must be between -1 and 1, got {self.ami_min}"))
        if problems:
            raise ConfigError(*problems)


@dataclass(frozen=True)
class Advice:
    """The answer: the case, the strategy (and cut), and why."""

    size: str
    similar: bool
    strategy: str
    reasons: list[str]
    cut: str | None = None

    @property
    def case(self) -> str:
        return f"{self.size} data, {'similar' if self.similar else 'different'} task"


# ---------------------------------------------------------------------------------------------
# Rule mode


def advise(size: str, similar: bool, cut: str | None = None, measured: bool = False) -> Advice:
    """The four cases; with `cut` (data mode found early layers that transfer), small+different keeps them.

    `measured`: the facts come from data mode, so the hint to run data mode is left out."""
    if size not in SIZES:
        raise ConfigError(Problem("--size", f"must be small or large, got '{size}'"))
    strategy, why = _CASES[(size, similar)]
    reasons = [why]
    if (size, similar) == ("small", False):
        if cut is not None:
            strategy = "feature_extract"
            reasons = [
                f"small data, different task, but the pretrained layers up to '{cut}' still transfer: keep the body up "
                f"to and including '{cut}' frozen (backbone.cut: {cut}), pool, and train only a new head"
            ]
        elif not measured:
            reasons.append(_DATA_MODE_HINT)
    return Advice(size, similar, strategy, reasons, cut if strategy == "feature_extract" else None)


# ---------------------------------------------------------------------------------------------
# Writing an experiment file


def experiment_yaml(advice: Advice, path: Path, data_root: Path, backbone: str, weights: str = "DEFAULT", seed: int = 0, image_size: int | None = None,
                    val_fraction: float = 0.2, augment: str = "standard", labels: Path | None = None, multi_label: bool | None = None) -> str:  # fmt: skip
    """A complete experiment file for the advice, validated exactly as `transferctl train` will read it.

    Paths are written relative to the file's own folder (how train reads them), so the pair can be moved together.
    image_size: the size data mode measured at, written so that training sees the images as measured (a
    scratch answer drops the weights, and with them their preprocessing's size). val_fraction: the share data
    mode held out of a flat tree, so that training holds out the same images. augment: what the race trained with.
    labels: the label file measured on (data.labels, relative to the file as data.root is); None: class folders.
    multi_label: data mode found several labels an image: the file says task: multi_label and follows val_map.
    None (rule mode, which reads no label file): early_stopping.metric stays auto, for the task training finds.
    """
    from transferctl.config import config_from_dict, config_to_dict, dump_yaml, parse_weights

    if problem := augment_problem(augment):
        raise ConfigError(problem)
    folder = path.resolve().parent
    own = python_fields(backbone, weights)  # read before weights is rewritten below
    source = parse_weights(weights)
    if advice.strategy == "scratch":
        weights = "none"  # scratch ignores weights; saying so keeps the file honest
    elif source.kind in ("file", "run"):
        weights = str(source.moved_to(_relative(source.path, folder)))
    raw: dict[str, Any] = {
        "name": _experiment_name(data_root, advice.strategy),
        "seed": seed,
        "backbone": {"name": backbone, "weights": weights, "cut": advice.cut, **own},
        "data": {"root": _relative(data_root, folder), "image_size": image_size, "val_fraction": val_fraction, "augment": augment,
                 **({"labels": _relative(labels, folder)} if labels else {})},  # fmt: skip
        "strategy": advice.strategy,
        "output": {"dir": "runs"},
    }
    if multi_label:
        raw.update(task="multi_label", early_stopping={"metric": "val_map"})
    config = config_from_dict(raw, source=str(path))
    written = config_to_dict(config)  # early_stopping.metric auto: val_map if the data turns out multi-label
    header = [f"# Written by `transferctl recommend`: {advice.case} -> {advice.strategy}."]
    header += [f"# {line}" for reason in advice.reasons for line in _wrap(reason)]
    header.append("# Check it with `transferctl check`; train with `transferctl train`.")
    return "\n".join(header) + "\n" + dump_yaml(written)


def write_experiment(text: str, path: Path, overwrite: bool = False) -> Path:
    from transferctl.runs.rundir import write_atomically

    if path.is_dir():
        raise ConfigError(Problem("--write-config", f"{path} is a folder", f"name a file, e.g. {path / 'experiment.yaml'}"))
    if path.exists() and not overwrite:
        raise ConfigError(Problem("--write-config", f"{path} already exists", "choose another file, or pass --force to replace it"))
    write_atomically(path, text, ConfigError)
    return path


def _relative(target: Path, folder: Path) -> str:
    target = target.resolve()
    try:
        return os.path.relpath(target, folder)
    except ValueError:  # another drive on Windows
        return str(target)


def _experiment_name(data_root: Path, strategy: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", data_root.resolve().name).strip("-.") or "data"
    return f"{stem}-{strategy}"


def _wrap(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width) or [""]


# ---------------------------------------------------------------------------------------------
# Data mode: the measurements and what they mean


@dataclass(frozen=True)
class MeasureOptions:
    # Three small, fast families (efficientnet_b0 transfers well too, but runs at half their speed on a CPU).
    backbones: tuple[str, ...] = ("resnet18", "mobilenet_v3_large", "regnet_y_400mf")
    weights: str = "DEFAULT"
    max_images: int = 1000  # a stratified sample of the data, at most this many images
    random_images: int = 300  # the random-network reference runs on a stratified sub-sample of this size
    random_for: str = "best"  # best: the reference for the top-ranked backbone only (what the advice uses); all
    image_size: int | None = None  # None: each weights' own preprocessing
    folds: int = 3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    val_fraction: float = 0.2  # a flat tree's held-out share, drawn as training draws it (data.val_fraction, seed)
    fast: bool = False  # forward-pass measures and the four-case rule only; no race
    budget: float = 60.0  # seconds for the race of the end-to-end strategies
    race_size: int | None = None  # crop size the race trains at; None: the size measured at
    augment: str = "standard"  # data.augment of the race's runs and of --write-config: none where a flip or crop changes a label
    labels: Path | None = None  # data.labels: the label file naming the images and their classes; None: class folders


@dataclass
class BackboneReport:
    """What was measured for one backbone. Accuracies are fractions (0-1); gains are percentage points."""

    name: str
    weights: str
    logme: float
    logme_spread: float
    probe_acc: float
    probe_gain_points: float | None  # from half to all of the sampled data
    stage_acc: dict[str, float]  # probe accuracy at every stage that differs from the penultimate layer
    feature_dim: int
    best_stage: str | None = None
    random_images: int | None = None  # None: no random-init reference measured for this backbone
    pretrained_subset_acc: float | None = None  # the probe on the sub-sample the random network saw
    random_probe_acc: float | None = None
    best_stage_random_acc: float | None = None  # the random network's probe at best_stage, same sub-sample
    best_stage_subset_acc: float | None = None
    source_agreement: float | None = None  # AMI of the labels and the source head's argmax
    source_classes: int | None = None
    imagenet_top1: float | None = None
    seconds: float = 0.0
    crop: int | None = None  # the input size the images were measured at
    probe_c: float | None = None  # the penultimate probe's inverse L2 strength, chosen by CV on the training images
    probe_val_acc: float | None = None  # full mode: that probe's plain accuracy on the validation images
    stage_val_acc: dict[str, float] = field(default_factory=dict)  # the same for every earlier stage

    @property
    def pretraining_gain_points(self) -> float | None:
        if self.pretrained_subset_acc is None or self.random_probe_acc is None:
            return None
        return 100.0 * (self.pretrained_subset_acc - self.random_probe_acc)

    @property
    def best_stage_acc(self) -> float | None:
        return self.stage_acc.get(self.best_stage) if self.best_stage else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        gain = self.pretraining_gain_points
        data["pretraining_gain_points"] = None if gain is None else round(gain, 2)
        return data


@dataclass
class DataSummary:
    root: str
    classes: list[str]
    images: int  # training images: the train split, or a flat tree's share that trains (a test split is never looked at)
    per_class_median: float  # of the training images
    per_class_min: int
    smallest_class: str
    sampled: int  # training images measured (a stratified sample of at most --max-images)
    layout: str = "split"  # split: train/ and val/ folders; flat: class folders, split here as training splits them
    val_images: int = 0
    scored: int = 0  # validation images the frozen probes were scored on (0: --fast, none)
    measured_on: str = ""  # which images were measured, and why
    task: str = "single_label"  # multi_label: per_class counts are images per label, accuracies are mAP

    @property
    def multi_label(self) -> bool:
        return self.task == "multi_label"

    @property
    def metric(self) -> str:
        """What the candidates' estimates measure, as training names it."""
        return "val_map" if self.multi_label else "val_acc"


@dataclass
class Candidate:
    """A way to train, with its measured estimate of validation accuracy (0-1).

    Frozen candidates: a probe fitted to convergence on the training images, scored on the validation images.
    End-to-end ones: the race's real training runs, scored on the same validation images."""

    strategy: str
    backbone: str
    cut: str | None
    estimate: float | None  # None: not measured (training diverged)
    noise: float | None  # the estimate's standard error
    how: str
    cost: int  # COSTS: ties within the noise go to the cheaper
    seconds: float | None = None
    epochs: int | None = None

    @property
    def label(self) -> str:
        return f"{self.strategy} (cut: {self.cut})" if self.cut else self.strategy

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["estimate"] = None if self.estimate is None else round(self.estimate, 4)
        data["noise"] = None if self.noise is None else round(self.noise, 4)
        return data


@dataclass
class DataReport:
    data: DataSummary
    thresholds: Thresholds
    backbones: list[BackboneReport]  # ranked, best first
    advice: Advice
    size_reasons: list[str]
    similarity_reasons: list[str]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)  # empty with --fast
    pick: Candidate | None = None
    race: dict[str, Any] | None = None  # race.RaceResult.to_dict()

    @property
    def best(self) -> BackboneReport:
        """The backbone the advice is for: the pick's, or (--fast) the top-ranked."""
        name = self.pick.backbone if self.pick else self.backbones[0].name
        return next(b for b in self.backbones if b.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "data",
            "measurement": "race" if self.pick else "fast",
            "metric": self.data.metric,
            "data": asdict(self.data),
            "thresholds": asdict(self.thresholds),
            "ranking": [b.to_dict() for b in self.backbones],
            "backbone": self.best.name,
            "weights": self.best.weights,
            **advice_dict(self.advice),
            "candidates": [c.to_dict() for c in self.candidates],
            "pick": self.pick.to_dict() if self.pick else None,
            "race": self.race,
            "size_reasons": self.size_reasons,
            "similarity_reasons": self.similarity_reasons,
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
        }


def advice_dict(advice: Advice) -> dict[str, Any]:
    return {"size": advice.size, "similar": advice.similar, "case": advice.case, "strategy": advice.strategy, "cut": advice.cut, "reasons": advice.reasons}


def judge_size(median: float, minimum: int, gain_points: float | None, sampled: int, total: int, th: Thresholds, per: str = "class") -> tuple[str, list[str]]:
    """small / large from images per class; in between, from whether a probe still gains from more data.

    The gain is measured on the sample. Learning curves flatten, so a small gain on a sample means a smaller
    one on all the data (large), while a big gain on a sample says little about all of it: then the answer
    is the cautious one (small), with the way to measure at full size. `per`: label for multi-label data, where
    an image counts once for each of its labels.
    """
    counts = f"median {median:g} images per {per}, smallest {per} {minimum} (small below {th.small_below}, large from {th.large_from})"
    if median < th.small_below:
        return "small", [f"small: {counts}"]
    if median >= th.large_from:
        return "large", [f"large: {counts}"]
    if gain_points is None:
        return "small", [f"small: {counts}; no probe to tell more"]
    gains = f"a linear probe gains {gain_points:+.1f} points from half to all of the {sampled} measured images"
    if gain_points <= th.gain_points:
        return "large", [f"large enough: {counts}, and {gains} (at most {th.gain_points:g})"]
    if sampled < total:
        return "small", [f"effectively small, as far as the sample shows: {counts}, and {gains} (more than {th.gain_points:g}); "
                         f"with all {total} it may gain less: --max-images {total} measures that"]
    return "small", [f"effectively small: {counts}, and {gains} (more than {th.gain_points:g})"]


def judge_similarity(best: BackboneReport, th: Thresholds) -> tuple[bool, str | None, list[str]]:
    """(similar, stage to cut after or None, reasons), from the best backbone's measurements."""
    reasons: list[str] = []
    different = False
    lead = None
    if best.best_stage is not None and best.best_stage_acc is not None:
        lead = 100.0 * (best.best_stage_acc - best.probe_acc)
        if lead > th.depth_points:
            different = True
            reasons.append(f"different: the probe on '{best.best_stage}' reaches {_pct(best.best_stage_acc)}, the penultimate layer only "
                           f"{_pct(best.probe_acc)} ({lead:+.1f} points; different when an earlier stage leads by more than {th.depth_points:g})")
        else:
            reasons.append(f"the penultimate layer's probe ({_pct(best.probe_acc)}) holds up against the best earlier stage '{best.best_stage}' "
                           f"({_pct(best.best_stage_acc)}, {lead:+.1f} points; different only beyond +{th.depth_points:g})")
    worth = best.pretraining_gain_points
    if worth is not None and best.pretrained_subset_acc is not None and best.random_probe_acc is not None:
        measured = f"on {best.random_images} images ({_pct(best.pretrained_subset_acc)} vs {_pct(best.random_probe_acc)}"
        if worth <= th.worth_points:
            different = True
            reasons.append(f"different: pretraining is worth only {worth:+.1f} points over a random network {measured}; needs more than {th.worth_points:g})")
        else:
            reasons.append(f"pretraining is worth {worth:+.1f} points over a random network {measured}; counts above {th.worth_points:g})")
    if best.source_agreement is not None:
        ami = best.source_agreement
        if ami < th.ami_min:
            different = True
            reasons.append(f"different: the source head's {best.source_classes}-class predictions barely agree with the labels (AMI {ami:.3f}, below {th.ami_min:g})")
        else:
            reasons.append(f"the source head's {best.source_classes}-class predictions agree with the labels (AMI {ami:.3f}, similar from {th.ami_min:g})")
    return not different, _cut_after(best, lead, th), reasons


def _cut_after(best: BackboneReport, lead: float | None, th: Thresholds) -> str | None:
    """The earlier stage to keep as a frozen body: clearly better than the top, and than random features there."""
    if lead is None or lead <= th.depth_points or best.best_stage_random_acc is None or best.best_stage_subset_acc is None:
        return None
    if 100.0 * (best.best_stage_subset_acc - best.best_stage_random_acc) <= th.worth_points:
        return None
    return best.best_stage


def cut_reason(best: BackboneReport, cut: str | None, th: Thresholds) -> str | None:
    """Why the earlier stage that beats the top layer is (or is not) worth keeping; None when none beats it clearly."""
    if best.best_stage_acc is None or best.best_stage_random_acc is None or best.best_stage_subset_acc is None:
        return None
    if 100.0 * (best.best_stage_acc - best.probe_acc) <= th.depth_points:
        return None
    edge = 100.0 * (best.best_stage_subset_acc - best.best_stage_random_acc)
    verdict = "so its layers transfer" if cut else "so a cut there would not beat random features"
    return (f"at '{best.best_stage}' the pretrained probe reaches {_pct(best.best_stage_subset_acc)} and a random network's "
            f"{_pct(best.best_stage_random_acc)} ({edge:+.1f} points, needs more than {th.worth_points:g}), {verdict}")


def rank(reports: Sequence[BackboneReport]) -> list[BackboneReport]:
    """Best first, by LogME (the probe accuracy breaks ties)."""
    return sorted(reports, key=_rank_key, reverse=True)


def _pct(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


# ---------------------------------------------------------------------------------------------
# Data mode: measuring


def measure(root: Path, options: MeasureOptions, thresholds: Thresholds, on_progress: Progress | None = None) -> DataReport:
    """Measure the candidates on the images under `root` as training will see them, and pick; see the module docstring."""
    thresholds.check()
    _check_options(options)
    say = on_progress or (lambda message: None)
    started = time.perf_counter()
    measured = _training_view(root, options)
    say(measured.summary.measured_on)
    ranked = _measure_backbones(measured.paths, measured.labels, len(measured.fit), options, say)
    top, summary = ranked[0], measured.summary
    size, size_reasons = judge_size(summary.per_class_median, summary.per_class_min, top.probe_gain_points, summary.sampled, summary.images, thresholds,
                                    "label" if summary.multi_label else "class")  # fmt: skip
    similar, cut, similarity_reasons = judge_similarity(top, thresholds)
    extra = cut_reason(top, cut, thresholds)
    if extra:
        similarity_reasons.append(extra)
    rule = advise(size, similar, cut if size == "small" else None, measured=True)
    notes = _notes(summary, measured.splits) + (MULTI_LABEL_NOTES if summary.multi_label else [])
    if options.fast:
        if cut and size == "large":
            rule.reasons.append(f"with this much data train every layer; a frozen body cut after '{cut}' (backbone.cut) is the cheaper alternative")
        rule.reasons.append(f"backbone: {top.name} ranks first by LogME ({top.logme:.3f})")
        rule.reasons.append("--fast: the four-case rule from forward-pass measures, nothing trained; without --fast the candidates are trained and measured")
        return DataReport(summary, thresholds, ranked, rule, size_reasons, similarity_reasons, time.perf_counter() - started, notes)
    race = _race(root, top, options, say)
    candidates = frozen_candidates(ranked, summary.scored, summary.metric) + race_candidates(race, top.name, summary.val_images)
    pick = pick_candidate(candidates)
    advice = Advice(size, similar, pick.strategy, pick_reasons(pick, candidates, rule, summary.metric), pick.cut)
    advice.reasons.append(f"the race trained {top.name}, first of the backbones by LogME ({top.logme:.3f}); every backbone's frozen body was probed")
    notes += race.notes
    return DataReport(summary, thresholds, ranked, advice, size_reasons, similarity_reasons, time.perf_counter() - started, notes,
                      candidates, pick, race.to_dict())  # fmt: skip


@dataclass
class _TrainingView:
    """The images measured: a stratified sample of the training images (the probes fit on them), then one of
    the validation images (scored; none with --fast). `fit` and `scored` index the splits' samples."""

    splits: Any
    fit: Any
    scored: Any
    paths: list[Path]
    labels: Any
    summary: DataSummary


def _training_view(root: Path, options: MeasureOptions) -> _TrainingView:
    """The data split as training will split it (a flat tree: data.val_fraction and the seed, as train draws it)."""
    import numpy as np

    from transferctl.data.targets import strata
    from transferctl.data.label_files import discover_data
    from transferctl.data.sampling import stratified_sample
    from transferctl.data.targets import target_array

    splits = discover_data(root, options.val_fraction, options.seed, labels=options.labels)
    multi = splits.multi_label  # then labels are multi-hot rows (images x classes), counts images per label
    train_labels = target_array([label for _, label in splits.train], len(splits.classes), multi)
    val_labels = target_array([label for _, label in splits.val], len(splits.classes), multi)
    counts = train_labels.sum(axis=0).astype(int) if multi else np.bincount(train_labels, minlength=len(splits.classes))
    if counts.min() < 2:
        small = splits.classes[int(counts.argmin())]
        share = f" (a flat tree gives {options.val_fraction:g} of each class to validation: --val-fraction)" if splits.layout == "flat" else ""
        kind = "label" if multi else "class"
        raise DataError(Problem(str(root), f"{kind} '{small}' has {counts.min()} training image(s){share}", f"data mode needs at least 2 training images per {kind} to cross-validate its probes"))
    if not options.fast and not len(val_labels):
        raise DataError(Problem(str(root / "val"), "holds no images", "the candidates are scored on validation images: add some, or use --fast"))
    if options.max_images < 2 * len(splits.classes):
        raise ConfigError(Problem("--max-images", f"{options.max_images} images cannot give each of {len(splits.classes)} classes the two a probe needs",
                                  f"use --max-images {2 * len(splits.classes)} or more"))  # fmt: skip
    fit = stratified_sample(strata(train_labels), options.max_images, options.seed)
    scored = np.array([], dtype=int) if options.fast or not len(val_labels) else stratified_sample(strata(val_labels), options.max_images, options.seed)
    summary = DataSummary(
        str(root), list(splits.classes), len(train_labels), float(np.median(counts)), int(counts.min()), splits.classes[int(counts.argmin())],
        len(fit), splits.layout, len(val_labels), len(scored), "", "multi_label" if multi else "single_label",
    )  # fmt: skip
    summary.measured_on = measured_on(summary, options)
    paths = [splits.train[i][0] for i in fit] + [splits.val[i][0] for i in scored]
    labels = np.concatenate([train_labels[fit], val_labels[scored]])
    return _TrainingView(splits, fit, scored, paths, labels, summary)


def measured_on(summary: DataSummary, options: MeasureOptions) -> str:
    """Which images were measured, and why: those training fits, scored where training scores."""
    sample = f"{summary.sampled} of the {summary.images}" if summary.sampled < summary.images else f"all {summary.images}"
    if summary.layout == "flat":
        where = (f"the flat tree split as training splits it (val_fraction {options.val_fraction:g}, seed {options.seed}): "
                 f"{summary.images} images train, {summary.val_images} validate; ")  # fmt: skip
        train_part, val_part = "training images", "held-out images"
    elif summary.layout == "labels":
        where = (f"the label file {options.labels} split as training splits it (its split column, else val_fraction {options.val_fraction:g}, "
                 f"seed {options.seed}): {summary.images} images train, {summary.val_images} validate; ")  # fmt: skip
        train_part, val_part = "training rows", "validation rows"
    else:
        where, train_part, val_part = "", "training images (train/)", "validation images (val/)"
    fitted = f"{where}probes fit on {sample} {train_part}, what training fits, median {summary.per_class_median:g} a {'label' if summary.multi_label else 'class'}"
    if options.fast:
        return f"{fitted}, cross-validated within them (--fast: no validation image is looked at)"
    return f"{fitted}; scored on {summary.scored} of the {summary.val_images} {val_part}, where training measures {summary.metric}; the race trains and scores on the same split"


# ---------------------------------------------------------------------------------------------
# Data mode: the candidates, the race and the pick

COSTS = {"feature_extract": 0, "cut": 1, "fine_tune": 2, "pretrained_init": 3, "scratch": 3}  # cost to train, for ties
ESTIMATE_WORDS = {"val_acc": "validation accuracy", "val_map": "validation mAP"}
MULTI_LABEL_NOTES = [
    "multi-label data: LogME is the mean of each label column's evidence; the probes are one-vs-rest (a logistic regression "
    "a label) scored by mAP, and the race ranks by val_map, so every accuracy and estimate here is mAP",
    "multi-label data: the size counts images per label (an image once for each of its labels)",
    "multi-label data: the source head's agreement (AMI) needs one label an image, so it is not measured",
    "multi-label data: the ± of an mAP is the binomial standard error of an accuracy on as many images, a rough scale rather than a measured spread",
]


def estimate_noise(accuracy: float, images: int) -> float:
    """The standard error of an accuracy measured on `images` images (Agresti-Coull: two successes and two
    failures added, so that 100% on a few images is not read as certain)."""
    p = (accuracy * images + 2.0) / (images + 4.0)
    return math.sqrt(p * (1.0 - p) / (images + 4.0))


def frozen_candidates(reports: Sequence[BackboneReport], scored: int, metric: str = "val_acc") -> list[Candidate]:
    """Every backbone's frozen body, whole and cut after each earlier layer group: its probe's validation accuracy
    (metric val_map: the one-vs-rest probe's validation mAP)."""
    found = []
    for report in reports:
        if report.probe_val_acc is None:
            continue
        for cut, accuracy in [(None, report.probe_val_acc), *report.stage_val_acc.items()]:
            layer = f"'{cut}'" if cut else "the penultimate layer"
            kind = "one-vs-rest linear probe (one a label)" if metric == "val_map" else "linear probe"
            how = (f"{kind} on {layer} ({report.crop} px), fitted to convergence on the training images with C chosen by "
                   f"cross-validation among them, scored on {scored} validation images{' by mAP' if metric == 'val_map' else ''}")  # fmt: skip
            found.append(Candidate("feature_extract", report.name, cut, accuracy, estimate_noise(accuracy, scored), how, COSTS["cut" if cut else "feature_extract"]))
    return found


def race_candidates(race: Any, backbone: str, val_images: int) -> list[Candidate]:
    """The race's strategies: each one's longest run, its best validation accuracy (val_map on multi-label data)."""
    from transferctl.analysis.race import METRIC_WORDS

    found = []
    for strategy in race.strategies:
        run = race.last_run(strategy)
        if run.best_val_acc is None:
            how = f"diverged in round {run.round + 1}: {run.failure}"
            found.append(Candidate(strategy, backbone, None, None, None, how, COSTS[strategy], round(run.seconds, 2), run.epochs))
            continue
        how = (f"trained {run.epochs} epochs ({_share(run.fraction)} its default schedule: {run.schedule}) on the training images, "
               f"best {METRIC_WORDS[run.metric]} on {val_images} validation images (race round {run.round + 1})")  # fmt: skip
        found.append(Candidate(strategy, backbone, None, run.best_val_acc, estimate_noise(run.best_val_acc, val_images), how, COSTS[strategy], round(run.seconds, 2), run.epochs))
    return found


def _share(fraction: float) -> str:
    return {1.0: "all of", 0.5: "half of", 0.25: "a quarter of", 0.125: "an eighth of"}.get(fraction, f"{fraction:g} of")


def pick_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The best estimate; within its noise (one standard error: the one-standard-error rule), the cheapest."""
    measured = [c for c in candidates if c.estimate is not None]
    if not measured:
        raise DataError(Problem("recommend", "no candidate could be measured: every race run diverged and no frozen probe was scored", "check the data, or use --fast"))
    best = max(measured, key=lambda c: c.estimate)  # type: ignore[arg-type, return-value]
    close = [c for c in measured if c.estimate >= best.estimate - best.noise]  # type: ignore[operator]
    return min(close, key=lambda c: (c.cost, -c.estimate))  # type: ignore[operator]


def pick_reasons(pick: Candidate, candidates: Sequence[Candidate], rule: Advice, metric: str = "val_acc") -> list[str]:
    measured = [c for c in candidates if c.estimate is not None]
    best = max(measured, key=lambda c: c.estimate)  # type: ignore[arg-type, return-value]
    mine = f"{pick.label} on {pick.backbone}: {_pct(pick.estimate)} ± {_pct(pick.noise)} {ESTIMATE_WORDS[metric]}"  # type: ignore[arg-type]
    if pick is best:
        reasons = [f"{mine}, the best measured estimate of {len(measured)} candidates"]
    else:
        reasons = [f"{mine}, within the noise of the best estimate ({best.label} on {best.backbone}, {_pct(best.estimate)} ± {_pct(best.noise)}: "  # type: ignore[arg-type]
                   f"one standard error) and cheaper to train"]  # fmt: skip
    if (rule.strategy, rule.cut) == (pick.strategy, pick.cut):
        reasons.append(f"the four-case rule agrees ({rule.case})")
    else:
        cut = f" with backbone.cut: {rule.cut}" if rule.cut else ""
        reasons.append(f"the four-case rule alone ({rule.case}) would say {rule.strategy}{cut}; the measurements overrule it")
    return reasons


def _race(root: Path, top: BackboneReport, options: MeasureOptions, say: Progress) -> Any:
    """The end-to-end strategies raced on the top-ranked backbone (only scratch without pretrained weights)."""
    from transferctl.analysis.race import END_TO_END, RaceSetup, race
    from transferctl.config import parse_weights

    weights_none = parse_weights(options.weights.strip()).kind == "none"
    strategies = ("scratch",) if weights_none else END_TO_END
    setup = RaceSetup(root, options.val_fraction, options.seed, probe_backbone(top.name, options.weights), options.race_size or top.crop,
                      options.device, options.precision, options.budget, options.augment, options.labels)  # fmt: skip
    say(f"race on {top.name}: {', '.join(strategies)}, --budget {options.budget:g}s")
    result = race(setup, strategies, say)
    if weights_none:
        result.notes.append("--weights none: fine_tune and pretrained_init would start from random weights too, so only scratch was raced")
    return result


def backbone_of_run(weights: str, trust_code: bool = False) -> str | None:
    """For `run:<dir>` weights, the backbone that run trained (from its config.yaml), so it need not be repeated.
    A python: one is then named by the run, not by the user: refused unless trust_code (transferctl/models/trust.py)."""
    from transferctl.config import parse_weights
    from transferctl.models.trust import require_trusted

    name = _run_backbone_section(weights).get("name")
    if not name:
        return None
    require_trusted(str(name), str(parse_weights(weights).path / "config.yaml"), trust_code)
    return str(name)


def probe_backbone(name: str, weights: str) -> BackboneConfig:
    """The backbone section to measure `name` with `weights` by (a python: one's from its run)."""
    from pydantic import ValidationError

    from transferctl.config import BackboneConfig

    try:
        return BackboneConfig.model_validate({"name": name, "weights": weights, **python_fields(name, weights)})
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ConfigError(Problem("--backbone", message, "recommend measures a python: backbone with the weights of a run that trained it: --weights run:<run dir>")) from None


def python_fields(name: str, weights: str) -> dict[str, Any]:
    """A python: backbone's head, groups and normalisation, which are no command-line options: from the run
    that `run:` weights name, when that run trained this backbone; {} otherwise."""
    from transferctl.config import PYTHON_FIELDS, PYTHON_PREFIX

    section = _run_backbone_section(weights)
    if not name.startswith(PYTHON_PREFIX) or section.get("name") != name:
        return {}
    return {key: section[key] for key in PYTHON_FIELDS if section.get(key) is not None}


def _run_backbone_section(weights: str) -> dict[str, Any]:
    """The backbone section of the config.yaml of the run that `run:` weights name; {} for other weights."""
    from transferctl.config import parse_weights, read_yaml

    source = parse_weights(weights)
    if source.kind != "run":
        return {}
    path = source.path / "config.yaml"
    if not path.is_file():
        return {}
    section = read_yaml(path).get("backbone")
    return dict(section) if isinstance(section, dict) else {}


def augment_problem(augment: str) -> Problem | None:
    from transferctl.config import AUGMENTS

    return None if augment in AUGMENTS else Problem("--augment", f"must be {', '.join(AUGMENTS[:-1])} or {AUGMENTS[-1]}, got '{clip(augment)}'")


def _check_options(options: MeasureOptions) -> None:
    problems = []
    if not options.backbones:
        problems.append(Problem("--backbone", "names no backbone", "e.g. --backbone resnet18,efficientnet_b0"))
    if options.max_images < 4:
        problems.append(Problem("--max-images", f"must be at least 4, got {options.max_images}"))
    if options.random_images < 4:
        problems.append(Problem("--random-images", f"must be at least 4, got {options.random_images}"))
    if options.folds < 2:
        problems.append(Problem("--folds", f"must be at least 2, got {options.folds}"))
    if options.image_size is not None and not 8 <= options.image_size <= 4096:
        problems.append(Problem("--image-size", f"must be between 8 and 4096 pixels, got {options.image_size}"))
    if options.seed < 0:
        problems.append(Problem("--seed", f"must be 0 or more, got {options.seed}"))
    if problem := augment_problem(options.augment):
        problems.append(problem)
    if options.random_for not in ("best", "all"):
        problems.append(Problem("--random-for", f"must be best or all, got '{options.random_for}'"))
    if not 0.0 < options.val_fraction < 1.0:
        problems.append(Problem("--val-fraction", f"must be between 0 and 1, got {options.val_fraction}"))
    if not 0 <= options.budget < math.inf:
        problems.append(Problem("--budget", f"must be a number of seconds >= 0, got {options.budget}"))
    if options.race_size is not None and not 8 <= options.race_size <= 4096:
        problems.append(Problem("--race-size", f"must be between 8 and 4096 pixels, got {options.race_size}"))
    if problems:
        raise ConfigError(*problems)


def _notes(summary: DataSummary, splits: Any) -> list[str]:
    notes = []
    if summary.sampled < summary.images:
        notes.append(f"probes fit on a stratified sample of {summary.sampled} of {summary.images} training images (--max-images)")
    if splits.test:
        notes.append(f"the {len(splits.test)} test images were not looked at")
    skipped = getattr(splits, "skipped", ())
    if skipped and splits.layout == "labels":
        notes.append(f"{len(skipped)} row(s) of the label file left out, e.g. {skipped[0].path} ({skipped[0].reason})")
    elif skipped:
        notes.append(f"{len(skipped)} unreadable image(s) left out, e.g. {skipped[0].path}")
    return notes


def _measure_backbones(paths: list[Path], labels: Any, fit: int, options: MeasureOptions, say: Progress) -> list[BackboneReport]:
    """Every backbone's own measures, ranked; then the random-init reference for the best (or every) one.

    The first `fit` images are training images (the probes fit on them), the rest validation images."""
    from transferctl.data.sampling import stratified_sample

    images = _ImageCache(paths, say)
    measured = [_measure_one(name, images, labels, fit, options, say) for name in options.backbones]
    ranked = sorted(measured, key=lambda item: _rank_key(item[0]), reverse=True)
    from transferctl.analysis.probes import is_multi_label
    from transferctl.data.targets import strata

    # Training images only; at least two a class, or the reference's probe could not be cross-validated.
    classes = labels.shape[1] if is_multi_label(labels) else len(set(labels.tolist()))
    subset = stratified_sample(strata(labels[:fit]), max(options.random_images, 2 * classes), options.seed + 1)
    for report, features, preprocessing in ranked if options.random_for == "all" else ranked[:1]:
        started = time.perf_counter()
        say(f"{report.name}: random-init reference on {len(subset)} training images")
        add_reference(report, features.rows(slice(0, fit)), _random_features(report.name, preprocessing, images, subset, options), labels[:fit], subset, options)
        report.seconds = round(report.seconds + time.perf_counter() - started, 2)
    return [report for report, _, _ in ranked]


class _ImageCache:
    """Decoded images for the current crop size (networks of the same crop share them)."""

    def __init__(self, paths: list[Path], say: Progress) -> None:
        self.paths, self.say = paths, say
        self.key: Any = None
        self.images: Any = None

    def get(self, preprocessing: Any) -> Any:
        from transferctl.analysis.probe_features import image_key, load_images

        if image_key(preprocessing) != self.key:
            self.say(f"decoding {len(self.paths)} images at {preprocessing.crop} px")
            self.images, self.key = load_images(self.paths, preprocessing), image_key(preprocessing)
        return self.images


def _measure_one(name: str, images: _ImageCache, labels: Any, fit: int, options: MeasureOptions, say: Progress) -> tuple[BackboneReport, Any, Any]:
    from transferctl.data.folders import seeded_torch_rng
    from transferctl.training.runtime import make_runtime
    from transferctl.analysis.probe_features import extract, load_probe_network

    started = time.perf_counter()
    say(f"{name}: building with weights {options.weights}")
    with seeded_torch_rng(options.seed):  # weights: none, and any layer the weights leave out, start from --seed
        network = load_probe_network(probe_backbone(name, options.weights), options.image_size)
    preprocessing = network.backbone.preprocessing
    batch = images.get(preprocessing)
    runtime = make_runtime(options.device, options.precision, network.model)
    say(f"{name}: forward pass over {len(batch)} images ({runtime.device}, {runtime.precision})")
    features = extract(network, batch, runtime, options.batch_size)
    say(f"{name}: probes and LogME")
    report = score_backbone(name, options, features, labels, fit)
    report.source_classes, report.imagenet_top1, report.crop = network.source_classes, network.imagenet_top1, preprocessing.crop
    report.seconds = round(time.perf_counter() - started, 2)
    say(f"{name}: done in {report.seconds:.1f}s")
    return report, features, preprocessing


def _random_features(name: str, preprocessing: Any, images: _ImageCache, subset: Any, options: MeasureOptions) -> Any:
    from transferctl.data.folders import seeded_torch_rng
    from transferctl.training.runtime import make_runtime
    from transferctl.analysis.probe_features import extract, load_probe_network, with_preprocessing

    with seeded_torch_rng(options.seed):  # pretrained=False: options.weights are left out, the architecture kept
        reference = with_preprocessing(load_probe_network(probe_backbone(name, options.weights), options.image_size, pretrained=False), preprocessing)
    runtime = make_runtime(options.device, options.precision, reference.model)
    return extract(reference, images.get(preprocessing)[subset], runtime, options.batch_size)


def _rank_key(report: BackboneReport) -> tuple[float, float]:
    return (report.logme, report.probe_acc)


def score_backbone(name: str, options: MeasureOptions, features: Any, labels: Any, fit: int | None = None) -> BackboneReport:
    """A backbone's own measures from its features: LogME, the probes (with the half-data gain), stages, source head.

    The first `fit` rows are training images, the rest validation images: the probes fit on the training
    images and are scored on the validation ones. `fit` None (or every row): cross-validated within them all.
    """
    import numpy as np

    from transferctl.analysis.probes import held_out_probe, is_multi_label, logme_with_spread, probe, source_agreement

    fit = len(labels) if fit is None else fit
    train, train_labels = features.rows(slice(0, fit)), labels[:fit]
    penultimate = train.penultimate
    score, spread = logme_with_spread(penultimate, train_labels, seed=options.seed)
    stages = [group for group, values in train.stages.items()
              if not (values.shape == penultimate.shape and np.allclose(values, penultimate))]  # the same as the penultimate layer: not a cut
    if fit < len(labels):
        def fitted(values: Any, with_half: bool = False) -> Any:
            return held_out_probe(values[:fit], train_labels, values[fit:], labels[fit:], options.folds, options.seed, with_half)

        top = fitted(features.penultimate, with_half=True)
        held = {group: fitted(features.stages[group]) for group in stages}
        stage_acc = {group: result.balanced_accuracy for group, result in held.items()}
        accuracy, gain, val_acc = top.balanced_accuracy, top.gain_from_half, top.accuracy
        stage_val_acc = {group: result.accuracy for group, result in held.items()}
    else:
        top = probe(penultimate, train_labels, options.folds, options.seed, with_half=True)
        stage_acc = {group: probe(train.stages[group], train_labels, options.folds, options.seed).accuracy for group in stages}
        accuracy, gain, val_acc, stage_val_acc = top.accuracy, top.gain_from_half, None, {}
    return BackboneReport(
        name=name,
        weights=options.weights,
        logme=score,
        logme_spread=spread,
        probe_acc=accuracy,
        probe_gain_points=None if gain is None else 100.0 * gain,
        stage_acc=stage_acc,
        feature_dim=int(penultimate.shape[1]),
        best_stage=max(stage_acc, key=lambda g: stage_acc[g]) if stage_acc else None,
        # AMI compares one label an image with the source head's one argmax: not defined for several labels.
        source_agreement=None if train.source_predictions is None or is_multi_label(labels) else source_agreement(train_labels, train.source_predictions),
        probe_c=top.c,
        probe_val_acc=val_acc,
        stage_val_acc=stage_val_acc,
    )


def add_reference(report: BackboneReport, features: Any, random_features: Any, labels: Any, subset: Any, options: MeasureOptions) -> None:
    """What pretraining is worth: the same probes on the random copy's features (of `subset`) and on the pretrained ones."""
    from transferctl.analysis.probes import probe

    sub_labels = labels[subset]
    # The reference saw every training image and the probes were cross-validated on them: reuse those probes.
    everything = len(subset) == len(labels) and report.probe_val_acc is None

    def accuracy(values: Any) -> float:
        return probe(values, sub_labels, options.folds, options.seed).accuracy

    report.random_images = len(subset)
    report.pretrained_subset_acc = report.probe_acc if everything else accuracy(features.penultimate[subset])
    report.random_probe_acc = accuracy(random_features.penultimate)
    stage = report.best_stage
    if stage is not None:
        report.best_stage_subset_acc = report.stage_acc[stage] if everything else accuracy(features.stages[stage][subset])
        report.best_stage_random_acc = accuracy(random_features.stages[stage])
