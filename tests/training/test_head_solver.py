from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import Notices, experiment
from transferctl.training import head_solver
from transferctl.config import config_from_dict
from transferctl.training.head_solver import Design, HeadSolver, _fit, _Rows, choose_weight_decay
from transferctl.training.train import describe, prepare, train

CPU = torch.device("cpu")


def blobs(per_class: int, classes: int, width: int, noise: float, seed: int = 0, views: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around random centres, far from the origin and large, as pooled ReLU features are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, width)) + 5.0
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels][:, None, :] + noise * rng.normal(size=(len(labels), views, width))
    return (features * 7.0).astype(np.float32), labels


@pytest.mark.parametrize("width", [8, 64])  # fewer, then more dimensions than training rows (the rotated design)
def test_the_fit_is_the_regularised_logistic_regression_optimum(width: int) -> None:
    from sklearn.linear_model import LogisticRegression

    features, labels = blobs(per_class=10, classes=3, width=width, noise=3.0)
    design = Design.of(features, CPU)
    assert (design.basis is not None) == (len(labels) < width)
    rows = _Rows(features, labels, np.arange(len(labels)), design)
    weight = torch.zeros(3, design.width, requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    decay = 1e-2
    _fit(rows, weight, bias, decay, 1000, lambda: False)
    head_weight, head_bias = design.to_head(weight.detach(), bias.detach())
    ours = torch.softmax(torch.from_numpy(features[:, 0]) @ head_weight.T + head_bias, dim=1).numpy()
    # The same objective in scikit-learn's terms: C x sum of losses + |w|^2 / 2 on the centred, scaled features.
    scaled = (features[:, 0] - design.mean.numpy()) / design.scale
    reference = LogisticRegression(C=1.0 / (decay * len(labels)), tol=1e-10, max_iter=10000).fit(scaled, labels)
    np.testing.assert_allclose(ours, reference.predict_proba(scaled), atol=2e-3)


def test_the_weight_decay_is_strong_for_noisy_features_and_weak_for_faint_but_clean_ones() -> None:
    noisy, noisy_labels = blobs(per_class=8, classes=3, width=32, noise=40.0, seed=1)
    strong = choose_weight_decay(noisy, noisy_labels, Design.of(noisy, CPU), seed=0)
    # The classes differ in two faint dimensions beside four loud ones that say nothing: only small
    # weight decays let the head weigh the faint ones enough.
    rng = np.random.default_rng(2)
    faint_labels = np.repeat(np.arange(3), 12)
    faint = np.concatenate([0.1 * np.eye(3)[faint_labels][:, :2] + 0.001 * rng.normal(size=(36, 2)), 5 + rng.normal(size=(36, 4))], axis=1)
    faint = faint[:, None, :].astype(np.float32)
    weak = choose_weight_decay(faint, faint_labels, Design.of(faint, CPU), seed=0)
    assert strong.folds == weak.folds == 3 and weak.accuracy is not None and weak.accuracy > 0.9
    assert strong.weight_decay >= 0.1 and weak.weight_decay <= 1e-2


def test_the_strength_is_chosen_on_a_plateau_of_held_out_accuracy_not_on_a_lone_spike(monkeypatch: pytest.MonkeyPatch) -> None:
    features, labels = blobs(per_class=6, classes=3, width=8, noise=1.0)
    path = [40, 41, 52, 41, 49, 50, 49, 30, 30, 30, 30, 30, 30]  # each fold's held-out count along WEIGHT_DECAYS
    scores = iter(path * 3)
    monkeypatch.setattr(_Rows, "score", lambda self, weight, bias: (0.0, next(scores)))
    selection = choose_weight_decay(features, labels, Design.of(features, CPU), seed=0)
    assert selection.weight_decay == head_solver.WEIGHT_DECAYS[5]  # the middle of 49, 50, 49; not the spike at 2
    assert selection.accuracy == pytest.approx(3 * 50 / len(labels))


def test_a_class_of_one_image_gets_the_fallback_strength_and_still_fits() -> None:
    features, labels = blobs(per_class=3, classes=3, width=16, noise=1.0)
    features, labels = features[2:], labels[2:]  # class 0 keeps one image
    head = torch.nn.Linear(16, 3)
    stats = HeadSolver(head, features, labels, CPU, seed=0).train_epoch()
    assert stats.accuracy == 1.0 and stats.images == len(labels)
    assert HeadSolver(head, features, labels, CPU, 0).train_epoch() is not None
    assert choose_weight_decay(features, labels, Design.of(features, CPU), 0).accuracy is None


def test_every_view_is_fitted_and_the_solve_happens_once() -> None:
    features, labels = blobs(per_class=6, classes=2, width=8, noise=2.0, views=3)
    head = torch.nn.Linear(8, 2)
    solver = HeadSolver(head, features, labels, CPU, seed=0)
    first = solver.train_epoch()
    assert first.images == 36 and solver.optimizer.param_groups[0]["solved"]
    solved = head.weight.detach().clone()
    second = solver.train_epoch()
    assert torch.equal(head.weight, solved) and second.loss == first.loss


def test_a_memory_mapped_cache_is_read_in_chunks_and_fits_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    features, labels = blobs(per_class=10, classes=3, width=8, noise=3.0, views=2)
    np.save(tmp_path / "f.npy", features)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    in_memory = torch.nn.Linear(8, 3)
    HeadSolver(in_memory, features, labels, CPU, seed=0).train_epoch()
    monkeypatch.setattr(head_solver, "RESIDENT_BYTES", 0)
    monkeypatch.setattr(head_solver, "ROWS_PER_CHUNK", 8)
    chunked = torch.nn.Linear(8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about tensors over the read-only memmap
        HeadSolver(chunked, mapped, labels, CPU, seed=0).train_epoch()
    torch.testing.assert_close(chunked.weight, in_memory.weight, atol=1e-3, rtol=1e-3)


def test_a_stop_request_stops_the_solve() -> None:
    from transferctl.training.engine import TrainingStopped

    features, labels = blobs(per_class=4, classes=2, width=8, noise=1.0)
    with pytest.raises(TrainingStopped):
        HeadSolver(torch.nn.Linear(8, 2), features, labels, CPU, seed=0).train_epoch(lambda: True)


def feature_extract(data: Path, out: Path, **phase: object) -> dict:
    return experiment(data, out, strategy="feature_extract", schedule=[{"name": "head", "epochs": 3, "train": "head", "lr": 1e-3, **phase}])


def rows_of(summary: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_a_head_phase_on_cached_features_is_solved_in_its_first_epoch(tiny_split_data: Path, tmp_path: Path) -> None:
    notices = Notices()
    summary = train(config_from_dict(feature_extract(tiny_split_data, tmp_path / "runs")), observer=notices)
    rows = rows_of(summary)
    assert [row["lr_head"] for row in rows] == [None, None, None]
    assert rows[0]["head_weight_decay"] in head_solver.WEIGHT_DECAYS + (head_solver.FALLBACK_WEIGHT_DECAY,)
    assert rows[0]["train_acc"] == 1.0  # 4 images a class of clearly coloured squares: separable
    assert rows[1]["train_loss"] == rows[2]["train_loss"] == rows[0]["train_loss"]  # solved: later epochs only measure
    assert any("solved to convergence" in line for line in notices.lines) and any("weight decay" in line for line in notices.lines)


def test_solver_minibatch_trains_the_head_with_the_optimizer(tiny_split_data: Path, tmp_path: Path) -> None:
    rows = rows_of(train(config_from_dict(feature_extract(tiny_split_data, tmp_path / "runs", solver="minibatch"))))
    assert [row["lr_head"] for row in rows] == pytest.approx([1e-3, 0.75e-3, 0.25e-3])  # cosine over 3 epochs
    assert "head_weight_decay" not in rows[0]


def test_check_says_which_phases_solve_their_head(tiny_split_data: Path, tmp_path: Path) -> None:
    raw = experiment(tiny_split_data, tmp_path / "runs")  # fine_tune: head, then body
    assert [phase["head_solved"] for phase in describe(prepare(config_from_dict(raw)))["phases"]] == [True, False]
    raw["data"]["cache"] = "off"
    assert [phase["head_solved"] for phase in describe(prepare(config_from_dict(raw)))["phases"]] == [False, False]
    raw["data"]["cache"] = "auto"
    raw["schedule"][1]["unfreeze_every"] = 1  # gradual unfreezing starts with a head-only step
    assert [phase["head_solved"] for phase in describe(prepare(config_from_dict(raw)))["phases"]] == [True, True]


def test_a_degenerate_body_gets_a_head_that_does_not_magnify_its_features() -> None:
    features, labels = blobs(per_class=3, classes=2, width=16, noise=1.0)
    features *= 1e-11  # a random network's features can be this small: weights of 1e10 would blow up fine-tuning
    head = torch.nn.Linear(16, 2)
    stats = HeadSolver(head, features, labels, CPU, seed=0).train_epoch()
    assert np.isfinite(stats.loss) and head.weight.abs().max() < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_solved_head_reaches_a_cross_validated_logistic_regression(seed: int) -> None:
    """The default head against the reference a practitioner would fit by hand on the same frozen features:
    scikit-learn's LogisticRegressionCV, C from 17 values chosen by 5-fold cross-validation."""
    from sklearn.linear_model import LogisticRegressionCV

    features, labels = blobs(per_class=220, classes=5, width=48, noise=4.0, seed=seed)
    train_rows = np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(5)])  # 20 a class, the rest validates
    val_rows = np.setdiff1d(np.arange(len(labels)), train_rows)
    head = torch.nn.Linear(48, 5)
    HeadSolver(head, features[train_rows], labels[train_rows], CPU, seed=seed).train_epoch()
    with torch.no_grad():
        ours = float((head(torch.from_numpy(features[val_rows, 0])).argmax(dim=1).numpy() == labels[val_rows]).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegressionCV(Cs=np.logspace(-4, 4, 17), cv=5, max_iter=5000).fit(features[train_rows, 0], labels[train_rows])
    theirs = float(reference.score(features[val_rows, 0], labels[val_rows]))
    assert 0.4 < theirs < 0.99  # neither trivial nor hopeless: the strength matters
    assert ours >= theirs - 0.02, (ours, theirs)


def test_a_class_without_training_rows_keeps_its_output_and_is_not_predicted() -> None:
    features, labels = blobs(per_class=4, classes=2, width=8, noise=1.0)
    head = torch.nn.Linear(8, 3)  # the run has a third class, with no training image here
    HeadSolver(head, features, labels, CPU, seed=0).train_epoch()
    with torch.no_grad():
        predicted = head(torch.from_numpy(features[:, 0])).argmax(dim=1)
    assert head.weight.shape == (3, 8) and torch.equal(predicted, torch.from_numpy(labels))  # the absent class is pushed down


def _solved_logits(features: np.ndarray, labels: np.ndarray, objective: head_solver.Objective, decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fitted (weight, bias) in the solver's coordinates, and those coordinates' rows."""
    design = Design.of(features, CPU)
    rows = _Rows(features, labels, np.arange(len(labels)), design, objective=objective)
    weight = torch.zeros(3, design.width, requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    _fit(rows, weight, bias, decay, 1000, lambda: False)
    return weight.detach(), bias.detach(), design.transform(torch.from_numpy(features[:, 0]))


def test_the_solved_head_minimises_the_runs_weighted_and_smoothed_loss() -> None:
    features, labels = blobs(per_class=10, classes=3, width=8, noise=6.0)
    features, labels = features[:23], labels[:23]  # 10, 10 and 3 images
    loss = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 5.0]), label_smoothing=0.2)
    decay = 1e-2
    weight, bias, rows = _solved_logits(features, labels, head_solver.Objective.of(loss), decay)
    # At the optimum of nn.CrossEntropyLoss's own weighted, smoothed mean plus the penalty, its gradient vanishes.
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    objective = loss(rows @ weight.T + bias, torch.from_numpy(labels)) + 0.5 * decay * weight.pow(2).sum()
    objective.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4
    plain, _, _ = _solved_logits(features, labels, head_solver.Objective(), decay)
    assert (plain - weight.detach()).abs().max() > 1e-2  # without the run's loss the head is another one


def test_balanced_sampling_weighs_rows_as_balanced_class_weights_would() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    from transferctl.data.imbalance import balanced_sample_weights

    features, labels = blobs(per_class=10, classes=3, width=8, noise=6.0)
    features, labels = features[:23], labels[:23]
    sampled = head_solver.Objective(image_weights=balanced_sample_weights(labels))
    weighted = head_solver.Objective(class_weights=torch.tensor(compute_class_weight("balanced", classes=np.arange(3), y=labels), dtype=torch.float32))
    by_sampling, _, _ = _solved_logits(features, labels, sampled, 1e-2)
    by_weights, _, _ = _solved_logits(features, labels, weighted, 1e-2)
    torch.testing.assert_close(by_sampling, by_weights, atol=1e-4, rtol=1e-4)


def test_a_solved_head_phase_reports_the_runs_training_loss(tiny_split_data: Path, tmp_path: Path) -> None:
    plain = rows_of(train(config_from_dict(feature_extract(tiny_split_data, tmp_path / "a"))))
    smoothed = rows_of(train(config_from_dict({**feature_extract(tiny_split_data, tmp_path / "b"), "loss": {"label_smoothing": 0.3}})))
    assert smoothed[0]["train_loss"] > plain[0]["train_loss"]  # smoothing keeps the loss of separable data away from 0
    assert smoothed[0]["val_loss"] != smoothed[0]["train_loss"]


def multi_label_blobs(images: int, classes: int, width: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each image the sum of the directions of its labels (each present with probability a half), plus noise."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(classes, width)) * 3.0
    targets = (rng.random((images, classes)) < 0.5).astype(np.float32)
    features = (targets @ directions + 5.0)[:, None, :] + noise * rng.normal(size=(images, 1, width))
    return features.astype(np.float32), targets


def test_a_multi_label_head_minimises_bce_with_its_positive_weights() -> None:
    features, targets = multi_label_blobs(images=30, classes=3, width=8, noise=2.0)
    loss = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0, 0.5]))
    decay = 1e-2
    weight, bias, rows = _solved_logits(features, targets, head_solver.Objective.of(loss), decay)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    objective = loss(rows @ weight.T + bias, torch.from_numpy(targets)) + 0.5 * decay * weight.pow(2).sum()
    objective.backward()  # at the optimum of nn.BCEWithLogitsLoss's own mean plus the penalty, the gradient vanishes
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4


def test_a_multi_label_head_is_cross_validated_on_out_of_fold_map_and_reaches_one_vs_rest_logistic_regressions() -> None:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import average_precision_score

    features, targets = multi_label_blobs(images=400, classes=4, width=32, noise=6.0, seed=1)
    fit, held = np.arange(80), np.arange(80, 400)
    head = torch.nn.Linear(32, 4)
    solver = HeadSolver(head, features[fit], targets[fit], CPU, seed=0, objective=head_solver.Objective.of(torch.nn.BCEWithLogitsLoss()))
    stats = solver.train_epoch()
    assert solver.selection is not None and solver.selection.criterion == "mAP" and "held-out mAP" in solver.selection.describe()
    assert 0 <= stats.accuracy <= 1 and stats.images == 80
    with torch.no_grad():
        ours = torch.sigmoid(head(torch.from_numpy(features[held, 0]))).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = np.stack([LogisticRegressionCV(Cs=np.logspace(-4, 4, 17), cv=5, max_iter=5000).fit(features[fit, 0], targets[fit, c])
                           .predict_proba(features[held, 0])[:, 1] for c in range(4)], axis=1)  # fmt: skip
    ours_map = average_precision_score(targets[held], ours, average="macro")
    theirs_map = average_precision_score(targets[held], theirs, average="macro")
    assert 0.5 < theirs_map < 0.99 and ours_map >= theirs_map - 0.02, (ours_map, theirs_map)


def test_a_multi_label_head_that_the_body_is_fine_tuned_through_is_chosen_on_held_out_loss() -> None:
    # Few noisy images in many dimensions, as frozen features of a small target set are: mAP keeps creeping up
    # as the penalty weakens, while the held-out loss turns up at a much stronger one.
    features, targets = multi_label_blobs(images=100, classes=4, width=512, noise=20.0, seed=0)
    chosen = {}
    for fine_tuned_after in (False, True):
        solver = HeadSolver(torch.nn.Linear(512, 4), features, targets, CPU, seed=0, objective=head_solver.Objective.of(torch.nn.BCEWithLogitsLoss()),
                            fine_tuned_after=fine_tuned_after)  # fmt: skip
        solver.train_epoch()
        chosen[fine_tuned_after] = solver.selection
    assert chosen[False].criterion == "mAP" and chosen[True].criterion == "loss" and "held-out loss" in chosen[True].describe()
    assert chosen[True].weight_decay > chosen[False].weight_decay  # small logits to fine-tune through; a sharper classifier to keep
