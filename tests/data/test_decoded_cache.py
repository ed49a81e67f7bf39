"""Decoded images kept in memory across epochs: the same pixels, shared by workers, within a budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import Notices, experiment
from transferctl.data.preprocessing import Preprocessing
from transferctl.config import config_from_dict
from transferctl.data.folders import ImageDataset, build_transform, discover
from transferctl.errors import DataError
from transferctl.data.decoded_cache import decode_all, estimated_bytes, keep_decoded, resized_size
from transferctl.testing.synthetic import tiny_dataset
from transferctl.training.train import train
from transferctl.training.observers import SilentObserver

PRE = Preprocessing(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def samples_of(root: Path) -> list:
    return discover(root, 0.2, 0).train


@pytest.fixture
def wide_images(tmp_path: Path) -> Path:
    """Images of different shapes and modes, so resizing and offsets are really exercised."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, sizes in {"a": [(30, 12), (12, 30), (25, 25)], "b": [(40, 17), (17, 17), (64, 33)]}.items():
        folder = tmp_path / "wide" / cls
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (20, 31), dtype=np.uint8), mode="L").save(folder / "gray.png")
    return tmp_path / "wide"


def test_decoded_images_give_exactly_the_pixels_of_decoding_each_file(wide_images: Path) -> None:
    samples = samples_of(wide_images)
    plain = ImageDataset(samples, build_transform(PRE, "none", train=False))
    cached = ImageDataset(samples, build_transform(PRE, "none", train=False))
    cached.decoded = decode_all(samples, PRE.resize, PRE.interpolation, workers=0)
    assert len(cached.decoded) == len(samples)
    for index in range(len(samples)):
        assert torch.equal(plain[index][0], cached[index][0])
        assert plain[index][1] == cached[index][1]


def test_worker_processes_decode_the_same_pixels(wide_images: Path) -> None:
    samples = samples_of(wide_images)
    here = decode_all(samples, PRE.resize, PRE.interpolation, workers=0)
    there = decode_all(samples, PRE.resize, PRE.interpolation, workers=2)
    assert torch.equal(here.pixels, there.pixels) and np.array_equal(here.shapes, there.shapes)


@pytest.mark.parametrize("estimate", [0, 1000, 10**7])
def test_a_wrong_size_estimate_still_gives_every_pixel(wide_images: Path, estimate: int) -> None:
    samples = samples_of(wide_images)
    exact = decode_all(samples, PRE.resize, PRE.interpolation, workers=0)
    guessed = decode_all(samples, PRE.resize, PRE.interpolation, workers=0, expected_bytes=estimate)
    assert torch.equal(exact.pixels, guessed.pixels) and np.array_equal(exact.offsets, guessed.offsets)
    assert all(np.array_equal(np.asarray(exact.image(i)), np.asarray(guessed.image(i))) for i in range(len(samples)))


def test_the_header_estimate_is_the_decoded_size(wide_images: Path) -> None:
    samples = samples_of(wide_images)
    decoded = decode_all(samples, PRE.resize, PRE.interpolation, workers=0)
    assert estimated_bytes([path for path, _ in samples], PRE.resize) == decoded.pixels.numel()
    assert resized_size((30, 12), 20) == (20, 50) and resized_size((12, 30), 20) == (50, 20)


def test_the_estimate_stops_reading_headers_once_over_the_budget(wide_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    paths = [path for path, _ in samples_of(wide_images)]
    opened: list[Path] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *args: opened.append(path) or real_open(path, *args))
    one = estimated_bytes(paths[:1], PRE.resize)
    assert estimated_bytes(paths, PRE.resize, stop_above=one) > one and opened[1:] == paths[:2]  # the second passed it
    dataset = ImageDataset(samples_of(wide_images), build_transform(PRE, "none", train=False))
    opened.clear()
    assert keep_decoded(dataset, PRE, budget_mb=0, workers=0) is None and len(opened) == 1


def test_images_over_the_budget_are_not_kept(wide_images: Path) -> None:
    dataset = ImageDataset(samples_of(wide_images), build_transform(PRE, "none", train=False))
    assert keep_decoded(dataset, PRE, budget_mb=0, workers=0) is None and dataset.decoded is None
    kept = keep_decoded(dataset, PRE, budget_mb=1, workers=0)
    assert kept is not None and dataset.decoded is kept
    assert keep_decoded(dataset, PRE, budget_mb=1, workers=0) is kept  # decoded once only


def test_a_file_damaged_after_discovery_names_the_file(wide_images: Path) -> None:
    samples = samples_of(wide_images)
    samples[0][0].write_bytes(b"not a png any more")
    with pytest.raises(DataError, match=samples[0][0].name):
        decode_all(samples, PRE.resize, PRE.interpolation, workers=0)


def full_passes(data: Path, out: Path, observer: SilentObserver | None = None, **data_fields: object) -> dict:
    raw = experiment(data, out, data=dict(data_fields), strategy="scratch", schedule=[{"name": "all", "epochs": 2, "train": "all", "lr": 1e-2}])
    return train(config_from_dict(raw), observer=observer)


def test_training_on_kept_images_equals_decoding_every_epoch(tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "data", n_classes=3, layout="split")
    kept = full_passes(data, tmp_path / "kept", cache="memory")
    decoded_each_epoch = full_passes(data, tmp_path / "each", cache="off")
    assert [r["split"] for r in kept["decoded_images"]] == ["train", "val"]
    assert kept["decoded_images"][0]["images"] == len(discover(data, 0.2, 0).train) and decoded_each_epoch["decoded_images"] == []
    rows = [[json.loads(line) for line in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()] for s in (kept, decoded_each_epoch)]
    assert [(r["train_loss"], r["val_acc"]) for r in rows[0]] == [(r["train_loss"], r["val_acc"]) for r in rows[1]]


def test_a_small_budget_decodes_every_epoch_and_says_so(tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "data", n_classes=3, layout="split")
    notices = Notices()
    summary = full_passes(data, tmp_path / "runs", notices, cache_memory_mb=0)
    assert summary["decoded_images"] == []
    assert any("decoded train images need more than 0 MB" in line for line in notices.lines)


# --------------------------------------------------------------------------- cropping in the training process


def loaders_over(root: Path, workers: int) -> dict:
    from transferctl.data.folders import make_loader

    samples = samples_of(root)
    train_set = ImageDataset(samples, build_transform(PRE, "standard", train=True))
    val_set = ImageDataset(samples, build_transform(PRE, "standard", train=False))
    return {"train": make_loader(train_set, 3, True, workers, seed=5), "val": make_loader(val_set, 3, False, workers, seed=5)}


def test_a_loader_without_workers_gives_the_same_batches(wide_images: Path) -> None:
    from transferctl.data.folders import set_loader_epoch, without_workers

    loader = loaders_over(wide_images, workers=1)["train"]
    inline = without_workers(loader)
    assert inline.num_workers == 0 and inline.sampler is loader.sampler and inline.batch_size == loader.batch_size
    set_loader_epoch(inline, 3)  # reaches the shared sampler: both now draw epoch 3's order and crops
    for (a, la), (b, lb) in zip(loader, inline, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("inline", [True, False])
def test_kept_splits_are_cropped_in_this_process_only_when_asked(wide_images: Path, inline: bool) -> None:
    from transferctl.data.decoded_cache import DecodeOnce

    loaders = loaders_over(wide_images, workers=1)
    notices = Notices()
    data = config_from_dict(experiment(wide_images, wide_images / "runs")).data
    once = DecodeOnce(data.model_copy(update={"cache_memory_mb": 1}), PRE, loaders, notices.notice, inline=inline)
    once.prepare()
    assert [loaders[split].num_workers for split in ("train", "val")] == ([0, 0] if inline else [1, 1])
    assert [record["workers"] for record in once.records] == ([0, 0] if inline else [1, 1])
    assert ("cropped in this process" in notices.lines[-1]) is inline


def test_a_split_not_kept_keeps_its_workers(wide_images: Path) -> None:
    from transferctl.data.decoded_cache import DecodeOnce

    loaders = loaders_over(wide_images, workers=1)
    data = config_from_dict(experiment(wide_images, wide_images / "runs")).data
    DecodeOnce(data.model_copy(update={"cache_memory_mb": 0}), PRE, loaders, Notices().notice, inline=True).prepare()
    assert [loaders[split].num_workers for split in ("train", "val")] == [1, 1]  # decoded every epoch: a worker helps


def test_crops_go_inline_only_for_cpu_training_on_two_cores_with_automatic_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    from transferctl.training.runtime import Runtime
    from transferctl.training.train import crops_inline

    automatic = config_from_dict(experiment(tmp_path, tmp_path / "runs", data={"num_workers": "auto"}))
    fixed = config_from_dict(experiment(tmp_path, tmp_path / "runs", data={"num_workers": 1}))
    cpu, gpu = Runtime(torch.device("cpu"), "bf16", True), Runtime(torch.device("cuda"), "bf16", True)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert crops_inline(automatic, cpu) and not crops_inline(fixed, cpu) and not crops_inline(automatic, gpu)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert not crops_inline(automatic, cpu)  # more cores: measured nowhere yet, so workers as before
