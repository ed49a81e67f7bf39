"""export(run_dir, format) -> Exported: the trained network as one file for deployment, plus a JSON sidecar.

Formats:
- `torchscript` (`model.torchscript.pt`): traced; runs with `torch.jit.load` and no transferctl installed.
- `onnx` (`model.onnx`, opset 17, dynamic batch axis): needs the `onnx` extra (`pip install 'transferctl[onnx]'`).
- `safetensors` (`model.safetensors`): the state dict only; the sidecar says how to rebuild the network.

The sidecar `model.json` holds what a deployment must reproduce: the input (RGB, NCHW, float in [0, 1] before
normalisation), the preprocessing (resize the short side, centre-crop, mean, std, interpolation), the class
names in output order and where the weights came from; its `task` says how to read the logits (single_label:
softmax, one class; multi_label: a sigmoid a class, each label where it reaches the class's `thresholds`). Every export is checked: the exported file runs on a
batch of random images and must match the PyTorch model (max absolute logit difference, in `Exported.max_diff`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferctl.data.folders import DECODING_STEPS
from transferctl.errors import CheckpointError, Problem, TransferctlError
from transferctl.inference.trained_model import RunTask, load_trained_model, run_task
from transferctl.runs.checkpoint import Checkpoint, checkpoint_file, load_run_checkpoint

FORMATS = ("onnx", "torchscript", "safetensors")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "safetensors": "model.safetensors"}
SIDECAR = "model.json"
RECORD_FIELDS = frozenset({"format", "file", "input", "output", "preprocessing", "classes", "source"})  # in every model.json export wrote
SOURCE_FIELDS = frozenset({"run_dir", "checkpoint", "phase_index", "epoch"})
ONNX_OPSET = 17
TOLERANCE = 1e-3  # fp32 logits of the same network through another runtime differ by ~1e-5


class ExportError(TransferctlError):
    """The model cannot be written in the asked format (a missing extra, an unsupported layer)."""


@dataclass(frozen=True)
class Exported:
    model_file: Path
    sidecar: Path
    format: str
    max_diff: float | None  # None: not checked (onnxruntime missing)
    notices: tuple[str, ...] = ()  # a multi-label run's thresholds that are not tuned ones (RunTask.notice)


def export(run_dir: Path, fmt: str, checkpoint: str = "best", out: Path | None = None, trust_code: bool = False) -> Exported:
    if fmt not in FORMATS:
        raise ExportError(Problem("--format", f"unknown format '{fmt}'", f"use one of: {', '.join(FORMATS)}"))
    model, classes, preprocessing = load_trained_model(run_dir, checkpoint, trust_code)
    out = out or run_dir / "export"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(Problem(str(out), f"cannot create the export folder: {exc.strerror}", "choose another --out")) from None
    target = out / FILE_NAMES[fmt]
    sidecar = out / SIDECAR
    saved = load_run_checkpoint(run_dir, checkpoint)  # for the backbone entry and the epoch it holds
    task = run_task(saved, str(checkpoint_file(run_dir, checkpoint)))
    meta = sidecar_payload(fmt, target.name, classes, preprocessing.to_dict(), saved, run_dir, checkpoint, task)
    meta["files"] = {**_earlier_files(out, meta["source"]), fmt: target.name}
    example = torch.rand(2, 3, preprocessing.crop, preprocessing.crop, generator=torch.Generator().manual_seed(0))
    writers = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}
    max_diff = writers[fmt](model, example, target)
    sidecar.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Exported(target, sidecar, fmt, max_diff, tuple(filter(None, [task.notice])))


def _earlier_files(out: Path, source: dict[str, Any]) -> dict[str, str]:
    """{format: file} that earlier exports of the same weights wrote into `out`, which model.json goes on
    describing. Refused before anything is written: a model.json transferctl did not write, another run's or
    epoch's export (model.json would describe files it did not write), and a model file no model.json of these
    weights lists (it may be the user's own, and would be overwritten or described wrongly)."""
    sidecar = out / SIDECAR
    earlier = _export_record(sidecar)
    files = {} if earlier is None else _same_weights_files(earlier, sidecar, source)
    for name in FILE_NAMES.values():
        if name not in files.values() and _exists(out / name):
            why = f"no {SIDECAR} there says a transferctl export wrote it" if earlier is None else f"the {SIDECAR} there does not list it among its export's files"
            raise CheckpointError(Problem(str(out / name), f"exists, and {why}", "choose another --out, or remove the file"))
    return files


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link would still be written through


def _export_record(sidecar: Path) -> dict[str, Any] | None:
    """The model.json an earlier export wrote; None when there is none. Anything else there is refused."""
    if not _exists(sidecar):
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(Problem(str(sidecar), f"exists and cannot be read ({exc.strerror})", "choose another --out, or remove it")) from None
    except ValueError:
        record = None
    if not _is_export_record(record):
        raise CheckpointError(Problem(str(sidecar), "exists and is not a model.json that transferctl export wrote", "choose another --out, or remove the file"))
    return record


def _is_export_record(record: Any) -> bool:
    """The fields every transferctl export has written into model.json."""
    if not isinstance(record, dict) or not RECORD_FIELDS <= record.keys():
        return False
    source = record["source"]
    return isinstance(source, dict) and SOURCE_FIELDS <= source.keys() and record["format"] in FORMATS and isinstance(record["file"], str)


def _same_weights_files(earlier: dict[str, Any], sidecar: Path, source: dict[str, Any]) -> dict[str, str]:
    was = earlier["source"]
    if any(was.get(key) != source[key] for key in ("run_dir", "phase_index", "epoch")):
        raise CheckpointError(Problem(str(sidecar.parent), f"holds an export of {was.get('run_dir')} epoch {was.get('epoch')} ({was.get('checkpoint')}), "
                                      f"not of {source['run_dir']} epoch {source['epoch']} ({source['checkpoint']})",
                                      "choose another --out, or empty the folder first"))  # fmt: skip
    files = earlier.get("files") or {earlier["format"]: earlier["file"]}  # exports before `files` listed their one file
    return {fmt: name for fmt, name in files.items() if FILE_NAMES.get(fmt) == name} if isinstance(files, dict) else {}


def sidecar_payload(
    fmt: str, file: str, classes: list[str], preprocessing: dict[str, Any], checkpoint: Checkpoint, run_dir: Path, which: str, task: RunTask = RunTask(),
) -> dict[str, Any]:  # fmt: skip
    return {
        "format": fmt,
        "file": file,
        "task": task.name,
        "input": {"name": "images", "layout": "NCHW", "channels": "RGB", "dtype": "float32", "range": "[0, 1] before normalisation",
                  "shape": [None, 3, preprocessing["crop"], preprocessing["crop"]], "decoding": list(DECODING_STEPS)},
        "output": {"name": "logits", "shape": [None, len(classes)], ("sigmoid" if task.multi_label else "softmax"): "not applied"},
        "preprocessing": preprocessing,
        "classes": classes,
        # A label is given where sigmoid(logit) >= its class's threshold (tuned on val, or the default: RunTask.notice).
        **({"thresholds": dict(zip(classes, task.thresholds)), "thresholds_tuned": task.notice is None} if task.multi_label else {}),
        "backbone": checkpoint.backbone,
        "source": {"run_dir": str(run_dir.resolve()), "checkpoint": which, "phase_index": checkpoint.phase_index, "epoch": checkpoint.epoch},
    }  # fmt: skip


@torch.no_grad()
def _write_torchscript(model: nn.Module, example: torch.Tensor, target: Path) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; the file format is not
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(target))
        loaded = torch.jit.load(str(target), map_location="cpu")
    return _max_diff(model(example), loaded(example))


@torch.no_grad()
def _write_onnx(model: nn.Module, example: torch.Tensor, target: Path) -> float | None:
    try:
        import onnx  # noqa: F401 - the legacy exporter needs it
    except ImportError:
        raise ExportError(Problem("--format onnx", "needs the onnx package, which is not installed", "pip install 'transferctl[onnx]'")) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter: no onnxscript needed, dynamic batch axis, a single file.
            torch.onnx.export(model, (example,), str(target), dynamo=False, opset_version=ONNX_OPSET, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - an operator ONNX lacks: tell the user, keep the other formats
            raise ExportError(Problem("--format onnx", f"this model cannot be exported to ONNX: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                                      "use --format torchscript or safetensors")) from None  # fmt: skip
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": example.numpy()})
    return _max_diff(model(example), torch.from_numpy(logits))


def _write_safetensors(model: nn.Module, example: torch.Tensor, target: Path) -> float:
    from safetensors.torch import load_file, save_file

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(target))
    reloaded = load_file(str(target))
    return max((float((state[k].float() - reloaded[k].float()).abs().max()) for k in state if state[k].numel()), default=0.0)


def _max_diff(want: torch.Tensor, got: torch.Tensor) -> float:
    diff = float((want.float() - got.float()).abs().max())
    if diff > TOLERANCE:
        raise ExportError(Problem("export", f"the exported model's outputs differ from the PyTorch model's by {diff:.2g}", "please report this model"))
    return diff
