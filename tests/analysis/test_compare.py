"""compare: planning (strategies, schedules with equal epochs, rerun checks), the comparison figure, and one
end-to-end comparison of two strategies over two seeds on the tiny generated dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helpers import experiment, write_experiment
from transferctl.cli import app
from transferctl.analysis.compare import check_existing_runs, derive_schedule, parse_strategies, plan_comparison
from transferctl.config import PhaseConfig, config_for_task, config_from_dict, config_to_dict, default_schedule, dump_yaml
from transferctl.errors import ConfigError
from transferctl.analysis.plots import PHASE_LABEL, StrategyBand, comparison_figure

runner = CliRunner()


def test_strategies_are_checked() -> None:
    assert parse_strategies(" scratch, fine_tune ") == ("scratch", "fine_tune")
    assert parse_strategies("Scratch,Feature_Extract") == ("scratch", "feature_extract")
    with pytest.raises(ConfigError, match="did you mean 'fine_tune'") as caught:
        parse_strategies("Scratch,finetune")
    assert len(caught.value.problems) == 1  # the unknown name alone, not also 'must include scratch'
    with pytest.raises(ConfigError, match="must include scratch"):
        parse_strategies("feature_extract,fine_tune")
    with pytest.raises(ConfigError, match="twice"):
        parse_strategies("scratch,fine_tune,fine_tune")
    with pytest.raises(ConfigError, match="compares nothing"):
        parse_strategies("scratch")


def test_compare_trains_every_strategy_with_the_run_s_fine_tuning_kit(tiny_split_data: Path, tmp_path: Path) -> None:
    kit = {"loss": {"label_smoothing": 0.1, "class_weights": "balanced"}, "mixup": {"alpha": 0.2}, "ema": {"decay": 0.9},
           "data": {"root": str(tiny_split_data), "image_size": 32, "batch_size": 8, "num_workers": 0, "augment": "trivialaugment", "sampler": "balanced"}}  # fmt: skip
    config = config_from_dict({**experiment(tiny_split_data, tmp_path / "runs"), **kit})
    plan = plan_comparison(config, ("feature_extract", "fine_tune", "scratch"), seeds=1)
    for run in plan.runs:  # each strategy's run keeps the options, and trains with them (feature_extract's cached head does not mix)
        assert (run.config.loss, run.config.mixup, run.config.ema, run.config.data) == (config.loss, config.mixup, config.ema, config.data)
    command = ["compare", str(write_experiment(tmp_path / "exp.yaml", {**experiment(tiny_split_data, tmp_path / "runs"), **kit})),
               "--strategies", "feature_extract,fine_tune,scratch", "--seeds", "1", "--json", "-q"]  # fmt: skip
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["strategies"] == ["feature_extract", "fine_tune", "scratch"]


def test_compare_trains_every_strategy_on_a_label_file(tiny_flat_data: Path, tmp_path: Path) -> None:
    # The file names red and blue as 'warm' and green as 'cool': every run trains on its two classes, not the three folders.
    rows = [f"{folder}/{n:04d}.png,{'cool' if folder == 'green' else 'warm'}" for folder in ("red", "green", "blue") for n in range(6)]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")
    config = write_experiment(tmp_path / "exp.yaml", experiment(tiny_flat_data, tmp_path / "runs", data={"labels": str(labels)}))
    out = tmp_path / "cmp"
    strategies = ("feature_extract", "fine_tune", "pretrained_init", "scratch")
    result = runner.invoke(app, ["compare", str(config), "--strategies", ",".join(strategies), "--seeds", "1", "--out", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["strategies"] == list(strategies)
    for strategy in strategies:
        run = out / f"{strategy}-seed0"
        assert [row["status"] for row in report["results"][strategy]["per_seed"]] == ["trained"]
        assert json.loads((run / "classes.json").read_text()) == ["cool", "warm"] and (run / "summary.json").is_file()
        assert config_from_dict(yaml.safe_load((run / "config.yaml").read_text())).data.labels == labels.resolve()


def test_derived_schedules_keep_the_total_epochs_and_the_learning_rates() -> None:
    reference = [
        PhaseConfig(name="warm", epochs=2, train="head", lr=0.01),
        PhaseConfig(name="tune", epochs=6, train="last:2", lr=0.002, backbone_lr_mult=0.5),
    ]
    scratch = derive_schedule("scratch", reference)
    assert [(p.name, p.epochs, p.train, p.lr, p.backbone_lr_mult) for p in scratch] == [("all", 8, "all", 0.002, 1.0)]
    assert [(p.epochs, p.train, p.lr) for p in derive_schedule("feature_extract", reference)] == [(8, "head", 0.01)]
    fine_tune = derive_schedule("fine_tune", reference)  # head round(3 * 8 / 8) = 3, body 5, as the default
    assert [(p.name, p.epochs, p.lr, p.backbone_lr_mult) for p in fine_tune] == [("head", 3, 0.01, 1.0), ("body", 5, 0.002, 0.5)]
    assert all(p.min_steps is None for p in fine_tune + scratch)  # every run trains the same epochs
    # from a single scratch phase of 10 epochs: head round(3.75) = 4, body 6, both at the scratch lr
    from_scratch = derive_schedule("fine_tune", [PhaseConfig(name="all", epochs=10, train="all", lr=0.005)])
    assert [(p.epochs, p.lr) for p in from_scratch] == [(4, 0.005), (6, 0.005)]
    assert [p.epochs for p in derive_schedule("fine_tune", [PhaseConfig(name="all", epochs=2, train="all", lr=0.1)])] == [1, 1]
    with pytest.raises(ConfigError, match="at least 2 epochs"):
        derive_schedule("fine_tune", [PhaseConfig(name="all", epochs=1, train="all", lr=0.1)])


def tiny_config(data: Path, out: Path, **sections: object):  # type: ignore[no-untyped-def]
    return config_from_dict(experiment(data, out, **sections))


def test_plan_runs_every_strategy_and_seed_for_the_same_epochs(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "data", tmp_path / "runs", seed=7, early_stopping={"patience": 1})
    plan = plan_comparison(config, ("scratch", "feature_extract", "fine_tune"), seeds=2)
    assert plan.out == tmp_path / "runs" / "tiny-compare"
    assert [(run.name, run.config.seed) for run in plan.runs] == [
        ("scratch-seed7", 7), ("feature_extract-seed7", 7), ("fine_tune-seed7", 7),
        ("scratch-seed8", 8), ("feature_extract-seed8", 8), ("fine_tune-seed8", 8),
    ]  # fmt: skip
    assert {sum(p.epochs for p in run.config.schedule or []) for run in plan.runs} == {2}
    fine_tune = plan.runs[2].config
    assert fine_tune.schedule == config.schedule  # the config's own strategy keeps its schedule
    assert all(run.config.early_stopping.patience is None for run in plan.runs)
    assert any("patience" in notice for notice in plan.notices)
    assert any("weights is none" in notice for notice in plan.notices)
    default = plan_comparison(config.model_copy(update={"schedule": None}), ("scratch", "fine_tune"), seeds=1)
    assert default.epochs == sum(p.epochs for p in default_schedule("fine_tune")) == 8


def test_until_plateau_is_switched_off_so_every_run_trains_every_epoch(tmp_path: Path) -> None:
    schedule = [{"name": "head", "epochs": 2, "train": "head", "lr": 1e-2, "until_plateau": {"patience": 1}},
                {"name": "body", "epochs": 2, "train": "all", "lr": 1e-3}]  # fmt: skip
    plan = plan_comparison(tiny_config(tmp_path / "data", tmp_path / "runs", schedule=schedule), ("scratch", "fine_tune"), seeds=1)
    assert all(phase.until_plateau is None for run in plan.runs for phase in run.config.schedule or [])
    assert any("until_plateau of phase(s) head is ignored" in notice for notice in plan.notices)


def test_a_rerun_must_ask_for_the_same_runs(tmp_path: Path) -> None:
    plan = plan_comparison(tiny_config(tmp_path / "data", tmp_path / "runs"), ("scratch", "fine_tune"), seeds=1)
    trained = config_to_dict(config_for_task(plan.runs[0].config, multi_label=False))  # as train records it: metric auto resolved
    trained["device"] = "cuda"  # may differ: it does not change what the run computes
    (plan.out / "scratch-seed0").mkdir(parents=True)
    (plan.out / "scratch-seed0" / "config.yaml").write_text(dump_yaml(trained))
    check_existing_runs(plan)
    trained["schedule"][0]["lr"] = 0.5
    (plan.out / "scratch-seed0" / "config.yaml").write_text(dump_yaml(trained))
    with pytest.raises(ConfigError, match=r"schedule: this run was trained with"):
        check_existing_runs(plan)


def test_the_comparison_figure_has_a_line_per_strategy_and_the_phase_boundaries() -> None:
    bands = [
        StrategyBand("scratch", [0.2, 0.4, 0.6], [0.05, 0.05, 0.1], [], 3),
        StrategyBand("fine_tune", [0.5, 0.7, 0.8], [0.05, 0.02, 0.01], [1], 3),
        StrategyBand("feature_extract", [0.5, 0.6, 0.65], None, [], 1),
    ]
    (axes,) = comparison_figure(bands, "t").axes
    curves = [line for line in axes.get_lines() if line.get_label() != PHASE_LABEL]
    boundaries = [line for line in axes.get_lines() if line.get_label() == PHASE_LABEL]
    assert [line.get_label().split(" ")[0] for line in curves] == ["scratch", "fine_tune", "feature_extract"]
    assert [line.get_xdata()[0] for line in boundaries] == [1.5]
    assert len(axes.collections) == 2  # the ± sd bands; one seed has none


def test_compare_end_to_end_then_resume(tmp_path: Path, tiny_split_data: Path) -> None:
    config = write_experiment(tmp_path / "experiment.yaml", experiment(tiny_split_data, tmp_path / "runs"))
    out = tmp_path / "cmp"
    (out / "fine_tune-seed1").mkdir(parents=True)  # a run killed before it wrote anything
    command = ["compare", str(config), "--strategies", "scratch,fine_tune", "--seeds", "2", "--out", str(out), "--json"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "report.json").read_text()) == report
    markdown = (out / "report.md").read_text()
    assert "transfer ratio" in markdown and "(AUC_T − AUC_S) / AUC_S" in markdown and "round(3T/8)" in markdown
    assert len(list((out / "unfinished").iterdir())) == 1  # the empty run was kept aside, then trained again

    assert report["strategies"] == ["scratch", "fine_tune"] and report["seeds"] == [0, 1] and report["epochs"] == 2
    assert [p["epochs"] for p in report["schedules"]["scratch"]] == [2]
    assert [p["epochs"] for p in report["schedules"]["fine_tune"]] == [1, 1]
    assert report["curves"]["fine_tune"]["phase_ends"] == [1] and report["curves"]["scratch"]["phase_ends"] == []
    first = {}
    for strategy in ("scratch", "fine_tune"):
        for seed in (0, 1):
            run = out / f"{strategy}-seed{seed}"
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert len(rows) == 2 and (run / "summary.json").is_file()
            first[strategy, seed] = rows[0]["val_acc"]
    per_seed = report["results"]["fine_tune"]["per_seed"]
    assert [row["status"] for row in per_seed] == ["trained", "trained"]
    for row in per_seed:  # measured against scratch of the same seed
        assert row["jumpstart"] == pytest.approx(first["fine_tune", row["seed"]] - first["scratch", row["seed"]])
    jumpstart = report["results"]["fine_tune"]["measures"]["jumpstart"]
    assert jumpstart["n"] == 2 and jumpstart["mean"] == pytest.approx(sum(r["jumpstart"] for r in per_seed) / 2)
    assert report["results"]["scratch"]["measures"]["jumpstart"]["mean"] == 0.0

    # Rerun: finished runs are skipped; a run without summary.json is resumed (or trained again).
    (out / "scratch-seed1" / "summary.json").unlink()
    damaged = out / "fine_tune-seed0"  # and a run whose last checkpoint was cut short: trained again, not stuck
    (damaged / "summary.json").unlink()
    (damaged / "checkpoints" / "last.pt").write_bytes((damaged / "checkpoints" / "last.pt").read_bytes()[:1000])
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    statuses = {(s, row["seed"]): row["status"] for s, r in json.loads(result.stdout)["results"].items() for row in r["per_seed"]}
    assert statuses.pop(("scratch", 1)) in ("resumed", "trained")
    assert statuses.pop(("fine_tune", 0)) == "trained" and "fine_tune-seed0" in result.stderr and "cannot be resumed" in result.stderr
    assert len(list((out / "unfinished").iterdir())) == 2
    assert set(statuses.values()) == {"skipped"}
    assert (out / "scratch-seed1" / "summary.json").is_file()

    # The folder then works with `report`, and a different experiment is refused.
    assert runner.invoke(app, ["report", str(out), "--json"]).exit_code == 0
    changed = runner.invoke(app, [*command, "--set", "schedule.0.lr=0.5"])
    assert changed.exit_code == 1 and "this run was trained with" in changed.output


def test_compare_on_multi_label_data_measures_every_curve_by_val_map_and_reruns(tmp_path: Path) -> None:
    from transferctl.testing.synthetic import write_multi_label_dataset

    labels = write_multi_label_dataset(tmp_path / "data", images=24, size=16)
    config = write_experiment(tmp_path / "exp.yaml", experiment(labels.parent, tmp_path / "runs", data={"labels": str(labels)}))
    out = tmp_path / "cmp"
    command = ["compare", str(config), "--strategies", "scratch,fine_tune", "--seeds", "1", "--out", str(out), "--json", "-q"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metric"] == "val_map"
    for strategy in ("scratch", "fine_tune"):
        run = out / f"{strategy}-seed0"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (row,) = report["results"][strategy]["per_seed"]
        assert row["best_val_map"] == max(r["val_map"] for r in rows) and "best_val_acc" not in row  # mAP, not subset accuracy
        assert yaml.safe_load((run / "config.yaml").read_text())["early_stopping"]["metric"] == "val_map"  # best.pt follows mAP too
    assert "best_val_map" in report["results"]["fine_tune"]["measures"]
    markdown = (out / "report.md").read_text()
    assert "best val mAP" in markdown and "validation mAP (`val_map`)" in markdown
    text = runner.invoke(app, command[:-2])  # the table, on stderr's console: titled by the metric
    assert text.exit_code == 0 and "best val mAP" in text.output and "on val_map" in " ".join(text.output.split())
    assert all(row["status"] == "skipped" for row in json.loads(runner.invoke(app, command).stdout)["results"]["scratch"]["per_seed"])
