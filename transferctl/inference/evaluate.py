"""evaluate: how good a trained model is on a split, class by class, with a confusion matrix plot (a
multi-label run: mAP, F1 at its tuned thresholds and at 0.5, and per-class precision-recall curves).

The metrics are scikit-learn's; only the expected calibration error is computed here (no library has
the standard multi-class, equal-width-bin version). `compute_metrics` works on plain arrays, so it is
tested against hand-computed cases; `evaluate_run` composes loading, inference and writing.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferctl.data.folders import DatasetSplits, ImageDataset, Sample, data_notices, lookalikes, make_loader, resolve_workers
from transferctl.data.label_files import discover_data
from transferctl.errors import DataError, Problem

if TYPE_CHECKING:
    from transferctl.inference.trained_model import RunTask

ECE_BINS = 15
SPLIT_CHOICES = ("val", "test", "train", "all")


# ---------------------------------------------------------------------------------------------
# Metrics on arrays


def compute_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, top-5, loss, per-class precision/recall/F1/support, F1 averages, confusion, ECE."""
    from scipy.special import softmax
    from sklearn import metrics

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = len(classes)
    ids = list(range(n_classes))
    probs = softmax(logits, axis=1)
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(labels, predicted, labels=ids, zero_division=0)
    calibration = calibration_bins(probs.max(axis=1), predicted == labels)
    return {
        "images": int(labels.size),
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "top5_accuracy": float(metrics.top_k_accuracy_score(labels, probs, k=5, labels=ids)) if n_classes > 5 else None,
        "loss": float(metrics.log_loss(labels, probs, labels=ids)),
        "macro_f1": float(metrics.f1_score(labels, predicted, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(metrics.f1_score(labels, predicted, labels=ids, average="weighted", zero_division=0)),
        "ece": expected_calibration_error(calibration),
        "per_class": [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        ],
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=ids).tolist(),
        "calibration": calibration,
    }


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Equal-width confidence bins (lower, upper], each with its count, accuracy and mean confidence."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # right=True puts a confidence exactly on an edge into the bin below it, as (lower, upper] says.
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append({
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": count,
            "accuracy": float(correct[members].mean()) if count else None,
            "confidence": float(confidence[members].mean()) if count else None,
        })  # fmt: skip
    return rows


def expected_calibration_error(bins: list[dict[str, Any]]) -> float:
    """ECE = sum over bins of (bin size / N) * |accuracy - mean confidence| (Guo et al. 2017)."""
    total = sum(b["count"] for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def compute_multi_label_metrics(scores: np.ndarray, targets: np.ndarray, classes: list[str], thresholds: Any) -> dict[str, Any]:
    """A multi-label run's numbers from sigmoid scores and multi-hot targets (training/multi_label_metrics.py):
    mAP (over the classes with a positive image), micro and macro F1 and subset accuracy at the thresholds
    and at 0.5, each class's AP, precision, recall, F1, support and threshold, and the mean binary cross-entropy."""
    import torch
    from sklearn import metrics

    from transferctl.inference.error_gallery import image_losses
    from transferctl.training.multi_label_metrics import DEFAULT_THRESHOLD, average_precisions, decisions, report

    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    tuned, default = report(targets, scores, thresholds), report(targets, scores, DEFAULT_THRESHOLD)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(targets.astype(bool), decisions(scores, thresholds), zero_division=0)
    return {
        "task": "multi_label",
        "images": len(targets),
        "map": _number(tuned["map"]),
        "micro_f1": tuned["micro_f1"],
        "macro_f1": tuned["macro_f1"],
        "subset_accuracy": tuned["subset_accuracy"],
        "accuracy": tuned["subset_accuracy"],  # every label right: what `runs` and `show` list for any evaluation
        "loss": float(image_losses(torch.from_numpy(scores), torch.from_numpy(targets)).mean()),
        "at_default_threshold": {"threshold": DEFAULT_THRESHOLD, **{key: value for key, value in default.items() if key != "map"}},
        "per_class": [
            {"class": name, "ap": _number(ap), "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n), "threshold": float(t)}
            for name, ap, p, r, f, n, t in zip(classes, average_precisions(targets, scores), precision, recall, f1, support, thresholds)
        ],
    }


def _number(value: float) -> float | None:
    """None where a metric is undefined (NaN: a class without a positive image has no AP): JSON has no NaN."""
    return None if np.isnan(value) else float(value)


# ---------------------------------------------------------------------------------------------
# The confusion matrix plot


def confusion_png(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    """A heat map coloured by row (the share of each true class), the counts written in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    n = len(classes)
    side = min(4.0 + 0.45 * n, 30.0)
    # No pyplot: a bare Figure has no global state and needs no display, whatever the backend setting.
    figure = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    axes.set_xticks(range(n), labels=classes, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    axes.set_yticks(range(n), labels=classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if n <= 40:
        font = max(5, 11 - n // 5)
        for row in range(n):
            for col in range(n):
                dark = shares[row, col] > 0.5
                axes.text(col, row, str(counts[row, col]), ha="center", va="center", fontsize=font, color="white" if dark else "black")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def pr_curves_png(scores: np.ndarray, targets: np.ndarray, classes: list[str], thresholds: Any, title: str) -> bytes:
    """A multi-label run's precision-recall curve of each class (scikit-learn's), its threshold's point marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, precision_score, recall_score

    figure = Figure(figsize=(7.5, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for column, (name, threshold) in enumerate(zip(classes, thresholds)):
        positive = np.asarray(targets)[:, column] > 0
        if not positive.any():
            continue  # no positive image: no curve to draw
        precision, recall, _ = precision_recall_curve(positive, scores[:, column])
        (line,) = axes.step(recall, precision, where="post", label=name if len(classes) <= 20 else None)
        given = np.asarray(scores)[:, column] >= threshold
        at = (recall_score(positive, given, zero_division=0), precision_score(positive, given, zero_division=0))
        axes.plot(*at, "o", color=line.get_color(), markeredgecolor="black")
    axes.set(xlabel="recall", ylabel="precision", xlim=(-0.02, 1.02), ylim=(-0.02, 1.05), title=title)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower left", fontsize="small", title="class (dot: its threshold)", title_fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# A whole evaluation


@dataclass(frozen=True)
class EvaluationResult:
    report: dict[str, Any]
    json_path: Path
    png_path: Path
    notices: tuple[str, ...] = ()  # what discovery left out of the data: unreadable images, other files


def evaluate_run(
    run_dir: Path,
    checkpoint: str = "best",
    data: Path | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    trust_code: bool = False,
    tta: str = "none",
    top_losses: int = 16,
) -> EvaluationResult:
    """Evaluate a run's checkpoint on a split of its own data (or of another tree with the same classes).
    With tta (inference/tta.py) the report's numbers are those of the averaged probabilities, and
    report["plain"] holds the same numbers without it. The error gallery (inference/error_gallery.py) lists
    the misclassified images and draws the top_losses worst. A multi-label run is scored on sigmoid scores
    at its tuned thresholds (trained_model.RunTask)."""
    from transferctl.inference.error_gallery import check_top_losses, write_error_gallery
    from transferctl.inference.tta import check_tta, view_logits
    from transferctl.inference.trained_model import check_runtime_options, eval_transform, inference_runtime, load_trained_task
    from transferctl.runs.checkpoint import checkpoint_file
    from transferctl.runs.listing import read_run_config

    check_runtime_options(device, precision)
    check_tta(tta)
    check_top_losses(top_losses)
    config = read_run_config(run_dir)
    if config.logging.tensorboard:
        from transferctl.training.tensorboard import require_tensorboard

        require_tensorboard(f"{run_dir / 'config.yaml'}: logging.tensorboard")
    (model, classes, preprocessing), task = load_trained_task(run_dir, checkpoint, trust_code)
    root = data if data is not None else config.data.root
    where = "--data" if data is not None else f"{run_dir / 'config.yaml'}: data.root"
    labels = config.data.labels if data is None else None  # --data names a folder of class folders
    splits = _discover(root, config.data.val_fraction, config.seed, config.data.on_bad_image, where, split != "all", labels, task.name)
    check_same_classes(classes, splits.classes, where, root)
    if splits.multi_label and not task.multi_label:
        raise DataError(Problem(where, f"{root} gives images several labels, and this run was trained with one label an image", "evaluate it on single-label data"))
    split = split or ("test" if splits.test else "val")
    samples = _relabel(_samples_of(splits, split, root), splits.classes, classes)

    model, runtime = inference_runtime(model, device, precision)
    dataset = ImageDataset(samples, eval_transform(preprocessing), len(classes) if task.multi_label else None)
    size = batch_size or config.data.batch_size
    loader = make_loader(dataset, size, False, resolve_workers(config.data.num_workers, len(samples)), config.seed, runtime.device.type == "cuda")
    logits, labels = view_logits(model, loader, runtime, tta)
    paths = [path for path, _ in samples]
    score = _multi_label_results if task.multi_label else _single_label_results
    numbers, plain, mistakes = score(logits, labels, paths, classes, tta, task)

    report = {
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint_file(run_dir, checkpoint)),
        "data_root": str(root.resolve()),
        "split": split,
        "classes": classes,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "skipped_images": [str(item.path) for item in splits.skipped],  # unreadable images anywhere in the data folder
        "evaluated_at": datetime.now().isoformat(timespec="seconds"),
        "tta": tta,
        **numbers,
    }
    if tta != "none":
        report["plain"] = plain
    if task.multi_label:
        report["thresholds_tuned"] = task.notice is None
    stem = report_stem(run_dir, split, checkpoint, root, config.data.root, runtime.precision, tta)
    report.update(write_error_gallery(run_dir / "eval", stem, mistakes, top_losses, f"{run_dir.name}: {stem}", task.multi_label))
    result = _write_report(run_dir, report, stem, (*data_notices(splits), *filter(None, [task.notice])), _curves(logits, labels, task))
    if config.logging.tensorboard:
        from transferctl.training.tensorboard import log_evaluation

        log_evaluation(run_dir, result.report, result.png_path, result.json_path.stem)
    if config.logging.mlflow:
        result = _log_to_mlflow(run_dir, stem, result)
    return result


Results = tuple[dict[str, Any], dict[str, Any], list[Any]]  # the reported numbers, the same without tta, the error gallery's rows


def _single_label_results(logits: Any, labels: Any, paths: list[Path], classes: list[str], tta: str, task: RunTask) -> Results:
    from transferctl.inference.error_gallery import misclassified
    from transferctl.inference.tta import as_logits, averaged_probabilities

    plain = compute_metrics(logits[0].numpy(), labels.numpy(), classes)
    reported = logits[0] if tta == "none" else as_logits(averaged_probabilities(logits))
    numbers = plain if tta == "none" else compute_metrics(reported.numpy(), labels.numpy(), classes)
    return numbers, plain, misclassified(reported, labels, paths, classes)


def _multi_label_results(logits: Any, labels: Any, paths: list[Path], classes: list[str], tta: str, task: RunTask) -> Results:
    """Sigmoid scores (with tta, averaged over the views), scored at the run's thresholds."""
    from transferctl.inference.error_gallery import wrong_labels
    from transferctl.inference.tta import averaged_probabilities

    plain = compute_multi_label_metrics(logits[0].sigmoid().numpy(), labels.numpy(), classes, task.thresholds)
    scores = averaged_probabilities(logits, multi_label=True)
    numbers = plain if tta == "none" else compute_multi_label_metrics(scores.numpy(), labels.numpy(), classes, task.thresholds)
    return numbers, plain, wrong_labels(scores, labels, task.thresholds, paths, classes)


def _curves(logits: Any, labels: Any, task: RunTask) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]] | None:
    """What a multi-label run's precision-recall curves are drawn from (the reported scores); None: single-label."""
    from transferctl.inference.tta import averaged_probabilities

    return (averaged_probabilities(logits, multi_label=True).numpy(), labels.numpy(), task.thresholds) if task.multi_label else None


def _log_to_mlflow(run_dir: Path, stem: str, result: EvaluationResult) -> EvaluationResult:
    """The report's numbers and files on the run's MLflow run; a notice when they are not."""
    from transferctl.training.mlflow_logging import log_evaluation

    report = result.report
    files = [result.json_path, result.png_path, *(Path(report[key]) for key in ("misclassified_csv", "top_losses_png") if report[key])]
    notice = log_evaluation(run_dir, stem, report, files)
    return result if notice is None else replace(result, notices=(*result.notices, notice))


def report_stem(run_dir: Path, split: str, checkpoint: str, root: Path, own_root: Path, precision: str = "fp32", tta: str = "none") -> str:
    """eval/<stem>.json: the split's name for the run's own data, best checkpoint and fp32; another data
    folder's name comes first, another checkpoint's, a lower precision and test-time augmentation
    (tta-flip) after, so no evaluation replaces one of something else (`runs` and `show` list them all by this name)."""
    from transferctl.runs.checkpoint import checkpoint_file

    parts = [split]
    if root.resolve() != own_root.resolve():
        parts.insert(0, _file_name_part(root.resolve().name or "data"))
    chosen = checkpoint_file(run_dir, checkpoint).resolve()
    if chosen != checkpoint_file(run_dir, "best").resolve():
        parts.append(_file_name_part(chosen.stem))
    if precision != "fp32":
        parts.append(precision)
    if tta != "none":
        parts.append(f"tta-{tta}")
    return "-".join(parts)


def _file_name_part(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._-") or "data"


def _write_report(run_dir: Path, report: dict[str, Any], stem: str, notices: tuple[str, ...], curves: Any = None) -> EvaluationResult:
    """eval/<stem>.json and eval/<stem>-confusion.png (multi-label: <stem>-pr-curves.png, drawn from
    `curves`: scores, targets, thresholds), each written atomically; one that cannot be written (a read-only
    or full disk) is a user error naming it, as the error gallery's files are."""
    from transferctl.runs.rundir import json_text, write_atomically

    json_path = run_dir / "eval" / f"{stem}.json"
    if curves is not None:
        png_path = run_dir / "eval" / f"{stem}-pr-curves.png"
        report["pr_curves_png"] = str(png_path)
        mean_ap = "n/a" if report["map"] is None else f"{report['map']:.3f}"
        png = pr_curves_png(*curves[:2], report["classes"], curves[2], f"{run_dir.name}: {stem}, mAP {mean_ap} ({report['images']} images)")
    else:
        png_path = run_dir / "eval" / f"{stem}-confusion.png"
        report["confusion_png"] = str(png_path)
        title = f"{run_dir.name}: {stem}, accuracy {report['accuracy']:.3f} ({report['images']} images)"
        png = confusion_png(report["confusion_matrix"], report["classes"], title)
    write_atomically(png_path, png, DataError)
    write_atomically(json_path, json_text(report), DataError)
    return EvaluationResult(report, json_path, png_path, notices)


def _discover(
    root: Path, val_fraction: float, seed: int, on_bad_image: str, where: str, split: bool, labels: Path | None = None, task: str = "auto",
) -> DatasetSplits:  # fmt: skip
    """The run's own data.on_bad_image applies: an unreadable image is skipped (and listed) or an error.
    --split all reads every image of a flat tree: no validation share to draw, however few images.
    task: multi_label reads the data as a multi-label run trained on it (class folders: one label an image)."""
    try:
        return discover_data(root, val_fraction, seed, on_bad_image, split, labels, "multi_label" if task == "multi_label" else "auto")
    except DataError as exc:
        # discover names the config field (data.root); here the folder may have come from --data.
        raise DataError(*(Problem(p.where.replace("data.root", where, 1), p.message, p.hint) for p in exc.problems)) from None


def check_same_classes(trained: list[str], found: list[str], where: str, root: Path) -> None:
    """The model can only be scored on the classes it was trained on, all of them."""
    missing = sorted(set(trained) - set(found))
    extra = sorted(set(found) - set(trained))
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)} (trained on, but no folder)")
    if extra:
        parts.append(f"extra {', '.join(extra)} (folders the model was not trained on)")
    parts.append(lookalikes(missing, extra))
    raise DataError(Problem(where, f"the classes of {root} differ from the run's: {'; '.join(part for part in parts if part)}", f"give a tree with exactly these class folders: {', '.join(trained)}"))


def _samples_of(splits: DatasetSplits, split: str, root: Path) -> list[Sample]:
    samples = splits.train + splits.val + splits.test if split == "all" else splits.split(split)
    if not samples:
        have = [name for name in ("train", "val", "test") if splits.split(name)]
        raise DataError(Problem("--split", f"{root} has no {split} images", f"choose one of: {', '.join(have + ['all'])}"))
    return samples


def _relabel(samples: list[Sample], data_classes: list[str], model_classes: list[str]) -> list[Sample]:
    """Labels by class name, not folder order: the model's output i is model_classes[i]; a multi-label
    image's classes each."""
    index = {name: i for i, name in enumerate(model_classes)}

    def relabel(label: Any) -> Any:
        return tuple(sorted(index[data_classes[one]] for one in label)) if isinstance(label, tuple) else index[data_classes[label]]

    return [(path, relabel(label)) for path, label in samples]
