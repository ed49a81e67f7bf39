"""python:module:function backbones (your own nn.Module) and timm: backbones (skipped without timm)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from helpers import experiment
from transferctl.models.build import build_backbone
from transferctl.config import BackboneConfig, config_from_dict
from transferctl.errors import ConfigError, WeightsError
from transferctl.inference.trained_model import load_trained_model
from transferctl.training.train import prepare, train

MODULE = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential()  # replaced below

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(self.features(x))

def net():
    torch.manual_seed(0)
    return Net()

def broken():
    raise RuntimeError("no GPU here")

def not_a_module():
    return 42
'''


@pytest.fixture
def models_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    package = tmp_path / "usermodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "python:usermodels.nets:net"


def test_own_model_gets_a_new_head_one_body_group_and_imagenet_preprocessing(models_module: str) -> None:
    backbone = build_backbone(BackboneConfig(name=models_module, head="classifier.1"), 3, 32)
    assert backbone.model.classifier[1].out_features == 3
    assert backbone.group_names == ["body", "head"]
    assert backbone.groups[0][1] == ["features"]  # a module prefix: its BatchNorm goes to eval when frozen
    assert backbone.preprocessing.crop == 32 and backbone.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    assert backbone.model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_own_groups_and_normalisation(models_module: str) -> None:
    config = BackboneConfig(name=models_module, head="classifier.1", groups={"early": ["features.0", "features.1"], "late": ["features.3"]}, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    backbone = build_backbone(config, 3, None)
    assert backbone.group_names == ["early", "late", "head"]
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5) and backbone.preprocessing.crop == 224


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        ({"name": "python:usermodels.nope:net", "head": "fc"}, "backbone.name", "cannot import usermodels.nope"),
        ({"name": "python:usermodels.nets:nett", "head": "fc"}, "backbone.name", "did you mean 'net'"),
        ({"name": "python:usermodels.nets", "head": "fc"}, "backbone.name", "is not python:package.module:function"),
        ({"name": "python:usermodels.nets:broken", "head": "fc"}, "backbone.name", "raised RuntimeError: no GPU here"),
        ({"name": "python:usermodels.nets:not_a_module", "head": "fc"}, "backbone.name", "not a torch.nn.Module"),
        ({"name": "python:usermodels.nets:net", "head": "clasifier.1"}, "backbone.head", "did you mean 'classifier.1'"),
        ({"name": "python:usermodels.nets:net", "head": "classifier"}, "backbone.head", "e.g. classifier.1"),
        ({"name": "python:usermodels.nets:net", "head": "classifier.1", "groups": {"early": ["features.0"]}}, "backbone.groups", "in no layer group"),
    ],
)
def test_mistakes_are_one_line_config_errors(models_module: str, fields: dict[str, object], where: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_backbone(BackboneConfig(**fields), 3, 32)  # type: ignore[arg-type]
    assert caught.value.problems[0].where == where and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_head_is_required_and_only_for_python_backbones() -> None:
    with pytest.raises(ConfigError, match="needs backbone.head"):
        config_from_dict({"data": {"root": "d"}, "backbone": {"name": "python:a.b:c"}})
    with pytest.raises(ConfigError, match="only apply to python"):
        config_from_dict({"data": {"root": "d"}, "backbone": {"name": "resnet18", "head": "fc"}})


def test_own_model_trains_both_strategies_and_the_checkpoint_rebuilds(models_module: str, tiny_split_data: Path, tmp_path: Path) -> None:
    backbone = {"name": models_module, "head": "classifier.1", "weights": "none"}
    config = config_from_dict(experiment(tiny_split_data, tmp_path / "runs", backbone=backbone))
    plans = prepare(config).plans
    assert [p.trainable for p in plans] == [("head",), ("body", "head")]
    summary = train(config, tmp_path / "run")
    model, classes, preprocessing = load_trained_model(tmp_path / "run", trust_code=True)  # the run names code to run
    assert classes == ["blue", "green", "red"] or len(classes) == 3
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert summary["epochs"] == 2


def test_weights_file_loads_on_top_of_the_function(models_module: str, tmp_path: Path) -> None:
    import usermodels.nets as nets  # type: ignore[import-not-found]

    donor = nets.Net()
    with torch.no_grad():
        donor.features[0].weight.fill_(0.5)
    torch.save(donor.state_dict(), tmp_path / "w.pt")
    backbone = build_backbone(BackboneConfig(name=models_module, head="classifier.1", weights=str(tmp_path / "w.pt")), 3, 32)
    assert torch.all(backbone.model.features[0].weight == 0.5)


# ---------------------------------------------------------------------------------------------
# timm


def test_timm_model_gets_groups_from_its_matcher_and_preprocessing_from_its_config() -> None:
    pytest.importorskip("timm")
    backbone = build_backbone(BackboneConfig(name="timm:test_vit", weights="none"), 3, None)
    assert backbone.group_names == ["stem", *[f"blocks{i}" for i in range(6)], "head"]
    assert backbone.head_path == "head" and backbone.model.get_classifier().out_features == 3
    assert (backbone.preprocessing.crop, backbone.preprocessing.mean) == (160, (0.5, 0.5, 0.5))
    assert backbone.model(torch.zeros(1, 3, 160, 160)).shape == (1, 3)


def test_timm_resnet_trains_and_rebuilds(tiny_split_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("timm")
    config = config_from_dict(experiment(tiny_split_data, tmp_path / "runs", backbone={"name": "timm:resnet18", "weights": "none"}))
    assert prepare(config).backbone.group_names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    train(config, tmp_path / "run")
    model, _, preprocessing = load_trained_model(tmp_path / "run")
    assert preprocessing.crop == 32 and preprocessing.interpolation == "bicubic"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_timm_model_suggests_one() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_backbone(BackboneConfig(name="timm:resnet81", weights="none"), 3, None)


def without_hub_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the variables that change how the Hub is reached, whatever this shell has set."""
    for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, and huggingface_hub offline: no test downloads or reads real weights."""
    pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    without_hub_settings(monkeypatch)
    return tmp_path / "hub"


def test_timm_weights_neither_cached_nor_reachable_fail_at_once(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    from transferctl.models import timm_models as timm_backbones

    monkeypatch.setattr(timm_backbones, "hub_reachable", lambda timeout=3.0: (False, "huggingface.co cannot be reached: Name or service not known"))
    monkeypatch.setattr(timm, "create_model", lambda *args, **kwargs: pytest.fail("huggingface_hub would retry for 45 s"))
    with pytest.raises(WeightsError, match=r"timm weights for resnet18 are not in the local cache and could not be downloaded "
                                           r"\(huggingface.co cannot be reached: Name or service not known\)"):  # fmt: skip
        build_backbone(BackboneConfig(name="timm:resnet18", weights="DEFAULT"), 3, None)


def test_timm_weights_in_the_hub_cache_need_no_network(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    from safetensors.torch import save_file

    from transferctl.models import timm_models as timm_backbones

    repo = empty_hub_cache / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    pretrained = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({name: tensor.contiguous() for name, tensor in pretrained.items()}, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setattr(timm_backbones, "hub_reachable", lambda timeout=3.0: pytest.fail("cached weights need no network"))
    backbone = build_backbone(BackboneConfig(name="timm:resnet18", weights="DEFAULT"), 3, None)
    assert torch.equal(backbone.model.conv1.weight, pretrained["conv1.weight"])


def test_the_hub_is_probed_only_where_a_connection_can_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from transferctl.models.timm_models import hub_reachable

    without_hub_settings(monkeypatch)
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: pytest.fail("no connection attempt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() == (False, "HF_HUB_OFFLINE is set")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_reachable() == (True, "")  # behind a proxy only huggingface_hub can tell
    monkeypatch.delenv("HTTPS_PROXY")
    tried: list[tuple[str, int]] = []

    def refused(address: tuple[str, int], timeout: float) -> None:
        tried.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    assert hub_reachable() == (False, "hub.example cannot be reached: Connection refused") and tried == [("hub.example", 8443)]
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: socket.socket())
    assert hub_reachable() == (True, "")


def test_without_timm_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'transferctl\[timm\]'"):
        build_backbone(BackboneConfig(name="timm:resnet18", weights="none"), 3, None)
