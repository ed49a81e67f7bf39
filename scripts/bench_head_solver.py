"""How long solving a head takes, beside scikit-learn's cross-validated logistic regression on the same features.

    python scripts/bench_head_solver.py [--images 10000] [--width 2048] [--classes 10] [--views 1]

A solved head (transferctl/training/head_solver.py) chooses its weight decay by 3-fold cross-validation over 8
strengths and then fits every row with L-BFGS. The reference does the same job the way a practitioner
would by hand: `LogisticRegressionCV(Cs=8, cv=3)` (lbfgs) on the same features. Both see Gaussian blobs
shaped like pooled ReLU features (positive, offset, noisy); the table gives each one's seconds, the ratio
and the accuracy on as many held-out rows, so a faster solve that fits worse would show.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def features(images: int, width: int, classes: int, views: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows around the same class centres for every seed, with noise loud enough that the strength matters."""
    centres = np.abs(np.random.default_rng(12345).normal(size=(classes, width))) * 0.5
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)
    labels[:classes] = np.arange(classes)
    rows = centres[labels][:, None, :] + 6.0 * np.abs(rng.normal(size=(images, views, width)))
    return rows.astype(np.float32), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--views", type=int, default=1)
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegressionCV

    from transferctl.training.head_solver import HeadSolver

    train, train_labels = features(args.images, args.width, args.classes, args.views, seed=0)
    held_out, held_out_labels = features(args.images, args.width, args.classes, 1, seed=1)
    held_out = held_out[:, 0]

    head = torch.nn.Linear(args.width, args.classes)
    started = time.perf_counter()
    solver = HeadSolver(head, train, train_labels, torch.device("cpu"), seed=0)
    solver.train_epoch()
    ours = time.perf_counter() - started
    with torch.no_grad():
        ours_acc = float((head(torch.from_numpy(held_out)).argmax(dim=1).numpy() == held_out_labels).mean())

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: the reference still answers
        reference = LogisticRegressionCV(Cs=8, cv=3, max_iter=300).fit(train.reshape(-1, args.width), np.repeat(train_labels, args.views))
    theirs = time.perf_counter() - started
    theirs_acc = float(reference.score(held_out, held_out_labels))

    print(f"{args.images} images x {args.views} view(s) x {args.width} features, {args.classes} classes; torch threads {torch.get_num_threads()}")
    assert solver.selection is not None
    print(f"transferctl head solve      {ours:7.2f} s  held-out acc {ours_acc:.3f}  ({solver.selection.describe()})")
    print(f"LogisticRegressionCV (ref.) {theirs:7.2f} s  held-out acc {theirs_acc:.3f}")
    print(f"ratio: the solve takes {ours / theirs:.2f}x the reference's time")


if __name__ == "__main__":
    main()
