from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from helpers import experiment
from transferctl.cli import app
from transferctl.config import STRATEGIES, load_config
from transferctl.errors import DataError
from transferctl.analysis.recommend import (
    COSTS,
    Advice,
    BackboneReport,
    Candidate,
    MeasureOptions,
    Thresholds,
    add_reference,
    advise,
    estimate_noise,
    frozen_candidates,
    judge_similarity,
    judge_size,
    pick_candidate,
    pick_reasons,
    rank,
    score_backbone,
)

runner = CliRunner()
TH = Thresholds()


def invoke(*args: str):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, list(args))


# ---------------------------------------------------------------------------------------------
# Rule mode


@pytest.mark.parametrize(
    ("size", "similar", "strategy"),
    [("small", "yes", "feature_extract"), ("small", "no", "scratch"), ("large", "yes", "fine_tune"), ("large", "no", "pretrained_init")],
)
def test_rule_mode_gives_the_four_cases(size: str, similar: str, strategy: str) -> None:
    result = invoke("recommend", "--size", size, "--similar", similar, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["mode"] == "rule" and answer["strategy"] == strategy and answer["cut"] is None
    assert answer["case"] == f"{size} data, {'similar' if similar == 'yes' else 'different'} task"
    assert answer["reasons"] and all(isinstance(r, str) for r in answer["reasons"])


def test_rule_mode_small_and_different_points_to_data_mode() -> None:
    reasons = advise("small", similar=False).reasons
    assert any("--data" in reason for reason in reasons)


def test_rule_mode_prints_for_humans_on_stderr() -> None:
    result = invoke("recommend", "--size", "large", "--similar", "yes")
    assert result.exit_code == 0 and result.stdout == ""
    assert "fine_tune" in result.stderr and "large data, similar task" in result.stderr


@pytest.mark.parametrize("args", [["--size", "small"], ["--size", "huge", "--similar", "yes"], ["--size", "small", "--similar", "maybe"], []])
def test_rule_mode_usage_errors_exit_2(args: list[str]) -> None:
    assert invoke("recommend", *args).exit_code == 2


@pytest.mark.parametrize(("size", "similar"), [("small", "yes"), ("small", "no"), ("large", "yes"), ("large", "no")])
def test_written_config_validates_unchanged(size: str, similar: str, tiny_split_data: Path, tmp_path: Path) -> None:
    path = tmp_path / "configs" / "exp.yaml"
    path.parent.mkdir()
    result = invoke("recommend", "--size", size, "--similar", similar, "--data", str(tiny_split_data), "--backbone", "resnet50", "--write-config", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"] == str(path)
    config = load_config(path)
    assert config.strategy == json.loads(result.stdout)["strategy"]
    assert config.data.root == tiny_split_data.resolve() and config.backbone.name == "resnet50"
    raw = yaml.safe_load(path.read_text())
    assert raw["data"]["root"] == "../tiny_split"  # relative to the file, as train reads it
    assert raw["schedule"]  # every default spelled out
    assert (config.backbone.weights == "none") == (config.strategy == "scratch")


def test_written_config_trains(tiny_split_data: Path, tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    assert invoke("recommend", "--size", "small", "--similar", "yes", "--data", str(tiny_split_data), "--write-config", str(path)).exit_code == 0
    fast = ["--set", "backbone.weights=none", "--set", "data.image_size=32", "--set", "schedule.0.epochs=1", "--set", "data.num_workers=0",
            "--set", "device=cpu", "--set", "precision=fp32", "--set", "data.batch_size=8"]  # fmt: skip
    result = invoke("train", str(path), *fast, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["strategy"] == "feature_extract" and Path(summary["run_dir"]).parent == tmp_path / "runs"


def test_write_config_refuses_to_overwrite_and_needs_data(tiny_split_data: Path, tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("mine\n")
    result = invoke("recommend", "--size", "small", "--similar", "yes", "--data", str(tiny_split_data), "--write-config", str(path))
    assert result.exit_code == 1 and "already exists" in result.stderr and path.read_text() == "mine\n"
    assert invoke("recommend", "--size", "small", "--similar", "yes", "--data", str(tiny_split_data), "--write-config", str(path), "--force").exit_code == 0
    result = invoke("recommend", "--size", "small", "--similar", "yes", "--write-config", str(tmp_path / "other.yaml"))
    assert result.exit_code == 1 and "--data" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [("--worth-points", "nan", "--worth-points: must be a number of points >= 0, got nan"),
     ("--gain-points", "inf", "--gain-points: must be a number of points >= 0, got inf"),
     ("--depth-points", "-1", "--depth-points: must be a number of points >= 0, got -1.0"),
     ("--image-size", "-5", "--image-size: must be between 8 and 4096 pixels, got -5"),
     ("--image-size", "0", "--image-size: must be between 8 and 4096 pixels, got 0"),
     ("--seed", "-1", "--seed: must be 0 or more, got -1"),
     ("--folds", "1", "--folds: must be at least 2, got 1"),
     ("--budget", "-1", "--budget: must be a number of seconds >= 0, got -1.0"),
     ("--val-fraction", "1", "--val-fraction: must be between 0 and 1, got 1.0"),
     ("--race-size", "4", "--race-size: must be between 8 and 4096 pixels, got 4"),
     ("--augment", "flip", "--augment: must be none, standard, randaugment, trivialaugment, autoaugment or augmix, got 'flip'")],
)  # fmt: skip
def test_measurement_flags_out_of_range_are_one_line(tiny_flat_data: Path, flag: str, value: str, expected: str) -> None:
    result = invoke("recommend", "--data", str(tiny_flat_data), "--weights", "none", flag, value, "--device", "cpu", "-q")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [f"error: {expected}"]


def test_rule_mode_says_when_random_weights_defeat_the_strategy() -> None:
    result = invoke("recommend", "--size", "small", "--similar", "yes", "--weights", "none")
    assert result.exit_code == 0 and "note: --weights none: feature_extract builds on pretrained weights" in result.stderr
    assert "note:" not in invoke("recommend", "--size", "small", "--similar", "no", "--weights", "none").stderr  # scratch needs none


def test_write_config_writes_the_augmentation_asked_for_and_refuses_an_unknown_one(tiny_split_data: Path, tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    rule = ["recommend", "--size", "small", "--similar", "yes", "--data", str(tiny_split_data), "--write-config", str(path)]
    assert invoke(*rule, "--augment", "none").exit_code == 0
    assert yaml.safe_load(path.read_text())["data"]["augment"] == "none"
    result = invoke(*rule, "--augment", "mirror", "--force")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "error: --augment: must be none, standard, randaugment, trivialaugment, autoaugment or augmix, got 'mirror'"
    ]


def test_write_config_refuses_a_folder_and_missing_data(tiny_split_data: Path, tmp_path: Path) -> None:
    rule = ["recommend", "--size", "small", "--similar", "yes", "--force"]
    result = invoke(*rule, "--data", str(tiny_split_data), "--write-config", str(tmp_path))
    assert result.exit_code == 1 and f"--write-config: {tmp_path} is a folder" in result.stderr
    result = invoke(*rule, "--data", str(tmp_path / "nope"), "--write-config", str(tmp_path / "exp.yaml"))
    assert result.exit_code == 1 and f"--data: no such folder: {tmp_path / 'nope'}" in result.stderr
    assert not (tmp_path / "exp.yaml").exists()


def test_rule_mode_does_not_import_torch(tiny_split_data: Path, tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from transferctl.cli import app
        args = ["recommend", "--size", "small", "--similar", "no", "--json", "--data", {str(tiny_split_data)!r},
                "--write-config", {str(tmp_path / "exp.yaml")!r}]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Data mode: the decisions, on measurements whose answer is known


def report(**fields: object) -> BackboneReport:
    values: dict[str, object] = dict(
        name="resnet18", weights="DEFAULT", logme=0.5, logme_spread=0.01, probe_acc=0.9, probe_gain_points=0.5,
        stage_acc={"layer2": 0.7}, feature_dim=512, random_images=100, pretrained_subset_acc=0.9, random_probe_acc=0.5,
        best_stage="layer2", best_stage_random_acc=0.5, best_stage_subset_acc=0.7, source_agreement=0.4, source_classes=1000,
    )  # fmt: skip
    values.update(fields)
    return BackboneReport(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("median", "gain", "size", "word"),
    [(40, 0.0, "small", "small:"), (5000, 9.0, "large", "large:"), (300, 3.5, "small", "effectively small"), (300, 1.0, "large", "large enough")],
)
def test_size_from_images_per_class_and_the_probe_gain(median: float, gain: float, size: str, word: str) -> None:
    got, reasons = judge_size(median, 10, gain, 500, 500, TH)
    assert got == size and reasons[0].startswith(word)
    assert "small below 100" in reasons[0]  # the threshold is shown next to the value


def test_a_gain_measured_on_a_sample_is_cautious_and_says_how_to_measure_all() -> None:
    got, reasons = judge_size(400, 300, 4.0, 1000, 8000, TH)
    assert got == "small" and "--max-images 8000" in reasons[0]
    assert judge_size(400, 300, 0.5, 1000, 8000, TH)[0] == "large"  # flat on the sample: flatter on all of it


def test_similar_when_the_top_layer_holds_up_and_pretraining_helps() -> None:
    similar, cut, reasons = judge_similarity(report(), TH)
    assert similar and cut is None
    assert any("AMI 0.400" in r for r in reasons)


def test_different_with_a_cut_when_a_mid_stage_wins_clearly_and_beats_random() -> None:
    best = report(probe_acc=0.55, pretrained_subset_acc=0.55, stage_acc={"layer2": 0.85}, best_stage_subset_acc=0.85, best_stage_random_acc=0.5)
    similar, cut, reasons = judge_similarity(best, TH)
    assert not similar and cut == "layer2"
    assert any("'layer2' reaches 85.0%" in r and "more than 5" in r for r in reasons)
    advice = advise("small", similar, cut, measured=True)
    assert advice.strategy == "feature_extract" and advice.cut == "layer2"
    assert advise("large", similar, None, measured=True).strategy == "pretrained_init"


def test_no_cut_when_the_winning_stage_is_no_better_than_random_features() -> None:
    best = report(probe_acc=0.55, stage_acc={"layer2": 0.85}, best_stage_subset_acc=0.85, best_stage_random_acc=0.84)
    similar, cut, _ = judge_similarity(best, TH)
    assert not similar and cut is None
    assert advise("small", similar, cut, measured=True).strategy == "scratch"


@pytest.mark.parametrize(("changes", "phrase"), [({"random_probe_acc": 0.88}, "worth only"), ({"source_agreement": 0.02}, "barely agree")])
def test_different_when_pretraining_is_worth_little_or_the_source_head_disagrees(changes: dict, phrase: str) -> None:
    similar, _, reasons = judge_similarity(report(**changes), TH)
    assert not similar and any(phrase in r for r in reasons)


def test_thresholds_are_configurable() -> None:
    best = report(random_probe_acc=0.88)  # pretraining worth 2 points
    assert not judge_similarity(best, TH)[0]
    assert judge_similarity(best, Thresholds(worth_points=1.0))[0]


def test_ranking_is_by_logme() -> None:
    ranked = rank([report(name="a", logme=0.1), report(name="b", logme=0.7), report(name="c", logme=0.3)])
    assert [r.name for r in ranked] == ["b", "c", "a"]


def test_scores_from_generated_features_find_a_mid_stage_that_separates_the_classes() -> None:
    from transferctl.analysis.probe_features import Features

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    clear = rng.normal(size=(100, 16))
    clear[:, :4] += 6.0 * np.eye(4)[labels]
    noise = rng.normal(size=(100, 64))
    subset = np.arange(0, 100, 2)
    pretrained = Features({"layer1": rng.normal(size=(100, 8)), "layer2": clear}, noise, (labels * 3) % 1000, 0.0)
    random = Features({"layer1": rng.normal(size=(50, 8)), "layer2": rng.normal(size=(50, 16))}, rng.normal(size=(50, 64)), None, 0.0)
    scored = score_backbone("resnet18", MeasureOptions(folds=3), pretrained, labels)
    assert scored.pretraining_gain_points is None  # no reference yet
    add_reference(scored, pretrained, random, labels, subset, MeasureOptions(folds=3))
    assert scored.best_stage == "layer2" and scored.stage_acc["layer2"] > 0.95 and scored.probe_acc < 0.5
    assert scored.best_stage_random_acc is not None and scored.best_stage_random_acc < 0.5
    assert scored.source_agreement == pytest.approx(1.0)
    similar, cut, _ = judge_similarity(scored, TH)
    assert not similar and cut == "layer2"


def candidate(strategy: str, estimate: float | None, cut: str | None = None, images: int = 400) -> Candidate:
    noise = None if estimate is None else estimate_noise(estimate, images)
    return Candidate(strategy, "resnet18", cut, estimate, noise, "measured", COSTS["cut" if cut else strategy])


def test_the_pick_is_the_best_estimate_when_it_leads_by_more_than_the_noise() -> None:
    field = [candidate("feature_extract", 0.70), candidate("feature_extract", 0.74, cut="layer2"), candidate("fine_tune", 0.80), candidate("scratch", 0.90)]
    assert pick_candidate(field).strategy == "scratch"


def test_within_one_standard_error_the_cheaper_candidate_is_picked() -> None:
    noise = estimate_noise(0.85, 400)  # about 1.8 points on 400 validation images
    close = [candidate("scratch", 0.85), candidate("pretrained_init", 0.845), candidate("fine_tune", 0.85 - 0.9 * noise), candidate("feature_extract", 0.80)]
    assert pick_candidate(close).strategy == "fine_tune"
    assert pick_candidate([candidate("fine_tune", 0.85), candidate("feature_extract", 0.84, cut="layer3")]).cut == "layer3"
    # Two of the same cost: the higher estimate.
    assert pick_candidate([candidate("scratch", 0.85), candidate("pretrained_init", 0.845)]).strategy == "scratch"


def test_few_validation_images_make_a_wide_noise_and_a_perfect_score_is_not_certain() -> None:
    assert estimate_noise(1.0, 8) > 0.05 and estimate_noise(1.0, 8) > estimate_noise(1.0, 800) > 0
    tied = [candidate("scratch", 1.0, images=8), candidate("feature_extract", 0.9, images=8)]
    assert pick_candidate(tied).strategy == "feature_extract"  # 8 of 8 is about 89% ± 11%


def test_a_diverged_candidate_is_never_picked_and_none_measured_is_an_error() -> None:
    assert pick_candidate([candidate("scratch", None), candidate("fine_tune", 0.4)]).strategy == "fine_tune"
    with pytest.raises(DataError, match="no candidate could be measured"):
        pick_candidate([candidate("scratch", None)])


def test_every_frozen_body_and_cut_is_a_candidate_and_the_reasons_compare_with_the_rule() -> None:
    measured = report(probe_val_acc=0.6, stage_val_acc={"layer2": 0.7, "layer3": 0.65}, crop=32, probe_c=1.0)
    found = frozen_candidates([measured, report(name="mobilenet_v3_small")], scored=50)  # the second: --fast, no validation score
    assert [(c.strategy, c.cut, c.estimate) for c in found] == [("feature_extract", None, 0.6), ("feature_extract", "layer2", 0.7), ("feature_extract", "layer3", 0.65)]
    assert all("50 validation images" in c.how for c in found)
    rule = advise("small", False, measured=True)
    pick = pick_candidate([*found, candidate("scratch", 0.9)])
    reasons = pick_reasons(pick, [*found, pick], rule)
    assert "the best measured estimate" in reasons[0] and "the four-case rule agrees (small data, different task)" in reasons[1]
    cut = pick_candidate(found)
    assert "would say scratch; the measurements overrule it" in pick_reasons(cut, found, rule)[1]


def test_advice_case_names_both_facts() -> None:
    assert Advice("large", False, "pretrained_init", []).case == "large data, different task"


# ---------------------------------------------------------------------------------------------
# Data mode end to end, with a base model trained here


@pytest.fixture(scope="module")
def base_run(module_tmp_path: Path) -> Path:
    """A tiny base model: resnet18 trained for one epoch on three colours, shared by this module's tests."""
    from transferctl.config import config_from_dict
    from transferctl.testing.synthetic import tiny_dataset
    from transferctl.training.train import train

    folder = module_tmp_path
    data = tiny_dataset(folder / "data", n_classes=3, layout="split")
    schedule = [{"name": "all", "epochs": 1, "train": "all", "lr": 1.0e-2}]
    return Path(train(config_from_dict(experiment(data, folder / "runs", strategy="scratch", schedule=schedule)))["run_dir"])


def test_data_mode_end_to_end_with_a_run_as_weights(base_run: Path, tmp_path: Path) -> None:
    # Also the fast known answer: the base learned colours and the target is four colours, so a frozen body
    # reads them perfectly and, cheapest, is picked; the race's first round (--budget 0) cannot do better.
    from transferctl.testing.synthetic import tiny_dataset

    target = tiny_dataset(tmp_path / "target", n_classes=4, per_class=8, layout="flat", seed=3)
    path = tmp_path / "rec.yaml"
    args = ["recommend", "--data", str(target), "--weights", f"run:{base_run}", "--image-size", "32", "--random-images", "16",
            "--folds", "2", "--device", "cpu", "--precision", "fp32", "--budget", "0", "--val-fraction", "0.25",
            "--write-config", str(path), "--json", "--quiet"]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["mode"] == "data" and answer["measurement"] == "race" and answer["strategy"] in STRATEGIES
    # The flat tree split as training splits it: 6 of each class's 8 train, 2 validate.
    assert answer["data"]["images"] == 24 and answer["data"]["per_class_median"] == 6 and answer["data"]["val_images"] == answer["data"]["scored"] == 8
    assert "split as training splits it (val_fraction 0.25, seed 0)" in answer["data"]["measured_on"]
    # Every frozen body (whole and each cut) and every end-to-end strategy has an estimate; --budget 0: one round.
    kinds = {(c["strategy"], c["cut"]) for c in answer["candidates"]}
    assert {("feature_extract", None), ("feature_extract", "layer2"), ("fine_tune", None), ("pretrained_init", None), ("scratch", None)} <= kinds
    assert {run["round"] for run in answer["race"]["runs"]} == {0} and answer["race"]["ended"].startswith("budget")
    assert (answer["pick"]["strategy"], answer["pick"]["cut"]) == (answer["strategy"], answer["cut"])
    assert answer["strategy"] == "feature_extract" and answer["pick"]["estimate"] == 1.0
    assert all("an eighth of its default schedule" in c["how"] for c in answer["candidates"] if c["strategy"] != "feature_extract")
    (row,) = answer["ranking"]  # the run's own backbone, found from its config.yaml
    assert row["name"] == "resnet18" and row["weights"] == f"run:{base_run}"
    assert row["source_classes"] == 3 and row["source_agreement"] is not None  # the base run's head
    assert row["imagenet_top1"] is None and set(row["stage_acc"]) <= {"stem", "layer1", "layer2", "layer3", "layer4"}
    assert {"small_below", "large_from", "gain_points", "depth_points", "worth_points", "ami_min"} <= set(answer["thresholds"])
    config = load_config(path)
    assert config.strategy == answer["strategy"] and config.backbone.cut == answer["cut"]
    assert config.data.val_fraction == 0.25  # training holds out the images recommend scored on
    assert config.data.image_size == 32 == row["crop"]  # trains at the size it was measured at, even when scratch drops the weights
    if config.strategy != "scratch":
        assert config.backbone.weights == f"run:{base_run.resolve()}"


def test_data_mode_prints_a_table_and_the_measured_values(base_run: Path, tiny_flat_data: Path) -> None:
    args = ["recommend", "--data", str(tiny_flat_data), "--weights", f"run:{base_run}", "--image-size", "32", "--folds", "2", "--precision", "fp32", "--fast"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    for text in ("resnet18", "LogME", "size:", "similarity:", "strategy:", "small below 100", "--fast: the four-case rule", "measured:"):
        assert text in result.stderr, text


def test_data_mode_ranks_several_backbones_and_measures_the_reference_for_the_best(tiny_flat_data: Path) -> None:
    args = ["recommend", "--data", str(tiny_flat_data), "--backbone", "resnet18,mobilenet_v3_small", "--weights", "none",
            "--image-size", "32", "--folds", "2", "--precision", "fp32", "--fast", "--json", "-q"]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)["ranking"]
    assert {first["name"], second["name"]} == {"resnet18", "mobilenet_v3_small"} and first["logme"] >= second["logme"]
    assert first["random_probe_acc"] is not None and second["random_probe_acc"] is None
    assert first["imagenet_top1"] is None and first["source_agreement"] is None  # weights none: no source head


def test_data_mode_user_errors(tmp_path: Path, tiny_flat_data: Path) -> None:
    result = invoke("recommend", "--data", str(tmp_path / "nowhere"))
    assert result.exit_code == 1 and "nowhere" in result.stderr
    result = invoke("recommend", "--data", str(tiny_flat_data), "--backbone", "resnet180", "--weights", "none")
    assert result.exit_code == 1 and "resnet18" in result.stderr
    result = invoke("recommend", "--data", str(tiny_flat_data), "--max-images", "2")
    assert result.exit_code == 1 and "--max-images" in result.stderr


def test_random_weights_are_measured_the_same_for_a_seed(tiny_flat_data: Path) -> None:
    import torch

    args = ["recommend", "--data", str(tiny_flat_data), "--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32",
            "--folds", "2", "--precision", "fp32", "--random-images", "8", "--device", "cpu", "--fast", "--json", "-q"]  # fmt: skip
    rows = []
    for _ in range(2):
        torch.manual_seed(len(rows))  # whatever the caller's RNG, --seed decides the network
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        rows.append(json.loads(result.stdout)["ranking"][0])
    assert (rows[0]["logme"], rows[0]["probe_acc"]) == (rows[1]["logme"], rows[1]["probe_acc"])


def test_data_mode_shows_every_candidate_how_it_was_measured_and_the_pick(monkeypatch: pytest.MonkeyPatch, tiny_split_data: Path) -> None:
    from transferctl.analysis import recommend as module
    from transferctl.analysis.recommend import DataReport, DataSummary

    field = [candidate("feature_extract", 0.71), candidate("feature_extract", 0.78, cut="layer2"), candidate("fine_tune", 0.80), candidate("scratch", None)]
    field[2].how, field[3].how = "trained 8 epochs (head 3 + body 5)", "diverged in round 1: the loss became nan"
    summary = DataSummary(str(tiny_split_data), ["a", "b"], 400, 200, 200, "a", 400, "split", 400, 400, "probes fit on all 400 training images (train/)")
    canned = DataReport(summary, TH, [report()], Advice("large", True, "fine_tune", ["fine_tune on resnet18: 80.0%"]), ["large: 200"], ["similar"],
                        candidates=field, pick=field[2], race={"runs": [], "ended": "one candidate left", "seconds": 1.0, "budget_seconds": 60, "notes": []})  # fmt: skip
    monkeypatch.setattr(module, "measure", lambda *args, **kwargs: canned)
    result = invoke("recommend", "--data", str(tiny_split_data), "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())  # the table folds long cells
    for expected in ("candidates, by measured validation accuracy", "80.0% ±", "78.0% ±", "layer2", "diverged in round 1",
                     "trained 8 epochs", "measured: probes fit on all 400 training images", "strategy: fine_tune", "→"):  # fmt: skip
        assert expected in text, expected
    answer = json.loads(invoke("recommend", "--data", str(tiny_split_data), "--json").stdout)
    assert answer["measurement"] == "race" and answer["pick"]["strategy"] == "fine_tune" and len(answer["candidates"]) == 4


# ---------------------------------------------------------------------------------------------
# Known answers: generated sets on which one way of training wins; recommend must pick it. The race gets a
# budget no machine runs out of, so that every round runs and the answer is the same everywhere.


def mark_pair(vertical: bool, colour: tuple[int, int, int] = (230, 230, 230), square: bool = False, background: float = 30.0) -> Any:
    """Two equal marks anywhere in the picture, side by side or one above the other: every small patch looks
    the same in both classes, only the arrangement tells them apart."""

    def make(rng: np.random.Generator, size: int) -> Image.Image:
        pixels = np.full((size, size, 3), background) + rng.normal(0.0, 6.0, (size, size, 1))
        radius, gap = 0.12 * size, rng.uniform(0.3, 0.5) * size
        along, across = rng.uniform(radius, size - radius - gap), rng.uniform(radius, size - radius)
        drift = rng.uniform(-2.0, 2.0)
        centres = [(along, across), (along + gap, across + drift)]
        rows, columns = np.mgrid[0:size, 0:size]
        for first, second in centres:
            x, y = (second, first) if vertical else (first, second)
            distance = np.maximum(abs(columns - x), abs(rows - y)) if square else np.hypot(columns - x, rows - y)
            pixels[distance < radius] = colour
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    return make


def pairs(**look: Any) -> dict[str, Any]:
    return {"horizontal": mark_pair(False, **look), "vertical": mark_pair(True, **look)}


COLOURS = {"red": (200, 50, 50), "green": (50, 180, 60), "blue": (50, 70, 210), "yellow": (220, 210, 50)}


def flat_colour(colour: tuple[int, int, int]) -> Any:
    def make(rng: np.random.Generator, size: int) -> Image.Image:
        return Image.fromarray(np.clip(np.asarray(colour) + rng.normal(0.0, 25.0, (size, size, 3)), 0, 255).astype(np.uint8), "RGB")

    return make


def split_set(root: Path, classes: dict[str, Any], train: int, val: int, seed: int = 1) -> Path:
    from transferctl.testing.synthetic import write_image_folder

    return write_image_folder(root, classes, train + val, 32, seed, "split", val_fraction=val / (train + val))


def recommend_json(data: Path, weights: str, *extra: str) -> dict[str, Any]:
    args = ["recommend", "--data", str(data), "--weights", weights, "--image-size", "32", "--device", "cpu", "--precision", "fp32",
            "--random-images", "40", "--json", "-q", *extra]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def estimates(answer: dict[str, Any]) -> dict[str, float]:
    """The best estimate of each strategy (the frozen ones: over every cut)."""
    found: dict[str, float] = {}
    for row in answer["candidates"]:
        if row["estimate"] is not None:
            found[row["strategy"]] = max(found.get(row["strategy"], 0.0), row["estimate"])
    return found


@pytest.fixture(scope="module")
def arrangement_base(module_tmp_path: Path) -> Path:
    """resnet18 trained from scratch to tell horizontal from vertical pairs of white dots (about 100% on val)."""
    from transferctl.config import config_from_dict
    from transferctl.training.train import train

    data = split_set(module_tmp_path / "dots", pairs(), 60, 15, seed=0)
    schedule = [{"name": "all", "epochs": 10, "train": "all", "lr": 1.0e-3}]
    raw = experiment(data, module_tmp_path / "runs", name="dots", strategy="scratch", schedule=schedule)
    return Path(train(config_from_dict(raw))["run_dir"])


@pytest.mark.slow
def test_known_answer_frozen_features_win_when_the_target_shares_the_bases_features(arrangement_base: Path, tmp_path: Path) -> None:
    # The same arrangements drawn with other marks, 10 training images a class: the base's features already
    # separate them, and a frozen body costs least. (--budget 0: the race's first round only, the same on any
    # machine; with the whole race every strategy reaches 100% here, and the frozen body still wins on cost.)
    target = split_set(tmp_path / "squares", pairs(colour=(230, 200, 40), square=True), 10, 30)
    answer = recommend_json(target, f"run:{arrangement_base}", "--budget", "0")
    assert answer["strategy"] == "feature_extract", answer["candidates"]
    measured = estimates(answer)
    assert measured["feature_extract"] == max(measured.values()) >= 0.95


@pytest.fixture(scope="module")
def colour_base(module_tmp_path: Path) -> Path:
    """resnet18 trained hard (lr 1e-2, 160 steps) on an unrelated task: which of four flat colours a picture is.
    (A base trained a step or two is still nearly random, and random features read arrangements well.)"""
    from transferctl.config import config_from_dict
    from transferctl.training.train import train

    data = split_set(module_tmp_path / "colours", {name: flat_colour(rgb) for name, rgb in COLOURS.items()}, 32, 8, seed=0)
    schedule = [{"name": "all", "epochs": 10, "train": "all", "lr": 1.0e-2}]
    return Path(train(config_from_dict(experiment(data, module_tmp_path / "runs", name="colours", strategy="scratch", schedule=schedule)))["run_dir"])


@pytest.mark.slow
def test_known_answer_scratch_wins_when_the_base_learned_an_unrelated_task(colour_base: Path, tmp_path: Path) -> None:
    # The base knows colours; the target is an arrangement of dots, and 60 images a class are enough to learn
    # it from random weights. No layer of the base separates the arrangements well, and starting from it is worse.
    target = split_set(tmp_path / "dots", pairs(), 60, 30)
    answer = recommend_json(target, f"run:{colour_base}", "--budget", "3600")
    assert answer["strategy"] == "scratch", answer["candidates"]
    pick = answer["pick"]
    assert "all of its default schedule" in pick["how"]  # the race's last one: as training with the defaults will train
    others = [row for row in answer["candidates"] if row["strategy"] != "scratch" and row["estimate"] is not None]
    assert all(row["estimate"] < pick["estimate"] - pick["noise"] for row in others)


@pytest.mark.slow
def test_known_answer_fine_tune_wins_when_the_features_need_adapting(arrangement_base: Path, tmp_path: Path) -> None:
    # The base's task with the contrast inverted (dark marks on a light ground), 12 images a class: its frozen
    # features fall short, training every layer reaches what scratch and pretrained_init reach, and fine_tune is
    # the cheapest way there.
    target = split_set(tmp_path / "inverted", pairs(colour=(20, 20, 20), background=220.0), 12, 30)
    answer = recommend_json(target, f"run:{arrangement_base}", "--budget", "3600")
    assert answer["strategy"] == "fine_tune", answer["candidates"]
    pick, best = answer["pick"], max((c for c in answer["candidates"] if c["estimate"] is not None), key=lambda c: c["estimate"])
    assert estimates(answer)["feature_extract"] < best["estimate"] - best["noise"] <= pick["estimate"]


def test_data_mode_needs_two_training_images_a_class_after_the_held_out_share(tmp_path: Path) -> None:
    from transferctl.testing.synthetic import tiny_dataset

    flat = tiny_dataset(tmp_path / "flat", n_classes=2, per_class=3, layout="flat")
    result = invoke("recommend", "--data", str(flat), "--weights", "none", "--val-fraction", "0.5", "--device", "cpu")
    assert result.exit_code == 1 and "has 1 training image(s)" in result.stderr and "--val-fraction" in result.stderr


# ---------------------------------------------------------------------------------------------
# Data mode on a label file (data.labels)


def label_file_data(tmp_path: Path) -> tuple[Path, Path]:
    """tiny_dataset's red, green and blue folders, of which a hand-written CSV names red as warm and green as
    cool (blue is not listed), plus one row naming a missing image."""
    from transferctl.testing.synthetic import tiny_dataset

    images = tiny_dataset(tmp_path / "images", n_classes=3, layout="flat")
    rows = [f"red/{n:04d}.png,warm" for n in range(6)] + [f"green/{n:04d}.png,cool" for n in range(6)] + ["red/missing.png,warm"]
    labels = tmp_path / "meta" / "labels.csv"
    labels.parent.mkdir()
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")
    return images, labels


LABELS_FAST = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--folds", "2", "--precision", "fp32",
               "--random-images", "8", "--device", "cpu", "--json", "-q"]  # fmt: skip


def test_data_mode_measures_the_images_a_label_file_names_and_writes_data_labels(tmp_path: Path) -> None:
    images, labels = label_file_data(tmp_path)
    path = tmp_path / "configs" / "rec.yaml"
    path.parent.mkdir()
    result = invoke("recommend", "--data", str(images), "--labels", str(labels), *LABELS_FAST, "--fast", "--write-config", str(path))
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    # The file's two classes and its twelve usable rows, split as training splits them; blue is never looked at.
    assert answer["data"]["classes"] == ["cool", "warm"] and answer["data"]["images"] + answer["data"]["val_images"] == 12
    assert f"the label file {labels}" in answer["data"]["measured_on"]
    assert any("1 row(s) of the label file left out" in note and "no such image" in note for note in answer["notes"])
    written = yaml.safe_load(path.read_text())["data"]
    assert written["labels"] == "../meta/labels.csv" and written["root"] == "../images"  # relative to the written file, as data.root
    assert load_config(path).data.labels == labels.resolve()
    assert invoke("check", str(path)).exit_code == 0


def test_data_mode_races_on_the_label_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transferctl.analysis.race as race

    images, labels = label_file_data(tmp_path)
    trained = []
    original = race._train
    monkeypatch.setattr(race, "_train", lambda config, run_dir: trained.append(config.data.labels) or original(config, run_dir))
    result = invoke("recommend", "--data", str(images), "--labels", str(labels), *LABELS_FAST, "--budget", "0")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["measurement"] == "race" and answer["race"]["runs"]
    assert trained and all(path == labels.resolve() for path in trained)  # every race run trains on the file's rows


def test_rule_mode_writes_data_labels_and_refuses_a_missing_label_file(tmp_path: Path) -> None:
    images, labels = label_file_data(tmp_path)
    path = tmp_path / "rule.yaml"
    result = invoke("recommend", "--size", "small", "--similar", "yes", "--data", str(images), "--labels", str(labels), "--write-config", str(path))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(path.read_text())["data"]["labels"] == "meta/labels.csv"
    result = invoke("recommend", "--size", "small", "--similar", "yes", "--data", str(images), "--labels", str(tmp_path / "gone.csv"),
                    "--write-config", str(tmp_path / "other.yaml"))  # fmt: skip
    assert result.exit_code == 1 and "--labels: no such file" in result.stderr and not (tmp_path / "other.yaml").exists()


def test_data_mode_refuses_a_bad_label_file_in_one_line(tmp_path: Path) -> None:
    images, labels = label_file_data(tmp_path)
    labels.write_text("file,label\nred/0000.png,warm\n")
    result = invoke("recommend", "--data", str(images), "--labels", str(labels), *LABELS_FAST, "--fast")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: data.labels") and "the header lacks path" in line


# ---------------------------------------------------------------------------------------------
# Data mode on multi-label data (a label file with cat|dog cells)


@pytest.fixture
def multi_label_file(tmp_path: Path) -> Path:
    from transferctl.testing.synthetic import write_multi_label_dataset

    return write_multi_label_dataset(tmp_path / "data", images=40, size=16)


def test_data_mode_measures_multi_label_data_by_map_and_writes_a_multi_label_experiment(multi_label_file: Path, tmp_path: Path) -> None:
    from transferctl.config import config_for_task
    from transferctl.data.label_files import discover_data
    from transferctl.data.targets import class_counts

    path = tmp_path / "rec.yaml"
    result = invoke("recommend", "--data", str(multi_label_file.parent), "--labels", str(multi_label_file), *LABELS_FAST, "--fast", "--write-config", str(path))
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["metric"] == "val_map" and answer["data"]["task"] == "multi_label"
    # The size counts images per label: an image once for each of its labels.
    splits = discover_data(multi_label_file.parent, 0.2, 0, labels=multi_label_file)
    per_label = class_counts([label for _, label in splits.train])
    assert answer["data"]["per_class_median"] == np.median(list(per_label.values())) and sum(per_label.values()) > answer["data"]["images"]
    notes = " ".join(answer["notes"])
    for text in ("one-vs-rest", "scored by mAP", "images per label", "(AMI) needs one label an image"):
        assert text in notes, text
    assert "images per label, smallest label" in answer["size_reasons"][0] and " a label" in answer["data"]["measured_on"]
    (row,) = answer["ranking"]
    assert 0.0 <= row["probe_acc"] <= 1.0 and row["source_agreement"] is None
    written = yaml.safe_load(path.read_text())
    assert written["task"] == "multi_label" and written["early_stopping"]["metric"] == "val_map"
    assert written["data"]["sampler"] == "shuffle" and written["loss"]["label_smoothing"] == 0 and written.get("mixup") is None
    assert invoke("check", str(path)).exit_code == 0
    # Rule mode reads no label file: its early_stopping.metric stays auto, for the task training finds (val_map here).
    rule = tmp_path / "rule.yaml"
    assert invoke("recommend", "--size", "small", "--similar", "yes", "--data", str(multi_label_file.parent), "--labels", str(multi_label_file),
                  "--write-config", str(rule)).exit_code == 0  # fmt: skip
    assert yaml.safe_load(rule.read_text())["early_stopping"]["metric"] == "auto"
    assert config_for_task(load_config(rule), multi_label=True).early_stopping.metric == "val_map"


def test_data_mode_races_multi_label_data_by_val_map(monkeypatch: pytest.MonkeyPatch, multi_label_file: Path) -> None:
    import transferctl.analysis.race as race

    summaries: dict[str, dict[str, Any]] = {}
    original = race._train

    def train(config: Any, run_dir: Path) -> dict[str, Any]:
        summaries[config.strategy] = original(config, run_dir)
        return summaries[config.strategy]

    monkeypatch.setattr(race, "_train", train)
    result = invoke("recommend", "--data", str(multi_label_file.parent), "--labels", str(multi_label_file), *LABELS_FAST, "--budget", "0")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["race"]["runs"] and all(run["metric"] == "val_map" for run in answer["race"]["runs"])
    raced = {c["strategy"]: c for c in answer["candidates"] if c["strategy"] != "feature_extract"}
    assert set(raced) == set(summaries) and all(summaries[s]["task"] == "multi_label" for s in summaries)
    for strategy, row in raced.items():  # each estimate is the run's best val_map, not its subset accuracy
        assert row["estimate"] == pytest.approx(summaries[strategy]["best_val_map"], abs=1e-4) and "best val mAP" in row["how"]
    assert all("by mAP" in c["how"] for c in answer["candidates"] if c["strategy"] == "feature_extract")
    assert "validation mAP" in answer["reasons"][0]
