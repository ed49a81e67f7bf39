"""`transferctl backbones` (catalog.py), and every torchvision family built through build_backbone with
weights: none, a new head and a forward pass at a small input size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from transferctl.models import catalog
from transferctl.models.build import build_backbone
from transferctl.models.torchvision_models import cached_weights_path, torchvision_weights
from transferctl.models.catalog import compact_groups, describe_backbone, list_backbones
from transferctl.cli import app
from transferctl.config import BackboneConfig

# One model per family, at the smallest input it accepts; maxvit (224 px only) runs forward in the slow run.
FAMILIES = {
    "alexnet": 64, "convnext_tiny": 32, "densenet121": 32, "efficientnet_b0": 32, "googlenet": 64,
    "inception_v3": 80, "maxvit_t": 224, "mnasnet0_5": 32, "mobilenet_v2": 32, "mobilenet_v3_small": 32,
    "regnet_x_400mf": 32, "resnet18": 32, "shufflenet_v2_x0_5": 32, "squeezenet1_1": 64, "swin_t": 32,
    "vgg11": 32, "vit_b_32": 32,
}  # fmt: skip
SLOW = {"maxvit_t"}  # 224 px only: its window partition needs it


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(FAMILIES)]
)
def test_every_family_builds_replaces_its_head_and_runs(name: str) -> None:
    size = FAMILIES[name]
    backbone = build_backbone(BackboneConfig(name=name, weights="none"), 5, size if name.startswith("vit_") else None)
    backbone.model.eval()
    with torch.no_grad():
        out = backbone.model(torch.zeros(2, 3, size, size))
    assert out.shape == (2, 5)
    assert backbone.group_names[-1] == "head" and len(backbone.group_names) >= 3


@pytest.mark.parametrize("name", sorted(SLOW))
def test_slow_families_have_groups_in_the_default_run(name: str) -> None:
    # Their forward pass is in the slow run; their layer groups and head are checked here, on the meta device.
    row = describe_backbone(name)
    assert row["layer_groups"][-1] == "head" and row["params"] > 1_000_000


def test_listing_has_params_input_groups_top1_and_cache_state() -> None:
    rows = list_backbones("resnet18")
    assert [r["name"] for r in rows] == ["resnet18"]
    row = rows[0]
    assert row["params"] == 11_689_512 and row["input_size"] == 224
    assert row["layer_groups"] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert row["weights"][0]["name"] == "IMAGENET1K_V1" and row["weights"][0]["top1"] == pytest.approx(69.758)
    assert row["weights"][0]["cached"] is False
    path = cached_weights_path(torchvision_weights("resnet18", "IMAGENET1K_V1"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    try:
        assert list_backbones("resnet18")[0]["weights"][0]["cached"] is True
    finally:
        path.unlink()


def test_cli_json_and_table() -> None:
    result = CliRunner().invoke(app, ["backbones", "--filter", "regnet_x_4", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["regnet_x_400mf"] and rows[0]["layer_groups"][1] == "stage1"
    table = CliRunner().invoke(app, ["backbones", "--filter", "mobilenet_v3_small"])
    assert table.exit_code == 0 and "mobilenet_v3_small" in table.output


def test_compact_groups() -> None:
    assert compact_groups(["embed", *[f"block{i}" for i in range(12)], "norm", "head"]) == "embed, block0..block11, norm, head"
    assert compact_groups(["stem", "layer1", "layer2", "head"]) == "stem, layer1..layer2, head"


def test_a_second_listing_builds_no_model(isolated_feature_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = list_backbones("resnet1")
    stored = json.loads((isolated_feature_cache / "backbones.json").read_text())
    assert sorted(stored["facts"]) == ["resnet101", "resnet152", "resnet18", "wide_resnet101_2"] and stored["key"].startswith("torchvision ")

    def no_build(name: str) -> None:
        raise AssertionError(f"{name} was built again")

    monkeypatch.setattr(catalog, "_meta_model", no_build)
    assert list_backbones("resnet1") == first


def test_facts_from_another_torchvision_or_a_damaged_file_are_built_again(isolated_feature_cache: Path) -> None:
    path = isolated_feature_cache / "backbones.json"
    first = list_backbones("resnet18")
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({"key": "torchvision 0.1", "facts": {"resnet18": {"params": 1, "layer_groups": ["x"]}}}))
    assert list_backbones("resnet18") == first and json.loads(path.read_text()) == stored
    path.write_text("{not json")
    assert list_backbones("resnet18") == first and json.loads(path.read_text()) == stored


def test_a_read_only_cache_folder_still_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("TRANSFERCTL_CACHE", str(blocked / "cache"))  # under a file: no folder can be made
    assert list_backbones("resnet18")[0]["layer_groups"][-1] == "head"
