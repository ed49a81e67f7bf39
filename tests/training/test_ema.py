"""ema.py: the weight average after each step, what does not train copied, BatchNorm buffers averaged; each
epoch's row carries both validations, best.pt keeps the better weights and says which; resume restores it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from helpers import assert_resume_matches, experiment, one_thread  # noqa: F401 - one_thread is a fixture
from transferctl.config import config_from_dict
from transferctl.errors import ConfigError
from transferctl.testing.synthetic import tiny_dataset
from transferctl.training import train as train_module
from transferctl.training.ema import WeightAverage, better_weights
from transferctl.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("ema", [{"decay": 1.0}, {"decay": 0}, {"decay": -0.5}, {"decay": "slow"}, {"rate": 0.9}])
def test_bad_ema_values_are_one_line_errors_naming_the_field(tmp_path: Path, ema: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(experiment(tmp_path, tmp_path, ema=ema))
    problems = [str(problem) for problem in caught.value.problems]
    field = "ema.rate" if "rate" in ema else "ema.decay"
    assert len(problems) == 1 and "\n" not in problems[0] and problems[0].startswith(f"<config>: {field}:"), problems


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    inputs = torch.randn(8, 3, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(inputs).square().mean().backward()
    optimizer.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_the_average_after_two_steps_is_the_hand_computed_one_and_frozen_weights_are_the_model_s() -> None:
    model, decay = tiny_model(), 0.9
    model[0].requires_grad_(False)  # frozen: as in a phase that trains the rest
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    start = snapshot(model)
    average = WeightAverage(model, decay)
    step(model, optimizer, 1)
    average.update()
    after_one = snapshot(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a frozen weight that moved anyway (trained in an earlier phase): followed as it is
    step(model, optimizer, 2)
    average.update()
    after_two = snapshot(model)

    averaged = average.module.state_dict()
    for name in ("1.weight", "1.bias", "1.running_mean", "1.running_var", "2.weight", "2.bias"):  # BatchNorm's statistics too
        expected = decay * (decay * start[name] + (1 - decay) * after_one[name]) + (1 - decay) * after_two[name]
        assert torch.allclose(averaged[name], expected, atol=1e-6), name
    for name in ("0.weight", "0.bias", "1.num_batches_tracked"):
        assert torch.equal(averaged[name], after_two[name]), name


def test_layers_in_eval_mode_keep_the_model_s_statistics_and_a_solved_head_is_followed() -> None:
    model = tiny_model()
    average = WeightAverage(model, 0.9)
    model.train()
    model(torch.randn(8, 3))  # the statistics move in train mode
    model[1].eval()  # bn: frozen
    average.update()
    assert torch.equal(average.module[1].running_mean, model[1].running_mean)
    with torch.no_grad():
        model[2].weight.mul_(3)
    average.follow()
    assert all(torch.equal(a, b) for a, b in zip(average.module.state_dict().values(), model.state_dict().values()))


def test_the_average_s_state_restores_it_exactly() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    average = WeightAverage(model, 0.9)
    step(model, optimizer, 1)
    average.update()
    restored = WeightAverage(model, 0.9, average.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.averaged.state_dict().values(), average.averaged.state_dict().values()))


@pytest.mark.parametrize(
    ("metric", "ema_loss", "ema_acc", "ema_f1", "kept"),
    [("val_acc", 0.9, 0.8, 0.1, "ema"), ("val_acc", 0.1, 0.5, 0.9, "raw"), ("val_loss", 0.4, 0.1, 0.1, "ema"), ("macro_f1", 0.1, 0.9, 0.2, "raw"), ("macro_f1", 0.9, 0.1, 0.4, "ema")],
)
def test_selection_sees_the_better_weights_validation(metric: str, ema_loss: float, ema_acc: float, ema_f1: float, kept: str) -> None:
    row = {"global_epoch": 1, "val_loss": 0.5, "val_acc": 0.6, "val_balanced_acc": 0.6, "val_macro_f1": 0.3,
           "ema_val_loss": ema_loss, "ema_val_acc": ema_acc, "ema_val_balanced_acc": 0.5, "ema_val_macro_f1": ema_f1}  # fmt: skip
    seen = better_weights(row, metric)
    assert seen["weights"] == kept
    assert seen["val_acc"] == (ema_acc if kept == "ema" else 0.6) and seen["ema_val_acc"] == ema_acc
    assert seen["val_macro_f1"] == (ema_f1 if kept == "ema" else 0.3)


@pytest.fixture(scope="module")
def data(module_tmp_path: Path) -> Path:
    return tiny_dataset(module_tmp_path / "data", n_classes=3, layout="split")


ONE_EPOCH = {"ema": {"decay": 0.5}, "data": {"cache": "off"}, "schedule": [{"name": "all", "epochs": 1, "train": "all", "lr": 0.01}]}


@pytest.mark.parametrize("kept", ["raw", "ema"])
def test_best_pt_holds_the_weights_selection_kept_and_says_which(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept: str) -> None:
    # Which weights did better depends on the seed: make each outcome happen.
    monkeypatch.setattr(train_module, "better_weights", lambda row, metric: {**better_weights(row, metric), "weights": kept})
    summary = train(config_from_dict(experiment(data, tmp_path, **ONE_EPOCH)), tmp_path / "run")
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    want = last["model"] if kept == "raw" else {name.removeprefix("module."): value for name, value in last["ema"].items() if name != "n_averaged"}
    assert best["weights"] == kept and summary["best_weights"] == kept and best["best"]["weights"] == kept
    assert best["model"].keys() == want.keys() and all(torch.equal(best["model"][name], want[name]) for name in want)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"ema_val_loss", "ema_val_acc", "ema_val_balanced_acc", "ema_val_macro_f1"} <= row.keys()


EMA_RUN = {
    "ema": {"decay": 0.9},
    "schedule": [
        {"name": "head", "epochs": 1, "train": "head", "lr": 0.01, "solver": "minibatch"},  # on cached features: the average's head steps too
        {"name": "body", "epochs": 2, "train": "all", "lr": 0.01},
    ],
}


def test_a_resumed_ema_run_averages_and_measures_as_the_uninterrupted_one(data: Path, tmp_path: Path, heeded_sigint: None) -> None:
    rows = assert_resume_matches(config_from_dict(experiment(data, tmp_path / "runs", **EMA_RUN)), tmp_path, stop_after=2)
    assert len(rows) == 3 and all(row["ema_val_acc"] is not None for row in rows)
    want = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)["ema"]
    got = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)["ema"]
    assert all(torch.equal(got[name], want[name]) for name in want)
