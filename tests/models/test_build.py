from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from transferctl.models.build import build_backbone
from transferctl.models.torchvision_models import cached_weights_path, torchvision_weights
from transferctl.config import BackboneConfig
from transferctl.errors import ConfigError, WeightsError


def body_state(model: torch.nn.Module, head: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}


def reference_resnet18(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None)


def assert_same_body(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = body_state(model, "fc"), body_state(reference, "fc")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_none_builds_a_random_network_with_a_new_head() -> None:
    backbone = build_backbone(BackboneConfig(name="resnet18", weights="none"), num_classes=5, image_size=None)
    assert backbone.model.fc.out_features == 5
    assert backbone.head_path == "fc"
    assert backbone.group_names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert backbone.preprocessing.crop == 224 and backbone.preprocessing.resize == 256


def test_image_size_keeps_the_weights_resize_ratio() -> None:
    backbone = build_backbone(BackboneConfig(name="resnet18", weights="none"), 3, image_size=112)
    assert (backbone.preprocessing.resize, backbone.preprocessing.crop) == (128, 112)


def test_torchvision_weights_load_from_the_hub_cache() -> None:
    weights = torchvision_weights("resnet18", "DEFAULT")
    path = cached_weights_path(weights)
    assert str(path).startswith(os.environ["TORCH_HOME"])
    reference = reference_resnet18()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    try:
        backbone = build_backbone(BackboneConfig(name="resnet18", weights="IMAGENET1K_V1"), 4, None)
    finally:
        path.unlink()
    assert_same_body(backbone.model, reference)
    assert backbone.model.fc.out_features == 4
    assert backbone.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    assert "IMAGENET1K_V1" in backbone.weights


def test_offline_without_a_cached_file_names_the_file_and_where_it_goes() -> None:
    with pytest.raises(WeightsError) as caught:
        build_backbone(BackboneConfig(name="resnet18", weights="DEFAULT"), 3, None)
    message = str(caught.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints") in message
    assert not list((Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints").glob("*.partial"))


def test_unknown_weights_name_suggests_a_close_one() -> None:
    with pytest.raises(WeightsError, match="did you mean 'IMAGENET1K_V1'"):
        build_backbone(BackboneConfig(name="resnet18", weights="IMAGENET1K_V"), 3, None)


def test_unknown_model_name_suggests_a_close_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_backbone(BackboneConfig(name="resnet81", weights="none"), 3, None)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "ddp"])
def test_local_state_dict_files_load_without_their_head(tmp_path: Path, wrap: str) -> None:
    reference = reference_resnet18()
    state = reference.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "ddp":
        state = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "model.pth"
    torch.save(state, path)
    backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(path)), 2, None)
    assert_same_body(backbone.model, reference)
    assert backbone.model.fc.out_features == 2


def test_safetensors_files_load(tmp_path: Path) -> None:
    reference = reference_resnet18()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(path)), 2, None)
    assert_same_body(backbone.model, reference)


def test_a_file_with_another_head_size_is_fine(tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = torchvision.models.resnet18(weights=None, num_classes=7)
    path = tmp_path / "seven.pt"
    torch.save(other.state_dict(), path)
    backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(path)), 3, None)
    assert_same_body(backbone.model, other)


def test_a_file_without_batchnorm_step_counters_loads_as_torch_loads_it(tmp_path: Path) -> None:
    reference = reference_resnet18()
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}, path)  # older torch
    backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(path)), 2, None)
    for name, tensor in backbone.model.state_dict().items():
        if not name.startswith("fc.") and not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, reference.state_dict()[name]), name
    path_missing_a_weight = tmp_path / "short.pt"
    torch.save({k: v for k, v in reference.state_dict().items() if k != "layer1.0.conv1.weight"}, path_missing_a_weight)
    with pytest.raises(WeightsError, match="missing"):  # a real weight still may not be missing
        build_backbone(BackboneConfig(name="resnet18", weights=str(path_missing_a_weight)), 2, None)


def test_weights_for_another_architecture_name_the_mismatched_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(WeightsError) as caught:
        build_backbone(BackboneConfig(name="resnet18", weights=str(path)), 3, None)
    message = str(caught.value)
    assert "backbone.weights" in message and "unexpected" in message and "layer1.2" in message


def test_missing_weights_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "nope.pth")), 3, None)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"fc.weight": _Exploit(marker)}, handle)
    with pytest.raises(WeightsError, match="refused"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(path)), 3, None)
    assert not marker.exists()


def test_googlenet_builds_without_aux_heads() -> None:
    backbone = build_backbone(BackboneConfig(name="googlenet", weights="none"), 3, 64)
    backbone.model.train()
    out = backbone.model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


def test_vit_accepts_another_image_size_without_pretrained_weights() -> None:
    backbone = build_backbone(BackboneConfig(name="vit_b_16", weights="none"), 3, 32)
    assert backbone.preprocessing.crop == 32
    assert backbone.model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
