"""scripts/quality.py's pieces: the digit folders, recommend's pick as a row, the verdict, the references.

The benchmark itself trains for minutes and is run by hand (docs/quality.md); its --quick
smoke version runs end to end in the slow test.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from test_bench import load_script


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    return load_script("quality")


def test_the_digits_become_a_base_set_and_a_small_target_set(quality: ModuleType, tmp_path: Path) -> None:
    from PIL import Image

    settings = quality.Settings(base_per_class=10, target_train=3, target_val=5)
    base, target = quality.write_digits(tmp_path, settings)

    def count(folder: Path) -> dict[str, int]:
        return {d.name: len(list(d.glob("*.png"))) for d in sorted(folder.iterdir())}

    assert count(base / "train") == dict.fromkeys("01234", 8) and count(base / "val") == dict.fromkeys("01234", 2)
    assert count(target / "train") == dict.fromkeys("56789", 3) and count(target / "val") == dict.fromkeys("56789", 5)
    image = Image.open(next((target / "val" / "7").glob("*.png")))
    assert image.size == (32, 32) and image.mode == "L"
    train_names = {p.name for p in (target / "train" / "7").glob("*.png")}
    assert not train_names & {p.name for p in (target / "val" / "7").glob("*.png")}  # no image in both


def test_every_other_image_of_a_target_class_validates_by_default(quality: ModuleType, tmp_path: Path) -> None:
    _, target = quality.write_digits(tmp_path, quality.Settings(base_per_class=5))
    assert len(list((target / "train" / "5").glob("*.png"))) == 20
    assert len(list((target / "val" / "5").glob("*.png"))) == 182 - 20  # load_digits has 182 fives


def test_recommends_answer_is_one_of_the_rows_or_a_new_one(quality: ModuleType) -> None:
    assert quality.pick_row({"strategy": "feature_extract", "cut": None}) == ("feature_extract", ["strategy=feature_extract"])
    assert quality.pick_row({"strategy": "feature_extract", "cut": "layer3"})[0] == "feature_extract, cut layer3"
    assert quality.pick_row({"strategy": "scratch", "cut": None})[0] == "scratch"
    assert quality.pick_row({"strategy": "feature_extract", "cut": "layer2"}) == (
        "feature_extract, cut layer2",
        ["strategy=feature_extract", "backbone.cut=layer2"],
    )


def test_the_verdict_says_won_within_noise_or_lost(quality: ModuleType) -> None:
    rows = {"a": {"accs": [0.80, 0.82, 0.84]}, "b": {"accs": [0.79, 0.81, 0.83]}, "c": {"accs": [0.50, 0.51, 0.52]}}
    assert quality.verdict(rows, "a") == "won"
    assert quality.verdict(rows, "b").startswith("within noise: 1.0 points behind a")
    assert quality.verdict(rows, "c").startswith("lost: 31.0 points behind a")


def test_the_references_fit_separable_features(quality: ModuleType) -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(10)
    features = torch.nn.functional.one_hot(labels, 3).float() * 4 + torch.randn(30, 3, generator=generator) * 0.1
    assert quality.linear_loop(features, labels, features, labels, seed=0, steps=50) == 1.0
    assert quality.logistic_cv(features, labels, features, labels, seed=0) == 1.0


def fake_summary(run: int) -> dict[str, Any]:
    return {"best_val_acc": 0.5 + run / 100, "seconds": 1.0, "run_dir": f"/runs/{run}"}


def test_every_strategy_and_recommends_pick_train_with_default_schedules(quality: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_transferctl(*args: str) -> dict[str, Any]:
        calls.append(args)
        if args[0] == "recommend":
            return {"strategy": "feature_extract", "cut": "layer2"}
        return fake_summary(len(calls))

    monkeypatch.setattr(quality, "transferctl", fake_transferctl)
    monkeypatch.setattr(quality, "reference_rows", lambda base, data, settings: {"plain loop": {"accs": [0.9, 0.9], "seconds": [0.1, 0.1]}})
    monkeypatch.setenv("TRANSFERCTL_CACHE", str(tmp_path / "elsewhere"))
    result = quality.run_benchmark(tmp_path, quality.QUICK, lambda line: None)

    trains = [call for call in calls if call[0] == "train"]
    assert len(trains) == 1 + 2 * 6  # the base, then five strategies and the pick (a cut of its own), two seeds
    assert not any("schedule" in arg for call in trains[1:] for arg in call)  # the defaults are what is measured
    assert all("backbone.weights=run:/runs/1" in call for call in trains[1:])
    recommend = next(call for call in calls if call[0] == "recommend")
    assert recommend[recommend.index("--augment") + 1] == "none"  # the race trains as the experiment file does
    assert [row["name"] for row in result["rows"]][-2:] == ["feature_extract, cut layer2", "plain loop"]
    assert result["recommend"]["row"] == "feature_extract, cut layer2" and result["recommend"]["verdict"] == "won"
    assert Path(quality.os.environ["TRANSFERCTL_CACHE"]).parent == tmp_path  # the features stay in the work folder
    text = quality.table(result)
    assert "| transferctl feature_extract, cut layer2 ← recommend | 0.6" in text
    json.dumps(result)  # --json can print it


def test_head_schedules_add_minibatch_heads_of_10_to_300_epochs(quality: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(quality, "transferctl", lambda *args: calls.append(args) or ({"strategy": "scratch"} if args[0] == "recommend" else fake_summary(len(calls))))
    monkeypatch.setattr(quality, "reference_rows", lambda base, data, settings: {})
    settings = quality.parse_args(["--quick", "--head-schedules"]).settings
    result = quality.run_benchmark(tmp_path, settings, lambda line: None)
    names = [row["name"] for row in result["rows"]]
    assert [name for name in names if "minibatch" in name] == [f"feature_extract, minibatch head {n} epochs" for n in (10, 30, 100, 300)]
    assert any("schedule.0.epochs=300" in call and "schedule.0.solver=minibatch" in call for call in calls)


def test_seeds_need_two_for_a_spread(quality: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert quality.parse_args(["--seeds", "3,5"]).settings.seeds == (3, 5)
    assert quality.parse_args(["--quick"]).settings == quality.QUICK
    with pytest.raises(SystemExit):
        quality.parse_args(["--seeds", "1"])
    assert "give two seeds at least" in capsys.readouterr().err


@pytest.mark.slow
def test_the_quick_benchmark_runs_end_to_end(quality: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = quality.main(["--quick", "--work", str(tmp_path), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == result["rows"] and len(result["rows"]) >= len(quality.STRATEGIES) + 5
    assert all(len(row["accs"]) == 2 and all(0.0 <= acc <= 1.0 for acc in row["accs"]) for row in result["rows"])
    assert result["recommend"]["row"] in {row["name"] for row in result["rows"]}


def test_a_scripts_run_says_its_progress_under_its_name_and_prints_its_table(quality: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(work: Path, settings: Any, say: Any) -> dict[str, Any]:
        say(f"working in {work.name}")
        return {"seconds": 60.0, "seeds": list(settings.seeds)}

    args = quality.parse_args(["--work", str(tmp_path / "kept"), "--json"])
    result = quality.run_and_print("multi_label", args, run, lambda result: "| the table |", ["--json"])
    out, err = capsys.readouterr()
    assert err.startswith("multi_label: working in kept\n") and "| the table |\n\ntotal 1.0 min" in err
    assert json.loads(out) == result and result["command"] == "python scripts/multi_label.py --json"
