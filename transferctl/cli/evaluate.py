"""evaluate: score a trained run on a split, write eval/<split>.json and a confusion-matrix plot (multi-label
runs: precision-recall curves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from transferctl.cli import USE, app, err, print_json, user_errors

RunDirArg = typer.Argument(..., file_okay=False, help="A run directory written by `transferctl train`.")
CheckpointOption = typer.Option("best", "--checkpoint", help="best | last | path to a checkpoint file.")
DeviceOption = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps.")
PrecisionOption = typer.Option("fp32", "--precision", help="fp32 (exact) | bf16 | fp16 | auto (as in training).")
TrustCodeOption = typer.Option(
    False, "--trust-code", help="Let a python: backbone that the run names be imported and run (its code runs: only for runs you trust; or list the module in TRANSFERCTL_TRUSTED_CODE)."
)
BatchSizeOption = typer.Option(None, "--batch-size", min=1, help="Images per batch (default: the run's data.batch_size).")
TtaOption = typer.Option("none", "--tta", help="Test-time augmentation: none | flip (softmax probabilities averaged over the image and its mirror image).")


@app.command(rich_help_panel=USE)
def evaluate(
    run_dir: Path = RunDirArg,
    checkpoint: str = CheckpointOption,
    data: Optional[Path] = typer.Option(None, "--data", help="Another class-per-folder tree with the run's classes (default: the run's own data)."),
    split: Optional[str] = typer.Option(None, "--split", help="val | test | train | all (default: test if the data has one, else val)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON document on stdout."),
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    trust_code: bool = TrustCodeOption,
    tta: str = TtaOption,
    top_losses: int = typer.Option(16, "--top-losses", min=0, help="Draw the N misclassified images with the highest loss in eval/<name>-top-losses.png (0: no picture; every one is listed in <name>-misclassified.csv)."),
) -> None:
    """Accuracy, per-class precision/recall/F1, confusion matrix and calibration of a trained run (multi-label: mAP, F1 at the tuned thresholds, PR curves)."""
    from transferctl.inference.evaluate import SPLIT_CHOICES, evaluate_run

    if split is not None and split not in SPLIT_CHOICES:
        raise typer.BadParameter(f"'{split}' is not one of {', '.join(SPLIT_CHOICES)}", param_hint="--split")
    with user_errors():
        result = evaluate_run(run_dir, checkpoint, data, split, batch_size, device, precision, trust_code, tta, top_losses=top_losses)
    for notice in result.notices:
        err.print(f"note: {notice}", style="yellow", markup=False)
    if as_json:
        print_json(result.report)
    else:
        err.print(render_report(result.report))
    err.print(f"wrote {result.json_path} and {result.png_path}", markup=False)
    err.print(_gallery_line(result.report), markup=False)


def _gallery_line(report: dict[str, Any]) -> str:
    picture = f", the worst in {report['top_losses_png']}" if report["top_losses_png"] else ""
    what = "with a wrong label" if report.get("task") == "multi_label" else "misclassified"
    return f"{what}: {report['misclassified']} images, listed in {report['misclassified_csv']}{picture}"


def render_report(report: dict[str, Any]) -> Table:
    """Headline numbers in the caption (with --tta, the same numbers without it below), then one row per class."""
    multi_label = report.get("task") == "multi_label"
    headline = _multi_label_headline if multi_label else _headline
    caption = headline(report)
    tta = report.get("tta", "none")
    if tta != "none":
        label = f"with --tta {tta}: "
        caption = f"{label}{caption}\n{'without:':<{len(label)}}{headline(report['plain'])}"
    table = Table(title=f"{escape(report['run_dir'])}: {report['split']} ({report['images']} images)", caption=caption, caption_justify="left")
    table.add_column("class")
    if multi_label:
        return _multi_label_rows(table, report)
    for column in ("precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for row in report["per_class"]:
        table.add_row(escape(row["class"]), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    return table


def _multi_label_rows(table: Table, report: dict[str, Any]) -> Table:
    """One row a class: its AP, the threshold its label is given at, and precision, recall, F1 there."""
    tuned = "threshold" if report.get("thresholds_tuned", True) else "threshold (default)"
    for column in ("AP", tuned, "precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for row in report["per_class"]:
        ap = "n/a" if row["ap"] is None else f"{row['ap']:.3f}"  # no positive image: AP is undefined
        table.add_row(escape(row["class"]), ap, f"{row['threshold']:.3f}", f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    return table


def _multi_label_headline(metrics: dict[str, Any]) -> str:
    """mAP, then micro/macro F1 and subset accuracy at the run's thresholds, and the same at 0.5 beside them."""
    default = metrics["at_default_threshold"]
    mean_ap = "n/a" if metrics["map"] is None else f"{metrics['map']:.4f}"
    return (
        f"mAP {mean_ap}   micro F1 {metrics['micro_f1']:.4f}   macro F1 {metrics['macro_f1']:.4f}   subset accuracy {metrics['subset_accuracy']:.4f}"
        + f"   loss {metrics['loss']:.4f}   (at {default['threshold']}: micro F1 {default['micro_f1']:.4f}, macro F1 {default['macro_f1']:.4f},"
        + f" subset accuracy {default['subset_accuracy']:.4f})"
    )


def _headline(metrics: dict[str, Any]) -> str:
    top5 = metrics["top5_accuracy"]
    return (
        f"accuracy {metrics['accuracy']:.4f}" + (f"   top-5 {top5:.4f}" if top5 is not None else "")
        + f"   loss {metrics['loss']:.4f}   macro F1 {metrics['macro_f1']:.4f}   weighted F1 {metrics['weighted_f1']:.4f}"
        + f"   ECE {metrics['ece']:.4f}"
    )
