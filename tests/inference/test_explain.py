"""explain: the layer Grad-CAM reads for each kind of backbone, and heatmaps that point at the evidence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import experiment, multi_label_run, write_experiment
from transferctl.config import BackboneConfig
from transferctl.models.build import build_backbone
from transferctl.testing.synthetic import write_image_folder

SIZE = 32
MARK = slice(20, 30)  # the class evidence: a red square in the bottom-right quarter


def _built(name: str, cut: str | None = None):  # noqa: ANN202 - a Backbone
    return build_backbone(BackboneConfig.model_validate({"name": name, "weights": "none", "cut": cut}), 3, 64, pretrained=False)


@pytest.mark.parametrize(
    ("name", "cut", "layer"),
    [
        ("resnet18", None, "layer4"),  # not the avgpool after it: a 1x1 map says nothing of where
        ("resnet18", "layer2", "body.layer2"),  # a cut network: the cut's last group
        ("mobilenet_v3_small", None, "features.12"),  # final_conv, not the pre_logits linear layers
        ("efficientnet_b0", None, "features.8"),
        ("vit_b_16", None, "encoder.layers.encoder_layer_11.ln_1"),  # its final norm gives the image no gradient
    ],
)
def test_target_layer_is_the_last_group_before_the_head_with_a_map(name: str, cut: str | None, layer: str) -> None:
    from transferctl.inference.explain import target_layer

    backbone = _built(name, cut)
    assert target_layer(backbone.model, backbone.groups) == layer


def _grey(rng: np.random.Generator, size: int) -> np.ndarray:
    return 128 + rng.normal(0, 10, (size, size, 3))


def _plain(rng: np.random.Generator, size: int) -> Image.Image:
    return Image.fromarray(_grey(rng, size).clip(0, 255).astype(np.uint8))


def _marked(rng: np.random.Generator, size: int) -> Image.Image:
    pixels = _grey(rng, size)
    pixels[MARK, MARK] = (230, 20, 20)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def corner_run(module_tmp_path: Path) -> Path:
    """A resnet18 cut after layer1 (an 8x8 map at 32 px) trained to tell a red bottom-right corner from none."""
    from transferctl.config import load_config
    from transferctl.training.train import train

    data = write_image_folder(module_tmp_path / "data", {"marked": _marked, "plain": _plain}, 8, SIZE, 0, "split", 0.25, False, False)
    raw = experiment(
        data, module_tmp_path / "runs", backbone={"name": "resnet18", "weights": "none", "cut": "layer1"},
        schedule=[{"name": "all", "epochs": 3, "train": "all", "lr": 1.0e-2}],
    )
    train(load_config(write_experiment(module_tmp_path / "experiment.yaml", raw)), module_tmp_path / "run")
    return module_tmp_path / "run"


def test_heatmap_peaks_where_the_class_evidence_is(corner_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pytorch_grad_cam")
    from transferctl.inference import explain

    image = tmp_path / "new.png"
    _marked(np.random.default_rng(7), SIZE).save(image)
    heats = []
    real = explain._save_overlay
    monkeypatch.setattr(explain, "_save_overlay", lambda cam, tensor, prep, heat, png: heats.append(heat) or real(cam, tensor, prep, heat, png))
    [result] = explain.explain_images(corner_run, [str(image)], tmp_path / "out", class_name="marked")
    assert result.explained == "marked" and result.png == tmp_path / "out" / "new.gradcam.png"
    assert Image.open(result.png).size == (SIZE, SIZE)  # drawn on the image as the network saw it
    row, column = np.unravel_index(np.argmax(heats[0]), heats[0].shape)
    assert row >= SIZE // 2 and column >= SIZE // 2, f"peak at {(row, column)}"


def test_default_class_is_the_predicted_one(corner_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytorch_grad_cam")
    from transferctl.inference.explain import explain_images

    image = tmp_path / "a.png"
    _plain(np.random.default_rng(3), SIZE).save(image)
    [result] = explain_images(corner_run, [str(image)], tmp_path)
    assert result.explained == result.predicted


def test_images_with_the_same_name_get_their_own_png() -> None:
    from transferctl.inference.explain import _output_names

    assert _output_names(["a/x.jpg", "b/x.png", "y.png"]) == ["x.gradcam.png", "x-2.gradcam.png", "y.gradcam.png"]


def test_a_multi_label_run_is_explained_by_its_sigmoid_scores_and_thresholds(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_grad_cam")
    import torch

    from transferctl.inference.explain import explain_images
    from transferctl.inference.trained_model import eval_transform, load_trained_task

    run = multi_label_run(tmp_path)
    image = next((tmp_path / "data" / "images").glob("*.png"))
    [result] = explain_images(run, [str(image)], tmp_path / "maps")
    (model, classes, preprocessing), task = load_trained_task(run)
    with torch.no_grad():
        scores = torch.sigmoid(model(eval_transform(preprocessing)(Image.open(image).convert("RGB")).unsqueeze(0)))[0].tolist()
    assert result.explained == classes[int(np.argmax(scores))] and result.score == pytest.approx(max(scores), abs=1e-5)
    assert result.predicted == "|".join(name for name, score, cut in zip(classes, scores, task.thresholds) if score >= cut)
