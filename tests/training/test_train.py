from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import Notices, experiment
from transferctl.config import config_from_dict
from transferctl.errors import CheckpointError, WeightsError
from transferctl.inference.trained_model import load_trained_model
from transferctl.runs.rundir import RunDir
from transferctl.training.train import describe, prepare, train


def test_a_run_directory_holds_everything_it_promises(tiny_split_data: Path, tmp_path: Path) -> None:
    summary = train(config_from_dict(experiment(tiny_split_data, tmp_path / "runs")))
    run = Path(summary["run_dir"])
    assert run.parent == tmp_path / "runs" and run.name.startswith("tiny-")
    for name in ("config.yaml", "classes.json", "env.json", "metrics.jsonl", "metrics.csv", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "classes.json").read_text()) == ["blue", "green", "red"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [("head", 1), ("body", 1)]
    assert {"lr_head", "lr_backbone", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_second", "data_seconds"} <= rows[0].keys()
    assert all(0 <= r["data_seconds"] <= r["train_seconds"] <= r["seconds"] for r in rows)
    assert summary["data_seconds"] == pytest.approx(sum(r["data_seconds"] for r in rows), abs=0.01)
    images = sum(r["images_per_second"] * r["train_seconds"] for r in rows)  # the head epoch's cached features are fast
    assert summary["images_per_second"] == pytest.approx(images / sum(r["train_seconds"] for r in rows), rel=0.02)
    with (run / "metrics.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2
    env = json.loads((run / "env.json").read_text())
    assert env["device"] == "cpu" and env["precision"] == "fp32" and "torch" in env
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["schedule"][1]["backbone_lr_mult"] == 0.1
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_a_last_training_batch_of_one_image_is_left_out_not_a_batchnorm_crash(tmp_path: Path) -> None:
    from transferctl.testing.synthetic import tiny_dataset

    data = tiny_dataset(tmp_path / "fifteen", n_classes=3, layout="split")  # 15 training images
    raw = experiment(data, tmp_path / "runs", data={"batch_size": 7})  # 7 + 7 + 1: BatchNorm cannot train on one image at 1x1
    summary = train(config_from_dict(raw))  # head on cached features, then the whole network
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["train_loss"] == row["train_loss"] for row in rows)
    raw["data"]["cache"] = "off"
    assert train(config_from_dict({**raw, "output": {"dir": str(tmp_path / "off")}}))["epochs"] == 2  # every epoch a full pass


def test_checkpoints_load_with_weights_only(tiny_split_data: Path, tmp_path: Path) -> None:
    summary = train(config_from_dict(experiment(tiny_split_data, tmp_path / "runs")))
    last = torch.load(summary["checkpoints"]["last"], weights_only=True)
    best = torch.load(summary["checkpoints"]["best"], weights_only=True)
    assert last["phase_index"] == 1 and last["epoch"] == 1 and "optimizer" in last
    assert best["classes"] == last["classes"]
    assert best["model"]["fc.weight"].shape[0] == 3


def test_flat_layout_trains(tiny_flat_data: Path, tmp_path: Path) -> None:
    raw = experiment(tiny_flat_data, tmp_path / "runs", strategy="scratch", schedule=[{"name": "all", "epochs": 1, "train": "all", "lr": 0.01}])
    summary = train(config_from_dict(raw))
    assert summary["epochs"] == 1 and summary["strategy"] == "scratch"


def test_tiny_separable_data_is_learned(tiny_split_data: Path, tmp_path: Path) -> None:
    raw = experiment(tiny_split_data, tmp_path / "runs", strategy="scratch", schedule=[{"name": "all", "epochs": 6, "train": "all", "lr": 1e-3}])
    summary = train(config_from_dict(raw))
    assert summary["best_val_acc"] == pytest.approx(1.0)


def test_feature_extract_keeps_the_whole_body_as_loaded(tiny_split_data: Path, tmp_path: Path) -> None:
    # The base trains every layer: a solved head on the same data and body would equal its solved head.
    base = train(config_from_dict(experiment(tiny_split_data, tmp_path / "base", schedule=[{"name": "all", "epochs": 1, "train": "all", "lr": 1e-2}])))
    raw = experiment(tiny_split_data, tmp_path / "target", strategy="feature_extract", schedule=[{"name": "head", "epochs": 2, "train": "head", "lr": 0.01}])
    raw["backbone"]["weights"] = "run:" + base["run_dir"]
    target = train(config_from_dict(raw))
    before = torch.load(base["checkpoints"]["best"], weights_only=True)["model"]
    after = torch.load(target["checkpoints"]["last"], weights_only=True)["model"]
    for name, tensor in before.items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, after[name]), f"{name} moved under feature_extract"
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_run_weights_must_match_the_backbone(tiny_split_data: Path, tmp_path: Path) -> None:
    base = train(config_from_dict(experiment(tiny_split_data, tmp_path / "base")))
    raw = experiment(tiny_split_data, tmp_path / "target")
    raw["backbone"] = {"name": "resnet34", "weights": "run:" + base["run_dir"]}
    with pytest.raises(WeightsError, match="trained a resnet18"):
        prepare(config_from_dict(raw))


def test_run_weights_from_a_missing_run_is_a_user_error(tiny_split_data: Path, tmp_path: Path) -> None:
    raw = experiment(tiny_split_data, tmp_path / "target")
    raw["backbone"]["weights"] = "run:" + str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no such run directory"):
        prepare(config_from_dict(raw))


def test_an_existing_run_dir_is_never_overwritten(tiny_split_data: Path, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        train(config_from_dict(experiment(tiny_split_data, tmp_path / "runs")), run_dir=target)
    assert (target / "keep.txt").read_text() == "mine"


def test_early_stopping_ends_a_phase_after_patience(tiny_split_data: Path, tmp_path: Path) -> None:
    raw = experiment(
        tiny_split_data, tmp_path / "runs", strategy="scratch",
        schedule=[{"name": "all", "epochs": 8, "train": "all", "lr": 1e-9}],
        early_stopping={"metric": "val_loss", "patience": 1},
    )  # fmt: skip
    summary = train(config_from_dict(raw))
    assert summary["epochs"] < 8


def test_describe_shows_each_phase(tiny_split_data: Path, tmp_path: Path) -> None:
    plan = describe(prepare(config_from_dict(experiment(tiny_split_data, tmp_path / "runs"))))
    assert [p["phase"] for p in plan["phases"]] == ["head", "body"]
    head, body = plan["phases"]
    assert head["train"] == ["head"] and head["trainable_params"] == 512 * 3 + 3
    assert body["lr"]["layer1"] == pytest.approx(body["lr"]["head"] * 0.1)
    assert plan["data"]["train"] == 12 and plan["data"]["classes"] == ["blue", "green", "red"]


def train_plain_and_compiled(data: Path, tmp_path: Path) -> tuple[Path, Path]:
    plain = train(config_from_dict(experiment(data, tmp_path / "plain")))["run_dir"]
    compiled = train(config_from_dict(experiment(data, tmp_path / "compiled", compile=True)))["run_dir"]
    return Path(plain), Path(compiled)


def assert_same_training(compiled: Path, plain: Path, rel: float = 1e-3) -> None:
    """Same losses as without compile, to `rel`, and a checkpoint any uncompiled model loads."""
    for mine, theirs in zip(RunDir(compiled).metrics(), RunDir(plain).metrics(), strict=True):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert mine[key] == pytest.approx(theirs[key], rel=rel, abs=1e-4), (mine["global_epoch"], key)
    weights = torch.load(compiled / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert weights.keys() == torch.load(plain / "checkpoints" / "last.pt", weights_only=True)["model"].keys()
    assert load_trained_model(compiled).classes == ["blue", "green", "red"]


def test_compile_traces_the_model_and_trains_as_without_it(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.utils import counters

    real_compile = torch.nn.Module.compile
    compiled: list[str] = []

    def compile_with_graph_capture_only(module: torch.nn.Module, **options: object) -> None:
        compiled.append(type(module).__name__)
        real_compile(module, backend="eager")  # Dynamo's tracing without Inductor's minute of codegen (slow test below)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_graph_capture_only)
    counters.clear()
    plain, fast = train_plain_and_compiled(tiny_split_data, tmp_path)
    assert compiled == ["ResNet"] and counters["stats"]["unique_graphs"] >= 1  # the training steps ran traced graphs
    assert_same_training(fast, plain)


@pytest.mark.slow
def test_compile_with_inductor_trains_as_without_it(tiny_split_data: Path, tmp_path: Path) -> None:
    plain, fast = train_plain_and_compiled(tiny_split_data, tmp_path)
    assert_same_training(fast, plain, rel=1e-2)  # Inductor fuses kernels and sums in another order


def test_loaders_pin_memory_only_for_a_gpu(tiny_split_data: Path) -> None:
    from transferctl.training.runtime import Runtime
    from transferctl.training.train import _loaders

    config = config_from_dict(experiment(tiny_split_data, tiny_split_data.parent / "runs"))
    loaded = prepare(config, load_weights=False)
    for device, pinned in (("cuda", True), ("cpu", False)):
        loaders = _loaders(config, loaded, Runtime(torch.device(device), "fp32", channels_last=True))
        assert loaders["train"].pin_memory is pinned and loaders["val"].pin_memory is pinned


def waited_for_images(notices: Notices) -> list[str]:
    return [line for line in notices.lines if "training waited for images" in line]


def test_a_run_whose_training_waits_for_images_says_once_what_may_help(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from transferctl.data import folders as data

    from transferctl.training import train as train_module

    real_open = data.open_rgb

    def slow_open(path: Path) -> object:
        time.sleep(0.02)
        return real_open(path)

    monkeypatch.setattr(data, "open_rgb", slow_open)
    monkeypatch.setattr(train_module, "DATA_WAIT_MIN_SECONDS", 0.0)  # tiny epochs: judge them anyway
    monkeypatch.setattr(train_module, "spare_cores", lambda: 3)
    notices = Notices()
    schedule = [{"name": "all", "epochs": 3, "train": "all", "lr": 1e-3}]
    # cache off: every epoch decodes its 12 images again in this process (no workers), 20 ms each
    train(config_from_dict(experiment(tiny_split_data, tmp_path / "runs", strategy="scratch", schedule=schedule, data={"cache": "off"})), observer=notices)
    (line,) = waited_for_images(notices)  # once a run, and not in the first epoch: its wait includes starting the workers
    assert line.startswith("phase 'all' epoch 2: training waited for images ") and line.endswith("more data.num_workers may help (now 0; 3 cores could prepare images)")


def test_epochs_on_cached_features_never_say_they_waited_for_images(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transferctl.training import train as train_module

    monkeypatch.setattr(train_module, "DATA_WAIT_MIN_SECONDS", 0.0)
    monkeypatch.setattr(train_module, "DATA_WAIT_SHARE", 0.0)  # any wait at all would be told
    notices = Notices()
    schedule = [{"name": "head", "epochs": 2, "train": "head", "lr": 1e-3}]
    train(config_from_dict(experiment(tiny_split_data, tmp_path / "runs", strategy="feature_extract", schedule=schedule)), observer=notices)
    assert waited_for_images(notices) == []


@pytest.mark.parametrize(
    ("workers", "kept", "cache", "advice"),
    [
        (1, True, "auto", "more data.num_workers may help (now 1; 3 cores could prepare images)"),
        (3, False, "auto", "raise data.cache_memory_mb, so that the decoded images are kept in memory instead of decoded every epoch"),
        (3, False, "off", "set data.cache: auto, so that the decoded images are kept in memory instead of decoded every epoch"),
        (3, True, "auto", "every spare core already prepares images from the decoded ones in memory"),
    ],
)
def test_data_wait_advice_goes_from_more_workers_to_keeping_images(workers: int, kept: bool, cache: str, advice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from transferctl.training import train as train_module

    monkeypatch.setattr(train_module, "spare_cores", lambda: 3)
    assert train_module.data_wait_advice(workers, kept, cache) == advice
