from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from helpers import Notices, experiment, write_experiment
from transferctl.config import OptimizerConfig, load_config
from transferctl.errors import ConfigError
from transferctl.training import lr_finder
from transferctl.training.lr_finder import lr_range_test, smooth, smooth_both_ways, suggest
from transferctl.training.phases import PhasePlan
from transferctl.training.runtime import Runtime
from transferctl.testing.synthetic import tiny_dataset

CPU = Runtime(torch.device("cpu"), "fp32", False)
GROUPS = [("body", ["body"]), ("head", ["head"])]


def tiny_model() -> nn.Module:
    return nn.Sequential(OrderedDict(body=nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU()), head=nn.Linear(16, 3)))


def separable_batches(n_batches: int = 4, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n_batches * size) % 3
    centres = torch.randn(3, 6, generator=generator) * 3
    images = centres[labels] + torch.randn(n_batches * size, 6, generator=generator)
    return list(zip(images.split(size), labels.split(size)))


def plan(trainable: tuple[str, ...] = ("body", "head"), mult: float = 0.1) -> PhasePlan:
    frozen = tuple(name for name, _ in GROUPS if name not in trainable)
    return PhasePlan(0, "all", 1, 1.0e-3, mult, "train", trainable, frozen)


def test_the_loss_falls_then_diverges_and_the_suggestion_lies_in_the_range() -> None:
    torch.manual_seed(0)
    finding = lr_range_test(tiny_model(), GROUPS, plan(), OptimizerConfig(), separable_batches(), CPU, start_lr=1e-5, end_lr=1e3, steps=80)
    assert finding.stopped == "diverged" and len(finding.lrs) < 80  # stopped early, at 4x the minimum
    assert finding.smoothed[-1] > 4 * min(finding.smoothed)
    assert min(finding.smoothed) < finding.smoothed[0]  # it fell before it rose
    assert finding.lrs[0] <= finding.suggestion <= finding.lrs[-1]
    assert finding.suggestion == pytest.approx(min(finding.min_loss_lr / 10, finding.steepest_lr))
    assert finding.lrs == sorted(finding.lrs) and finding.lrs[0] == pytest.approx(1e-5)


def test_the_model_and_the_random_generators_are_as_before() -> None:
    torch.manual_seed(1)
    model = tiny_model()
    model.head.requires_grad_(False)
    model.eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    state = torch.get_rng_state()
    lr_range_test(model, GROUPS, plan(), OptimizerConfig(), separable_batches(), CPU, steps=30)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # BatchNorm's running statistics too
    assert not model.head.weight.requires_grad and model.body[0].weight.requires_grad
    assert not any(module.training for module in model.modules())
    assert all(param.grad is None for param in model.parameters())
    assert torch.equal(torch.get_rng_state(), state)


def test_only_the_phases_groups_train_and_the_body_keeps_its_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[torch.optim.Optimizer] = []
    original = lr_finder.build_optimizer

    def recording(config: OptimizerConfig, groups: list[dict]) -> torch.optim.Optimizer:
        built.append(original(config, groups))
        return built[-1]

    monkeypatch.setattr(lr_finder, "build_optimizer", recording)
    finding = lr_range_test(tiny_model(), GROUPS, plan(mult=0.25), OptimizerConfig(), separable_batches(), CPU, steps=20)
    groups = {group["name"]: group["lr"] for group in built[0].param_groups}
    assert set(groups) == {"body", "body/no_decay", "head", "head/no_decay"}
    assert groups["head"] == pytest.approx(finding.lrs[-1]) and groups["body"] == pytest.approx(0.25 * finding.lrs[-1])

    built.clear()
    lr_range_test(tiny_model(), GROUPS, plan(trainable=("head",)), OptimizerConfig(), separable_batches(), CPU, steps=20)
    assert {group["name"] for group in built[0].param_groups} == {"head", "head/no_decay"}


def test_the_runs_loss_is_the_one_tested() -> None:
    smoothing = nn.CrossEntropyLoss(label_smoothing=0.5)
    calls: list[float] = []
    smoothing.register_forward_hook(lambda module, args, output: calls.append(float(output)))
    finding = lr_range_test(tiny_model(), GROUPS, plan(), OptimizerConfig(), separable_batches(), CPU, steps=20, loss_fn=smoothing)
    assert calls == pytest.approx(finding.losses)


def test_suggest_on_a_known_curve() -> None:
    lrs = list(np.geomspace(1e-6, 1.0, 61))
    # Falls fastest at 1e-4, lowest at 1e-2, then rises: the smaller pick is the steepest descent.
    losses = [1 / (1 + np.exp(4 * (np.log10(lr) + 4))) + max(0.0, np.log10(lr) + 2) ** 2 for lr in lrs]
    suggestion, low, steepest = suggest(lrs, losses)
    assert low == pytest.approx(1e-2) and steepest == pytest.approx(1e-4) and suggestion == steepest
    # Falls fastest at 1e-2 and is lowest just after: a tenth of the minimum is the smaller.
    losses = [1 / (1 + np.exp(4 * (np.log10(lr) + 2))) + 4 * max(0.0, np.log10(lr) + 1.8) ** 2 for lr in lrs]
    suggestion, low, steepest = suggest(lrs, losses)
    assert steepest == pytest.approx(1e-2) and low > steepest and suggestion == pytest.approx(low / 10)
    # A fall that flattens at its floor: the minimum is the last lr, the steepest descent is where it fell.
    floor = [(1.0 if lr < 1e-4 else max(0.0, 1.0 - (np.log10(lr) + 4))) - 1e-3 * np.log10(lr) for lr in lrs]  # still sinking, slowly
    suggestion, low, steepest = suggest(lrs, floor)
    assert low == lrs[-1] and 1e-4 <= steepest <= 1e-3 and suggestion == steepest
    shifted = smooth_both_ways([0.0] * 30 + [1.0] * 30)
    assert shifted[29] < 0.5 < shifted[30]  # no lag: the step stays in its place
    assert smooth([0.0] * 30 + [1.0] * 30)[35] < 0.5  # where the one-way average is still below half way
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull towards 0


def test_lr_auto_trains_with_the_found_lr_and_config_yaml_records_it(tmp_path: Path) -> None:
    from transferctl.training.train import train

    data = tiny_dataset(tmp_path / "data", n_classes=3, layout="split")
    schedule = [{"name": "head", "epochs": 1, "train": "head", "lr": "auto", "solver": "minibatch"}]
    config = write_experiment(tmp_path / "experiment.yaml", experiment(data, tmp_path / "runs", schedule=schedule))
    notices = Notices()
    summary = train(load_config(config), tmp_path / "run", notices)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["schedule"][0]["lr"]
    assert isinstance(recorded, float) and 1e-7 <= recorded <= 10
    assert any(line.startswith(f"schedule[0].lr: auto chose {recorded:.3g}") for line in notices.lines)
    assert summary["epochs"] == 1
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr_head"] == pytest.approx(recorded)


def test_lr_is_a_number_above_zero_or_auto(tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "data", n_classes=3, layout="split")
    config = write_experiment(tmp_path / "experiment.yaml", experiment(data, tmp_path / "runs"))
    assert load_config(config, ["schedule.1.lr=auto"]).schedule[1].lr == "auto"
    for bad in ("fast", "0", "-1"):
        with pytest.raises(ConfigError) as caught:
            load_config(config, [f"schedule.1.lr={bad}"])
        assert len(caught.value.problems) == 1
        assert "schedule[1].lr" in str(caught.value) and "must be a number above 0, or auto" in str(caught.value)


class Events(Notices):
    """Notices and finished epochs, in the order the run gave them."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def notice(self, message: str) -> None:
        super().notice(message)
        self.events.append(message)

    def epoch_done(self, row: dict) -> None:
        self.events.append(f"epoch {row['global_epoch']}")


def test_a_body_phases_lr_auto_is_found_when_it_starts_on_the_head_the_phase_before_trained(tmp_path: Path, heeded_sigint: None) -> None:
    from helpers import assert_resume_matches
    from transferctl.training.train import train

    data = tiny_dataset(tmp_path / "data", n_classes=3, layout="split")
    schedule = [{"name": "head", "epochs": 2, "train": "head", "lr": 0.01, "solver": "minibatch"},
                {"name": "body", "epochs": 1, "train": "all", "lr": "auto", "backbone_lr_mult": 0.1}]  # fmt: skip
    config = load_config(write_experiment(tmp_path / "experiment.yaml", experiment(data, tmp_path / "runs", data={"cache": "off"}, schedule=schedule)))
    heard = Events()
    train(config, tmp_path / "run", heard)
    chose = next(index for index, event in enumerate(heard.events) if event.startswith("schedule[1].lr: auto chose"))
    assert heard.events[chose - 1] == "epoch 2" and heard.events[chose + 1] == "epoch 3"  # after the head phase, before the body's epoch
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["schedule"]
    assert recorded[0]["lr"] == 0.01 and isinstance(recorded[1]["lr"], float)
    # Stopped in the head phase and resumed: the body's lr is found on the same model, so the rows are the same.
    rows = assert_resume_matches(config, tmp_path / "resumed", stop_after=1)
    assert rows[2]["lr_head"] == pytest.approx(recorded[1]["lr"])
