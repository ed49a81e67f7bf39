from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from transferctl.models.build import build_backbone
from transferctl.models.torchvision_models import cached_weights_path, torchvision_weights
from transferctl.config import BackboneConfig
from transferctl.training.runtime import Runtime
from transferctl.analysis.probe_features import extract, image_key, load_images, load_probe_network, with_preprocessing
from transferctl.testing.synthetic import tiny_dataset

CPU = Runtime(torch.device("cpu"), "fp32", channels_last=False)


def images(tmp_path: Path, count: int = 6) -> torch.Tensor:
    root = tiny_dataset(tmp_path / "data", n_classes=3, per_class=2, layout="flat")
    paths = sorted(root.glob("*/*.png"))[:count]
    network = load_probe_network(BackboneConfig(name="resnet18", weights="none"), 32, pretrained=False)
    return load_images(paths, network.backbone.preprocessing)


def test_images_are_decoded_at_the_networks_crop(tmp_path: Path) -> None:
    batch = images(tmp_path)
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.uint8


def test_stage_features_are_what_a_cut_network_trains_on(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = load_probe_network(BackboneConfig(name="resnet18", weights="none"), 32, pretrained=False)
    batch = images(tmp_path)
    features = extract(network, batch, CPU, batch_size=4)
    assert set(features.stages) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    assert features.penultimate.shape == (6, 512) and features.source_predictions is None
    np.testing.assert_allclose(features.stages["layer4"], features.penultimate, rtol=1e-6)  # avgpool feeds the head
    weights = tmp_path / "net.pt"
    torch.save(network.model.state_dict(), weights)
    cut = build_backbone(BackboneConfig(name="resnet18", weights=str(weights), cut="layer2"), 3, 32).model.eval()
    pre = network.backbone.preprocessing
    normalised = (batch.float() / 255.0 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(features.stages["layer2"], cut.features(normalised).numpy(), rtol=1e-4, atol=1e-5)


def test_a_random_copy_can_read_the_pretrained_networks_images(tmp_path: Path) -> None:
    network = load_probe_network(BackboneConfig(name="resnet18", weights="none"), 32, pretrained=False)
    other = load_probe_network(BackboneConfig(name="resnet18", weights="none"), 48, pretrained=False)
    copy = with_preprocessing(other, network.backbone.preprocessing)
    assert image_key(copy.backbone.preprocessing) == image_key(network.backbone.preprocessing) == 32
    assert extract(copy, images(tmp_path), CPU).penultimate.shape == (6, 512)


def test_torchvision_weights_keep_their_imagenet_head_and_top1(tmp_path: Path) -> None:
    weights = torchvision_weights("resnet18", "DEFAULT")
    path = cached_weights_path(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), path)
    try:
        network = load_probe_network(BackboneConfig(name="resnet18", weights="DEFAULT"), 32)
    finally:
        path.unlink()
    assert network.source_classes == 1000 and torch.equal(network.model.fc.weight, reference.fc.weight)
    assert network.imagenet_top1 == pytest.approx(weights.meta["_metrics"]["ImageNet-1K"]["acc@1"])
    features = extract(network, images(tmp_path), CPU)
    assert features.source_predictions is not None and features.source_predictions.shape == (6,)
    assert features.source_predictions.max() < 1000


def test_a_weights_file_keeps_its_own_head_too(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None, num_classes=7)
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    network = load_probe_network(BackboneConfig(name="resnet18", weights=str(path)), 32)
    assert network.source_classes == 7 and network.imagenet_top1 is None
    assert torch.equal(network.model.fc.weight, reference.fc.weight)


def test_rows_picks_the_same_images_from_every_measure() -> None:
    from transferctl.analysis.probe_features import Features

    stages = {"layer1": np.arange(12.0).reshape(6, 2), "layer2": np.arange(18.0).reshape(6, 3)}
    features = Features(stages, np.arange(24.0).reshape(6, 4), np.arange(6), 1.5)
    part = features.rows(slice(2, 4))
    assert part.stages["layer1"].tolist() == [[4.0, 5.0], [6.0, 7.0]] and part.stages["layer2"].shape == (2, 3)
    assert part.penultimate.tolist() == [[8.0, 9.0, 10.0, 11.0], [12.0, 13.0, 14.0, 15.0]]
    assert part.source_predictions is not None and part.source_predictions.tolist() == [2, 3]
    assert Features(stages, features.penultimate, None, 0.0).rows([0]).source_predictions is None
