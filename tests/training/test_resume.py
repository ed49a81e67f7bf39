"""resume.py and interruptions: a run stopped by a signal, kill -9 or a full disk continues exactly as if
nothing had happened; a resume that would change what the run computes is refused."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import Notices, StopAfter, cli_with_patched_decoding, experiment, one_thread, record_checkpoint_writes, slow_decoding, write_experiment
from transferctl.training import runtime as runtime_module
from transferctl.cli import app
from transferctl.config import load_config
from transferctl.errors import CheckpointError, TrainingInterrupted
from transferctl.training.resume import incompatibilities, resume
from transferctl.runs.rundir import RunDir
from transferctl.testing.synthetic import tiny_dataset
from transferctl.training.train import resume_command, train
from transferctl.training.observers import SilentObserver

# Two phases of two epochs, random crops and flips: resuming must restore the scheduler mid-phase, the
# next phase's fresh optimizer, and the per-epoch shuffle order and augmentations.
SCHEDULE = [
    {"name": "head", "epochs": 2, "train": "head", "lr": 1.0e-2},
    {"name": "body", "epochs": 2, "train": "all", "lr": 1.0e-2, "backbone_lr_mult": 0.1},
]
EXACT = ("phase", "phase_index", "epoch", "global_epoch", "lr_head", "lr_backbone")
MEASURED = ("train_loss", "train_acc", "val_loss", "val_acc")

# The child process: the real CLI, with image decoding slowed down so that a signal sent after the first
# epoch always lands while later epochs are still running.
CHILD = cli_with_patched_decoding("import torch\ntorch.set_num_threads(1)\n" + slow_decoding(0.05))


pytestmark = pytest.mark.usefixtures("one_thread")


def raw_experiment(data: Path, runs: Path, checkpoint_seconds: float = 0) -> dict[str, Any]:
    # mobilenet_v3_small: BatchNorm statistics and dropout (the RNG state matters), and fast on a CPU.
    # checkpoint_seconds 0: every epoch is written at once, so that a kill -9 after any epoch keeps it.
    return experiment(data, runs, backbone={"name": "mobilenet_v3_small", "weights": "none"}, schedule=SCHEDULE, data={"augment": "standard"},
                      output={"checkpoint_seconds": checkpoint_seconds})  # fmt: skip


@pytest.fixture(scope="module")
def data(module_tmp_path: Path) -> Path:
    return tiny_dataset(module_tmp_path / "data", n_classes=3, layout="split")


@pytest.fixture(scope="module")
def config_file(data: Path) -> Path:
    return write_experiment(data.parent / "experiment.yaml", raw_experiment(data, data.parent / "runs"))


@pytest.fixture(scope="module")
def reference(config_file: Path) -> Path:
    """The uninterrupted run every resumed one must match."""
    run = config_file.parent / "reference"
    train(load_config(config_file), run)
    return run


@pytest.fixture(scope="module")
def stopped(config_file: Path, heeded_sigint: None) -> Path:
    """A run stopped after its first phase (global epoch 2 of 4)."""
    run = config_file.parent / "stopped"
    with pytest.raises(TrainingInterrupted):
        train(load_config(config_file), run, StopAfter(2))
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def rows(run: Path) -> list[dict[str, Any]]:
    return RunDir(run).metrics()


def assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = rows(resumed), rows(reference)
    assert [r["global_epoch"] for r in got] == list(range(1, len(want) + 1))  # none duplicated or missing
    for mine, theirs in zip(got, want):
        assert {k: mine[k] for k in EXACT} == {k: theirs[k] for k in EXACT}
        for key in MEASURED:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["global_epoch"], key)
    final = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
    expected = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, tensor in expected.items():
        assert torch.allclose(final[name].float(), tensor.float(), rtol=1e-4, atol=1e-6), name
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["epochs"] == len(want) and summary["best_epoch"] == json.loads((reference / "summary.json").read_text())["best_epoch"]


def start_child(config_file: Path, run: Path) -> subprocess.Popen[str]:
    script = run.parent / "child.py"
    script.write_text(CHILD)
    command = [sys.executable, str(script), "train", str(config_file), "--run-dir", str(run), "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])


def wait_for_rows(run: Path, child: subprocess.Popen[str], count: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {child.communicate()}")
        try:
            if len(rows(run)) >= count:
                return
        except (json.JSONDecodeError, OSError):
            pass  # a reader may race the rename; never a torn file, but the folder may not exist yet
        time.sleep(0.02)
    child.kill()
    pytest.fail("the run did not finish its first epoch in time")


# --------------------------------------------------------------------------- real signals, real processes


# SIGINT also reaches the loop in-process (StopAfter); its subprocess twin mostly costs another torch import.
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow)])
def test_a_signal_stops_the_run_and_resume_matches_an_uninterrupted_run(config_file: Path, reference: Path, tmp_path: Path, signum: int, heeded_sigint: None) -> None:
    run = tmp_path / "run"
    child = start_child(config_file, run)
    wait_for_rows(run, child, 1)
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)

    assert child.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), stderr
    assert signal.Signals(signum).name in lines[0] and resume_command(run) in lines[0]
    assert "Traceback" not in stderr and stdout == ""
    stopped_at = rows(run)
    assert 1 <= len(stopped_at) < 4 and [r["global_epoch"] for r in stopped_at] == list(range(1, len(stopped_at) + 1))
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["global_epoch"] == len(stopped_at)

    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--quiet"])

    assert result.exit_code == 0, result.output
    assert_same_run(run, reference)


# The real CLI, sent a SIGTERM by itself as soon as torch starts to be imported: seconds in which the
# command used to die of the signal (exit 143).
SIGNAL_WHILE_TORCH_IS_IMPORTED = """
import os, signal, sys
class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None
sys.meta_path.insert(0, SignalOnImport())
from transferctl.cli import main
sys.argv[0] = "transferctl"
main()
"""

# The real CLI, sent a SIGTERM by itself just before it writes the new run directory's first files.
SIGNAL_WHILE_THE_RUN_IS_MADE = """
import os, signal, sys
import transferctl.training.train as train
write_run_header = train.write_run_header
def signal_then_write(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    write_run_header(*args, **kwargs)
train.write_run_header = signal_then_write
from transferctl.cli import main
sys.argv[0] = "transferctl"
main()
"""


def run_script(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "child.py"
    path.write_text(script)
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300)


def test_sigterm_while_train_starts_up_is_an_interruption_with_nothing_written(config_file: Path, tmp_path: Path) -> None:
    done = run_script(SIGNAL_WHILE_TORCH_IS_IMPORTED, tmp_path, "train", str(config_file), "--run-dir", str(tmp_path / "run"))
    assert (done.returncode, done.stderr) == (130, "interrupted: stopped by SIGTERM\n")
    assert not (tmp_path / "run").exists()


def test_sigterm_while_the_run_directory_is_made_leaves_one_that_resumes(config_file: Path, reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = run_script(SIGNAL_WHILE_THE_RUN_IS_MADE, tmp_path, "train", str(config_file), "--run-dir", str(run), "--quiet")
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == (f"interrupted: {run}: stopped by SIGTERM during phase 'head' epoch 1; no epoch had finished, so a resume "
                                   f"starts from the beginning (resume with: {resume_command(run)})")  # fmt: skip
    assert sorted(path.name for path in run.iterdir() if not path.name.startswith(".")) == ["classes.json", "config.yaml", "env.json"]

    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--quiet"])

    assert result.exit_code == 0, result.output
    assert_same_run(run, reference)


def test_after_kill_9_resume_continues_from_the_last_completed_epoch(config_file: Path, reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = start_child(config_file, run)
    wait_for_rows(run, child, 1)
    child.kill()
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL

    summary = resume(run)

    assert summary["epochs"] == 4
    assert not list(run.rglob("*.tmp"))
    assert_same_run(run, reference)


# --------------------------------------------------------------------------- failures in the library


def fail_writes_of(monkeypatch: pytest.MonkeyPatch, name: str, when: Callable[[], bool]) -> None:
    """Every fsync of a temp file for `name` fails with ENOSPC while when() is true: a disk that fills up."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if target.startswith(f".{name}.") and when():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is written")
def test_a_full_disk_keeps_the_previous_checkpoint_and_resume_finishes_the_run(config_file: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = {"now": False}

    class FillDiskAfterFirstEpoch(SilentObserver):
        def epoch_done(self, row: dict[str, Any]) -> None:
            full["now"] = True

    fail_writes_of(monkeypatch, "last.pt", lambda: full["now"])
    run = tmp_path / "run"

    with pytest.raises(CheckpointError) as info:
        train(load_config(config_file), run, FillDiskAfterFirstEpoch())

    (problem,) = info.value.problems
    assert problem.where == str(run / "checkpoints" / "last.pt")
    assert "No space left on device" in problem.message and "intact" in problem.message
    assert resume_command(run) in problem.hint
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["global_epoch"] == 1
    assert not list(run.rglob("*.tmp"))

    monkeypatch.undo()
    resume(run)
    assert_same_run(run, reference)


# --------------------------------------------------------------------------- checkpoints held between writes


class StopInFourthEpoch(SilentObserver):
    """A Ctrl-C after the first step of global epoch 4 (body epoch 2): that step has changed the model since
    epoch 3 ended, and epoch 3, in the middle of its phase, is held in memory. (The head phase before it is
    solved in its first epoch, without steps to stop at.)"""

    def __init__(self) -> None:
        self.epochs = 0

    def batch_done(self, index: int, count: int, running_loss: float) -> None:
        if self.epochs == 3 and index == 0:
            os.kill(os.getpid(), signal.SIGINT)

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.epochs += 1


def test_a_stop_writes_the_epoch_held_in_memory_and_resume_matches_an_uninterrupted_run(data: Path, reference: Path, tmp_path: Path, heeded_sigint: None) -> None:
    config_file = write_experiment(tmp_path / "experiment.yaml", raw_experiment(data, tmp_path / "runs", checkpoint_seconds=3600))
    run = tmp_path / "run"

    with pytest.raises(TrainingInterrupted, match="during phase 'body' epoch 2"):
        train(load_config(config_file), run, StopInFourthEpoch())

    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["global_epoch"] == 3
    assert [r["global_epoch"] for r in rows(run)] == [1, 2, 3]
    resume(run)
    assert_same_run(run, reference)


def test_within_a_phase_checkpoints_wait_for_the_interval_and_end_up_the_same(data: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes = record_checkpoint_writes(monkeypatch, "global_epoch")
    config_file = write_experiment(tmp_path / "experiment.yaml", raw_experiment(data, tmp_path / "runs", checkpoint_seconds=3600))

    train(load_config(config_file), tmp_path / "run")

    assert [epoch for kind, epoch in writes if kind == "last"] == [2, 4]  # the ends of the two phases
    assert_same_run(tmp_path / "run", reference)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    expected = torch.load(reference / "checkpoints" / "best.pt", weights_only=True)
    assert best["global_epoch"] == expected["global_epoch"]
    for name, tensor in expected["model"].items():
        assert torch.allclose(best["model"][name].float(), tensor.float(), rtol=1e-4, atol=1e-6), name


def test_resume_drops_rows_of_an_epoch_that_was_cut_short(stopped: Path, reference: Path, tmp_path: Path) -> None:
    run = copy_run(stopped, tmp_path)
    torn = rows(run) + [{**rows(run)[-1], "global_epoch": 3, "phase": "body", "epoch": 1}]
    RunDir(run).write_metrics(torn)  # as if killed after the metrics but before last.pt of epoch 3
    (run / "checkpoints" / ".last.pt.0123456789ab.tmp").write_bytes(b"half a checkpoint")

    resume(run)

    assert not list(run.rglob("*.tmp"))
    assert_same_run(run, reference)


def test_interrupted_before_any_epoch_finished_starts_over(stopped: Path, reference: Path, tmp_path: Path) -> None:
    run = copy_run(stopped, tmp_path)
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()

    resume(run)

    assert_same_run(run, reference)


def test_a_missing_last_pt_after_finished_epochs_is_refused_and_restart_keeps_the_earlier_files(stopped: Path, reference: Path, tmp_path: Path) -> None:
    run = copy_run(stopped, tmp_path)
    (run / "checkpoints" / "last.pt").unlink()
    best, metrics = (run / "checkpoints" / "best.pt").read_bytes(), (run / "metrics.jsonl").read_text()

    result = CliRunner().invoke(app, ["train", "--resume", str(run)])

    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert f"{run / 'checkpoints' / 'last.pt'}: missing, but epochs had finished (checkpoints/best.pt is there; metrics.jsonl has 2 epoch rows)" in result.stderr
    assert f"{resume_command(run)} --restart" in result.stderr
    assert (run / "checkpoints" / "best.pt").read_bytes() == best and (run / "metrics.jsonl").read_text() == metrics

    notices = Notices()
    resume(run, observer=notices, restart=True)

    (kept,) = run.glob("before-restart-*")
    assert (kept / "best.pt").read_bytes() == best and (kept / "metrics.jsonl").read_text() == metrics
    assert any(f"starting over from epoch 1, as --restart asks; the earlier checkpoints, metrics and summary are in {kept}" in line for line in notices.lines)
    assert_same_run(run, reference)  # trained from epoch 1 again


@pytest.mark.parametrize("damage", ["truncated", "folder"])
def test_a_damaged_last_pt_is_refused_not_trained_over(stopped: Path, tmp_path: Path, damage: str) -> None:
    run = copy_run(stopped, tmp_path)
    last = run / "checkpoints" / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        last.unlink()
        last.mkdir()
    best = (run / "checkpoints" / "best.pt").read_bytes()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(last))}.*start over from epoch 1 with `.* --restart`"):
        resume(run)
    assert (run / "checkpoints" / "best.pt").read_bytes() == best and len(rows(run)) == 2


def test_restart_applies_only_to_a_resume(config_file: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(config_file), "--restart"])
    assert result.exit_code == 2 and "only applies with --resume" in result.output


def test_an_fp16_run_resumes_with_its_grad_scaler(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, heeded_sigint: None) -> None:
    """fp16 is for GPUs; PyTorch's CPU autocast and GradScaler take the same path, so the choice is patched."""
    monkeypatch.setattr(runtime_module, "choose_precision", lambda spec, device: "fp16")
    schedule = [{"name": "all", "epochs": 3, "train": "all", "lr": 1.0e-2}]
    config = write_experiment(tmp_path / "fp16.yaml", experiment(data, tmp_path / "runs", backbone={"name": "mobilenet_v3_small", "weights": "none"}, schedule=schedule))
    train(load_config(config), tmp_path / "reference")
    with pytest.raises(TrainingInterrupted):
        train(load_config(config), tmp_path / "run", StopAfter(1))
    stopped = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert stopped is not None and stopped["scale"] < 2.0**16  # moved off its start: a fresh scaler differs

    resume(tmp_path / "run")

    assert_same_run(tmp_path / "run", tmp_path / "reference")
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert final == torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)["scaler"]


def test_a_stopped_run_keeps_its_completed_epochs_and_has_no_summary(stopped: Path) -> None:
    last = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert (last["phase_index"], last["epoch"], last["phase_done"]) == (0, 2, True)
    assert [r["global_epoch"] for r in rows(stopped)] == [1, 2]
    assert not (stopped / "summary.json").exists()


def test_interrupted_run_message(config_file: Path, tmp_path: Path, heeded_sigint: None) -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        train(load_config(config_file), tmp_path / "run", StopAfter(1))
    text = str(info.value)
    assert "stopped by SIGINT during phase 'head' epoch 2" in text
    assert "last completed epoch (head epoch 1, global epoch 1)" in text
    assert text.endswith(f"(resume with: transferctl train --resume {tmp_path / 'run'})")
    assert signal.getsignal(signal.SIGINT) is before  # handlers are put back


def test_a_signal_the_process_ignores_stays_ignored() -> None:
    from transferctl.training.interrupts import stop_on_signals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup, or in a background job
    try:
        with stop_on_signals() as request:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM still stops training cleanly
            assert not request()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# --------------------------------------------------------------------------- what a resume may change


def edit_config(run: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = run / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize(
    ("change", "field", "detail"),
    [
        (lambda raw: raw["backbone"].update(name="resnet18"), "backbone.name", "changed from 'mobilenet_v3_small' to 'resnet18'"),
        (lambda raw: raw["schedule"][0].update(lr=0.5), "schedule[0].lr", "but phase 'head' has already started"),
        (lambda raw: raw["data"].update(batch_size=4), "data.batch_size", "changed from 8 to 4"),
        (lambda raw: raw.update(seed=1), "seed", "changed from 0 to 1"),
        (lambda raw: raw.update(strategy="pretrained_init"), "strategy", "changed from 'fine_tune' to 'pretrained_init'"),
    ],
    ids=["backbone", "finished-phase", "batch-size", "seed", "strategy"],
)
def test_incompatible_config_changes_are_refused(stopped: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None], field: str, detail: str) -> None:
    run = copy_run(stopped, tmp_path)
    edit_config(run, change)
    before = (run / "checkpoints" / "last.pt").read_bytes()

    result = CliRunner().invoke(app, ["train", "--resume", str(run)])

    assert result.exit_code == 1, result.output
    assert f"{run / 'config.yaml'}: {field}" in result.stderr and detail in result.stderr
    assert "start a new run" in result.stderr and "Traceback" not in result.output
    assert all(line.startswith("error:") for line in result.stderr.strip().splitlines())
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_incompatibilities_allow_the_device_and_phases_not_yet_started() -> None:
    trained = {"device": "cuda", "data": {"num_workers": 4, "batch_size": 8}, "output": {"checkpoint_seconds": 30},
               "schedule": [{"name": "a", "epochs": 1}, {"name": "b", "epochs": 5}]}  # fmt: skip
    now = {"device": "cpu", "data": {"num_workers": 0, "batch_size": 8}, "output": {"checkpoint_seconds": 0},
           "schedule": [{"name": "a", "epochs": 1}, {"name": "b", "epochs": 9}, {"name": "c", "epochs": 1}]}  # fmt: skip

    assert incompatibilities(trained, now, phases_started=1, where="config.yaml") == []
    (problem,) = incompatibilities(trained, now, phases_started=2, where="config.yaml")
    assert problem.where == "config.yaml: schedule[1].epochs"


def test_set_may_lengthen_a_phase_that_has_not_started(stopped: Path, tmp_path: Path) -> None:
    run = copy_run(stopped, tmp_path)

    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", "schedule.1.epochs=1", "--json", "-q"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["schedule"][1]["epochs"] == 1
    assert [(r["phase"], r["epoch"]) for r in rows(run)] == [("head", 1), ("head", 2), ("body", 1)]


def test_set_lr_auto_on_a_phase_that_has_not_started_records_the_lr_found(stopped: Path, tmp_path: Path) -> None:
    run = copy_run(stopped, tmp_path)

    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", "schedule.1.lr=auto", "--set", "schedule.1.epochs=1", "--json", "-q"])

    assert result.exit_code == 0, result.output
    found = yaml.safe_load((run / "config.yaml").read_text())["schedule"][1]["lr"]
    assert isinstance(found, float) and rows(run)[-1]["phase"] == "body" and rows(run)[-1]["lr_head"] == pytest.approx(found)


def test_resume_refuses_data_with_other_classes(stopped: Path, tmp_path: Path) -> None:
    run = copy_run(stopped, tmp_path)
    other = tiny_dataset(tmp_path / "other", n_classes=4, layout="split")

    with pytest.raises(CheckpointError, match=r"differ from the run's: extra \['yellow'\]"):
        resume(run, [f"data.root={other}"])


def test_resume_says_when_the_images_are_not_those_the_run_started_on(stopped: Path, data: Path, tmp_path: Path) -> None:
    moved = Path(shutil.copytree(data, tmp_path / "moved"))  # the same images in another folder: nothing to say
    heard = Notices()
    resume(copy_run(stopped, tmp_path / "a"), [f"data.root={moved}"], heard)
    assert not [line for line in heard.lines if "images differ" in line]

    next(iter(sorted((moved / "train" / "red").iterdir()))).unlink()
    heard = Notices()
    resume(copy_run(stopped, tmp_path / "b"), [f"data.root={moved}"], heard)
    (line,) = [line for line in heard.lines if "images differ" in line]
    assert "train 15 -> 14, val 3 -> 3" in line and "start a new run" in line


def test_resume_of_a_finished_run_changes_nothing(reference: Path, tmp_path: Path) -> None:
    run = copy_run(reference, tmp_path)
    before = (run / "summary.json").read_text()

    result = CliRunner().invoke(app, ["train", "--resume", str(run)])

    assert result.exit_code == 0, result.output
    assert "already finished all 4 epochs" in result.stderr
    assert (run / "summary.json").read_text() == before


def test_a_run_being_trained_cannot_be_resumed_twice(stopped: Path, tmp_path: Path) -> None:
    run = copy_run(stopped, tmp_path)
    with RunDir(run).lock(), pytest.raises(CheckpointError, match="another transferctl process is training"):
        resume(run)


def test_a_checkpoint_without_resume_state_is_refused(stopped: Path, tmp_path: Path) -> None:
    run = copy_run(stopped, tmp_path)
    last = run / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    for key in ("rows", "rng"):
        del payload[key]
    torch.save(payload, last)

    with pytest.raises(CheckpointError, match=r"has no resume state \(rng, rows missing\)"):
        resume(run)


@pytest.mark.parametrize("make", ["missing", "not-a-run"])
def test_resume_needs_a_run_directory(tmp_path: Path, make: str) -> None:
    target = tmp_path / "somewhere"
    if make == "not-a-run":
        target.mkdir()

    result = CliRunner().invoke(app, ["train", "--resume", str(target)])

    assert result.exit_code == 1 and "--resume" in result.stderr and str(target) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_train_needs_exactly_one_of_config_and_resume(config_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["train"]).exit_code == 2
    assert runner.invoke(app, ["train", str(config_file), "--resume", str(tmp_path)]).exit_code == 2
    assert runner.invoke(app, ["train", "--resume", str(tmp_path), "--run-dir", str(tmp_path / "x")]).exit_code == 2


def test_a_head_phase_an_earlier_version_trained_with_steps_is_solved_on_resume(data: Path, tmp_path: Path, heeded_sigint: None) -> None:
    """A run written before heads were solved: its last.pt holds an AdamW state for the head phase. Resumed,
    the head is solved from where its weights are instead of loading that state into the solver's."""
    raw = raw_experiment(data, tmp_path / "runs")
    raw["schedule"] = [{**SCHEDULE[0], "solver": "minibatch"}, SCHEDULE[1]]
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(load_config(write_experiment(tmp_path / "experiment.yaml", raw)), run, StopAfter(1))
    # As an earlier version wrote them: no solver field anywhere.
    written = yaml.safe_load((run / "config.yaml").read_text())
    written["schedule"][0].pop("solver")
    (run / "config.yaml").write_text(yaml.safe_dump(written))
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    last["config"]["schedule"][0].pop("solver")
    torch.save(last, run / "checkpoints" / "last.pt")
    resume(run)
    second = rows(run)[1]
    assert second["phase"] == "head" and second["epoch"] == 2 and second["head_weight_decay"] is not None


def test_a_run_with_the_imbalance_options_resumes_as_it_would_have_run(tmp_path: Path, heeded_sigint: None) -> None:
    """Balanced draws, class weights and smoothing (in the solved head too) and early stopping on balanced accuracy:
    stopped in the middle of the body phase, the run continues with the rows an uninterrupted one writes."""
    from helpers import imbalanced_dataset

    raw = raw_experiment(imbalanced_dataset(tmp_path / "data"), tmp_path / "runs")
    raw["data"]["sampler"] = "balanced"
    raw.update(loss={"label_smoothing": 0.1, "class_weights": "balanced"}, early_stopping={"metric": "balanced_acc"})
    config_file = write_experiment(tmp_path / "experiment.yaml", raw)
    train(load_config(config_file), tmp_path / "reference")
    with pytest.raises(TrainingInterrupted):
        train(load_config(config_file), tmp_path / "stopped", StopAfter(3))
    resume(tmp_path / "stopped")
    assert_same_run(tmp_path / "stopped", tmp_path / "reference")
    balanced = [{key: row[key] for key in ("val_balanced_acc", "val_macro_f1")} for row in rows(tmp_path / "reference")]
    assert [{key: row[key] for key in ("val_balanced_acc", "val_macro_f1")} for row in rows(tmp_path / "stopped")] == balanced
