"""A run directory names the code its python: backbone runs: rebuilding it from there needs --trust-code or
the module on TRANSFERCTL_TRUSTED_CODE (transferctl/models/trust.py), and never imports from the current folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import Result
from typer.testing import CliRunner

from helpers import experiment, write_experiment
from runs_helpers import ONE_EPOCH
from transferctl.cli import app
from transferctl.errors import CheckpointError
from transferctl.inference.trained_model import load_trained_model
from transferctl.testing.synthetic import tiny_dataset
from transferctl.models.trust import TRUSTED_CODE_ENV, require_trusted

runner = CliRunner()

NETS = '''
from torch import nn

print("Loaded pretrained weights for trustnet")  # as efficientnet_pytorch does: never onto stdout

class Loud(nn.Sequential):
    def forward(self, x):
        print("trustnet forward")  # user code prints while it runs, too
        return super().forward(x)

def net():
    print("building trustnet")
    return Loud(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
'''
NAME = "python:trustmodels.nets:net"
# A module whose import alone leaves a mark: its absence proves that nothing was imported.
MARKING = '''
import os
open(os.environ["TRUST_MARKER"], "w").close()

def build():
    raise SystemExit("called")
'''


def invoke(*args: object):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, [str(a) for a in args])


def write_module(folder: Path, dotted: str, source: str) -> Path:
    """folder/<package>/<module>.py for 'package.module' (or folder/<module>.py); returns folder."""
    *packages, module = dotted.split(".")
    target = folder.joinpath(*packages)
    target.mkdir(parents=True, exist_ok=True)
    for depth in range(1, len(packages) + 1):
        (folder.joinpath(*packages[:depth]) / "__init__.py").touch()
    (target / f"{module}.py").write_text(textwrap.dedent(source))
    return folder


@pytest.fixture(scope="module")
def code(module_tmp_path: Path) -> Iterator[Path]:
    """trustmodels.nets, importable (on sys.path) for this module's tests."""
    folder = write_module(module_tmp_path / "code", "trustmodels.nets", NETS)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield folder


@pytest.fixture(scope="module")
def trained(module_tmp_path: Path, code: Path) -> Result:
    """`train --json` of a trustmodels.nets run into module_tmp_path/run; the module prints as it is imported and called."""
    data = tiny_dataset(module_tmp_path / "data", n_classes=3, layout="split", test=True)
    backbone = {"name": NAME, "head": "5", "weights": "none"}
    config = write_experiment(module_tmp_path / "e.yaml", experiment(data, module_tmp_path / "runs", backbone=backbone, schedule=ONE_EPOCH))
    return invoke("train", config, "--run-dir", module_tmp_path / "run", "--json", "--quiet")


@pytest.fixture(scope="module")
def python_run(trained: Result) -> Path:
    assert trained.exit_code == 0, trained.output
    return Path(json.loads(trained.stdout)["run_dir"])


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRUST_MARKER", str(tmp_path / "imported"))
    return tmp_path / "imported"


def doctored(run: Path, dest: Path, name: str) -> Path:
    """A copy of run whose checkpoint and config.yaml name another python: backbone, as an attacker would."""
    shutil.copytree(run, dest)
    path = dest / "checkpoints" / "best.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["backbone"]["name"] = checkpoint["config"]["backbone"]["name"] = name
    torch.save(checkpoint, path)
    config = yaml.safe_load((dest / "config.yaml").read_text())
    config["backbone"]["name"] = name
    (dest / "config.yaml").write_text(yaml.safe_dump(config))
    return dest


def image(run: Path) -> Path:
    return next((run.parent / "data" / "test").glob("*/*.png"))  # the data the module's run trained on


@pytest.mark.parametrize("command", [["predict", "{run}", "{image}"], ["evaluate", "{run}"], ["export", "{run}", "--format", "safetensors"]])
def test_a_run_naming_code_is_refused_before_anything_is_imported(
    python_run: Path, tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.syspath_prepend(str(write_module(tmp_path / "evil", "trustevil", MARKING)))
    run = doctored(python_run, tmp_path / "shared-run", "python:trustevil:build")
    result = invoke(*(part.format(run=run, image=image(python_run)) for part in command))
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert f"{run / 'checkpoints' / 'best.pt'}: names the backbone python:trustevil:build" in line
    assert "would import and run the code of trustevil" in line
    assert f"add --trust-code, or add 'trustevil' to {TRUSTED_CODE_ENV}" in line
    assert not marker.exists() and "trustevil" not in sys.modules


def cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """transferctl in a child process as the installed command runs it: `python -c` would put the current
    folder on sys.path (as `python -m` does), which the console script does not."""
    script = "import sys; sys.path.pop(0); from transferctl.cli import main; sys.argv[0] = 'transferctl'; main()"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_checkpoint_naming_os_abort_does_not_abort(python_run: Path, tmp_path: Path) -> None:
    run = doctored(python_run, tmp_path / "shared-run", "python:os:abort")
    done = cli("predict", run, image(python_run), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {run / 'checkpoints' / 'best.pt'}: names the backbone python:os:abort: rebuilding it would import and run the code of os "
        f"(if you trust this run, add --trust-code, or add 'os' to {TRUSTED_CODE_ENV})"
    ]


def test_the_current_folder_is_never_on_the_import_path(python_run: Path, tmp_path: Path, marker: Path) -> None:
    run = doctored(python_run, tmp_path / "shared-run", "python:evilmod:build")
    write_module(run, "evilmod", MARKING)  # shipped inside the run directory; the user cds there
    done = cli("predict", ".", image(python_run), "--trust-code", cwd=run)
    assert done.returncode == 1 and not marker.exists(), done.stderr
    assert "cannot import evilmod: ModuleNotFoundError" in done.stderr and "PYTHONPATH" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_trust_code_rebuilds_the_run_and_its_prints_stay_off_stdout(python_run: Path) -> None:
    result = invoke("predict", python_run, image(python_run), "--trust-code")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["label"] in ("blue", "green", "red")
    assert "building trustnet" in result.stderr and "trustnet forward" in result.stderr


def test_the_allow_list_stands_for_trust_code(python_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match="--trust-code"):
        load_trained_model(python_run)
    monkeypatch.setenv(TRUSTED_CODE_ENV, "other, trustmodels")
    assert load_trained_model(python_run).classes == ["blue", "green", "red"]


@pytest.mark.parametrize(
    ("allowed", "trusted"),
    [("pkg.mod", True), ("pkg", True), (" other , pkg ", True), ("pkg.mod.sub", False), ("pk", False), ("pkg.mo", False), ("", False), ("mod", False)],
)
def test_the_allow_list_names_modules_or_their_packages(monkeypatch: pytest.MonkeyPatch, allowed: str, trusted: bool) -> None:
    monkeypatch.setenv(TRUSTED_CODE_ENV, allowed)
    if trusted:
        require_trusted("python:pkg.mod:build", "run", trust_code=False)
    else:
        with pytest.raises(CheckpointError):
            require_trusted("python:pkg.mod:build", "run", trust_code=False)


def test_a_name_with_a_newline_stays_one_line() -> None:
    with pytest.raises(CheckpointError) as caught:
        require_trusted("python:os\nx:abort", "run", trust_code=False)
    assert "\n" not in str(caught.value) and "os\\nx" in str(caught.value)


def test_resume_needs_the_opt_in_too(python_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(python_run, tmp_path / "run")
    (run / "summary.json").unlink()  # as if stopped after its last epoch: resume rebuilds the network
    result = invoke("train", "--resume", run, "--quiet")
    assert result.exit_code == 1 and f"{run / 'config.yaml'}: names the backbone {NAME}" in result.stderr
    result = invoke("train", "--resume", run, "--quiet", "--trust-code", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 1


def test_recommend_measures_a_python_run_with_the_opt_in(python_run: Path, tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "target", n_classes=3, per_class=4, layout="flat", seed=3)
    config = tmp_path / "rec.yaml"
    args = ["recommend", "--data", data, "--weights", f"run:{python_run}", "--image-size", "32", "--folds", "2",
            "--device", "cpu", "--precision", "fp32", "--write-config", config, "--json", "--quiet"]  # fmt: skip
    refused = invoke(*args)
    assert refused.exit_code == 1 and f"{python_run / 'config.yaml'}: names the backbone {NAME}" in refused.stderr
    result = invoke(*args, "--trust-code")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["ranking"]
    assert row["name"] == NAME and row["random_probe_acc"] is not None
    assert yaml.safe_load(config.read_text())["backbone"]["head"] == "5"  # the written experiment is complete


def test_what_the_backbone_prints_leaves_train_json_one_document(trained: Result) -> None:
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["epochs"] == 1
    assert "Loaded pretrained weights for trustnet" in trained.stderr and "building trustnet" in trained.stderr
    assert "trustnet forward" in trained.stderr and "trustnet forward" not in trained.stdout
