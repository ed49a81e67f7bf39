"""export: TorchScript, ONNX (onnxruntime, skipped without it) and safetensors files that give the PyTorch
model's outputs on the same images, with preprocessing and class names in model.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import experiment
from transferctl.cli import app
from transferctl.config import config_from_dict
from transferctl.data.folders import open_rgb
from transferctl.errors import CheckpointError
from transferctl.inference.export import export
from transferctl.inference.trained_model import eval_transform, load_trained_model
from transferctl.testing.synthetic import tiny_dataset
from transferctl.training.train import train


@pytest.fixture(scope="module")
def run_dir(module_tmp_path: Path) -> Path:
    root = module_tmp_path
    data = tiny_dataset(root / "data", n_classes=3, layout="split")
    train(config_from_dict(experiment(data, root / "runs")), root / "run")
    return root / "run"


def images(run: Path) -> torch.Tensor:
    """The run's own validation images, preprocessed as the sidecar says."""
    preprocessing = load_trained_model(run).preprocessing
    transform = eval_transform(preprocessing)
    files = sorted(Path(load_config_root(run)).glob("val/*/*.png"))
    return torch.stack([transform(open_rgb(f)) for f in files])


def load_config_root(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]


def reference(run: Path, batch: torch.Tensor) -> torch.Tensor:
    model = load_trained_model(run).model
    with torch.no_grad():
        return model(batch)


def test_torchscript_matches_the_pytorch_model(run_dir: Path) -> None:
    result = export(run_dir, "torchscript")
    assert result.model_file == run_dir / "export" / "model.torchscript.pt"
    batch = images(run_dir)
    scripted = torch.jit.load(str(result.model_file))
    with torch.no_grad():
        assert torch.allclose(scripted(batch), reference(run_dir, batch), atol=1e-4)
    meta = json.loads(result.sidecar.read_text())
    assert meta["classes"] == load_trained_model(run_dir).classes
    assert meta["preprocessing"]["crop"] == 32 and len(meta["preprocessing"]["mean"]) == 3
    assert meta["backbone"]["name"] == "resnet18" and meta["file"] == "model.torchscript.pt"
    assert any("composited onto white" in step for step in meta["input"]["decoding"])  # what predict does to RGBA, said


def test_onnx_matches_the_pytorch_model_with_any_batch_size(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    result = export(run_dir, "onnx", out=tmp_path / "onnx")
    assert result.max_diff is not None and result.max_diff < 1e-3
    batch = images(run_dir)
    session = onnxruntime.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": batch.numpy()})
    assert torch.allclose(torch.from_numpy(logits), reference(run_dir, batch), atol=1e-4)
    assert json.loads((tmp_path / "onnx" / "model.json").read_text())["format"] == "onnx"


def test_safetensors_holds_the_state_dict(run_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    result = export(run_dir, "safetensors", checkpoint="last", out=tmp_path)
    state = load_file(str(result.model_file))
    model = load_trained_model(run_dir, "last").model
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert json.loads(result.sidecar.read_text())["source"]["checkpoint"] == "last"


def test_exports_of_the_same_weights_share_a_folder_and_another_epochs_are_refused(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    export(run_dir, "torchscript", out=out)
    export(run_dir, "safetensors", out=out)
    meta = json.loads((out / "model.json").read_text())
    assert meta["files"] == {"torchscript": "model.torchscript.pt", "safetensors": "model.safetensors"}  # both described

    meta["source"]["epoch"] += 1  # as if another epoch had been exported here
    (out / "model.json").write_text(json.dumps(meta))
    before = (out / "model.torchscript.pt").read_bytes()
    with pytest.raises(CheckpointError, match=f"{out}: holds an export of .* epoch .*, not of .*choose another --out"):
        export(run_dir, "torchscript", out=out)
    assert (out / "model.torchscript.pt").read_bytes() == before  # nothing written


@pytest.mark.parametrize("mine", ["not json {", '{"format": "onnx", "classes": ["cat"]}', "[]"])
def test_a_model_json_transferctl_did_not_write_is_refused(run_dir: Path, tmp_path: Path, mine: str) -> None:
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "model.json").write_text(mine)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "safetensors", "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{out / 'model.json'}: exists and is not a model.json that transferctl export wrote" in result.stderr
    assert "choose another --out, or remove the file" in result.stderr
    assert (out / "model.json").read_text() == mine and not (out / "model.safetensors").exists()


def test_a_model_file_transferctl_did_not_write_is_refused(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's own weights")
    with pytest.raises(CheckpointError, match=r"model.safetensors: exists, and no model.json there says a transferctl export wrote it \(choose another --out"):
        export(run_dir, "torchscript", out=out)  # another format: model.json would sit beside a file it does not describe
    assert not (out / "model.json").exists() and not (out / "model.torchscript.pt").exists()

    export(run_dir, "torchscript", out=tmp_path / "ours")
    (tmp_path / "ours" / "model.onnx").write_bytes(b"the user's own onnx")
    with pytest.raises(CheckpointError, match="model.onnx: exists, and the model.json there does not list it among its export's files"):
        export(run_dir, "onnx", out=tmp_path / "ours")
    assert (tmp_path / "ours" / "model.onnx").read_bytes() == b"the user's own onnx"
    (tmp_path / "ours" / "model.onnx").unlink()
    export(run_dir, "torchscript", out=tmp_path / "ours")  # its own file, listed: written again


def test_cli_export_json_and_errors(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "ts"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"].endswith("model.torchscript.pt")
    assert runner.invoke(app, ["export", str(run_dir), "--format", "tflite"]).exit_code == 2
    missing = runner.invoke(app, ["export", str(tmp_path / "nope"), "--format", "onnx"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output


# --------------------------------------------------------------------------- multi-label runs


@pytest.fixture(scope="module")
def multi_label(module_tmp_path: Path) -> Path:
    from helpers import multi_label_run

    return multi_label_run(module_tmp_path / "multi-label")


def test_model_json_says_the_task_and_a_multi_label_runs_thresholds(run_dir: Path, multi_label: Path, tmp_path: Path) -> None:
    single = json.loads(export(run_dir, "safetensors", out=tmp_path / "single").sidecar.read_text())
    assert single["task"] == "single_label" and single["output"]["softmax"] == "not applied" and "thresholds" not in single
    result = export(multi_label, "torchscript", out=tmp_path / "multi")
    meta = json.loads(result.sidecar.read_text())
    tuned = json.loads((multi_label / "summary.json").read_text())["thresholds"]
    assert meta["task"] == "multi_label" and meta["output"] == {"name": "logits", "shape": [None, 3], "sigmoid": "not applied"}
    assert meta["thresholds"] == tuned and list(meta["thresholds"]) == meta["classes"] and meta["thresholds_tuned"] and not result.notices
    # The file gives logits: their sigmoid against the thresholds gives the labels.
    batch = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(result.model_file))(batch), reference(multi_label, batch), atol=1e-4, rtol=0)


def test_exporting_weights_the_thresholds_were_not_tuned_for_says_so(multi_label: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(multi_label), "--format", "safetensors", "--checkpoint", "last", "--out", str(tmp_path / "last")])
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "thresholds were tuned for epoch 1" in result.output and "0.5" in result.output
    meta = json.loads((tmp_path / "last" / "model.json").read_text())
    assert meta["thresholds"] == dict.fromkeys(meta["classes"], 0.5) and meta["thresholds_tuned"] is False
