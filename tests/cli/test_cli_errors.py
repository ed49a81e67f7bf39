"""Bad input through the command line: exit 1, one line per problem naming the file or field, no traceback.

Each case here is also tested where it is detected (test_config, test_data, test_backbones, ...); these
tests check what a user sees. Resume and interruptions are in test_resume.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from PIL import Image
from typer.testing import CliRunner

from helpers import experiment, write_experiment
from transferctl.cli import app
from transferctl.runs.rundir import RunDir
from transferctl.testing.synthetic import tiny_dataset

runner = CliRunner()


def one_error_line(result: Any) -> str:
    """The single `error:` line of a failed command (exit 1, no traceback)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tiny_dataset(tmp_path / "data", n_classes=2, per_class=3, layout="split")


def check_with(tmp_path: Path, data: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    raw = experiment(data, tmp_path / "runs")
    edit(raw)
    result = runner.invoke(app, ["check", str(write_experiment(tmp_path / "e.yaml", raw))])
    return one_error_line(result)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on machines without a GPU")
@pytest.mark.parametrize(
    ("fields", "expected"),
    [({"device": "cuda"}, "error: device: cuda asked for, but no CUDA GPU is available (use device: auto or cpu)"),
     ({"device": "cpu", "precision": "fp16"}, "error: precision: fp16 autocast is for GPUs (use bf16 or fp32 on a CPU)")],
)  # fmt: skip
def test_check_refuses_what_train_would_refuse_on_this_machine(tmp_path: Path, data: Path, fields: dict[str, str], expected: str) -> None:
    assert check_with(tmp_path, data, lambda raw: raw.update(fields)) == expected


# --------------------------------------------------------------------------- the experiment file


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("name: x\ndata:\n  root: [unclosed\nseed: 1\n")
    line = one_error_line(runner.invoke(app, ["check", str(path)]))
    assert f"{path}:4: invalid YAML" in line


def test_a_python_object_tag_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "e.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ndata: {{root: d}}\n")
    line = one_error_line(runner.invoke(app, ["train", str(path)]))
    assert "YAML tags that build Python objects are not allowed" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda raw: raw["data"].update(batch_size="eight"), "data.batch_size: Input should be a valid integer"),
        (lambda raw: raw["schedule"][0].update(epochs=-1), "schedule[0].epochs: Input should be greater than or equal to 1"),
        (lambda raw: raw["schedule"][1].update(lr=0), "schedule[1].lr: must be a number above 0, or auto"),
        (lambda raw: raw["optimizer"].update(nme="sgd") if "optimizer" in raw else raw.update(optimizer={"nme": "sgd"}), "did you mean 'name'?"),
    ],
    ids=["type", "negative-epochs", "zero-lr", "unknown-key"],
)
def test_invalid_fields_are_named(tmp_path: Path, data: Path, edit: Callable[[dict[str, Any]], None], expected: str) -> None:
    assert expected in check_with(tmp_path, data, edit)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("name", "resnet_18", "unknown model 'resnet_18' (did you mean 'resnet18'?"), ("weights", "IMAGENET1K_V3", "did you mean 'IMAGENET1K_V1'?")],
)
def test_unknown_backbone_or_weights_suggest_a_close_name(tmp_path: Path, data: Path, field: str, value: str, expected: str) -> None:
    line = check_with(tmp_path, data, lambda raw: raw["backbone"].update({field: value}))
    assert f"backbone.{field}" in line and expected in line


def test_nothing_in_a_config_runs_code(tmp_path: Path, data: Path) -> None:
    """Names are looked up in registries, never evaluated or imported."""
    marker = tmp_path / "ran"
    code = f"__import__('os').system('touch {marker}')"
    for field in ("name", "weights"):
        check_with(tmp_path, data, lambda raw, field=field: raw["backbone"].update({field: code}))
    check_with(tmp_path, data, lambda raw: raw.update(device=code))
    assert not marker.exists()


def test_one_image_per_step_with_training_batchnorm_is_refused_before_a_run_directory_is_made(tmp_path: Path, data: Path) -> None:
    raw = experiment(data, tmp_path / "runs", data={"batch_size": 1})
    expected = "error: data.batch_size: 1 image per step, but phase 'body' (schedule[1]) trains 20 BatchNorm layers (bn1, ...)"
    assert check_with(tmp_path, data, lambda raw: raw["data"].update(batch_size=1)).startswith(expected)
    line = one_error_line(runner.invoke(app, ["train", str(write_experiment(tmp_path / "t.yaml", raw))]))
    assert line.startswith(expected) and line.endswith("(raise data.batch_size, or set bn: frozen in schedule[1] to keep their statistics fixed)")
    assert not (tmp_path / "runs").exists()


def test_a_file_name_with_a_newline_stays_on_the_error_line(tmp_path: Path, data: Path) -> None:
    (data / "train" / "red" / "bad\nname.png").write_bytes(b"not an image")
    line = check_with(tmp_path, data, lambda raw: raw["data"].update(on_bad_image="error"))
    assert f"{data / 'train' / 'red'}/bad\\nname.png (not an image)" in line


def test_an_alias_bomb_is_one_line(tmp_path: Path) -> None:
    from test_config import alias_bomb

    path = tmp_path / "e.yaml"
    path.write_text(alias_bomb(9))
    assert one_error_line(runner.invoke(app, ["check", str(path)])) == f"error: {path}: refused: its aliases expand to more than 10,000 values (write the values out; an experiment file needs no deep aliases)"


# --------------------------------------------------------------------------- weights files


def test_weights_for_another_architecture_name_the_mismatched_keys(tmp_path: Path, data: Path) -> None:
    path = tmp_path / "squeezenet.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    line = check_with(tmp_path, data, lambda raw: raw["backbone"].update(weights=str(path)))
    assert "backbone.weights" in line and "does not fit this architecture" in line
    assert "missing (bn1.bias, " in line and "unexpected (classifier.1.bias, " in line


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def test_a_weights_file_that_would_run_code_is_refused(tmp_path: Path, data: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": RunsCode(marker)}, path)
    line = check_with(tmp_path, data, lambda raw: raw["backbone"].update(weights=str(path)))
    assert "refused to load" in line and not marker.exists()


# --------------------------------------------------------------------------- data


def rename_val_class(data: Path) -> None:
    (data / "val" / "red").rename(data / "val" / "crimson")


def empty_val_split(data: Path) -> None:
    shutil.rmtree(data / "val")
    (data / "val").mkdir()


def empty_class(data: Path) -> None:
    for image in (data / "train" / "red").iterdir():
        image.unlink()


def one_class(data: Path) -> None:
    for split in ("train", "val"):
        shutil.rmtree(data / split / "red")


def corrupt_image_with_error_policy(data: Path) -> None:
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and then nothing")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (rename_val_class, "data.root/val: class folders differ from train/: missing ['red']; extra ['crimson']"),
        (empty_val_split, "has no images"),
        (empty_class, "has no images"),
        (one_class, "needs at least two class folders, found only 'green'"),
        (corrupt_image_with_error_policy, "data.root: 1 unreadable image"),
    ],
    ids=["classes-differ", "empty-split", "empty-class", "one-class", "corrupt-image"],
)
def test_bad_data_folders_are_named(tmp_path: Path, data: Path, damage: Callable[[Path], None], expected: str) -> None:
    damage(data)
    line = check_with(tmp_path, data, lambda raw: raw["data"].update(on_bad_image="error"))
    assert expected in line


# --------------------------------------------------------------------------- paths the system refuses


HOSTILE_COMMANDS = {
    "config": lambda path, config: ["check", path],
    "show": lambda path, config: ["show", path],
    "runs": lambda path, config: ["runs", path],
    "resume": lambda path, config: ["train", "--resume", path],
    "run-dir": lambda path, config: ["train", config, "--run-dir", path / "run"],
    "data.root": lambda path, config: ["check", config, "--set", f"data.root={path}"],
    "output.dir": lambda path, config: ["train", config, "--set", f"output.dir={path}"],
    "weights-file": lambda path, config: ["check", config, "--set", f"backbone.weights={path / 'w.pt'}"],
    "weights-run": lambda path, config: ["check", config, "--set", f"backbone.weights=run:{path}"],
    "predict": lambda path, config: ["predict", path, "x.png"],
    "evaluate": lambda path, config: ["evaluate", path],
}
FIELDS = {"resume": "--resume", "run-dir": "--run-dir", "data.root": "data.root", "output.dir": "output.dir", "weights-file": "backbone.weights",
          "weights-run": "backbone.weights"}  # fmt: skip


@pytest.mark.parametrize("kind", ["long name", "symlink loop"])
@pytest.mark.parametrize("command", list(HOSTILE_COMMANDS))
def test_a_name_too_long_or_a_symlink_loop_is_one_line_naming_the_path(tmp_path: Path, data: Path, command: str, kind: str) -> None:
    """OSError: [Errno 36] File name too long, or RuntimeError: Symlink loop, was a traceback in each."""
    config = write_experiment(tmp_path / "e.yaml", experiment(data, tmp_path / "runs"))
    path = tmp_path / ("n" * 300)  # one name over the 255 bytes file systems allow
    if kind == "symlink loop":
        path = tmp_path / "loop"
        path.symlink_to(path)

    line = one_error_line(runner.invoke(app, [str(arg) for arg in HOSTILE_COMMANDS[command](path, config)]))

    field = f"{FIELDS[command]}: " if command in FIELDS else ""
    if kind == "long name":
        assert line.startswith(f"error: {field}{tmp_path}/{'n' * 22}...{'n' * 22}") and "has a name of 300 bytes, where file systems allow 255" in line
    else:
        assert line.startswith(f"error: {field}{tmp_path}/loop") and "runs into a symlink loop" in line


# --------------------------------------------------------------------------- training


def test_an_existing_run_directory_is_never_touched(tmp_path: Path, data: Path) -> None:
    config = write_experiment(tmp_path / "e.yaml", experiment(data, tmp_path / "runs"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")

    line = one_error_line(runner.invoke(app, ["train", str(config), "--run-dir", str(taken)]))

    assert f"--run-dir: {taken} already exists" in line
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path: Path, data: Path) -> None:
    (tmp_path / "runs").write_text("notes")
    config = write_experiment(tmp_path / "e.yaml", experiment(data, tmp_path / "runs"))

    line = one_error_line(runner.invoke(app, ["train", str(config)]))

    assert line == f"error: output.dir: cannot make {tmp_path / 'runs'}: {tmp_path / 'runs'} is a file (point output.dir at a folder)"


def mobilenet(root: Path, runs: Path, **sections: Any) -> dict[str, Any]:
    """The tiny experiment on mobilenet_v3_small: several times faster than resnet18 on a CPU."""
    return experiment(root, runs, backbone={"name": "mobilenet_v3_small", "weights": "none"}, **sections)


def test_a_diverging_loss_stops_with_the_phase_epoch_and_a_lower_lr(tmp_path: Path, data: Path) -> None:
    schedule = [{"name": "head", "epochs": 1, "train": "head", "lr": 1.0e-2}, {"name": "body", "epochs": 2, "train": "all", "lr": 1.0e6}]
    raw = mobilenet(data, tmp_path / "runs", optimizer={"name": "sgd"}, schedule=schedule)
    config = write_experiment(tmp_path / "e.yaml", raw)

    line = one_error_line(runner.invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run"), "-q"]))

    assert line.startswith("error: schedule[1] (body), epoch ") and "loss became nan" in line
    assert f"the last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'last.pt'}" in line
    assert line.endswith(f"(lower schedule[1].lr (now 1e+06), e.g. transferctl train --resume {tmp_path / 'run'} --set schedule.1.lr=100000)")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(tensor).all() for tensor in last["model"].values() if tensor.is_floating_point())
    assert not (tmp_path / "run" / "summary.json").exists()

    # The body phase had not saved an epoch: a resume may give it a sane learning rate.
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--set", "schedule.1.lr=0.001", "-q", "--json"])
    assert result.exit_code == 0, result.output
    assert [(r["phase"], r["epoch"]) for r in RunDir(tmp_path / "run").metrics()] == [("head", 1), ("body", 1), ("body", 2)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is written")
def test_a_full_disk_is_one_line(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".last.pt."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    schedule = [{"name": "head", "epochs": 1, "train": "head", "lr": 1.0e-2}]
    config = write_experiment(tmp_path / "e.yaml", mobilenet(data, tmp_path / "runs", schedule=schedule))

    line = one_error_line(runner.invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run"), "-q"]))

    assert f"{tmp_path / 'run' / 'checkpoints' / 'last.pt'}: cannot write: No space left on device" in line
    assert f"transferctl train --resume {tmp_path / 'run'}" in line
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt"]


def test_odd_images_and_names_train_end_to_end(tmp_path: Path) -> None:
    """Grayscale, RGBA, palette, 16-bit, CMYK, non-ASCII names, junk and a symlink loop: it trains."""
    root = tmp_path / "données"
    for name, mode, colour in (("chat été", "L", 30), ("собака", "RGB", (0, 0, 200))):
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(3):
            Image.new(mode, (20, 20), colour).save(folder / f"ünï {index}.png")
    Image.new("RGBA", (20, 20), (200, 0, 0, 128)).save(root / "chat été" / "rgba.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).convert("P").save(root / "собака" / "palette.png")
    Image.fromarray((torch.arange(400).reshape(20, 20) * 150).numpy().astype("uint16")).save(root / "chat été" / "deep16.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).convert("CMYK").save(root / "собака" / "print.jpg")
    (root / "собака" / "🐶 broken.jpg").write_bytes(b"not a dog")
    (root / "собака" / "readme.txt").write_text("ignored")
    (root / "chat été" / "loop").symlink_to(root, target_is_directory=True)
    schedule = [{"name": "head", "epochs": 1, "train": "head", "lr": 1.0e-2}]
    raw = mobilenet(root, tmp_path / "runs", schedule=schedule, data={"val_fraction": 0.3})
    config = write_experiment(tmp_path / "e.yaml", raw)

    result = runner.invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run")])

    assert result.exit_code == 0, result.output
    assert f"note: data.root: skipped 1 unreadable image: {root / 'собака' / '🐶 broken.jpg'} (not an image)" in result.stderr
    assert "ignored 1 file without an image suffix" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["skipped_images"] == [str(root / "собака" / "🐶 broken.jpg")]
    assert json.loads((tmp_path / "run" / "classes.json").read_text(encoding="utf-8")) == ["chat été", "собака"]
