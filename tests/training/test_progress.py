"""training/progress.py: the plan `check` prints."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from helpers import experiment
from transferctl.config import config_from_dict
from transferctl.training.progress import render_plan
from transferctl.training.train import describe, prepare


def plan_text(data: Path, out: Path, **data_fields: object) -> str:
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(render_plan(describe(prepare(config_from_dict(experiment(data, out, data=data_fields))))))
    return console.export_text()


def test_the_plan_names_the_training_transforms_and_what_cached_views_cost(tiny_split_data: Path, tmp_path: Path) -> None:
    text = plan_text(tiny_split_data, tmp_path, augment="randaugment", random_erasing=0.25, cached_views=8)
    assert "randaugment + random_erasing 0.25: RandomResizedCrop, RandomHorizontalFlip, RandAugment, ToTensor, Normalize, RandomErasing(p=0.25)" in text
    assert "8 cached views = 8 forward passes of the training images" in text and "raise data.cached_views" in text
    assert "clean view alone, without the augmentation" in plan_text(tiny_split_data, tmp_path, augment="augmix")  # cached_views: 1
    assert "cached views" not in plan_text(tiny_split_data, tmp_path, augment="augmix", cache="off")  # no cached phase
    plain = plan_text(tiny_split_data, tmp_path, augment="none")
    assert "none: Resize, CenterCrop, ToTensor, Normalize" in plain and "view" not in plain  # nothing random to cache


def test_the_plan_names_the_fine_tuning_kit_and_where_it_mixes(tiny_split_data: Path, tmp_path: Path) -> None:
    def text_of(**sections: object) -> str:
        console = Console(width=400, record=True, file=io.StringIO())
        console.print(render_plan(describe(prepare(config_from_dict(experiment(tiny_split_data, tmp_path, **sections))))))
        return console.export_text()

    data = {"root": str(tiny_split_data), "image_size": 32, "batch_size": 8, "num_workers": 0, "augment": "none", "sampler": "balanced"}
    text = text_of(loss={"label_smoothing": 0.1, "class_weights": "balanced"}, mixup={"alpha": 0.2}, ema={"decay": 0.99}, data=data)
    # experiment()'s phases: 'head' on cached features (does not mix), then 'body'
    assert "label_smoothing 0.1, class_weights balanced, sampler balanced, mixup 0.2 in phase body, ema 0.99" in text
    assert "kit" not in text_of()  # plain cross-entropy on shuffled batches: nothing to say
