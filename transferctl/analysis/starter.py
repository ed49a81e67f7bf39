"""init: look at a folder of images, then write a commented experiment file that `transferctl check` accepts.

The folder is read exactly as training will read it (data.discover: layout, classes, unreadable files),
plus the headers of a sample of images for their sizes and modes. `--strategy auto` applies recommend's
rule (transferctl.analysis.recommend) to the measured size; similarity cannot be seen without a network, so it is
assumed and the file says how to measure it. No torch here except to check the backbone's name.
"""

from __future__ import annotations

import os
import re
import statistics
import textwrap
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from transferctl.config import SCHEMA_FILE, STRATEGIES, PhaseConfig, config_from_dict, default_schedule, json_schema, parse_yaml
from transferctl.data.folders import BadImage, DatasetSplits, Sample
from transferctl.data.label_files import discover_data
from transferctl.data.targets import class_counts
from transferctl.data.imbalance import imbalance_warning
from transferctl.errors import ConfigError, DataError, Problem, did_you_mean
from transferctl.analysis.recommend import Advice, Thresholds, advise, judge_size
from transferctl.runs.rundir import file_in_the_way, write_atomically

HEADER_SAMPLE = 2000  # images whose headers are read for sizes and modes (evenly spread over the folder)
AUTO = "auto"
COMMENT_COLUMN = 34
SMALL_IMAGE_SIDE = 96  # below this, upscaling to the weights' 224 pixels mostly costs time


@dataclass(frozen=True)
class ImageStats:
    """Sizes and modes of the sampled images (headers only: nothing is decoded)."""

    sampled: int
    min_size: tuple[int, int]
    median_size: tuple[int, int]
    max_size: tuple[int, int]
    modes: dict[str, int]
    formats: dict[str, int]


@dataclass(frozen=True)
class DataInspection:
    """What a data folder holds, as training will see it."""

    root: Path
    layout: str  # split | flat | labels (a label file's rows)
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split (train/val/test; 'all' in the flat layout) -> class -> images
    images: ImageStats
    unreadable: tuple[BadImage, ...]
    ignored: tuple[Path, ...]
    labels: Path | None = None  # the label file read (data.labels); None: class folders
    multi_label: bool = False  # some image has several labels: counts are images per label, one for each of an image's labels
    images_total: int | None = None  # images (a multi-label image once); None: the sum of the counts

    @property
    def task(self) -> str:
        return "multi_label" if self.multi_label else "single_label"

    @property
    def per(self) -> str:
        """What the counts are per: class, or label (multi-label: an image once for each of its labels)."""
        return "label" if self.multi_label else "class"

    @property
    def splits(self) -> list[str]:
        return list(self.counts)

    @property
    def labelled_per_class(self) -> dict[str, int]:
        """Images per class that train and validate (a test split is never looked at, as in recommend)."""
        return {name: sum(self.counts[split][name] for split in self.counts if split != "test") for name in self.classes}

    @property
    def median_per_class(self) -> float:
        return float(statistics.median(self.labelled_per_class.values()))

    @property
    def smallest_class(self) -> tuple[str, int]:
        per_class = self.labelled_per_class
        name = min(self.classes, key=lambda c: (per_class[c], c))
        return name, per_class[name]

    @property
    def total(self) -> int:
        if self.images_total is not None:
            return self.images_total
        return sum(sum(per_class.values()) for per_class in self.counts.values())

    @property
    def imbalance(self) -> str | None:
        """The warning when the smallest class (train+val) has less than a tenth of the largest's images."""
        return imbalance_warning(self.labelled_per_class, where="data.labels" if self.labels else "data.root", multi_label=self.multi_label)

    def to_dict(self) -> dict[str, Any]:
        smallest, smallest_count = self.smallest_class
        return {
            "root": str(self.root),
            "layout": self.layout,
            "labels": None if self.labels is None else str(self.labels),
            "task": self.task,
            "classes": self.classes,
            "images": self.total,
            "counts": self.counts,
            "median_per_class": self.median_per_class,
            "smallest_class": {"name": smallest, "images": smallest_count},
            "imbalance": self.imbalance,
            "image_sizes": {
                "sampled": self.images.sampled,
                "min": list(self.images.min_size),
                "median": list(self.images.median_size),
                "max": list(self.images.max_size),
            },
            "modes": self.images.modes,
            "formats": self.images.formats,
            "unreadable": [{"path": str(bad.path), "reason": bad.reason} for bad in self.unreadable],
            "ignored": [str(path) for path in self.ignored],
        }


def inspect_folder(root: Path, labels: Path | None = None) -> DataInspection:
    """Layout, classes, images per class, sizes and modes, unreadable files (or a label file's unusable rows);
    DataError if training could not use it."""
    splits = _discover(root, labels)
    if splits.layout == "split":
        present = [name for name in ("train", "val", "test") if splits.split(name)]
        counts = {name: _per_class(splits.split(name), splits.classes) for name in present}
    else:  # a label file's test rows are counted apart: they never train or validate
        counts = {"all": _per_class(splits.train + splits.val, splits.classes), **({"test": _per_class(splits.test, splits.classes)} if splits.test else {})}
    samples = splits.train + splits.val + splits.test
    stats = image_stats([path for path, _ in samples])
    return DataInspection(root, splits.layout, list(splits.classes), counts, stats, splits.skipped, splits.ignored, labels, splits.multi_label, len(samples))


def _discover(root: Path, labels: Path | None = None) -> DatasetSplits:
    try:
        return discover_data(root, val_fraction=0.2, seed=0, on_bad_image="skip", labels=labels)
    except DataError as exc:
        # discover names the config fields; here the folder and the label file are init's arguments.
        named = {"data.root": "DATA_DIR", "data.labels": "--labels"}
        raise DataError(*(Problem(named.get(p.where, p.where), p.message, p.hint) for p in exc.problems)) from None


def _per_class(samples: list[Sample], classes: list[str]) -> dict[str, int]:
    """Images per class; a multi-label image counts once for each of its labels."""
    counts = class_counts([label for _, label in samples])
    return {name: counts[label] for label, name in enumerate(classes)}


def image_stats(paths: list[Path], limit: int = HEADER_SAMPLE) -> ImageStats:
    """Sizes and modes from the headers of at most `limit` images, evenly spread over `paths`."""
    ordered = sorted(paths)
    step = max(1.0, len(ordered) / limit)
    sample = [ordered[int(i * step)] for i in range(min(limit, len(ordered)))]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        headers = [h for h in pool.map(_header, sample) if h is not None]
    if not headers:
        return ImageStats(0, (0, 0), (0, 0), (0, 0), {}, {})
    widths = [h[0] for h in headers]
    heights = [h[1] for h in headers]
    areas = [w * h for w, h in zip(widths, heights)]
    smallest = headers[areas.index(min(areas))]
    largest = headers[areas.index(max(areas))]
    return ImageStats(
        sampled=len(headers),
        min_size=(smallest[0], smallest[1]),
        median_size=(int(statistics.median(widths)), int(statistics.median(heights))),
        max_size=(largest[0], largest[1]),
        modes=dict(Counter(h[2] for h in headers).most_common()),
        formats=dict(Counter(h[3] for h in headers).most_common()),
    )


def _header(path: Path) -> tuple[int, int, str, str] | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size[0], image.size[1], image.mode, image.format or "?"
    except Exception:  # noqa: BLE001 - discover already left unreadable files out; a race must not stop init
        return None


# ---------------------------------------------------------------------------------------------
# Choosing


def choose_strategy(strategy: str, inspection: DataInspection) -> tuple[str, Advice | None]:
    """An explicit strategy as given; `auto`: recommend's rule on the measured size, similarity assumed."""
    if strategy == AUTO:
        thresholds = Thresholds()
        smallest = inspection.smallest_class[1]
        size, _ = judge_size(inspection.median_per_class, smallest, None, 0, 0, thresholds)
        advice = advise(size, similar=True)
        return advice.strategy, advice
    if strategy not in STRATEGIES:
        raise ConfigError(Problem("--strategy", f"unknown strategy '{strategy}'", did_you_mean(strategy, [AUTO, *STRATEGIES])))
    return strategy, None


def check_backbone_name(name: str) -> None:
    from transferctl.models.torchvision_models import classification_models  # torchvision: only here

    names = classification_models()
    if name not in names:
        raise ConfigError(Problem("--backbone", f"unknown model '{name}'", did_you_mean(name, names)))


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class InitResult:
    inspection: DataInspection
    strategy: str
    advice: Advice | None
    config_path: Path
    schema_path: Path
    text: str

    def to_dict(self) -> dict[str, Any]:
        advice = None
        if self.advice is not None:
            advice = {"size": self.advice.size, "similar": self.advice.similar, "assumed": ["similar"], "case": self.advice.case, "reasons": self.advice.reasons}
        return {
            "config": str(self.config_path),
            "schema": str(self.schema_path),
            "strategy": self.strategy,
            "advice": advice,
            "data": self.inspection.to_dict(),
        }


def init_experiment(data_dir: Path, output: Path, backbone: str = "resnet18", strategy: str = AUTO, force: bool = False, labels: Path | None = None) -> InitResult:
    """Inspect data_dir (with labels: the label file's rows) and write output (and the schema beside it); refuse to replace output unless force."""
    if output.exists() and not force:
        raise ConfigError(Problem(str(output), "already exists", "choose another file with -o, or pass --force to replace it"))
    if output.is_dir():
        raise ConfigError(Problem(str(output), "is a folder", "give a file name with -o, e.g. -o experiment.yaml"))
    blocking = file_in_the_way(output.parent)
    if blocking is not None:  # mkdir would say only 'File exists'
        raise ConfigError(Problem(str(output), f"cannot write: {blocking} is a file, not a folder", "give -o a path in a folder"))
    check_backbone_name(backbone)
    inspection = inspect_folder(data_dir, labels)
    chosen, advice = choose_strategy(strategy, inspection)
    text = experiment_text(inspection, data_dir, output, backbone, chosen, advice)
    schema_path = output.parent / SCHEMA_FILE
    _write_schema(schema_path)  # first: a schema that cannot be written must not leave a half-done init behind
    write_atomically(output, text, ConfigError)
    return InitResult(inspection, chosen, advice, output, schema_path, text)


def _write_schema(path: Path) -> None:
    """The schema the modeline points at, rewritten when this version's differs (it is generated, never edited)."""
    import json

    text = json.dumps(json_schema(), indent=2) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
        write_atomically(path, text, ConfigError)


def experiment_text(inspection: DataInspection, data_dir: Path, output: Path, backbone: str, strategy: str, advice: Advice | None) -> str:
    """The commented experiment file; validated here exactly as `check` will read it."""
    weights = "none" if strategy == "scratch" else "DEFAULT"
    root = _relative_to_file(data_dir, output)
    split = inspection.layout == "split"
    lines = [f"# yaml-language-server: $schema={SCHEMA_FILE}"]
    lines += [f"# {line}" for line in _header_lines(inspection, data_dir, output, strategy, advice)]
    lines += [
        _field("name", _experiment_name(inspection.root, backbone), "run folders are <output.dir>/<name>-<date>-<time>"),
        _field("seed", 0),
        "backbone:",
        _field("  name", backbone, "any torchvision classification model"),
        _field("  weights", weights, "DEFAULT | a torchvision weights name | .pt/.pth/.safetensors file | run:<run dir> | none"),
        "data:",
        _field("  root", str(root), "relative to this file"),
        *([_field("  labels", str(_relative_to_file(inspection.labels, output)), "the label file (path,label[,split]), relative to this file; its paths: to data.root")]
          if inspection.labels else []),
        _field("  val_fraction", 0.2, "not used: the data has train/ and val/ folders" if split else "held out of each class for validation"),
        _field("  image_size", None, _image_size_comment(inspection.images)),
        _field("  augment", "standard", "none | standard (random resized crops and flips while training) | randaugment | trivialaugment | autoaugment | augmix"),
        _field("  batch_size", 32),
        _field("  num_workers", "auto"),
        _field("  on_bad_image", "skip", "skip: leave unreadable images out | error: stop"),
        _field("strategy", strategy, "feature_extract | fine_tune | scratch | pretrained_init"),
        *([_field("task", "multi_label", "several labels an image (cat|dog): one sigmoid a class, BCEWithLogitsLoss")] if inspection.multi_label else []),
        _field("schedule:", None, f"{strategy}'s default; each phase gets a fresh optimizer", bare=True),
        *(_field(f"  - {_flow(_phase(phase))}", None, "train: head | all | last:N | [group, ...]" if i == 0 else "", bare=True) for i, phase in enumerate(default_schedule(strategy))),
        _field("optimizer", {"name": "adamw", "weight_decay": 1.0e-4}, "adamw | adam | sgd"),
        _field("scheduler", {"name": "cosine", "warmup_epochs": 0}, "cosine | constant; warm-up in epochs"),
        _early_stopping_field(inspection.multi_label),
        _field("device", "auto", "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps"),
        _field("precision", "auto", "auto (bf16 where the hardware has it) | fp32 | bf16 | fp16"),
        _field("output", {"dir": "runs"}, "relative to this file"),
        _field("logging", {"tensorboard": False}, "true: curves in <run>/tensorboard/ (pip install transferctl[tensorboard])"),
    ]
    text = "\n".join(lines) + "\n"
    config_from_dict(parse_yaml(text), source=str(output))  # never write a file check would refuse
    return text


def _early_stopping_field(multi_label: bool) -> str:
    if multi_label:  # val_acc of a multi-label run is subset accuracy (every label right): mAP ranks better
        return _field("early_stopping", {"metric": "val_map", "patience": None}, "val_map (mean average precision) | micro_f1 | macro_f1 | val_acc (every label right) | val_loss")
    return _field("early_stopping", {"metric": "val_acc", "patience": None}, "patience N: end a phase after N epochs without improvement")


def _relative_to_file(path: Path, output: Path) -> Path:
    """A path as the experiment file names it: relative to the file's folder (as given, when given absolute)."""
    return path if path.is_absolute() else Path(os.path.relpath(path.resolve(), output.resolve().parent))


def _header_lines(inspection: DataInspection, data_dir: Path, output: Path, strategy: str, advice: Advice | None) -> list[str]:
    smallest, smallest_count = inspection.smallest_class
    layout = {"split": "train/val" + ("/test" if "test" in inspection.counts else "") + " folders", "flat": "one folder per class, split 80/20 here",
              "labels": f"the label file {inspection.labels}, rows without a split column split 80/20 here"}[inspection.layout]  # fmt: skip
    measure = f"transferctl recommend --data {data_dir}" + (f" --labels {inspection.labels}" if inspection.labels else "")
    stats = inspection.images
    lines = [
        f"Written by `transferctl init {data_dir}`.",
        f"Data: {layout}; {len(inspection.classes)} classes, {inspection.total} images, median {inspection.median_per_class:g} per {inspection.per} "
        f"(train+val; smallest: {smallest}, {smallest_count}).",
    ]
    if inspection.multi_label:
        lines.append("Task: multi-label (some images have several labels): one sigmoid a class; the counts are images per label, "
                     "an image counting once for each of its labels.")
    if stats.sampled:
        modes = ", ".join(f"{mode} {count}" for mode, count in stats.modes.items())
        converted = "" if set(stats.modes) == {"RGB"} else "; all become RGB"
        sizes = f"all {_size(stats.min_size)}" if stats.min_size == stats.max_size else (
            f"median {_size(stats.median_size)}, from {_size(stats.min_size)} to {_size(stats.max_size)}"
        )
        sample = f" (a sample of {stats.sampled})" if stats.sampled < inspection.total else ""
        lines.append(f"Images{sample}: {sizes}; modes {modes}{converted}.")
    if inspection.unreadable:
        first = inspection.unreadable[0]
        what = "row(s) of the label file" if inspection.labels else "unreadable file(s)"
        lines.append(f"{len(inspection.unreadable)} {what} will be left out (data.on_bad_image: skip), e.g. {first.path} ({first.reason}).")
    if inspection.imbalance:
        lines.append(f"Warning: {inspection.imbalance}.")
    if advice is not None:
        lines.append(f"Strategy: {strategy}, by recommend's rule: {advice.reasons[0]}.")
        lines.append(
            f"The size was measured (small below {Thresholds().small_below} images per {inspection.per}, large from {Thresholds().large_from}); "
            f"the similarity to ImageNet photos was assumed. Measure it with: {measure}"
        )
    else:
        lines.append(f"Strategy: {strategy}, as asked. `{measure}` measures which one suits the data.")
    lines.append(f"Next: transferctl check {output}, then transferctl train {output}. Every field: transferctl schema.")
    return [wrapped for line in lines for wrapped in (textwrap.wrap(line, width=110, subsequent_indent="  ") or [""])]


def _image_size_comment(stats: ImageStats) -> str:
    comment = "null: the weights' own resize and crop"
    if stats.sampled and min(stats.median_size) < SMALL_IMAGE_SIDE:
        comment += f"; the images are small ({_size(stats.median_size)}): a small size such as {max(32, min(stats.median_size) // 8 * 8)} trains faster"
    return comment


def _field(key: str, value: Any, comment: str = "", bare: bool = False) -> str:
    text = key if bare else f"{key}: {_flow(value)}"
    return f"{text.ljust(COMMENT_COLUMN - 2)}  # {comment}" if comment else text


def _flow(value: Any) -> str:
    """One YAML value on one line, quoted only where YAML needs it."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _phase(phase: PhaseConfig) -> dict[str, Any]:
    data: dict[str, Any] = {"name": phase.name, "epochs": phase.epochs, "train": phase.train, "lr": phase.lr}
    if phase.backbone_lr_mult != 1.0:
        data["backbone_lr_mult"] = phase.backbone_lr_mult
    if phase.bn != "train":
        data["bn"] = phase.bn
    if phase.min_steps is not None:
        data["min_steps"] = phase.min_steps
    return data


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _experiment_name(root: Path, backbone: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", root.resolve().name).strip("-.") or "data"
    return f"{stem}-{backbone}"
