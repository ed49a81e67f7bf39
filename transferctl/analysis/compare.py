"""compare: one experiment under several strategies and seeds, and what transfer bought over scratch.

A comparison folder holds one normal run directory per (strategy, seed), named `<strategy>-seed<seed>`,
and the report on them: report.json, report.md and curves.png. Rerunning the same command on the same
folder skips finished runs (those with summary.json), resumes unfinished ones (`train --resume`'s logic,
where this transferctl has it) and trains the missing ones; a run that cannot be resumed is moved to
`unfinished/` (never deleted) and trained again.

Fairness: every run gets the same data, the same number of epochs and, per seed, the same seed (so the
same split and shuffle order); early stopping is off, so all curves have the same length.

The curves are validation accuracy per epoch, or validation mAP (val_map) where the data is multi-label (a
multi-label run's val_acc is subset accuracy, every label right); the report's `metric` says which, and the
measures are named after it (best_val_map, ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from transferctl.config import (
    STRATEGIES,
    ExperimentConfig,
    PhaseConfig,
    config_for_task,
    config_from_dict,
    config_to_dict,
    default_schedule,
    dump_yaml,
    flatten,
    read_yaml,
    schedule_of,
)
from transferctl.analysis.curves import DEFINITIONS, Stat, curve_metric, measure, mean_band, negative_transfer, summarize
from transferctl.errors import CheckpointError, ConfigError, Problem, TransferctlError, did_you_mean
from transferctl.analysis.curves import RunCurves
from transferctl.analysis.report import load_run_curves
from transferctl.runs.rundir import write_atomically

if TYPE_CHECKING:
    from transferctl.training.observers import TrainObserver

BASELINE = "scratch"
FINE_TUNE_HEAD_SHARE = 3 / 8  # the default fine_tune schedule: head 3 of 8 epochs, body 5
RERUN_MAY_CHANGE = ("name", "device", "data.num_workers", "output.dir")  # none changes what a run computes
UNFINISHED = "unfinished"

SCHEDULE_RULE = (
    "The config's own strategy keeps its schedule (as written, or its default); its total epoch count T applies "
    "to every strategy. The others take their default schedule's phases (names, what trains, backbone_lr_mult, "
    "bn) with T epochs: feature_extract, scratch and pretrained_init one phase of T epochs; fine_tune "
    "head round(3T/8) epochs (1 to T−1), body the rest. Phases that train only the head take the learning rate "
    "of the config's first head-only phase, the others that of its first phase training more than the head "
    "(each falls back to the other). Early stopping is off: every run trains all T epochs."
)

# Columns of the results table, shared by report.md and the terminal table: (title, measure, digits); "val_acc" in a
# measure's name stands for the report's metric (val_map for multi-label data: see metric_key).
COLUMNS = (
    ("best val acc", "best_val_acc", 3),
    ("AUC", "auc", 3),
    ("jumpstart", "jumpstart", 3),
    ("transfer ratio", "transfer_ratio", 3),
    ("asymptote", "asymptote", 3),
    ("asymptotic gain", "asymptotic_gain", 3),
    ("epochs to 95%", "time_to_threshold", 1),
    ("speed-up", "speedup", 2),
    ("seconds", "seconds", 0),
)
# Summarised over seeds per strategy: absolute numbers, then the measures against scratch (curves.SeedMeasures).
MEASURES = ("first_val_acc", "best_val_acc", "final_val_acc", "seconds", "jumpstart", "auc", "transfer_ratio", "asymptote", "asymptotic_gain", "time_to_threshold", "speedup")
RELATIVE = {"jumpstart", "transfer_ratio", "asymptotic_gain", "speedup"}  # meaningless for the baseline itself
METRIC_TITLES = {"val_acc": ("val acc", "validation accuracy"), "val_map": ("val mAP", "validation mAP")}  # short, long


def metric_key(key: str, metric: str) -> str:
    """A measure's name for the report's metric: best_val_acc -> best_val_map on multi-label data."""
    return key.replace("val_acc", metric)


@dataclass(frozen=True)
class PlannedRun:
    strategy: str
    seed: int
    config: ExperimentConfig

    @property
    def name(self) -> str:
        return f"{self.strategy}-seed{self.seed}"


@dataclass(frozen=True)
class ComparisonPlan:
    out: Path
    source: str  # the experiment file, for the report
    title: str
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    schedules: dict[str, list[PhaseConfig]]
    runs: tuple[PlannedRun, ...]  # seed-major: an early stop still leaves whole seeds to look at
    notices: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Planning


def parse_strategies(text: str) -> tuple[str, ...]:
    """'scratch,fine_tune' -> ('scratch', 'fine_tune'), with scratch (the baseline) required."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]  # Scratch is scratch
    unknown = [name for name in names if name not in STRATEGIES]
    problems = [Problem("--strategies", f"unknown strategy '{name}'", did_you_mean(name, STRATEGIES)) for name in unknown]
    if unknown:
        raise ConfigError(*problems)  # the checks below would only repeat the unknown names
    if len(set(names)) != len(names):
        problems.append(Problem("--strategies", f"'{text}' names a strategy twice", "name each once"))
    if BASELINE not in names:
        problems.append(Problem("--strategies", f"must include {BASELINE}: every measure is relative to it", f"e.g. --strategies {BASELINE},{','.join(n for n in names if n != BASELINE) or 'fine_tune'}"))
    elif len(names) < 2:
        problems.append(Problem("--strategies", f"{BASELINE} alone compares nothing", f"add one, e.g. --strategies {BASELINE},fine_tune"))
    if problems:
        raise ConfigError(*problems)
    return tuple(names)


def derive_schedule(strategy: str, reference: list[PhaseConfig]) -> list[PhaseConfig]:
    """The strategy's default phases stretched to the reference's total epochs, at its learning rates."""
    epochs = sum(phase.epochs for phase in reference)
    head_lr = next((phase.lr for phase in reference if phase.train == "head"), None)
    body_lr = next((phase.lr for phase in reference if phase.train != "head"), None)
    head_lr, body_lr = head_lr or body_lr, body_lr or head_lr
    template = default_schedule(strategy)
    if len(template) == 1:
        counts = [epochs]
    else:  # fine_tune: head, then body
        if epochs < 2:
            raise ConfigError(Problem("schedule", f"fine_tune needs at least 2 epochs (a head phase and a body phase), the schedule has {epochs}", "give the schedule more epochs"))
        head = min(max(1, int(epochs * FINE_TUNE_HEAD_SHARE + 0.5)), epochs - 1)
        counts = [head, epochs - head]
    # min_steps off: on a small set it would add epochs, and every run must train exactly the T epochs.
    return [phase.model_copy(update={"epochs": n, "lr": head_lr if phase.train == "head" else body_lr, "min_steps": None}) for phase, n in zip(template, counts)]


def plan_comparison(config: ExperimentConfig, strategies: tuple[str, ...], seeds: int, out: Path | None = None, source: str = "<config>") -> ComparisonPlan:
    """One run config per (seed, strategy): same data, same epochs, seeds config.seed, config.seed + 1, ..."""
    if seeds < 1:
        raise ConfigError(Problem("--seeds", f"must be at least 1, got {seeds}"))
    out = out or config.output.dir / f"{config.name}-compare"
    reference = [phase.model_copy(update={"until_plateau": None}) for phase in schedule_of(config)]  # every run trains every epoch
    schedules = {s: list(reference) if s == config.strategy else derive_schedule(s, reference) for s in strategies}
    seed_list = tuple(config.seed + k for k in range(seeds))
    runs = tuple(PlannedRun(s, seed, _run_config(config, s, seed, schedules[s], out)) for seed in seed_list for s in strategies)
    notices = []
    if config.early_stopping.patience is not None:
        notices.append(f"early_stopping.patience ({config.early_stopping.patience}) is ignored: every run trains all {sum(p.epochs for p in reference)} epochs so that the curves line up")
    plateaus = [phase.name for phase in schedule_of(config) if phase.until_plateau is not None]
    if plateaus:
        notices.append(f"until_plateau of phase(s) {', '.join(plateaus)} is ignored: every run trains all {sum(p.epochs for p in reference)} epochs so that the curves line up")
    if config.backbone.weights_source.kind == "none" and set(strategies) - {BASELINE}:
        notices.append("backbone.weights is none: the other strategies start from random weights too, so this compares schedules, not transfer")
    return ComparisonPlan(out, source, config.name, strategies, seed_list, sum(p.epochs for p in reference), schedules, runs, tuple(notices))


def _run_config(config: ExperimentConfig, strategy: str, seed: int, schedule: list[PhaseConfig], out: Path) -> ExperimentConfig:
    raw = config.model_dump(mode="json")
    raw.update(name=f"{config.name}-{strategy}-seed{seed}", strategy=strategy, seed=seed, schedule=[phase.model_dump(mode="json") for phase in schedule])
    raw["early_stopping"]["patience"] = None
    raw["output"]["dir"] = str(out)
    return config_from_dict(raw, source=f"--strategies {strategy}")


# ---------------------------------------------------------------------------------------------
# Running


def run_comparison(plan: ComparisonPlan, observer: TrainObserver) -> dict[str, Any]:
    """Train (or skip, or resume) every planned run, then write and return the report."""
    plan.out.mkdir(parents=True, exist_ok=True)
    for notice in plan.notices:
        observer.notice(notice)
    check_existing_runs(plan)  # before any training: a mismatch found late would waste hours
    statuses: dict[str, str] = {}
    for index, run in enumerate(plan.runs, start=1):
        statuses[run.name] = _with_rerun_hint(plan, lambda: _ensure_run(plan, run, f"run {index}/{len(plan.runs)} {run.name}", observer))
    report = build_report(plan, statuses)
    write_report(plan, report)
    return report


def check_existing_runs(plan: ComparisonPlan) -> None:
    """A run directory already in the folder must have been trained with exactly the planned config."""
    problems: list[Problem] = []
    for run in plan.runs:
        config_file = plan.out / run.name / "config.yaml"
        if not config_file.is_file():
            continue
        trained = flatten(read_yaml(config_file))
        # The data told training the task (config_for_task): the planned config as that run recorded it.
        planned_config = config_for_task(run.config, multi_label=trained.get("task") == "multi_label" and run.config.task != "single_label")
        planned = flatten(yaml.safe_load(dump_yaml(config_to_dict(planned_config))))  # through YAML, as train wrote it
        for key in sorted(trained.keys() | planned.keys()):
            old, new = trained.get(key), planned.get(key)
            if key not in RERUN_MAY_CHANGE and old != new:
                problems.append(Problem(f"{config_file}: {key}", f"this run was trained with {old!r}, the comparison now asks for {new!r}", f"use another --out for a different experiment, or restore {key}"))
    if problems:
        raise ConfigError(*problems)


def _ensure_run(plan: ComparisonPlan, run: PlannedRun, label: str, observer: TrainObserver) -> str:
    """skipped (finished earlier) | resumed | trained."""
    path = plan.out / run.name
    if (path / "summary.json").is_file():
        observer.notice(f"{label}: finished earlier, skipped")
        return "skipped"
    if path.exists():
        resume = _resume_function()
        why_not = "this transferctl cannot resume runs" if resume is None else _cannot_resume(path)
        if resume is not None and why_not is None:
            observer.notice(f"{label}: unfinished, resuming")
            # check_existing_runs made sure its config.yaml names the backbone of the user's own experiment file.
            resume(path, [], observer, trust_code=True)
            return "resumed"
        aside = _move_aside(plan.out, path)
        observer.notice(f"{label}: unfinished and cannot be resumed ({why_not}); kept it as {aside}, training again")
    else:
        observer.notice(f"{label}: training")
    from transferctl.training.train import train

    train(run.config, run_dir=path, observer=observer)
    return "trained"


def _cannot_resume(path: Path) -> str | None:
    """Why an unfinished run cannot be resumed (no config.yaml; a damaged or too old last.pt), or None.
    Without the check, a damaged last.pt stopped every rerun of the comparison at the same place."""
    from transferctl.training.resume import resume_point
    from transferctl.runs.checkpoint import checkpoint_file, load_run_checkpoint

    if not (path / "config.yaml").is_file():
        return "no config.yaml"
    last = checkpoint_file(path, "last")
    if not last.is_file():
        return None  # stopped before its first epoch ended: resume starts it over in its folder
    try:
        resume_point(load_run_checkpoint(path, "last"), str(last))
    except CheckpointError as exc:
        return str(exc)
    return None


def _resume_function() -> Callable[..., dict[str, Any]] | None:
    """`train --resume`'s logic where this transferctl has it."""
    try:
        from transferctl.training.resume import resume
    except ImportError:
        return None
    return resume


def _move_aside(out: Path, path: Path) -> Path:
    aside = out / UNFINISHED / f"{path.name}-{datetime.now():%Y%m%d-%H%M%S}"
    aside.parent.mkdir(exist_ok=True)
    try:
        return path.rename(aside)
    except OSError as exc:
        raise CheckpointError(Problem(str(path), f"cannot move the unfinished run aside: {exc.strerror or exc}", f"move or delete {path} yourself, then rerun")) from None


def _with_rerun_hint(plan: ComparisonPlan, step: Callable[[], str]) -> str:
    """A failed or interrupted run: the same error, plus how to continue the comparison."""
    try:
        return step()
    except TransferctlError as exc:
        hint = Problem(str(plan.out), "the comparison stopped here; finished runs are kept", "rerun the same compare command to continue")
        raise type(exc)(*exc.problems, hint) from None


# ---------------------------------------------------------------------------------------------
# The report


def build_report(plan: ComparisonPlan, statuses: dict[str, str]) -> dict[str, Any]:
    """Per-seed measures against scratch of the same seed, their mean ± sd, and the mean curves."""
    loaded = {run.name: _finished_curve(plan, run) for run in plan.runs}
    metric = curve_metric([row for run_curve in loaded.values() for row in run_curve.rows])
    curves = {name: run_curve.series(metric) for name, run_curve in loaded.items()}
    results: dict[str, Any] = {}
    bands: dict[str, Any] = {}
    for strategy in plan.strategies:
        mine = [run for run in plan.runs if run.strategy == strategy]
        per_seed = [_seed_row(run, loaded[run.name], curves[run.name], curves[f"{BASELINE}-seed{run.seed}"], statuses.get(run.name), metric) for run in mine]
        stats = {metric_key(key, metric): summarize([row[metric_key(key, metric)] for row in per_seed]) for key in MEASURES}
        results[strategy] = {
            "measures": {key: stat.to_dict() for key, stat in stats.items()},
            "negative_transfer": strategy != BASELINE and negative_transfer(stats["asymptotic_gain"]),
            "per_seed": per_seed,
        }
        mean, sd = mean_band([curves[run.name] for run in mine])
        bands[strategy] = {"mean": mean, "sd": sd, "phase_ends": loaded[mine[0].name].phase_ends}
    return {
        "comparison": str(plan.out),
        "config": plan.source,
        "title": plan.title,
        "baseline": BASELINE,
        "metric": metric,
        "strategies": list(plan.strategies),
        "seeds": list(plan.seeds),
        "epochs": plan.epochs,
        "schedule_rule": SCHEDULE_RULE,
        "schedules": {s: [phase.model_dump(mode="json") for phase in phases] for s, phases in plan.schedules.items()},
        "notices": list(plan.notices),
        "definitions": DEFINITIONS,
        "results": results,
        "curves": bands,
        "files": {name: str(plan.out / name) for name in ("report.json", "report.md", "curves.png")},
    }


def _finished_curve(plan: ComparisonPlan, run: PlannedRun) -> RunCurves:
    curve = load_run_curves(plan.out / run.name)
    if len(curve.rows) != plan.epochs:
        raise CheckpointError(Problem(str(curve.path), f"has {len(curve.rows)} epochs, the comparison expects {plan.epochs}", f"delete {curve.path} and rerun to train it again"))
    return curve


def _seed_row(run: PlannedRun, loaded: RunCurves, curve: list[float], scratch: list[float], status: str | None, metric: str = "val_acc") -> dict[str, Any]:
    return {
        "seed": run.seed,
        "run_dir": str(loaded.path),
        "status": status,
        f"first_{metric}": curve[0],
        f"best_{metric}": max(curve),
        f"final_{metric}": curve[-1],
        "seconds": round(sum(row.get("seconds", 0.0) for row in loaded.rows), 2),
        **asdict(measure(curve, scratch)),
    }


def write_report(plan: ComparisonPlan, report: dict[str, Any]) -> None:
    """curves.png, report.md, then report.json (the last: its presence means the report is whole)."""
    from transferctl.analysis.plots import StrategyBand, comparison_figure, png_bytes

    bands = [StrategyBand(s, c["mean"], c["sd"], c["phase_ends"], len(plan.seeds)) for s, c in report["curves"].items()]
    words = METRIC_TITLES[report.get("metric", "val_acc")][1]
    figure = comparison_figure(bands, f"{plan.title}: {words} per epoch ({len(plan.seeds)} seeds, {plan.epochs} epochs)", ylabel=words)
    write_atomically(plan.out / "curves.png", png_bytes(figure))
    write_atomically(plan.out / "report.md", render_markdown(report))
    write_atomically(plan.out / "report.json", json.dumps(report, indent=2, default=str) + "\n")


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The results table as text cells: one row per strategy, each cell mean ± sd over seeds."""
    metric = report.get("metric", "val_acc")  # reports written before multi-label have none: val_acc
    header = ["strategy", *(title.replace("val acc", METRIC_TITLES[metric][0]) for title, _, _ in COLUMNS), "negative transfer"]
    rows = []
    for strategy, result in report["results"].items():
        baseline = strategy == report["baseline"]
        cells = [strategy]
        for _, key, digits in COLUMNS:
            cells.append("baseline" if baseline and key in RELATIVE else Stat(**result["measures"][metric_key(key, metric)]).text(digits))
        cells.append("—" if baseline else ("YES" if result["negative_transfer"] else "no"))
        rows.append(cells)
    return header, rows


def render_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    lines = [
        f"# Transfer comparison: {report['title']}",
        "",
        f"Experiment `{report['config']}`, seeds {', '.join(map(str, report['seeds']))}, {report['epochs']} epochs per run; "
        f"every measure is against `{report['baseline']}` with the same seed, as mean ± sample sd over seeds.",
        "",
        f"Every curve and measure is {METRIC_TITLES[report.get('metric', 'val_acc')][1]} (`{report.get('metric', 'val_acc')}`)"
        + (": the data is multi-label, where val_acc would be subset accuracy (every label right)." if report.get("metric") == "val_map" else "."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"![{METRIC_TITLES[report.get('metric', 'val_acc')][1]} per epoch](curves.png)",
        "",
        "## Schedules",
        "",
        *(f"- `{strategy}`: {describe_schedule(phases)}" for strategy, phases in report["schedules"].items()),
        "",
        report["schedule_rule"],
        "",
        "## Definitions (Taylor & Stone 2009)",
        "",
        *(f"- **{name}**: {text}" for name, text in report["definitions"].items()),
    ]
    if report["notices"]:
        lines += ["", "## Notes", "", *(f"- {notice}" for notice in report["notices"])]
    lines += ["", "## Runs", "", "| strategy | seed | status | run directory |", "| --- | --- | --- | --- |"]
    for strategy, result in report["results"].items():
        lines += [f"| {strategy} | {row['seed']} | {row['status']} | `{row['run_dir']}` |" for row in result["per_seed"]]
    return "\n".join(lines) + "\n"


def describe_schedule(phases: list[dict[str, Any]]) -> str:
    """'head 3 epochs (train head, lr 0.001) → body 5 epochs (train all, lr 0.001, backbone ×0.5)'."""
    parts = []
    for phase in phases:
        mult = f", backbone ×{phase['backbone_lr_mult']:g}" if phase["backbone_lr_mult"] != 1 else ""
        epochs = f"{phase['epochs']} epoch" + ("s" if phase["epochs"] != 1 else "")
        parts.append(f"{phase['name']} {epochs} (train {phase['train']}, lr {phase['lr']:g}{mult})")
    return " → ".join(parts)
