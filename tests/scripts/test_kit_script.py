"""scripts/kit.py's pieces: the imbalanced target, the best epoch's value, the rows it trains, the table.

The benchmark trains for half an hour and is run by hand (docs/kit.md); its --quick smoke version runs
end to end in the slow test.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from test_bench import load_script


@pytest.fixture(scope="module")
def kit() -> ModuleType:
    return load_script("kit")


def test_the_imbalanced_target_keeps_few_images_of_the_rare_digits_in_train_and_val(kit: ModuleType, tmp_path: Path) -> None:
    quality = load_script("quality")
    _, target = quality.write_digits(tmp_path / "digits", quality.Settings(base_per_class=4, target_train=10, target_val=10))
    rare = kit.imbalanced_copy(target, tmp_path / "rare")

    def count(split: str) -> dict[str, int]:
        return {d.name: len(list(d.glob("*.png"))) for d in sorted((rare / split).iterdir())}

    assert count("train") == {"5": 10, "6": 10, "7": 4, "8": 4, "9": 4}
    assert count("val") == {"5": 10, "6": 10, "7": 2, "8": 2, "9": 2}
    assert len(list((target / "train" / "7").glob("*.png"))) == 10  # the balanced target is untouched


def test_the_best_value_is_taken_over_epochs_and_over_the_averaged_weights(kit: ModuleType) -> None:
    rows = [{"val_balanced_acc": 0.5, "ema_val_balanced_acc": 0.7, "train_balanced_acc": 0.99}, {"val_balanced_acc": 0.6}]
    assert kit.best(rows, "balanced_acc") == 0.7
    assert kit.best([{"val_acc": 0.4}], "balanced_acc") is None


def test_every_option_trains_fine_tune_on_both_targets_beside_the_defaults(kit: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_transferctl(*args: str) -> dict[str, Any]:
        calls.append(args)
        if args[0] == "evaluate":
            return {"accuracy": 0.5, "per_class": [{"recall": 0.25}, {"recall": 0.75}]}
        run = tmp_path / f"run{len(calls)}"
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"val_acc": 0.6, "val_balanced_acc": 0.55}) + "\n")
        return {"run_dir": str(run), "best_val_acc": 0.6, "seconds": 1.0}

    monkeypatch.setattr(kit, "transferctl", fake_transferctl)
    settings = kit.parse_args(["--quick", "--only", "schedule[1].mixup: {alpha: 0.2}"]).settings
    result = kit.run_benchmark(tmp_path / "work", settings, lambda line: None)
    trains = [call for call in calls if call[0] == "train"][1:]  # after the base
    assert len(trains) == 2 * 2 * 2  # two seeds, two targets, defaults and mixup
    assert all("strategy=fine_tune" in call and f"schedule.1.min_steps={settings.body_steps}" in call for call in trains)
    assert sum("schedule.1.mixup.alpha=0.2" in call for call in trains) == 4
    assert [call[0] for call in calls].count("evaluate") == 4  # tta on each defaults run
    assert result["cells"]["defaults + evaluate --tta flip"]["imbalanced"]["balanced_acc"] == [0.5, 0.5]
    text = kit.table(result)
    assert "| schedule[1].mixup: {alpha: 0.2} | 0.600 ± 0.000 | 0.550 ± 0.000 | 0.600 ± 0.000 | 0.550 ± 0.000 | 1.0 |" in text
    json.dumps(result)


def test_only_names_known_rows(kit: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        kit.parse_args(["--only", "dropout"])
    assert "unknown rows ['dropout']" in capsys.readouterr().err


@pytest.mark.slow
def test_the_quick_benchmark_runs_end_to_end(kit: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = kit.main(["--quick", "--work", str(tmp_path), "--json", "--only", "loss.label_smoothing: 0.1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["cells"] == result["cells"] and set(result["cells"]) == {"defaults", "loss.label_smoothing: 0.1", "defaults + evaluate --tta flip"}
    assert all(0.0 <= acc <= 1.0 for cells in result["cells"].values() for target in cells.values() for acc in target["acc"])


def test_a_row_whose_training_fails_is_left_empty_and_the_others_go_on(kit: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_transferctl(*args: str) -> dict[str, Any]:
        if "ema.decay=0.99" in args:
            raise SystemExit("`train` failed with exit code 1")
        if args[0] == "evaluate":
            return {"accuracy": 0.5, "per_class": [{"recall": 0.5}]}
        run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"val_acc": 0.6}) + "\n")
        return {"run_dir": str(run), "best_val_acc": 0.6, "seconds": 1.0}

    monkeypatch.setattr(kit, "transferctl", fake_transferctl)
    result = kit.run_benchmark(tmp_path / "work", kit.parse_args(["--quick", "--only", "ema: {decay: 0.99}"]).settings, lambda line: None)
    assert result["cells"]["ema: {decay: 0.99}"]["balanced"]["acc"] == [] and len(result["cells"]["defaults"]["balanced"]["acc"]) == 2
    assert "| ema: {decay: 0.99} | - | - | - | - | - |" in kit.table(result)
