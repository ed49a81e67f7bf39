"""Label files: a CSV (path,label[,split]) or JSONL beside a folder of images, read into the same
DatasetSplits a class-per-folder tree gives, so every command downstream works unchanged.
See docs/experiment-file.md, Label files."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from transferctl.data.folders import SPLITS, BadImage, DatasetSplits, Sample, bad_rows, discover, find_bad_images, stratified_split
from transferctl.data.targets import MULTI_LABEL_SEPARATOR, Label, class_counts
from transferctl.errors import DataError, Problem
from transferctl.paths import shown

WHERE = "data.labels"


@dataclass(frozen=True)
class LabelRow:
    line: int  # the row's line in the file (the CSV header is line 1), for messages
    path: str
    labels: tuple[str, ...]  # one, or several for a multi-label image (cat|dog, or a JSON list)
    split: str
    unlabelled: bool = False  # a JSON list with no label: a multi-label image of none of the classes


def label_file_digest(path: Path) -> str:
    """A digest of the label file's bytes: the feature cache's key and resume's fingerprint cover it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def discover_data(
    root: Path, val_fraction: float, seed: int, on_bad_image: str = "skip", split: bool = True, labels: Path | None = None, task: str = "auto",
) -> DatasetSplits:  # fmt: skip
    """The one place that chooses where the classes come from: the label file data.labels names, or else
    the class folders below data.root (folders.discover); either way the same DatasetSplits. `task`
    (auto | single_label | multi_label): auto is multi-label where a label file gives an image several labels."""
    if labels is not None:
        return read_label_file(labels, root, val_fraction, seed, on_bad_image, split, task)
    splits = discover(root, val_fraction, seed, on_bad_image, split)
    if task != "multi_label":
        return splits
    # One class folder an image, trained with one sigmoid a class: an image may then belong to none of them.
    return replace(splits, train=_as_sets(splits.train), val=_as_sets(splits.val), test=_as_sets(splits.test), multi_label=True)


def _as_sets(samples: list[Sample]) -> list[Sample]:
    return [(path, (label,)) for path, label in samples]


def read_label_file(
    labels: Path, root: Path, val_fraction: float, seed: int, on_bad_image: str = "skip", split: bool = True, task: str = "auto",
) -> DatasetSplits:  # fmt: skip
    """The classes (sorted label names) and samples a label file names. Rows naming missing, duplicated or
    unreadable images, empty labels or unknown splits are skipped and listed (or, with on_bad_image 'error',
    stop everything); a path that leaves data.root is refused outright: the file would reach outside the data."""
    if not labels.is_file():
        raise DataError(Problem(WHERE, f"no such file: {shown(labels)}", "point data.labels at a .csv or .jsonl file, relative to the experiment file"))
    if not root.is_dir():
        raise DataError(Problem("data.root", f"no such folder: {shown(root)}", "point data.root at the folder the label file's paths start from"))
    root = root.resolve()
    kept, bad = _check_rows(_read_rows(labels), labels, root)
    unreadable = find_bad_images([root / row.path for row in kept])
    bad += [BadImage(root / row.path, f"line {row.line}: {unreadable[root / row.path]}") for row in kept if root / row.path in unreadable]
    kept = [row for row in kept if root / row.path not in unreadable]
    multi_label = _multi_label(kept, labels, task)
    if not multi_label:
        bad += [BadImage(root / row.path, f"line {row.line}: no label (an empty list: only multi-label runs take such images)") for row in kept if row.unlabelled]
        kept = [row for row in kept if not row.unlabelled]
    if bad and on_bad_image == "error":
        raise DataError(Problem(WHERE, f"{shown(labels)}: {bad_rows(bad)}", "fix or remove the rows, or set data.on_bad_image: skip to train without them"))
    classes = sorted({name for row in kept for name in row.labels})
    if len(classes) < 2:
        raise DataError(Problem(WHERE, f"{shown(labels)} needs at least two labels among its usable rows, found {classes or 'none'}", "label the images with two or more classes"))
    return _splits(kept, classes, root, val_fraction, seed, split, labels, tuple(bad), multi_label)


def _multi_label(rows: list[LabelRow], labels: Path, task: str) -> bool:
    """Multi-label when the task says so, or (auto) when some row gives several labels; task single_label
    refuses such a row, naming it, rather than training on one of its labels."""
    several = next((row for row in rows if len(row.labels) > 1), None)
    if task == "single_label" and several is not None:
        raise DataError(Problem(
            WHERE, f"{shown(labels)} line {several.line} gives {len(several.labels)} labels ({MULTI_LABEL_SEPARATOR.join(several.labels)}) and task is single_label",
            "set task: multi_label (or auto), or give each image one label",
        ))  # fmt: skip
    return task == "multi_label" or (task == "auto" and several is not None)


def _read_rows(labels: Path) -> list[LabelRow]:
    try:
        text = labels.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(Problem(WHERE, f"cannot read {shown(labels)}: {exc}", "save it as UTF-8 text")) from None
    if labels.suffix.lower() == ".jsonl":
        return _jsonl_rows(labels, text)
    if labels.suffix.lower() == ".csv":
        return _csv_rows(labels, text)
    raise DataError(Problem(WHERE, f"{shown(labels)}: unknown kind of label file", "use a .csv (path,label[,split]) or .jsonl file"))


def _csv_rows(labels: Path, text: str) -> list[LabelRow]:
    reader = csv.DictReader(text.splitlines())
    missing = [column for column in ("path", "label") if column not in (reader.fieldnames or [])]
    if missing:
        raise DataError(Problem(WHERE, f"{shown(labels)}: the header lacks {', '.join(missing)} (found {reader.fieldnames or 'none'})", "start the file with the header path,label[,split]"))
    return [LabelRow(reader.line_num, (row["path"] or "").strip(), _cell_labels(row["label"] or ""), (row.get("split") or "").strip()) for row in reader]


def _cell_labels(cell: str) -> tuple[str, ...]:
    """A cell's labels: 'cat', or 'cat|dog' for several (order and repeats do not matter)."""
    return tuple(sorted({name.strip() for name in cell.split(MULTI_LABEL_SEPARATOR) if name.strip()}))


def _jsonl_rows(labels: Path, text: str) -> list[LabelRow]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(Problem(WHERE, f"{shown(labels)} line {line}: not JSON ({exc.msg})", 'write one object a line: {"path": ..., "label": ...}')) from None
        if not isinstance(item, dict):
            raise DataError(Problem(WHERE, f"{shown(labels)} line {line}: not a JSON object", 'write one object a line: {"path": ..., "label": ...}'))
        label = item.get("label")
        names = tuple(sorted({_cell(name) for name in label} - {""})) if isinstance(label, list) else _cell_labels(_cell(label))
        rows.append(LabelRow(line, _cell(item.get("path")), names, _cell(item.get("split")), unlabelled=label == []))
    return rows


def _cell(value: object) -> str:
    return "" if value is None else str(value).strip()


def _check_rows(rows: list[LabelRow], labels: Path, root: Path) -> tuple[list[LabelRow], list[BadImage]]:
    """The usable rows, and the others with the reason; a path leaving root raises."""
    kept: list[LabelRow] = []
    bad: list[BadImage] = []
    seen: set[str] = set()
    for row in rows:
        _refuse_outside(row, labels, root)
        where = root / row.path
        reason = _row_problem(row, where, seen)
        seen.add(os.path.normpath(row.path))
        if reason:
            bad.append(BadImage(where, f"line {row.line}: {reason}"))
        else:
            kept.append(row)
    return kept, bad


def _refuse_outside(row: LabelRow, labels: Path, root: Path) -> None:
    target = Path(os.path.normpath(root / row.path)) if row.path else root
    if target != root and root not in target.parents:
        raise DataError(Problem(WHERE, f"{shown(labels)} line {row.line}: {shown(row.path)} leaves data.root", "name each image by its path below data.root"))


def _row_problem(row: LabelRow, where: Path, seen: set[str]) -> str | None:
    if not row.path:
        return "empty path"
    if os.path.normpath(row.path) in seen:
        return "duplicated path"
    if not row.labels and not row.unlabelled:
        return "empty label"
    if row.split and row.split not in SPLITS:
        return f"unknown split '{shown(row.split)}' (train, val or test)"
    if not where.is_file():
        return "no such image"
    return None


def _splits(rows: list[LabelRow], classes: list[str], root: Path, val_fraction: float, seed: int, split: bool, labels: Path,
            skipped: tuple[BadImage, ...], multi_label: bool) -> DatasetSplits:  # fmt: skip
    """Rows with a split go there; the others are split as a flat folder is (seeded, per class)."""
    index = {name: label for label, name in enumerate(classes)}
    given: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    unsplit: list[Sample] = []
    for row in rows:
        label: Label = tuple(index[name] for name in row.labels) if multi_label else index[row.labels[0]]
        sample = (root / row.path, label)
        (given[row.split] if row.split else unsplit).append(sample)
    train, val = stratified_split(unsplit, val_fraction, seed) if split and unsplit else (sorted(unsplit), [])
    if split:
        _refuse_missing(labels, classes, given["train"] + train, given["val"] + val)
    return DatasetSplits(root, classes, sorted(given["train"] + train), sorted(given["val"] + val), sorted(given["test"]), layout="labels",
                         skipped=skipped, label_file=labels, label_digest=label_file_digest(labels), multi_label=multi_label)  # fmt: skip


def _refuse_missing(labels: Path, classes: list[str], train: list[Sample], val: list[Sample]) -> None:
    """A class the model never sees in training, or no validation image at all, fails here with the file's
    name, not later as an epoch with nothing to measure (class folders cannot have either)."""
    untrained = sorted(set(range(len(classes))) - set(class_counts([label for _, label in train])))
    if untrained:
        names = ", ".join(classes[label] for label in untrained)
        raise DataError(Problem(WHERE, f"{shown(labels)}: no training rows for {names}", "leave the split of some of their rows empty, or set it to train"))
    if not val:
        raise DataError(Problem(WHERE, f"{shown(labels)}: no validation rows", "leave the split of some rows empty (data.val_fraction of them go to val), or set it to val"))
