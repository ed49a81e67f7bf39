from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import experiment
from transferctl.models.backbone import Backbone
from transferctl.models.build import build_backbone
from transferctl.config import BackboneConfig, config_from_dict
from transferctl.models.cut import CutNetwork, cut_points, tap_path
from transferctl.errors import ConfigError, WeightsError
from transferctl.training.train import describe, prepare, train


def cut_backbone(name: str, cut: str | None, image_size: int | None = None, classes: int = 3) -> Backbone:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(name=name, weights="none", cut=cut), classes, image_size)


def index_after(group_paths: list[str], container: str) -> int:
    """features[:k] ends with the group's last module: k = its index + 1 (paths carry the `body.` prefix)."""
    return int(group_paths[-1].removeprefix(f"body.{container}.")) + 1


def plain(model: CutNetwork) -> nn.Module:
    """The body without the hook that stops the forward pass at the cut, for computing the expected values by hand."""
    model.body.get_submodule(model.tap)._forward_hooks.clear()
    return model.body


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), (a.shape, b.shape)


def test_resnet_cut_keeps_the_groups_up_to_the_cut_and_a_new_head() -> None:
    backbone = cut_backbone("resnet18", "layer2")
    model = backbone.model
    assert isinstance(model, CutNetwork) and backbone.cut == "layer2"
    assert backbone.group_names == ["stem", "layer1", "layer2", "head"] and backbone.head_path == "head"
    names = [name for name, _ in model.named_parameters()]
    assert not any(n.startswith(("body.layer3", "body.layer4", "body.fc")) for n in names)
    assert model.head.in_features == 128
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, logits = model.features(x), model(x)
        body = plain(model)
        expected = body.layer2(body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x)))))).mean(dim=(2, 3))
    assert_same(got, expected)
    assert_same(logits, model.head(expected))


def test_a_cut_after_the_stem_includes_its_pooling() -> None:
    backbone = cut_backbone("resnet18", "stem")
    assert backbone.model.tap == "maxpool"


def test_mobilenet_cut_is_a_prefix_of_features() -> None:
    backbone = cut_backbone("mobilenet_v3_small", "stage2")
    model = backbone.model.eval()
    k = index_after(dict(backbone.groups)["stage2"], "features")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = model.features(x)
        assert_same(got, plain(model).features[:k](x).mean(dim=(2, 3)))
    assert backbone.group_names == ["stem", "stage1", "stage2", "head"]


def test_vgg_cut_ends_after_the_stage_pooling() -> None:
    backbone = cut_backbone("vgg11", "stage1")
    model = backbone.model.eval()
    k = index_after(dict(backbone.groups)["stage1"], "features")
    assert isinstance(model.body.features[k], nn.ReLU) and isinstance(model.body.features[k + 1], nn.MaxPool2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = model.features(x)
        assert_same(got, plain(model).features[: k + 2](x).mean(dim=(2, 3)))
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # the 120M-parameter classifier is gone


def test_vit_cut_runs_the_models_own_embedding_and_pools_tokens() -> None:
    backbone = cut_backbone("vit_b_16", "block1", image_size=32)
    model = backbone.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model.features(x)
        body = plain(model)
        tokens = body._process_input(x)
        tokens = torch.cat([body.class_token.expand(2, -1, -1), tokens], dim=1) + body.encoder.pos_embedding
        expected = body.encoder.layers[1](body.encoder.layers[0](tokens)).mean(dim=1)
    assert_same(got, expected)
    assert backbone.group_names == ["embed", "block0", "block1", "head"]


@pytest.mark.parametrize(
    ("name", "cut", "message"),
    [
        ("resnet18", "layer5", "did you mean 'layer4'"),
        ("resnet18", "head", "the head is what a cut replaces"),
        ("mobilenet_v3_small", "pre_logits", "already feeds the classifier"),
        ("vit_b_16", "embed", "not a single module"),
    ],
)
def test_impossible_cuts_are_config_errors(name: str, cut: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        cut_backbone(name, cut, image_size=32 if name.startswith("vit") else None)
    assert caught.value.problems[0].where == "backbone.cut"


def test_train_and_check_support_a_cut_and_the_checkpoint_rebuilds(tiny_split_data: Path, tmp_path: Path) -> None:
    raw = experiment(tiny_split_data, tmp_path / "runs", strategy="feature_extract", schedule=[{"name": "head", "epochs": 1, "train": "head", "lr": 0.01}])
    raw["backbone"]["cut"] = "layer1"
    config = config_from_dict(raw)
    plan = describe(prepare(config))
    assert plan["layer_groups"] == ["stem", "layer1", "head"]
    summary = train(config)
    checkpoint = torch.load(summary["checkpoints"]["best"], weights_only=True)
    assert checkpoint["backbone"]["cut"] == "layer1" and checkpoint["backbone"]["head"] == "head"
    assert set(checkpoint["model"]) >= {"head.weight", "body.layer1.0.conv1.weight"}
    # What evaluate and predict do: rebuild with weights none and the same cut, then load strictly.
    rebuilt = build_backbone(BackboneConfig(name="resnet18", weights="none", cut="layer1"), 3, checkpoint["preprocessing"]["crop"]).model
    rebuilt.load_state_dict(checkpoint["model"], strict=True)


def test_a_cut_run_chains_into_a_run_with_the_same_cut_only(tiny_split_data: Path, tmp_path: Path) -> None:
    raw = experiment(tiny_split_data, tmp_path / "base", strategy="feature_extract", schedule=[{"name": "head", "epochs": 1, "train": "head", "lr": 0.01}])
    raw["backbone"]["cut"] = "layer1"
    base = train(config_from_dict(raw))
    source = "run:" + base["run_dir"]
    saved = torch.load(base["checkpoints"]["best"], weights_only=True)["model"]
    same = build_backbone(BackboneConfig(name="resnet18", weights=source, cut="layer1"), 5, 32)
    assert torch.equal(same.model.state_dict()["body.layer1.0.conv1.weight"], saved["body.layer1.0.conv1.weight"])
    with pytest.raises(WeightsError, match="backbone.cut"):
        build_backbone(BackboneConfig(name="resnet18", weights=source), 5, 32)
    with pytest.raises(WeightsError, match="another layer group"):
        build_backbone(BackboneConfig(name="resnet18", weights=source, cut="layer2"), 5, 32)


def test_tap_of_the_last_stage_is_the_pooling_before_the_head() -> None:
    backbone = cut_backbone("resnet18", None)
    assert tap_path(backbone.model, backbone.groups, "layer4") == "avgpool"
    assert cut_points(backbone.model, backbone.groups) == ["stem", "layer1", "layer2", "layer3", "layer4"]


ALL_FAMILIES = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_y_400mf", "resnet18", "shufflenet_v2_x0_5",
    "squeezenet1_1", "swin_t", "vgg11_bn", "vit_b_16",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_every_family_can_be_cut_at_every_cut_point(name: str) -> None:
    size = {"maxvit_t": 224, "inception_v3": 80}.get(name, 64)
    full = cut_backbone(name, None, image_size=size if name.startswith("vit") else None)
    for cut in cut_points(full.model, full.groups):
        backbone = cut_backbone(name, cut, image_size=size)
        backbone.model.eval()
        with torch.no_grad():
            assert backbone.model(torch.zeros(2, 3, size, size)).shape == (2, 3), cut
        assert backbone.group_names[-2:] == [cut, "head"]


def test_check_shows_the_cut(tiny_split_data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from helpers import write_experiment
    from transferctl.cli import app

    raw = experiment(tiny_split_data, tmp_path / "runs", strategy="feature_extract", schedule=[{"name": "head", "epochs": 1, "train": "head", "lr": 0.01}])
    raw["backbone"]["cut"] = "layer2"
    result = CliRunner().invoke(app, ["check", str(write_experiment(tmp_path / "e.yaml", raw))])
    assert result.exit_code == 0, result.output
    assert "cut after layer2" in result.stderr and "stem, layer1, layer2, head" in result.stderr
