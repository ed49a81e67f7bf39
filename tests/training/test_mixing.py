"""mixing.py: mixup and cutmix from torchvision, drawn per (seed, epoch, batch), trained against soft targets,
refused where the head trains on cached features; a resumed mixup run matches an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from helpers import assert_resume_matches, experiment, one_thread  # noqa: F401 - one_thread is a fixture
from transferctl.config import config_from_dict
from transferctl.errors import ConfigError
from transferctl.testing.synthetic import tiny_dataset
from transferctl.training.engine import train_one_epoch
from transferctl.training.mixing import BatchMixer, Mixing, mixing_of
from transferctl.training.runtime import make_runtime
from transferctl.training.train import prepare, train

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4


def config(root: Path, out: Path, **sections: Any) -> Any:
    return config_from_dict(experiment(root, out, **sections))


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"mixup": {"alpha": 0}}, "mixup.alpha"),
        ({"mixup": {"alpha": -0.2}}, "mixup.alpha"),
        ({"cutmix": {"alpha": "wide"}}, "cutmix.alpha"),
        ({"cutmix": {"alpha": float("inf")}}, "cutmix.alpha"),
        ({"mixup": {"beta": 1}}, "mixup.beta"),
        ({"mixup": 0.2}, "mixup"),
        ({"schedule": [{"name": "all", "epochs": 1, "lr": 0.1, "cutmix": {"alpha": 0}}]}, "schedule[0].cutmix.alpha"),
    ],
)
def test_bad_mixing_values_are_one_line_errors_naming_the_field(tmp_path: Path, sections: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, tmp_path, **sections)
    problems = [str(problem) for problem in caught.value.problems]
    assert len(problems) == 1 and "\n" not in problems[0] and problems[0].startswith(f"<config>: {field}:"), problems


def test_a_phase_s_own_mixing_wins_over_the_run_s(tmp_path: Path) -> None:
    schedule = [{"name": "a", "epochs": 1, "lr": 0.1}, {"name": "b", "epochs": 1, "lr": 0.1, "mixup": {"alpha": 0.4}}]
    run = config(tmp_path, tmp_path, mixup={"alpha": 0.2}, cutmix={"alpha": 1.0}, schedule=schedule)
    assert mixing_of(run, 0) == Mixing(0.2, 1.0)
    assert mixing_of(run, 1) == Mixing(0.4, 1.0)
    assert mixing_of(config(tmp_path, tmp_path), 0) == Mixing(None, None)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(CLASSES, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return images, torch.arange(CLASSES)  # every image its own class: a target's weights say where its pixels came from


def test_mixup_blends_each_image_with_the_previous_one_by_the_weight_its_target_gives() -> None:
    images, labels = batch()
    mixed, targets, dominant = BatchMixer(Mixing(0.4, None), CLASSES, seed=3).mix(1, 0, images, labels)
    own = targets[labels, labels]  # lambda: the image's own share
    assert torch.allclose(own, own[0]) and 0 < float(own[0]) < 1
    assert torch.allclose(targets.sum(dim=1), torch.ones(CLASSES))
    expected = own[0] * images + (1 - own[0]) * images.roll(1, dims=0)
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert torch.equal(dominant, targets.argmax(dim=1))


def test_cutmix_pastes_a_box_whose_area_is_the_target_s_other_share() -> None:
    images, labels = batch()
    mixed, targets, _ = BatchMixer(Mixing(None, 1.0), CLASSES, seed=0).mix(1, 2, images, labels)
    from_other = (mixed != images).all(dim=1)  # pixels (all three channels) taken from the previous image
    assert torch.equal(mixed[:, :, from_other[0]], images.roll(1, dims=0)[:, :, from_other[0]])
    share = from_other[0].float().mean()
    assert torch.allclose(1 - targets[labels, labels], share.expand(CLASSES), atol=1e-6)


def test_mixes_are_the_same_for_the_same_seed_epoch_and_batch_and_leave_the_global_generator_alone() -> None:
    images, labels = batch()
    mixer = BatchMixer(Mixing(0.2, 1.0), CLASSES, seed=7)
    state = torch.get_rng_state()
    first = mixer.for_epoch(3)(5, images, labels)
    assert torch.equal(torch.get_rng_state(), state)
    again = BatchMixer(Mixing(0.2, 1.0), CLASSES, seed=7).mix(3, 5, images, labels)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    others = [mixer.mix(epoch, index, images, labels)[1] for epoch, index in ((3, 6), (4, 5))]
    assert all(not torch.equal(first[1], other) for other in others)


def test_with_both_each_batch_gets_one_of_the_two() -> None:
    images, labels = batch()
    mixer = BatchMixer(Mixing(0.4, 1.0), CLASSES, seed=0)
    kinds = set()
    for index in range(20):
        mixed = mixer.mix(1, index, images, labels)[0]
        pasted = ((mixed == images) | (mixed == images.roll(1, dims=0))).all()
        kinds.add("cutmix" if pasted else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_an_epoch_trains_on_the_soft_targets_and_counts_accuracy_against_the_dominant_label() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: the loss can be recomputed
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    runtime = make_runtime("cpu", "fp32", model)
    images, labels = batch()
    targets = torch.full((CLASSES, CLASSES), 0.1).fill_diagonal_(0.7)
    dominant = torch.tensor([0, 1, 1, 1])  # what the mix says counts, not the loader's labels
    stats = train_one_epoch(model, [(images, labels)], optimizer, scheduler, runtime, mix=lambda index, x, y: (x * 0.5, targets, dominant))
    with torch.no_grad():
        logits = model(images * 0.5)
    assert stats.loss == pytest.approx(float(nn.functional.cross_entropy(logits, targets)), rel=1e-6)
    assert stats.accuracy == pytest.approx(float((logits.argmax(dim=1) == dominant).float().mean()))


@pytest.fixture(scope="module")
def data(module_tmp_path: Path) -> Path:
    return tiny_dataset(module_tmp_path / "data", n_classes=3, layout="split")


def test_mixing_set_in_a_head_phase_on_cached_features_is_refused_naming_the_field_and_the_fix(data: Path, tmp_path: Path) -> None:
    head = {"name": "head", "epochs": 1, "train": "head", "lr": 0.01}
    sections: dict[str, Any] = {"schedule": [{**head, "cutmix": {"alpha": 1.0}}]}
    with pytest.raises(ConfigError) as caught:
        prepare(config(data, tmp_path, **sections))
    (problem,) = caught.value.problems
    assert str(problem).startswith("schedule[0].cutmix: phase 'head' trains the head alone on cached features") and "data.cache: off" in str(problem)
    prepare(config(data, tmp_path, data={"cache": "off"}, **sections))  # full forward passes: images to mix


def test_the_run_s_mixing_skips_a_head_phase_on_cached_features_and_mixes_the_body(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transferctl.training import mixing

    mixed: list[int] = []
    real = mixing.BatchMixer.mix
    monkeypatch.setattr(mixing.BatchMixer, "mix", lambda self, epoch, index, images, labels: mixed.append(epoch) or real(self, epoch, index, images, labels))
    schedule = [{"name": "head", "epochs": 1, "train": "head", "lr": 0.01}, {"name": "body", "epochs": 1, "train": "all", "lr": 0.01}]
    summary = train(config(data, tmp_path, cutmix={"alpha": 1.0}, schedule=schedule))
    assert summary["epochs"] == 2 and set(mixed) == {2}  # the body's epoch (global 2), never the cached head's
    feature_extract = config(data, tmp_path / "fe", cutmix={"alpha": 1.0}, strategy="feature_extract", schedule=[schedule[0]])
    assert train(feature_extract)["epochs"] == 1  # nothing to mix: trained, not refused (compare runs every strategy)


# A run and its resume: two phases, stopped after global epoch 2, in the middle of the body phase.
MIXED = {
    "mixup": {"alpha": 0.4}, "cutmix": {"alpha": 1.0}, "data": {"cache": "off"},
    "schedule": [{"name": "head", "epochs": 1, "train": "head", "lr": 0.01}, {"name": "body", "epochs": 2, "train": "all", "lr": 0.01}],
}  # fmt: skip


def test_a_resumed_mixup_run_mixes_and_measures_as_the_uninterrupted_one(data: Path, tmp_path: Path, heeded_sigint: None) -> None:
    rows = assert_resume_matches(config(data, tmp_path / "runs", **MIXED), tmp_path, stop_after=2)
    assert len(rows) == 3
