"""recommend: which strategy and backbone, from two facts (instant, no torch) or measured on the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transferctl.cli import CHOOSE, app, err, print_json, user_errors



@app.command(rich_help_panel=CHOOSE)
def recommend(
    size: Optional[str] = typer.Option(None, "--size", help="Rule mode: small or large (images per class: small below 100, large from 1,000)."),
    similar: Optional[str] = typer.Option(None, "--similar", help="Rule mode: yes or no, is the task like the pretraining data (ImageNet photos)?"),
    data: Optional[Path] = typer.Option(None, "--data", help="Data mode: measure on this class-per-folder tree. Rule mode: data.root of --write-config."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="A label file (.csv path,label[,split] or .jsonl) naming the images below --data and their classes, instead of class folders; --write-config writes it as data.labels."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Data mode: comma-separated backbones to compare (default: resnet18,mobilenet_v3_large,regnet_y_400mf; with run: weights, that run's own). Rule mode: one, for --write-config (default: resnet18)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Weights for every backbone: DEFAULT | a torchvision weights name | a file | run:<run dir> | none."),
    max_images: int = typer.Option(1000, "--max-images", help="Fit the probes on a stratified sample of at most this many training images (and score them on as many validation images)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="A flat tree's share of each class that validates, drawn as training draws it (data.val_fraction)."),
    budget: float = typer.Option(60.0, "--budget", help="Seconds for the race: short real training runs of scratch, fine_tune and pretrained_init (successive halving)."),
    fast: bool = typer.Option(False, "--fast", help="No race: the four-case rule from forward-pass measures only (about a minute)."),
    race_size: Optional[int] = typer.Option(None, "--race-size", help="Crop size the race trains at (lower is faster and usually keeps the ranking); default: the measured size."),
    augment: str = typer.Option("standard", "--augment", help="data.augment the race trains with and --write-config writes: standard | none | randaugment | trivialaugment | autoaugment | augmix (none where a flip or crop changes a label: digits, text)."),
    random_images: int = typer.Option(300, "--random-images", help="Images for the random-init reference network (a stratified sub-sample)."),
    random_for: str = typer.Option("best", "--random-for", help="best: the random-init reference for the top-ranked backbone (what the advice uses); all: for every backbone."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Crop size; default: each weights' own preprocessing."),
    folds: int = typer.Option(3, "--folds", help="Cross-validation folds of the linear probes."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 where the hardware has it) | fp32 | bf16 | fp16"),
    small_below: int = typer.Option(100, "--small-below", help="Small data: median images per class below this."),
    large_from: int = typer.Option(1000, "--large-from", help="Large data: median images per class from this."),
    gain_points: float = typer.Option(2.0, "--gain-points", help="Effectively small if a probe gains more than this many points from half to all of the data."),
    depth_points: float = typer.Option(5.0, "--depth-points", help="Different task if an earlier stage's probe beats the penultimate layer's by more points."),
    worth_points: float = typer.Option(5.0, "--worth-points", help="Pretrained features must beat a random network's probe by more points than this."),
    ami_min: float = typer.Option(0.10, "--ami-min", help="Different task if the source head's predictions agree with the labels less (AMI)."),
    write_config: Optional[Path] = typer.Option(None, "--write-config", help="Write a complete experiment YAML for the advice to this file."),
    force: bool = typer.Option(False, "--force", help="Let --write-config replace an existing file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="With run: weights of a python: backbone: let the run's module be imported and run (only for runs you trust; or list it in TRANSFERCTL_TRUSTED_CODE)."
    ),
) -> None:
    """Recommend a strategy: rule mode (--size, --similar) or data mode (--data DIR, measured)."""
    rule_mode = size is not None or similar is not None
    if rule_mode:
        if size is None or similar is None:
            raise typer.BadParameter("rule mode needs both --size small|large and --similar yes|no", param_hint="--size/--similar")
        _rule_mode(size, similar, data, backbone, weights, write_config, force, as_json, augment, labels)
        return
    if data is None:
        raise typer.BadParameter("give --size and --similar (rule mode), or --data DIR (data mode)", param_hint="--data")
    from transferctl.analysis.recommend import MeasureOptions, Thresholds

    thresholds = Thresholds(small_below, large_from, gain_points, depth_points, worth_points, ami_min)
    with user_errors():
        names = _backbone_names(backbone, weights, trust_code)
        options = MeasureOptions(names, weights, max_images, random_images, random_for, image_size, folds, seed, device, precision,
                                 val_fraction=val_fraction, fast=fast, budget=budget, race_size=race_size, augment=augment, labels=labels)  # fmt: skip
        _data_mode(data, options, thresholds, write_config, force, as_json, quiet)


def _rule_mode(size: str, similar: str, data: Optional[Path], backbone: Optional[str], weights: str,
               write_config: Optional[Path], force: bool, as_json: bool, augment: str, labels: Optional[Path] = None) -> None:  # fmt: skip
    from transferctl.analysis.recommend import advice_dict, advise

    size_value = size.strip().lower()
    if size_value not in ("small", "large"):
        raise typer.BadParameter(f"'{size}' is not small or large", param_hint="--size")
    similar_value = {"yes": True, "y": True, "true": True, "no": False, "n": False, "false": False}.get(similar.strip().lower())
    if similar_value is None:
        raise typer.BadParameter(f"'{similar}' is not yes or no", param_hint="--similar")
    with user_errors():
        advice = advise(size_value, similar_value)
        written = None
        if write_config is not None:
            name = _single_backbone(backbone)
            written = _write(advice, write_config, data, name, weights, force, augment=augment, labels=labels)
    result = {"mode": "rule", **advice_dict(advice), "config": str(written) if written else None}
    if weights.strip().lower() == "none" and advice.strategy != "scratch":
        err.print(f"[yellow]note:[/] --weights none: {advice.strategy} builds on pretrained weights; with none the body starts random, which is scratch training at best")
    if as_json:
        print_json(result)
        return
    _print_advice(result)
    if written is None:
        err.print("[dim]write an experiment file with --write-config FILE --data DIR; measure instead of guessing with --data DIR alone[/]")


def _single_backbone(backbone: Optional[str]) -> str:
    from transferctl.errors import ConfigError, Problem

    names = [n.strip() for n in (backbone or "resnet18").split(",") if n.strip()]
    if len(names) != 1:
        raise ConfigError(Problem("--backbone", f"rule mode writes one experiment, got {len(names)} backbones", "name one, e.g. --backbone resnet50"))
    return names[0]


def _backbone_names(backbone: Optional[str], weights: str, trust_code: bool) -> tuple[str, ...]:
    from transferctl.analysis.recommend import MeasureOptions, backbone_of_run

    if backbone:
        return tuple(n.strip() for n in backbone.split(",") if n.strip())
    own = backbone_of_run(weights, trust_code)
    return (own,) if own else MeasureOptions().backbones


def _write(advice: Any, path: Path, data: Optional[Path], backbone: str, weights: str, force: bool, image_size: Optional[int] = None, val_fraction: float = 0.2,
           seed: int = 0, augment: str = "standard", labels: Optional[Path] = None, multi_label: Optional[bool] = None) -> Path:  # fmt: skip
    from transferctl.errors import ConfigError, Problem
    from transferctl.analysis.recommend import experiment_yaml, write_experiment

    if data is None:
        raise ConfigError(Problem("--write-config", "needs --data DIR for the experiment's data.root", "add --data path/to/images"))
    if not data.is_dir():
        raise ConfigError(Problem("--data", f"no such folder: {data}", "give the folder of class folders the experiment trains on"))
    if labels is not None and not labels.is_file():
        raise ConfigError(Problem("--labels", f"no such file: {labels}", "give the .csv or .jsonl label file the experiment trains on"))
    return write_experiment(experiment_yaml(advice, path, data, backbone, weights, seed, image_size, val_fraction, augment, labels, multi_label), path, overwrite=force)


def _data_mode(data: Path, options: Any, thresholds: Any, write_config: Optional[Path], force: bool, as_json: bool, quiet: bool) -> None:
    from transferctl.analysis.recommend import measure

    def progress(message: str) -> None:
        err.print(f"[dim]recommend: {escape(message)}[/]")

    report = measure(data, options, thresholds, None if quiet else progress)
    written = _write(report.advice, write_config, data, report.best.name, report.best.weights, force, report.best.crop, options.val_fraction, options.seed, options.augment,
                     options.labels, report.data.multi_label) if write_config else None  # fmt: skip
    result = {**report.to_dict(), "config": str(written) if written else None}
    if as_json:
        print_json(result)
        return
    # Pipes and logs get 80 columns by default, too narrow for the table; a terminal keeps its own width.
    wide = err if err.is_terminal else Console(stderr=True, highlight=False, width=120)
    wide.print(_ranking_table(result))
    if result["candidates"]:
        wide.print(_candidates_table(result))
    err.print(f"[bold]measured:[/] {escape(result['data']['measured_on'])}")
    for note in result["notes"]:
        err.print(f"[dim]note: {escape(note)}[/]")
    err.print(f"[bold]size:[/] {escape('; '.join(result['size_reasons']))}")
    for line in result["similarity_reasons"]:
        err.print(f"[bold]similarity:[/] {escape(line)}")
    _print_advice(result)


def _print_advice(result: dict[str, Any]) -> None:
    err.print(f"[bold]case:[/] {result['case']}")
    cut = f" with backbone.cut: {result['cut']}" if result.get("cut") else ""
    err.print(f"[bold]strategy:[/] [green]{result['strategy']}[/]{cut}")
    for reason in result["reasons"]:
        err.print(f"  - {escape(reason)}")
    if result.get("config"):
        err.print(f"[bold]wrote:[/] {escape(result['config'])}  (next: transferctl check {escape(result['config'])})")


def _ranking_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"backbones, probes fitted on {result['data']['sampled']} training images, best first by LogME", title_justify="left")
    for column in ("backbone", "LogME", "probe", "random", "best stage", "AMI", "top-1", "s"):
        table.add_column(column, justify="left" if column in ("backbone", "best stage") else "right")
    for row in result["ranking"]:
        stage = row["best_stage"]
        table.add_row(
            escape(row["name"]),
            f"{row['logme']:.3f}±{row['logme_spread']:.3f}",
            _pct(row["probe_acc"]),
            "-" if row["random_probe_acc"] is None else f"{_pct(row['random_probe_acc'])} ({row['pretraining_gain_points']:+.0f})",
            f"{stage} {_pct(row['stage_acc'][stage])}" if stage else "-",
            "-" if row["source_agreement"] is None else f"{row['source_agreement']:.2f}",
            "-" if row["imagenet_top1"] is None else f"{row['imagenet_top1']:.1f}",
            f"{row['seconds']:.0f}",
        )
    scored = f"scored on {result['data']['scored']} validation images" if result["data"]["scored"] else "cross-validated"
    table.caption = (
        f"LogME ± spread over stratified halves · probe: linear probe on the penultimate layer, {scored} ({_probe_measure(result)}) · "
        "random: that probe on a random-init copy (points gained by pretraining) · best stage: best earlier layer "
        "group's probe · AMI: source head vs labels · top-1: ImageNet, from the weights"
    )
    table.caption_justify = "left"
    return table


def _candidates_table(result: dict[str, Any]) -> Table:
    pick = result["pick"]
    measured = "validation mAP" if result.get("metric") == "val_map" else "validation accuracy"
    table = Table(title=f"candidates, by measured {measured} (± one standard error)", title_justify="left")
    for column in ("", "strategy", "cut", "backbone", "estimate", "how", "s"):
        table.add_column(column, justify="right" if column in ("estimate", "s") else "left", overflow="fold")
    ranked = sorted(result["candidates"], key=lambda c: -1.0 if c["estimate"] is None else c["estimate"], reverse=True)
    for row in ranked:
        chosen = (row["strategy"], row["cut"], row["backbone"]) == (pick["strategy"], pick["cut"], pick["backbone"])
        estimate = "-" if row["estimate"] is None else f"{_pct(row['estimate'])} ± {_pct(row['noise'])}"
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
        table.add_row("[green]→[/]" if chosen else "", escape(row["strategy"]), escape(row["cut"] or "-"), escape(row["backbone"]), estimate, escape(row["how"]), seconds)
    table.caption = ("the pick (→) is the best estimate or, within one standard error of it, the cheapest: "
                     "feature_extract < a cut < fine_tune < pretrained_init, scratch")  # fmt: skip
    table.caption_justify = "left"
    return table


def _probe_measure(result: dict[str, Any]) -> str:
    return "one-vs-rest, mAP" if result.get("metric") == "val_map" else "balanced accuracy"


def _pct(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"
