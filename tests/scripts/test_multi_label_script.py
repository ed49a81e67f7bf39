"""scripts/multi_label.py's pieces: the digit composites and their label file, the multi-label references, the
rows it trains and the table that sets each default beside its plain loop.

The benchmark trains for tens of minutes and is run by hand (docs/quality.md, Multi-label); its --quick smoke
version runs end to end in the slow test.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from test_bench import load_script


@pytest.fixture(scope="module")
def multi_label() -> ModuleType:
    return load_script("multi_label")


def test_pairs_use_every_image_of_the_pool_once_before_any_twice(multi_label: ModuleType) -> None:
    rng = np.random.default_rng(0)
    pool = np.arange(10, 20)
    once = multi_label.draw_pairs(pool, 5, rng)
    assert once.shape == (5, 2) and sorted(once.ravel()) == list(pool)
    again = multi_label.draw_pairs(pool, 8, rng).ravel()
    assert sorted(again[:10]) == list(pool) and set(again[10:]) <= set(pool)


def test_a_composite_holds_two_digits_in_two_cells_of_a_blank_grid(multi_label: ModuleType) -> None:
    grid = multi_label.composite(np.stack([np.full((8, 8), 3.0), np.full((8, 8), 7.0)]), np.random.default_rng(1))
    cells = [grid[r : r + 8, c : c + 8] for r in (0, 8) for c in (0, 8)]
    assert grid.shape == (16, 16) and sorted(float(cell.max()) for cell in cells) == [0.0, 0.0, 3.0, 7.0]


def test_the_label_file_names_the_digits_each_composite_shows(multi_label: ModuleType, tmp_path: Path) -> None:
    from PIL import Image

    settings = multi_label.Settings(train_pool=4, train_composites=10, val_composites=30)
    labels = multi_label.write_composites(tmp_path, settings)
    with labels.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["split"] for row in rows] == ["train"] * 10 + ["val"] * 30
    cells = [row["label"].split("|") for row in rows]
    assert all(cell == sorted(set(cell)) and set(cell) <= set("56789") and len(cell) in (1, 2) for cell in cells)
    assert {name for cell in cells[:10] for name in cell} == set("56789")  # 4 images a digit, each once: every digit trains
    assert any(len(cell) == 2 for cell in cells) and all((tmp_path / row["path"]).is_file() for row in rows)
    image = Image.open(tmp_path / rows[0]["path"])
    assert image.size == (32, 32) and image.mode == "L"
    assert labels.read_bytes() == multi_label.write_composites(tmp_path / "again", settings).read_bytes()  # fixed by the split seed


def test_the_references_fit_separable_multi_label_features(multi_label: ModuleType) -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]] * 5, dtype=torch.float32)
    features = targets * 4 + torch.randn(30, 3, generator=generator) * 0.1
    assert multi_label.linear_loop(features, targets, features, targets, seed=0, steps=50, objective=multi_label.MULTI_LABEL) == 1.0
    assert multi_label.logistic_ovr(features, targets, features, targets, seed=0) == 1.0
    assert multi_label.mean_average_precision([[0.9, 0.1], [0.2, 0.3]], [[1, 0], [0, 0]]) == 1.0  # a class without a positive is left out


def test_a_default_is_above_within_noise_of_or_below_its_loop(multi_label: ModuleType) -> None:
    assert multi_label.against_loop([0.90, 0.92], [0.80, 0.82]).startswith("above the loop: +10.0 points")
    assert multi_label.against_loop([0.80, 0.82], [0.81, 0.83]).startswith("within noise of the loop: -1.0 points")
    assert multi_label.against_loop([0.70, 0.71], [0.80, 0.81]).startswith("BELOW the loop: -10.0 points")


def test_every_default_trains_on_the_label_file_from_the_base(multi_label: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_transferctl(*args: str) -> dict[str, Any]:
        if args[0] == "evaluate":
            assert args[1:] == (f"/runs/{len(calls)}", "--split", "val")  # the run just trained
            return {"micro_f1": 0.7}
        calls.append(args)
        return {"best_val_map": 0.5 + len(calls) / 100, "seconds": 1.0, "run_dir": f"/runs/{len(calls)}"}

    monkeypatch.setattr(multi_label, "transferctl", fake_transferctl)
    monkeypatch.setattr(multi_label, "train_base", lambda base_yaml, settings, say: {"best_val_acc": 0.9, "seconds": 2.0, "run_dir": "/runs/base"})
    loops = {loop: {"maps": [0.6, 0.6], "seconds": [0.1, 0.1]} for loop in set(multi_label.LOOP_OF.values())}
    monkeypatch.setattr(multi_label, "reference_rows", lambda base, labels, settings: loops)
    monkeypatch.setenv("TRANSFERCTL_CACHE", str(tmp_path / "elsewhere"))
    result = multi_label.run_benchmark(tmp_path, multi_label.QUICK, lambda line: None)

    assert len(calls) == 2 * 4 and all(call[0] == "train" for call in calls)  # four defaults, two seeds
    labels = tmp_path / "data" / "multi_label" / "labels.csv"
    assert all(f"data.labels={labels}" in call and "backbone.weights=run:/runs/base" in call for call in calls)
    assert not any("schedule" in arg for call in calls for arg in call)  # the defaults are what is measured
    assert result["data"]["train"] == 10 and result["data"]["val"] == 20
    assert result["rows"][0] == {"name": "feature_extract", "kind": "transferctl", "maps": [0.51, 0.55], "micro_f1": [0.7, 0.7], "seconds": [1.0, 1.0]}
    text = multi_label.table(result)
    assert "| transferctl feature_extract | 0.530 ± 0.028 | 0.510, 0.550 | 0.700 ± 0.000 | 1.0 |" in text
    assert "| plain loop: linear head | 0.600 ± 0.000 | 0.600, 0.600 | - | 0.1 |" in text  # the references tune no thresholds
    assert "- transferctl scratch vs plain loop: fine-tune all layers: BELOW the loop" in text
    json.dumps(result)  # --json can print it


def test_seeds_and_split_seed_reach_the_settings(multi_label: ModuleType) -> None:
    settings = multi_label.parse_args(["--quick", "--seeds", "3,5", "--split-seed", "2"]).settings
    assert settings.seeds == (3, 5) and settings.split_seed == 2 and settings.base.split_seed == 2
    assert settings.train_composites == multi_label.QUICK.train_composites
    assert multi_label.parse_args([]).settings == multi_label.Settings()


@pytest.mark.slow
def test_the_quick_benchmark_runs_end_to_end(multi_label: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = multi_label.main(["--quick", "--work", str(tmp_path), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == result["rows"] and len(result["rows"]) == len(multi_label.STRATEGIES) + 5
    assert all(len(row["maps"]) == 2 and all(0.0 <= value <= 1.0 for value in row["maps"]) for row in result["rows"])
