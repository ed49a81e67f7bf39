"""early_stopping.py: a phase ends once its metric has not improved for `patience` epochs."""

from __future__ import annotations

from transferctl.training.early_stopping import EarlyStopping, is_better


def rows(*accuracies: float) -> list[dict[str, float]]:
    return [{"val_acc": acc, "val_loss": 1 - acc} for acc in accuracies]


def test_a_lower_loss_and_a_higher_accuracy_are_better() -> None:
    worse, better = rows(0.5, 0.6)
    assert is_better(better, worse, "val_acc") and is_better(better, worse, "val_loss")
    assert not is_better(worse, better, "val_acc") and not is_better(worse, worse, "val_loss")  # a tie is no improvement


def test_a_phase_stops_after_patience_epochs_without_improvement() -> None:
    stopping = EarlyStopping("val_acc", patience=2)
    assert [stopping.update(row) for row in rows(0.5, 0.7, 0.6, 0.7)] == [False, False, False, True]
    assert stopping.best == {"val_acc": 0.7, "val_loss": 1 - 0.7} and stopping.stale == 2


def test_without_patience_a_phase_runs_all_its_epochs() -> None:
    stopping = EarlyStopping("val_loss", patience=None)
    assert not any(stopping.update(row) for row in rows(0.9, 0.1, 0.1, 0.1))


def test_a_resumed_phase_counts_on_from_its_saved_state() -> None:
    best, worse = rows(0.8, 0.5)
    stopping = EarlyStopping("val_acc", patience=2, best=best, stale=1)
    assert stopping.update(worse) and stopping.best is best


def test_balanced_acc_and_macro_f1_follow_their_own_columns() -> None:
    # Accuracy rises while the minority class is lost: balanced accuracy and macro F1 fall.
    before = {"val_acc": 0.90, "val_loss": 0.3, "val_balanced_acc": 0.80, "val_macro_f1": 0.75}
    after = {"val_acc": 0.95, "val_loss": 0.2, "val_balanced_acc": 0.60, "val_macro_f1": 0.55}
    assert is_better(after, before, "val_acc")
    assert not is_better(after, before, "balanced_acc") and is_better(before, after, "balanced_acc")
    assert not is_better(after, before, "macro_f1") and is_better(before, after, "macro_f1")
    stopping = EarlyStopping("balanced_acc", patience=1)
    assert [stopping.update(row) for row in (before, after)] == [False, True] and stopping.best is before
