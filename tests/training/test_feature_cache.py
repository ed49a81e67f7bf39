from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import experiment, head_only
from transferctl.data.preprocessing import Preprocessing
from transferctl.config import config_from_dict
from transferctl.data.folders import EpochSampler, ImageDataset, build_transform, discover
from transferctl.data.sharding import Shard
from transferctl.errors import ConfigError
from transferctl.training.feature_cache import FeatureBatches, FeatureStore, Views, head_for_features
from transferctl.training.train import train


def run(raw: dict) -> tuple[dict, dict[str, torch.Tensor], list[dict]]:
    summary = train(config_from_dict(raw))
    model = torch.load(summary["checkpoints"]["last"], weights_only=True)["model"]
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return summary, model, rows


def test_cached_head_phase_equals_full_forward_passes(tiny_split_data: Path, tmp_path: Path) -> None:
    _, plain, plain_rows = run(head_only(tiny_split_data, tmp_path / "off", cache="off"))
    summary, cached, cached_rows = run(head_only(tiny_split_data, tmp_path / "on", cache="memory"))
    assert [r["split"] for r in summary["feature_cache"]] == ["train", "val"]
    torch.testing.assert_close(cached["fc.weight"], plain["fc.weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached["fc.bias"], plain["fc.bias"], rtol=1e-4, atol=1e-5)
    for a, b in zip(plain_rows, cached_rows):
        assert a["val_acc"] == b["val_acc"] and a["train_acc"] == b["train_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4) and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_a_second_run_reuses_the_cache_and_a_changed_file_invalidates_it(tiny_split_data: Path, tmp_path: Path, isolated_feature_cache: Path) -> None:
    first, _, _ = run(head_only(tiny_split_data, tmp_path / "a", cache="disk", epochs=1))
    assert not any(r["reused"] for r in first["feature_cache"])
    assert len(list(isolated_feature_cache.glob("features-*.npy"))) == 2  # train and val
    second, _, _ = run(head_only(tiny_split_data, tmp_path / "b", cache="disk", epochs=1))
    assert all(r["reused"] for r in second["feature_cache"])
    image = sorted((tiny_split_data / "train").rglob("*.png"))[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    third, _, _ = run(head_only(tiny_split_data, tmp_path / "c", cache="disk", epochs=1))
    assert [r["reused"] for r in third["feature_cache"]] == [False, True]  # only train's files changed


def test_the_key_changes_with_everything_the_features_depend_on(tiny_split_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import PIL
    import torchvision

    from transferctl.training.feature_cache import CacheSpec

    samples = discover(tiny_split_data, 0.2, 0).train
    spec = CacheSpec("resnet18", "weights", None, "fc", {"resize": 36, "crop": 32}, "standard", 2, 0, "fp32")
    key = spec.key(samples)
    assert spec.key(samples) == key
    changed = [spec.key(samples[1:])]
    for field, value in (("backbone", "resnet50"), ("weights", "other weights"), ("cut", "layer3"), ("preprocessing", {"resize": 36, "crop": 28}),
                         ("views", 3), ("seed", 1), ("precision", "bf16"), ("network", "other code"), ("device", "cuda")):  # fmt: skip
        changed.append(dataclasses.replace(spec, **{field: value}).key(samples))
    for module in (torch, torchvision, PIL):
        with monkeypatch.context() as patch:
            patch.setattr(module, "__version__", "0.0.0")
            changed.append(spec.key(samples))
    assert len(set(changed)) == len(changed) and key not in changed
    unaugmented = dataclasses.replace(spec, augment="none", views=1)
    assert unaugmented.key(samples) == dataclasses.replace(unaugmented, seed=1).key(samples)  # no random views


def test_a_file_replaced_with_its_size_and_mtime_kept_changes_the_key(tiny_split_data: Path) -> None:
    from transferctl.training.feature_cache import CacheSpec

    samples = discover(tiny_split_data, 0.2, 0).train
    spec = CacheSpec("resnet18", "weights", None, "fc", {"resize": 36, "crop": 32}, "none", 1, 0, "fp32")
    key = spec.key(samples)
    first, second = samples[0][0], samples[1][0]
    stat = first.stat()
    swapped = first.read_bytes()
    first.write_bytes(second.read_bytes()[: len(swapped)].ljust(len(swapped), b"\0"))  # other content, the same size
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the mtime put back, as a copy tool or an archive does
    assert first.stat().st_size == stat.st_size and first.stat().st_mtime_ns == stat.st_mtime_ns
    assert spec.key(samples) != key


def test_the_network_digest_covers_code_that_the_weights_do_not_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    from transferctl.training.feature_cache import network_digest

    module = tmp_path / "mynet.py"
    module.write_text("import torch\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        return x.relu()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = network_digest(torch.nn.Sequential(importlib.import_module("mynet").Net(), torch.nn.Linear(2, 2)))
    module.write_text("import torch\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        return x.tanh()\n")  # same weights
    sys.modules.pop("mynet")
    after = network_digest(torch.nn.Sequential(importlib.import_module("mynet").Net(), torch.nn.Linear(2, 2)))
    assert before != after
    assert network_digest(torch.nn.Sequential(torch.nn.ReLU())) != network_digest(torch.nn.Sequential(torch.nn.GELU()))  # the structure too
    sys.modules.pop("mynet")


def test_memory_and_disk_give_the_same_result(tiny_split_data: Path, tmp_path: Path, isolated_feature_cache: Path) -> None:
    memory, in_memory, _ = run(head_only(tiny_split_data, tmp_path / "m", cache="memory", augment="standard", cached_views=3))
    assert not list(isolated_feature_cache.glob("*.npy")) and memory["feature_cache"][0]["location"] == "memory"
    disk, on_disk, _ = run(head_only(tiny_split_data, tmp_path / "d", cache="disk", augment="standard", cached_views=3))
    assert disk["feature_cache"][0]["location"].endswith(".npy") and disk["feature_cache"][0]["views"] == 3
    torch.testing.assert_close(in_memory["fc.weight"], on_disk["fc.weight"])


def test_auto_keeps_small_features_in_memory_and_saves_them(tiny_split_data: Path, tmp_path: Path, isolated_feature_cache: Path) -> None:
    summary, _, _ = run(head_only(tiny_split_data, tmp_path / "a", epochs=1))
    assert [r["location"] for r in summary["feature_cache"]] == ["memory", "memory"]
    assert len(list(isolated_feature_cache.glob("features-*.npy"))) == 2
    over_budget, _, _ = run(head_only(tiny_split_data, tmp_path / "b", epochs=1, cache_memory_mb=0))
    assert all(r["reused"] and r["location"].endswith(".npy") for r in over_budget["feature_cache"])


def test_a_cache_folder_that_cannot_be_one_costs_auto_only_the_reuse(tiny_split_data: Path, tmp_path: Path, isolated_feature_cache: Path) -> None:
    isolated_feature_cache.write_text("a file where the folder should be")
    summary, _, _ = run(head_only(tiny_split_data, tmp_path / "a", epochs=1))
    assert [r["location"] for r in summary["feature_cache"]] == ["memory", "memory"]


def test_a_disk_cache_that_cannot_be_written_is_a_one_line_error(tiny_split_data: Path, tmp_path: Path, isolated_feature_cache: Path) -> None:
    isolated_feature_cache.write_text("a file where the folder should be")
    with pytest.raises(ConfigError) as caught:
        train(config_from_dict(head_only(tiny_split_data, tmp_path / "d", epochs=1, cache="disk")))
    message = str(caught.value)
    assert f"{isolated_feature_cache}: the feature cache" in message and "it is not a folder" in message
    assert "$TRANSFERCTL_CACHE" in message and "data.cache: memory" in message


def no_fallocate(code: int) -> Any:
    def fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    return fallocate


def test_a_disk_cache_without_room_stops_before_writing_into_its_mapping(tiny_split_data: Path, tmp_path: Path, isolated_feature_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk under a memory-mapped file would otherwise kill the process with SIGBUS mid-write.
    monkeypatch.setattr(os, "posix_fallocate", no_fallocate(errno.ENOSPC), raising=False)
    with pytest.raises(ConfigError, match="cannot be written there: No space left on device"):
        train(config_from_dict(head_only(tiny_split_data, tmp_path / "d", epochs=1, cache="disk")))
    assert not list(isolated_feature_cache.glob("*.tmp-*"))


def test_ctrl_c_while_features_are_computed_stops_after_the_batch_and_leaves_no_partial_file(
    tiny_split_data: Path, tmp_path: Path, isolated_feature_cache: Path, monkeypatch: pytest.MonkeyPatch, heeded_sigint: None
) -> None:
    import signal

    from transferctl.training import feature_cache
    from transferctl.errors import TrainingInterrupted

    read = feature_cache._Views.__getitem__
    items: list[int] = []

    def pressing_ctrl_c(self: Any, item: int) -> Any:
        items.append(item)
        if len(items) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # one Ctrl-C: transferctl's handler asks for a stop
        return read(self, item)

    monkeypatch.setattr(feature_cache._Views, "__getitem__", pressing_ctrl_c)
    raw = head_only(tiny_split_data, tmp_path / "d", epochs=1, cache="disk", batch_size=2, num_workers=0)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT during phase 'head' epoch 1"):
        train(config_from_dict(raw))
    assert len(items) == 2  # the first batch of 12 training images, then the stop: not the whole set
    assert not [path.name for path in isolated_feature_cache.rglob("*") if path.is_file() and ".tmp-" in path.name]


def test_a_file_system_without_fallocate_still_caches_on_disk(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "posix_fallocate", no_fallocate(errno.EOPNOTSUPP), raising=False)
    summary, _, _ = run(head_only(tiny_split_data, tmp_path / "d", epochs=1, cache="disk"))
    assert summary["feature_cache"][0]["location"].endswith(".npy")


def test_unfrozen_phases_switch_back_to_full_passes(tiny_split_data: Path, tmp_path: Path) -> None:
    raw = experiment(tiny_split_data, tmp_path / "runs")  # head 1 epoch, then body 1 epoch
    raw["schedule"][0]["solver"] = "minibatch"  # as cache: off trains it
    raw["data"]["cache"] = "memory"
    summary, model, _ = run(raw)
    assert {r["phase"] for r in summary["feature_cache"]} == {"head"}
    raw["data"]["cache"] = "off"
    _, plain, _ = run({**raw, "output": {"dir": str(tmp_path / "off")}})
    torch.testing.assert_close(model["layer1.0.conv1.weight"], plain["layer1.0.conv1.weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model["fc.weight"], plain["fc.weight"], rtol=1e-4, atol=1e-5)


def test_each_epoch_draws_one_view_per_image_from_seed_and_epoch() -> None:
    features = np.arange(6 * 3, dtype=np.float32).reshape(6, 3, 1)  # image i, view v -> 3i + v
    store = FeatureStore(features, np.arange(6), "memory", False, 0.0)
    sampler = EpochSampler(6, seed=5)
    batches = FeatureBatches(store, 4, sampler)
    assert len(batches) == 2
    sampler.set_epoch(1)
    first = torch.cat([f for f, _ in batches]).flatten()
    labels = torch.cat([y for _, y in batches])
    assert sorted((first // 3).long().tolist()) == list(range(6)) and torch.equal((first // 3).long(), labels)
    assert torch.equal(first, torch.cat([f for f, _ in batches]).flatten())  # the same epoch again: the same draw
    sampler.set_epoch(2)
    assert not torch.equal(first, torch.cat([f for f, _ in batches]).flatten())


def test_each_rank_takes_its_shard_of_the_epoch_in_batches_of_its_own() -> None:
    store = FeatureStore(np.arange(7, dtype=np.float32).reshape(7, 1, 1), np.arange(7), "memory", False, 0.0)
    ranks = [FeatureBatches(store, 2, EpochSampler(7, seed=3, shard=Shard(rank, 2))) for rank in range(2)]
    taken = [torch.cat([f for f, _ in batches]).flatten().long().tolist() for batches in ranks]
    assert [len(batches) for batches in ranks] == [2, 2] and [len(t) for t in taken] == [4, 4]  # padded to equal steps
    assert set(taken[0]) | set(taken[1]) == set(range(7))
    in_order = [FeatureBatches(store, 2, EpochSampler(7, seed=3, shuffle=False, shard=Shard(rank, 2), pad=False)) for rank in range(2)]
    assert [torch.cat([f for f, _ in b]).flatten().long().tolist() for b in in_order] == [[0, 2, 4, 6], [1, 3, 5]]


def test_view_zero_is_the_clean_centre_crop_and_the_others_are_augmented(tiny_split_data: Path) -> None:
    pre = Preprocessing(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    samples = discover(tiny_split_data, 0.2, 0).train
    augmented = ImageDataset(samples, build_transform(pre, "standard", train=True))
    clean = ImageDataset(samples, build_transform(pre, "none", train=False))
    views = Views(augmented, clean, 3, seed=0).of([2, 0])
    assert len(views) == 6
    assert torch.equal(views[0][0], clean[2][0]) and torch.equal(views[3][0], clean[0][0])
    assert not torch.equal(views[1][0], clean[2][0]) and not torch.equal(views[1][0], views[2][0])
    assert torch.equal(views[1][0], Views(augmented, clean, 3, seed=0).of([2])[1][0])  # a view's seed: (run seed, view, image)


def test_a_dropout_before_the_head_still_trains() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(4, 2)))
    head = head_for_features(model, "1.1")
    assert isinstance(head, torch.nn.Sequential) and isinstance(head[0], torch.nn.Dropout) and head[1] is model[1][1]
    assert head_for_features(model, "0") is model[0]


def test_the_key_changes_with_the_augmentation_and_random_erasing(tiny_split_data: Path) -> None:
    import dataclasses

    from transferctl.config import AUGMENTS
    from transferctl.training.feature_cache import CacheSpec

    samples = discover(tiny_split_data, 0.2, 0).train
    spec = CacheSpec("resnet18", "weights", None, "fc", {"resize": 36, "crop": 32}, "standard", 2, 0, "fp32")
    keys = [dataclasses.replace(spec, augment=augment).key(samples) for augment in AUGMENTS]
    keys += [dataclasses.replace(spec, random_erasing=p).key(samples) for p in (0.25, 0.5)]
    assert len(set(keys)) == len(AUGMENTS) + 2
    erased = dataclasses.replace(spec, augment="none", random_erasing=0.25)
    assert erased.key(samples) != dataclasses.replace(erased, seed=1).key(samples)  # erasing alone draws its views from the seed


@pytest.mark.parametrize("augment", ["none", "standard", "randaugment", "trivialaugment", "autoaugment", "augmix"])
def test_each_augmentation_trains_on_cached_views_then_through_the_body(tiny_split_data: Path, tmp_path: Path, augment: str) -> None:
    raw = experiment(tiny_split_data, tmp_path / "runs", data={"augment": augment, "random_erasing": 0.5, "cached_views": 2, "cache": "memory"})
    summary, _, rows = run(raw)
    assert [r["views"] for r in summary["feature_cache"]] == [2, 1]  # train: the clean view and a random one; val: clean
    assert [r["phase"] for r in rows] == ["head", "body"] and all(np.isfinite(r["train_loss"]) for r in rows)
