"""The experiment file: YAML in, frozen typed objects out, every problem reported with its dotted path.

This module must not import torch: `check`-free commands such as `recommend` build configs too.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from transferctl.errors import ConfigError, Problem, clip, did_you_mean, quote
from transferctl.paths import checked, resolved

Strategy = Literal["feature_extract", "fine_tune", "scratch", "pretrained_init"]
STRATEGIES: tuple[str, ...] = ("feature_extract", "fine_tune", "scratch", "pretrained_init")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_TRAIN_PATTERN = re.compile(r"^(head|all|last:\d+)$")
PYTHON_PREFIX = "python:"  # backbone.name: python:package.module:function, your own nn.Module
PYTHON_FIELDS = ("head", "groups", "mean", "std")  # backbone fields only python: backbones have: what their code does not say
TIMM_PREFIX = "timm:"  # backbone.name: timm:<model>, with the optional timm package
RUN_PREFIX = "run:"  # backbone.weights: run:<run dir>, an earlier run's best checkpoint
WEIGHTS_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


MAX_SEED = 2**63 - 1  # torch's generators take seeds of 64 bits
MAX_BATCH = 65_536  # images per step: more than any accelerator holds
MAX_EPOCHS = 100_000  # epochs of a phase, or between unfreezing steps or improvements
MAX_MEMORY_MB = 2**30  # a mebibyte budget of a pebibyte: anything above is a typo
MAX_WORKERS = 1024  # data-loading processes


class _FieldError(ValueError):
    """A validator's error about a field inside the value it checks: `loc` goes after the value's own path."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class _Section(BaseModel):
    # No inf or nan anywhere: `lr: .inf` would train on nothing but NaN, and `checkpoint_seconds: .nan` never save.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1: `batch_size: true` would train with batches of one, silently."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation in (int, float) or {int, float} & set(get_args(annotation)):
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _whole_floats_are_ints(cls, value: Any, info: ValidationInfo) -> Any:
        """`batch_size: 1.0e+20` is the whole number it says, so that the field's range check refuses it by
        its bounds (pydantic's own message speaks of parsing a string)."""
        if isinstance(value, float) and value.is_integer() and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is int or (int in get_args(annotation) and float not in get_args(annotation)):
                return int(value)
        return value


WeightsKind = Literal["none", "hub", "file", "run"]


@dataclass(frozen=True)
class WeightsSource:
    """`backbone.weights` parsed once: no weights, a hub's (DEFAULT, a torchvision weights name or a timm tag),
    a local state-dict file, or an earlier run's best checkpoint. transferctl.models turns it into tensors."""

    kind: WeightsKind
    value: str = ""  # hub: the weights name; file: the file; run: the run directory

    @property
    def path(self) -> Path:
        return Path(self.value)

    def moved_to(self, path: Path | str) -> WeightsSource:
        """The same file or run at another path (resolved, or made relative)."""
        return replace(self, value=str(path))

    def __str__(self) -> str:
        """As an experiment file writes it."""
        return {"none": "none", "run": RUN_PREFIX + self.value}.get(self.kind, self.value)


NO_WEIGHTS = WeightsSource("none")


def parse_weights(text: str) -> WeightsSource:
    if text.lower() == "none":
        return NO_WEIGHTS
    if text.startswith(RUN_PREFIX):
        return WeightsSource("run", text[len(RUN_PREFIX) :])
    if text.endswith(WEIGHTS_FILE_SUFFIXES) or "/" in text:
        return WeightsSource("file", text)
    return WeightsSource("hub", text)


class BackboneConfig(_Section):
    name: str = Field("resnet18", description="any torchvision classification model (`transferctl check` lists its layer groups)")
    weights: str = Field(
        "DEFAULT",
        description="DEFAULT | a torchvision weights name | path to a state-dict file | run:<run dir> | none",
    )
    cut: str | None = Field(None, description="keep the backbone up to and including this layer group")
    # Only for `python:` backbones (your own model); torchvision and timm models know their own.
    head: str | None = Field(None, description="python: backbones: attribute path of the classification layer (e.g. fc)")
    groups: dict[str, list[str]] | None = Field(
        None, description="python: backbones: layer groups from the input side, name -> module prefixes (default: one group 'body')"
    )
    mean: tuple[float, float, float] | None = Field(None, description="python: backbones: normalisation mean (default ImageNet's)")
    std: tuple[float, float, float] | None = Field(None, description="python: backbones: normalisation std (default ImageNet's)")

    @field_validator("weights", mode="before")
    @classmethod
    def _null_is_none(cls, value: Any) -> Any:
        """`weights: null` (or empty) means no weights, as `none` does: YAML's word for nothing."""
        return "none" if value is None else value

    @property
    def weights_source(self) -> WeightsSource:
        return parse_weights(self.weights)

    @model_validator(mode="after")
    def _custom_fields_need_python(self) -> BackboneConfig:
        if not self.name.startswith(PYTHON_PREFIX):
            given = [field for field in PYTHON_FIELDS if getattr(self, field) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to python:module:function backbones; {clip(self.name)} knows its own")
        elif self.head is None:
            raise ValueError(f"{clip(self.name)} needs backbone.head: the attribute path of its classification layer (e.g. fc)")
        return self


# standard: random resized crops and flips; the others add torchvision's policy of that name to standard (data/folders.py).
Augment = Literal["none", "standard", "randaugment", "trivialaugment", "autoaugment", "augmix"]
AUGMENTS: tuple[str, ...] = get_args(Augment)


class DataConfig(_Section):
    root: Path = Field(description="root/train/<class>/*, root/val/<class>/* (optional root/test), or root/<class>/*; relative to the experiment file")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each class held out for validation when root has no train/ and val/ folders")
    image_size: int | None = Field(None, ge=8, le=4096, description="crop size; null: the weights' own preprocessing")
    augment: Augment = Field(
        "standard",
        description="standard: random resized crops and flips while training; randaugment | trivialaugment | autoaugment | augmix: "
                    "standard, then torchvision's policy of that name",
    )  # fmt: skip
    random_erasing: float | None = Field(
        None, gt=0.0, le=1.0, description="probability of erasing a random rectangle of each training image (torchvision's RandomErasing); null: never"
    )
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="images per step, over all processes")
    num_workers: Union[int, Literal["auto"]] = Field("auto", description="data-loading processes, or auto")
    on_bad_image: Literal["skip", "error"] = Field("skip", description="skip: leave unreadable images out (listed before training); error: stop")
    cache: Literal["auto", "off", "memory", "disk"] = Field(
        "auto", description="features of the frozen backbone, computed once for head-only phases: auto | off | memory | disk (see docs/performance.md, Speed)"
    )
    cached_views: int = Field(
        1, ge=1, le=64, description="views cached per image with augmentation: the clean centre crop, then augmented views (one is drawn per epoch)"
    )
    cache_memory_mb: int = Field(1024, ge=0, le=MAX_MEMORY_MB, description="RAM budget of each in-memory cache (features, decoded images); larger goes to disk or is decoded again")
    labels: Path | None = Field(
        None, description="a .csv (path,label[,split]) or .jsonl label file, relative to the experiment file; its paths are relative to data.root; null: class folders"
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle",
        description="shuffle: every training image once an epoch; balanced: as many draws, with replacement, each class equally likely "
                    "(WeightedRandomSampler's weights)",
    )  # fmt: skip

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers_auto_or_a_count(cls, value: Any) -> Any:
        """One message for every wrong value (pydantic's own would name only one of the two kinds)."""
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_WORKERS):
            return value
        raise ValueError(f"must be 'auto' or a number from 0 to {MAX_WORKERS}")

    @field_validator("root", mode="before")
    @classmethod
    def _root_named(cls, value: Any) -> Any:
        return _a_path(value)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_named(cls, value: Any) -> Any:
        """A label file's kind is its suffix: anything else (a number, a folder) is refused with the field's name, before any reading."""
        if value is None:
            return value
        if not isinstance(value, (str, Path)) or not str(value).strip().lower().endswith((".csv", ".jsonl")):
            raise ValueError("must be a .csv or .jsonl file (or null: class folders)")
        return value

    @property
    def random_views(self) -> bool:
        """Whether a training image looks different each time it is drawn (augmentation or erasing)."""
        return self.augment != "none" or self.random_erasing is not None


class PlateauConfig(_Section):
    patience: int = Field(ge=1, le=MAX_EPOCHS, description="epochs without improvement of early_stopping.metric before the phase ends")


class MixupConfig(_Section):
    alpha: float = Field(0.2, gt=0.0, description="each batch is blended with itself shifted by one, weight ~ Beta(alpha, alpha) (torchvision's MixUp)")


class CutmixConfig(_Section):
    alpha: float = Field(1.0, gt=0.0, description="a box of each image is pasted from the next one, area ~ Beta(alpha, alpha) (torchvision's CutMix)")


class EmaConfig(_Section):
    decay: float = Field(
        0.999, gt=0.0, lt=1.0, description="after each step average = decay x average + (1 - decay) x weights; about 1 / (1 - decay) steps are averaged"
    )


class PhaseConfig(_Section):
    name: str
    epochs: int = Field(ge=1, le=MAX_EPOCHS)
    train: Union[str, list[str]] = Field("all", description="head | all | last:N | a list of layer-group names (the head always trains)")
    lr: Union[float, Literal["auto"]] = Field(
        description="learning rate of the head; the backbone's is lr x backbone_lr_mult; auto: `transferctl lr-find`'s suggestion, "
                    "found when the run starts and written into its config.yaml",
    )  # fmt: skip
    backbone_lr_mult: float = Field(1.0, gt=0.0, le=1.0)
    bn: Literal["train", "frozen"] = Field("train", description="frozen: every BatchNorm layer stays in eval mode")
    unfreeze_every: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description="gradual unfreezing: start with the head, unfreeze one more layer group (from the top) every K epochs"
    )
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description="each layer group's lr x layer_decay^(groups between it and the head)")
    until_plateau: PlateauConfig | None = Field(None, description="end this phase early when the monitored metric stops improving")
    min_steps: int | None = Field(
        None, ge=1, le=10**7,
        description="the phase trains at least this many optimizer steps: on a small training set it runs more epochs than `epochs` "
                    "(null: exactly `epochs`)",
    )  # fmt: skip
    solver: Literal["auto", "minibatch"] = Field(
        "auto",
        description="auto: a phase (or unfreezing step) that trains only a linear head on cached features solves it to convergence "
                    "(L-BFGS, weight decay chosen by cross-validation on the training images; lr unused); "
                    "minibatch: the optimizer's steps at lr, as for any other phase",
    )  # fmt: skip
    mixup: MixupConfig | None = Field(None, description="this phase's mixup, in place of the run's; null: the run's mixup")
    cutmix: CutmixConfig | None = Field(None, description="this phase's cutmix, in place of the run's; null: the run's cutmix")

    @field_validator("train")
    @classmethod
    def _train_spec(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and not _TRAIN_PATTERN.match(value):
            raise ValueError("must be head, all, last:N or a list of layer-group names")
        if isinstance(value, list) and not value:
            raise ValueError("an empty list trains nothing; name at least one layer group")
        return value

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_number_or_auto(cls, value: Any) -> Any:
        """A number above 0, or the word auto; one message for anything else (a union's would be two)."""
        if value == "auto":
            return value
        wrong = ValueError("must be a number above 0, or auto (found by the learning-rate range test)")
        if isinstance(value, bool):
            raise wrong
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise wrong from None
        if not math.isfinite(number):
            raise ValueError("Input should be a finite number")  # as every other number field says
        if number <= 0:
            raise wrong
        return number


class OptimizerConfig(_Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(1.0e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)


class SchedulerConfig(_Section):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)


ClassWeights = Union[Literal["none", "balanced"], list[float]]
MAX_CLASS_WEIGHT = 1.0e6


class LossConfig(_Section):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="share of each target spread evenly over the classes (nn.CrossEntropyLoss's label_smoothing)")
    class_weights: ClassWeights = Field(
        "none",
        description="none | balanced (scikit-learn's compute_class_weight on the training images) | one weight per class, in the order of the class folders' names",
    )

    @field_validator("class_weights", mode="before")
    @classmethod
    def _none_balanced_or_weights(cls, value: Any) -> Any:
        """One message for every wrong value (pydantic's own gives one line per branch of the Union); null is none."""
        if value is None or value in ("none", "balanced"):
            return "none" if value is None else value
        if isinstance(value, list) and value and all(_positive_number(weight) for weight in value):
            return [float(weight) for weight in value]
        raise ValueError(f"must be none, balanced or a list of weights above 0 (at most {MAX_CLASS_WEIGHT:g}), one per class")


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_CLASS_WEIGHT


class EarlyStoppingConfig(_Section):
    metric: Literal["auto", "val_acc", "val_loss", "balanced_acc", "macro_f1", "val_map", "micro_f1"] = Field(
        "auto",
        description="what early stopping and best.pt follow: auto (val_acc, or val_map for a multi-label run) | val_acc | val_loss | "
                    "balanced_acc | macro_f1 (of the validation images); multi-label runs also: val_map | micro_f1 (val_acc: every label right)",
    )  # fmt: skip
    patience: int | None = Field(None, ge=1, le=MAX_EPOCHS)


class OutputConfig(_Section):
    dir: Path = Field(Path("runs"), description="runs go to <dir>/<name>-<YYYYmmdd-HHMMSS>; relative to the experiment file")
    checkpoint_seconds: float = Field(
        30.0, ge=0,
        description="checkpoints and metric files are written at the end of every phase and, within a phase, after the first epoch "
                    "that ends this many seconds after the last write (0: after every epoch); stopping writes the last finished epoch",
    )  # fmt: skip

    @field_validator("dir", mode="before")
    @classmethod
    def _dir_named(cls, value: Any) -> Any:
        return _a_path(value)


def _a_path(value: Any) -> Any:
    """An empty path (`--set data.root=`, `root: ""`) would mean the experiment file's own folder, silently."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("is empty: name a folder")
    if not isinstance(value, (str, Path)):
        raise ValueError("must be a folder path")
    return value


class LoggingConfig(_Section):
    tensorboard: bool = Field(False, description="per-epoch scalars into <run>/tensorboard/ (pip install transferctl[tensorboard])")
    mlflow: bool = Field(False, description="params, per-epoch metrics and the run's files into MLflow: MLFLOW_TRACKING_URI or its default store (pip install transferctl[mlflow])")


class ExperimentConfig(_Section):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = Field(0, ge=-MAX_SEED - 1, le=MAX_SEED)
    backbone: BackboneConfig = BackboneConfig()
    data: DataConfig
    strategy: Strategy = Field("fine_tune", description="feature_extract | fine_tune | scratch | pretrained_init")
    task: Literal["auto", "single_label", "multi_label"] = Field(
        "auto", description="auto: multi_label where data.labels gives an image several labels (cat|dog), else single_label; multi_label: one sigmoid a class"
    )
    schedule: list[PhaseConfig] | None = Field(None, description="the phases; null or absent: the strategy's default schedule")
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    loss: LossConfig = LossConfig()
    # The pattern is for editors (JSON Schema); _device_spec gives the error message.
    device: str = Field("auto", description="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps", json_schema_extra={"pattern": DEVICE_PATTERN.pattern})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 where the hardware has it, else fp32")
    compile: bool = Field(False, description="torch.compile the model (pays off on GPUs for long runs; the first steps are slow)")
    output: OutputConfig = OutputConfig()
    logging: LoggingConfig = LoggingConfig()
    mixup: MixupConfig | None = Field(None, description="mix pairs of training images and their labels (soft targets) in every phase; null: never")
    cutmix: CutmixConfig | None = Field(None, description="paste a box of one training image into another in every phase; with mixup, each batch gets one of the two")
    ema: EmaConfig | None = Field(None, description="keep an exponential moving average of the weights, evaluated each epoch beside them; null: none")

    @field_validator("device")
    @classmethod
    def _device_spec(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule_not_empty(cls, value: list[PhaseConfig] | None) -> list[PhaseConfig] | None:
        if value is not None and not value:
            raise ValueError("an empty schedule trains nothing; remove it to use the strategy's default")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule_fits_strategy(cls, value: list[PhaseConfig] | None, info: ValidationInfo) -> list[PhaseConfig] | None:
        """feature_extract keeps the pretrained body as it is; scratch has no body worth keeping frozen."""
        strategy = info.data.get("strategy")  # absent when the strategy itself is invalid
        for index, phase in enumerate(value or ()):
            if strategy == "feature_extract" and phase.train != "head":
                raise _FieldError(
                    (index, "train"),
                    f"feature_extract trains only the new head, but phase {quote(phase.name)} has train: {quote(phase.train)}; "
                    "use strategy fine_tune to train backbone layers",
                )
            if strategy == "scratch" and phase.train == "head":
                raise _FieldError(
                    (index, "train"),
                    f"scratch starts the body from random weights, and phase {quote(phase.name)} would train only the head "
                    "on its random features; use train: all, or strategy fine_tune to keep pretrained weights",
                )
        return value

    @property
    def loads_pretrained_weights(self) -> bool:
        """scratch ignores the weights entry: the network starts from random values."""
        return self.strategy != "scratch" and self.backbone.weights_source.kind != "none"


# Optimizer steps a default phase that trains the body takes at the least: 20 images a class of 5 classes
# are 4 steps an epoch, and 10 epochs of them left the network far short of a plain 30-epoch loop
# (docs/quality.md).
DEFAULT_MIN_STEPS = 300
# fine_tune's pretrained layers train at half the head's rate: at a tenth, 300 steps left the body where it
# was (0.886 on the digits, where a plain loop training everything at one rate reached 0.940); at half,
# 0.930 and 0.947 for two seeds.
FINE_TUNE_BODY_LR_MULT = 0.5


def default_schedule(strategy: str) -> list[PhaseConfig]:
    """The phases each strategy prescribes when the experiment file gives no schedule."""
    if strategy == "feature_extract":
        return [PhaseConfig(name="head", epochs=10, train="head", lr=1.0e-3)]
    if strategy == "fine_tune":
        return [
            PhaseConfig(name="head", epochs=3, train="head", lr=1.0e-3),
            PhaseConfig(name="body", epochs=5, train="all", lr=1.0e-3, backbone_lr_mult=FINE_TUNE_BODY_LR_MULT, min_steps=DEFAULT_MIN_STEPS),
        ]
    return [PhaseConfig(name="all", epochs=10, train="all", lr=1.0e-3, min_steps=DEFAULT_MIN_STEPS)]


def schedule_of(config: ExperimentConfig) -> list[PhaseConfig]:
    return list(config.schedule) if config.schedule else default_schedule(config.strategy)


SCHEMA_FILE = "transferctl.schema.json"  # where `transferctl init` puts the schema, beside the experiment file


def json_schema() -> dict[str, Any]:
    """The experiment file's JSON Schema, from the very model that validates it (for editors and CI).

    It leaves out the cross-field rules (feature_extract trains only the head) and, unlike validation,
    does not coerce types: a quoted "32" where a number belongs is flagged by editors, accepted by check.
    """
    schema = ExperimentConfig.model_json_schema()
    schema["title"] = "transferctl experiment file"
    schema["description"] = "Transfer learning for image classification: one YAML file, one command."
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment file; raise ConfigError naming every problem."""
    raw = read_yaml(path)
    # schedule.* last (in their order): `--set schedule.1.epochs=10` on a file without a schedule edits the
    # default schedule of the strategy the other overrides leave.
    for override in sorted(overrides, key=lambda text: text.strip().startswith("schedule.")):
        apply_override(raw, override)
    return config_from_dict(raw, source=str(path), base_dir=path.parent)


class ExperimentLoader(yaml.SafeLoader):
    """YAML as an experiment file means it.

    Only true and false are booleans (YAML 1.2): YAML 1.1 also reads off, on, yes and no as booleans, which
    would turn the documented `cache: off` into false. Boolean fields still take those words (pydantic
    converts them). A key given twice is an error: YAML keeps the last one without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys may be overridden; SafeLoader refuses unhashable keys itself
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key '{key_node.value}' is given twice", key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_alias_bombs(node)
        return super().construct_document(node)


MAX_YAML_VALUES = 10_000  # of an experiment file with its aliases expanded; real ones hold a few hundred


class YamlTooLarge(yaml.YAMLError):
    """The document's aliases expand to more values than an experiment file can need (an alias bomb)."""


def _refuse_alias_bombs(root: yaml.Node) -> None:
    """Count the values the document holds once every alias is expanded, without expanding any.

    The YAML itself stays small: nine lines of nine aliases each is 9^9 values, and every message and check
    that walks or prints the value then takes gigabytes. Each node's count is computed once (aliases share
    their node), so this takes time in the size of the file.
    """
    counts: dict[int, int] = {}

    def count(node: yaml.Node, open_nodes: set[int]) -> int:
        if id(node) in counts:
            return counts[id(node)]
        if id(node) in open_nodes:
            raise YamlTooLarge("an alias refers to a value that contains it")
        open_nodes.add(id(node))
        children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else node.value
        total = 1 + (sum(count(child, open_nodes) for child in children) if isinstance(node, yaml.CollectionNode) else 0)
        open_nodes.discard(id(node))
        if total > MAX_YAML_VALUES:
            raise YamlTooLarge(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
        counts[id(node)] = total
        return total

    count(root, set())


ExperimentLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ExperimentLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ExperimentLoader)  # noqa: S506 - a SafeLoader


def read_yaml(path: Path) -> dict[str, Any]:
    if not checked(path, ConfigError).is_file():
        raise ConfigError(Problem(str(path), "no such file", "check the path to the experiment file"))
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except YamlTooLarge as exc:
        raise ConfigError(Problem(str(path), f"refused: {exc}", "write the values out; an experiment file needs no deep aliases")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(path, exc)) from None
    except RecursionError:  # PyYAML composes nested values recursively
        raise ConfigError(Problem(str(path), "refused: values nested too deeply", "an experiment file nests a few levels")) from None
    except UnicodeDecodeError:
        raise ConfigError(Problem(str(path), "is not a UTF-8 text file", "save it as UTF-8 YAML")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(Problem(str(path), "must be a YAML mapping of fields", "see configs/ for examples"))
    return data


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> Problem:
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "could not determine a constructor" in str(exc):
        return Problem(where, "YAML tags that build Python objects are not allowed", "use plain values")
    if "given twice" in str(reason):
        return Problem(where, reason, "keep one of them")
    return Problem(where, f"invalid YAML: {reason}", "fix the syntax at that line")


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.path=value` override in place; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(Problem("--set", f"{quote(override)} is not key.path=value", "e.g. --set data.batch_size=16"))
    try:
        value = parse_yaml(text) if text.strip() else None
    except (YamlTooLarge, RecursionError):
        raise ConfigError(Problem(f"--set {clip(key)}", "refused: the value expands or nests beyond what a field can hold", "give a plain value")) from None
    except yaml.YAMLError:
        value = text
    node: Any = raw
    parts = key.strip().split(".")
    if parts[0] == "schedule" and len(parts) > 1 and raw.get("schedule") is None:
        raw["schedule"] = [phase.model_dump(mode="json", exclude_defaults=True) for phase in default_schedule(str(raw.get("strategy", "fine_tune")))]
    for part in parts[:-1]:
        node = _child_for_override(node, part, key)
    _set_child(node, parts[-1], value, key)


def _child_for_override(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(Problem(f"--set {key}", f"'{part}' is inside a value that is not a mapping"))
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _set_child(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        node[_list_index(node, part, key)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(Problem(f"--set {key}", f"'{part}' is inside a value that is not a mapping"))


def _list_index(node: list[Any], part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(Problem(f"--set {key}", f"'{part}' is not an index of a list of {len(node)} items"))
    return int(part)


MAX_PROBLEMS = 20  # reported of one file: a list of a thousand wrong items needs one line, not a thousand


def config_from_dict(raw: dict[str, Any], source: str = "<config>", base_dir: Path | None = None) -> ExperimentConfig:
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_pydantic_problem(source, error) for error in exc.errors()[:MAX_PROBLEMS]]
        if exc.error_count() > MAX_PROBLEMS:
            problems.append(Problem(source, f"and {exc.error_count() - MAX_PROBLEMS} more problems", "fix the ones above first"))
        raise ConfigError(*problems) from None
    return _resolve_paths(config, base_dir) if base_dir is not None else config


def _resolve_paths(config: ExperimentConfig, base_dir: Path) -> ExperimentConfig:
    """Relative paths in the file mean 'relative to the file', not to wherever the shell happens to be."""

    def resolve(path: Path, field: str) -> Path:
        return path if path.is_absolute() else resolved(base_dir / path, ConfigError, field)

    source = config.backbone.weights_source
    weights = str(source.moved_to(resolve(source.path, "backbone.weights"))) if source.kind in ("file", "run") else config.backbone.weights
    return config.model_copy(
        update={
            "data": config.data.model_copy(update={"root": resolve(config.data.root, "data.root"),
                                                   "labels": config.data.labels and resolve(config.data.labels, "data.labels")}),
            "output": config.output.model_copy(update={"dir": resolve(config.output.dir, "output.dir")}),
            "backbone": config.backbone.model_copy(update={"weights": weights}),
        }
    )


def _pydantic_problem(source: str, error: dict[str, Any]) -> Problem:
    raised = error.get("ctx", {}).get("error")
    location = [str(part) for part in (*error["loc"], *getattr(raised, "loc", ()))]
    # pydantic reports the branch of a Union it tried ("train.str"); users never wrote that part.
    location = [part for part in location if part not in {"str", "int", "list[str]", "literal['auto']"}]
    dotted = _dotted(location)
    where = f"{source}: {dotted}" if dotted else source
    kind = error["type"]
    if kind == "extra_forbidden":
        return Problem(where, "unknown field", _field_hint(location))
    if kind == "missing":
        return Problem(where, "is required", "add it to the experiment file")
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if kind == "value_error" and isinstance(value, (dict, list)):
        return Problem(where, message)  # our own check of a section or list, whose message names what is wrong
    if kind == "literal_error" and isinstance(value, str):
        # A misspelt choice (augment: randaug) gets the closest one named, as a misspelt field does.
        close = difflib.get_close_matches(value, re.findall(r"'([^']*)'", error["ctx"]["expected"]), n=1)
        return Problem(where, f"{message} (got {quote(value)})", f"did you mean '{close[0]}'?" if close else "")
    return Problem(where, f"{message} (got {quote(value)})")


def _dotted(location: list[str]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text


def _field_hint(location: list[str]) -> str:
    model: type[BaseModel] = ExperimentConfig
    for part in location[:-1]:
        if part.isdigit():
            continue
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        nested = _model_in(annotation)
        if nested is None:
            return "remove it"
        model = nested
    return did_you_mean(location[-1], list(model.model_fields))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


MULTI_LABEL_METRICS = ("val_map", "micro_f1")  # early_stopping.metric choices that only multi-label rows have


def config_for_task(config: ExperimentConfig, multi_label: bool) -> ExperimentConfig:
    """The config a run trains and records once its data says which task it is: early_stopping.metric auto
    becomes val_acc, or for a multi-label run val_map, and a multi-label run says task: multi_label; options
    made for one class an image are refused in one line each (ConfigError)."""
    metric = config.early_stopping.metric
    if not multi_label and metric in MULTI_LABEL_METRICS:
        raise ConfigError(Problem("early_stopping.metric", f"{metric} is for multi-label runs, and this data has one label an image",
                                  "use val_acc, val_loss, balanced_acc or macro_f1, or set task: multi_label"))  # fmt: skip
    if multi_label:
        _refuse_single_label_options(config)
    resolved = auto_metric(multi_label) if metric == "auto" else metric
    task = "multi_label" if multi_label else config.task
    return config.model_copy(update={"task": task, "early_stopping": config.early_stopping.model_copy(update={"metric": resolved})})


def auto_metric(multi_label: bool) -> str:
    """What early_stopping.metric auto follows."""
    return "val_map" if multi_label else "val_acc"


def _refuse_single_label_options(config: ExperimentConfig) -> None:
    def refuse(field: str, what: str, fix: str = "remove it: multi-label runs train one sigmoid a class") -> None:
        raise ConfigError(Problem(field, f"{what} (task: multi_label)", fix))

    if config.early_stopping.metric == "balanced_acc":
        refuse("early_stopping.metric", "balanced_acc needs one label an image", "use val_map, micro_f1 or macro_f1")
    if config.loss.label_smoothing > 0:
        refuse("loss.label_smoothing", "is for single-label runs")
    if config.data.sampler == "balanced":
        refuse("data.sampler", "balanced draws by each image's one class, and multi-label images have several",
               "use loss.class_weights: balanced, which weighs each class's positives")  # fmt: skip
    sections = [("", config), *((f"schedule[{index}].", phase) for index, phase in enumerate(config.schedule or []))]
    for prefix, section in sections:
        for kind in ("mixup", "cutmix"):
            if getattr(section, kind) is not None:
                refuse(prefix + kind, "mixes one-class targets (torchvision's MixUp and CutMix), and these images have several labels")


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Plain data for writing back to YAML (paths as strings, the resolved schedule spelled out)."""
    data = config.model_dump(mode="json")
    data["schedule"] = [phase.model_dump(mode="json") for phase in schedule_of(config)]
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested sections as dotted field names (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
