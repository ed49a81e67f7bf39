from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models
from torchvision.models import regnet as tv_regnet
from torchvision.models.vision_transformer import VisionTransformer

from transferctl.models.layer_groups import (
    LayerGroups,
    family_of,
    generic_layer_groups,
    head_path,
    layer_groups,
    parameters_by_group,
)

NUM_CLASSES = 7
AUX_MODELS = ("googlenet", "inception_v3")  # the caller builds these without aux heads

# The smallest variant of each family, with the group names a user can write in `train:`.
STAGES4 = ["stage1", "stage2", "stage3", "stage4"]
EXPECTED_NAMES: dict[str, list[str]] = {
    "alexnet": ["stem", "stage1", "stage2", "pre_logits", "head"],
    "convnext_tiny": ["stem", *STAGES4, "pre_logits", "head"],
    "densenet121": ["stem", *STAGES4, "head"],
    "efficientnet_b0": ["stem", *[f"stage{i}" for i in range(1, 8)], "final_conv", "head"],
    "efficientnet_v2_s": ["stem", *[f"stage{i}" for i in range(1, 7)], "final_conv", "head"],
    "googlenet": ["stem", "inception3", "inception4", "inception5", "head"],
    "inception_v3": ["stem", "mixed5", "mixed6", "mixed7", "head"],
    "maxvit_t": ["stem", *STAGES4, "pre_logits", "head"],
    "mnasnet0_5": ["stem", *[f"stage{i}" for i in range(1, 7)], "final_conv", "head"],
    "mobilenet_v2": ["stem", *[f"stage{i}" for i in range(1, 8)], "final_conv", "head"],
    "mobilenet_v3_small": [
        "stem", *[f"stage{i}" for i in range(1, 6)], "final_conv", "pre_logits", "head"
    ],
    "regnet_x_400mf": ["stem", *STAGES4, "head"],
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "shufflenet_v2_x0_5": ["stem", "stage2", "stage3", "stage4", "final_conv", "head"],
    "squeezenet1_1": ["stem", "stage1", "stage2", "stage3", "head"],
    "swin_t": ["stem", *STAGES4, "pre_logits", "head"],
    "swin_v2_t": ["stem", *STAGES4, "pre_logits", "head"],
    "vgg11": ["stem", *STAGES4, "pre_logits", "head"],
    "vgg11_bn": ["stem", *STAGES4, "pre_logits", "head"],
    "vit_b_32": ["embed", *[f"block{i}" for i in range(12)], "norm", "head"],
}


@pytest.fixture
def meta_regnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """RegNet computes its stage widths with tensor ops, which fail on the meta device; run
    that arithmetic on the CPU so every model can be built without allocating its weights."""
    original = tv_regnet.BlockParams.from_init_params.__func__

    def on_cpu(cls: type, *args: object, **kwargs: object) -> object:
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    monkeypatch.setattr(tv_regnet.BlockParams, "from_init_params", classmethod(on_cpu))


def build(name: str, device: str = "meta") -> nn.Module:
    # The meta device builds the structure without memory or initialisation: fast for any size.
    extra = {"aux_logits": False, "init_weights": False} if name in AUX_MODELS else {}
    with torch.device(device):
        return get_model(name, weights=None, num_classes=NUM_CLASSES, **extra)


def output_size(head: nn.Module) -> int:
    # The last Linear or Conv2d inside the head (the head itself, unless a caller wrapped it).
    for module in reversed(list(head.modules())):
        for attribute in ("out_features", "out_channels"):
            if isinstance(size := getattr(module, attribute, None), int):
                return size
    raise AssertionError(f"{type(head).__name__} has no output size")


def check_groups(model: nn.Module, groups: LayerGroups) -> None:
    names = [name for name, _ in groups]
    assert len(set(names)) == len(names), names
    assert len(groups) > 2, names
    assert all(paths for _, paths in groups), groups

    by_group = parameters_by_group(model, groups)
    all_params = [name for name, _ in model.named_parameters()]
    grouped = [param for params in by_group.values() for param in params]
    assert sorted(grouped) == sorted(all_params)
    assert all(by_group.values()), "every group holds parameters"

    last_name, last_paths = groups[-1]
    assert last_name == "head" and len(last_paths) == 1
    assert output_size(model.get_submodule(last_paths[0])) == NUM_CLASSES


@pytest.mark.usefixtures("meta_regnet")
@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_representative_models(name: str) -> None:
    model = build(name)
    groups = layer_groups(name, model)
    check_groups(model, groups)
    assert [group for group, _ in groups] == EXPECTED_NAMES[name]
    assert head_path(name, model) == groups[-1][1][0]


@pytest.mark.slow
@pytest.mark.usefixtures("meta_regnet")
@pytest.mark.parametrize("name", list_models(module=torchvision.models))
def test_every_classification_model(name: str) -> None:
    model = build(name)
    check_groups(model, layer_groups(name, model))


def test_every_classification_name_has_a_family() -> None:
    names = list_models(module=torchvision.models)
    assert len(names) >= 80
    for name in names:
        family_of(name)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("resnext50_32x4d", "resnet"),
        ("wide_resnet50_2", "resnet"),
        ("efficientnet_v2_s", "efficientnet"),
        ("swin_v2_t", "swin"),
        ("vgg19_bn", "vgg"),
        ("ResNet18", "resnet"),
    ],
)
def test_family_of(name: str, family: str) -> None:
    assert family_of(name) == family


def test_unknown_model_name_raises_key_error_naming_families() -> None:
    with pytest.raises(KeyError, match="known families: alexnet"):
        layer_groups("lenet5", nn.Linear(2, 2))


def test_a_model_of_another_layout_raises_value_error() -> None:
    with pytest.raises(ValueError, match="layout of the resnet family"):
        layer_groups("resnet18", nn.Sequential(nn.Linear(2, 2)))


def test_real_cpu_model_groups_match_the_layout() -> None:
    model = build("resnet18", device="cpu")
    groups = dict(layer_groups("resnet18", model))
    assert groups["stem"] == ["conv1", "bn1"]
    assert groups["layer4"] == ["layer4"]
    assert groups["head"] == ["fc"]


def test_replaced_head_stays_the_head() -> None:
    model = build("resnet18")
    with torch.device("meta"):
        model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, NUM_CLASSES))
    groups = layer_groups("resnet18", model)
    assert groups[-1] == ("head", ["fc"])
    check_groups(model, groups)


@pytest.mark.parametrize(
    ("name", "aux", "stage"),
    [("googlenet", ["aux1", "aux2"], "inception4"), ("inception_v3", ["AuxLogits"], "mixed6")],
)
def test_aux_heads_join_the_stage_they_read(name: str, aux: list[str], stage: str) -> None:
    with torch.device("meta"):
        model = get_model(name, num_classes=NUM_CLASSES, aux_logits=True, init_weights=False)
    groups = dict(layer_groups(name, model))
    assert set(aux) <= set(groups[stage])
    check_groups(model, list(groups.items()))


def test_vit_with_representation_size_has_pre_logits() -> None:
    with torch.device("meta"):
        model = VisionTransformer(
            image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
            mlp_dim=64, num_classes=NUM_CLASSES, representation_size=16,
        )
    groups = layer_groups("vit_tiny", model)
    names = [name for name, _ in groups]
    assert names == ["embed", "block0", "block1", "norm", "pre_logits", "head"]
    assert dict(groups)["pre_logits"] == ["heads.pre_logits"]
    check_groups(model, groups)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # a root parameter, like a ViT class token
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES)
        )


def test_generic_groups_split_the_child_holding_the_head() -> None:
    model = TinyNet()
    groups = generic_layer_groups(model, "classifier.3")
    assert groups == [
        ("features", ["scale", "features"]),
        ("classifier", ["classifier.1"]),
        ("head", ["classifier.3"]),
    ]
    check_groups(model, groups)


def test_generic_groups_of_a_sequential() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, NUM_CLASSES),
    )
    groups = generic_layer_groups(model, "5")
    # The BatchNorm has no parameters but keeps running statistics: it joins the group before it
    # (so a caller keeping frozen BatchNorm layers in eval mode finds it), not a group of its own.
    assert groups == [("0", ["0", "1"]), ("3", ["3"]), ("head", ["5"])]
    check_groups(model, groups)


def test_generic_groups_rename_the_rest_of_a_head_container() -> None:
    model = nn.Sequential()
    model.add_module("body", nn.Conv2d(3, 8, 3))
    model.add_module("head", nn.Sequential())
    model.head.add_module("norm", nn.LayerNorm(8))
    model.head.add_module("fc", nn.Linear(8, NUM_CLASSES))
    groups = generic_layer_groups(model, "head.fc")
    assert groups == [("body", ["body"]), ("pre_logits", ["head.norm"]), ("head", ["head.fc"])]


def test_generic_groups_reject_an_unknown_head() -> None:
    with pytest.raises(KeyError, match="classifier.9"):
        generic_layer_groups(TinyNet(), "classifier.9")


def test_parameters_by_group_reports_gaps_and_overlaps() -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match="in no layer group"):
        parameters_by_group(model, [("body", ["features"]), ("head", ["classifier.3"])])
    overlapping = [
        ("body", ["scale", "features", "classifier"]),
        ("head", ["classifier.3"]),
    ]
    with pytest.raises(ValueError, match="in several layer groups"):
        parameters_by_group(model, overlapping)
