"""runs/checkpoint.py: the typed checkpoint, and its one reader, which never runs code a file carries."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from transferctl.errors import CheckpointError
from transferctl.runs.checkpoint import Checkpoint, LastCheckpoint, checkpoint_file, checkpoint_from_payload, load_run_checkpoint
from transferctl.runs.rundir import RunDir


def valid_checkpoint() -> dict[str, Any]:
    return {"model": {"fc.weight": torch.randn(2, 3), "fc.bias": torch.zeros(2)}, "classes": ["cat", "dog"], "epoch": 3}


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def test_load_run_checkpoint_reads_best_and_last(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.save_checkpoint("best", {**valid_checkpoint(), "epoch": 2})
    run.save_checkpoint("last", {**valid_checkpoint(), "epoch": 5})

    assert load_run_checkpoint(tmp_path).epoch == 2
    assert load_run_checkpoint(tmp_path, "last").epoch == 5
    assert load_run_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "last.pt")).epoch == 5


def test_checkpoint_file_resolves_names_and_paths(tmp_path: Path) -> None:
    assert checkpoint_file(tmp_path, "best") == tmp_path / "checkpoints" / "best.pt"
    assert checkpoint_file(tmp_path, "last") == tmp_path / "checkpoints" / "last.pt"
    assert checkpoint_file(tmp_path, "/elsewhere/x.pt") == Path("/elsewhere/x.pt")


def test_load_run_checkpoint_of_a_missing_run_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_run_checkpoint(tmp_path / "missing")


def test_load_run_checkpoint_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at") as info:
        load_run_checkpoint(tmp_path, "last", where="--run")
    assert info.value.problems[0].where == "--run"
    assert str(tmp_path / "checkpoints" / "last.pt") in str(info.value)


@pytest.mark.parametrize("payload", [{"weights": torch.zeros(1)}, {"model": {}}, [torch.zeros(1)], torch.zeros(2)])
def test_load_run_checkpoint_of_a_foreign_file_is_refused(tmp_path: Path, payload: Any) -> None:
    path = tmp_path / "checkpoints" / "best.pt"
    path.parent.mkdir()
    torch.save(payload, path)

    with pytest.raises(CheckpointError, match="not a transferctl checkpoint"):
        load_run_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is a text file", b"PK\x03\x04 truncated zip", b"\x80\x02}q\x00(X\x01"],
    ids=["empty", "text", "truncated-zip", "truncated-pickle"],
)
def test_load_run_checkpoint_of_a_damaged_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "checkpoints" / "best.pt"
    path.parent.mkdir()
    path.write_bytes(content)

    with pytest.raises(CheckpointError) as info:
        load_run_checkpoint(tmp_path)
    assert str(path) in str(info.value)


def test_truncated_real_checkpoint_is_refused_in_a_sentence_of_ours(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    path = RunDir(tmp_path).save_checkpoint("best", valid_checkpoint())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(CheckpointError) as info:
        load_run_checkpoint(tmp_path)
    # torch's own text ran on for three sentences and was cut mid-word
    assert str(info.value) == f"{tmp_path}: cannot read {path}: the file ends early, as one cut off by an interrupted copy or a full disk does (the file is damaged or not a PyTorch file)"
    assert not recwarn.list


def test_a_torchscript_archive_is_refused_in_one_line_without_torchs_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    path = tmp_path / "checkpoints" / "best.pt"
    path.parent.mkdir()
    with pytest.warns(FutureWarning):  # torch.jit is deprecated; making the archive warns, not loading it
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    recwarn.clear()

    with pytest.raises(CheckpointError) as info:
        load_run_checkpoint(tmp_path)
    assert str(info.value) == f"{tmp_path}: refused to load {path}: a TorchScript archive holds code, which loading it would run (save model.state_dict() instead)"
    assert not recwarn.list


@pytest.mark.parametrize("damage", ["opcode", "pickle-protocol-4"])
def test_a_pickle_instruction_the_safe_loader_refuses_is_said_in_one_line(tmp_path: Path, damage: str, recwarn: pytest.WarningsRecorder) -> None:
    path = RunDir(tmp_path).save_checkpoint("best", valid_checkpoint())
    data = bytearray(path.read_bytes())
    if damage == "opcode":
        header = next(info for info in zipfile.ZipFile(path).infolist() if info.filename.endswith("/data.pkl")).header_offset
        name_length, extra_length = struct.unpack_from("<HH", data, header + 26)  # of the entry's local header
        start = header + 30 + name_length + extra_length + 20  # into the pickle's bytes (torch stores entries uncompressed)
        data[start : start + 4] = b"\xff" * 4  # no such pickle opcode
    else:  # plain pickle frames its data, which the safe loader does not read (and warned about, on two lines)
        data = bytearray(pickle.dumps({"model": {}, "classes": ["a", "b"]}, protocol=4))
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError) as info:
        load_run_checkpoint(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: refused to load {path}: its pickle has an instruction that torch's safe loader does not run "
        "(a damaged file, or one pickled without torch.save) (save plain tensors with torch.save(model.state_dict()) or as safetensors)"
    )  # it was called a file that could run code, in torch's paragraph cut mid-word
    assert not recwarn.list


def test_malicious_payload_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """The payload used below is live: plain pickle runs it. So its refusal below means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCode(marker)))

    assert marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"model": RunsCode(marker), "classes": ["cat", "dog"]}
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(payload, handle, protocol=2)

    with pytest.raises(CheckpointError, match="refused to load") as info:
        load_run_checkpoint(tmp_path / "run")

    assert str(path) in str(info.value)
    assert f"could run code (it names {os.system.__module__}.system)" in str(info.value)  # the code it names, not torch's paragraph
    assert not marker.exists()


def test_a_checkpoint_round_trips_through_its_payload_in_the_files_order() -> None:
    last = LastCheckpoint(format=2, model={"fc.bias": torch.zeros(2)}, classes=["cat", "dog"], phase_index=1, epoch=2, scaler=None, rows=[{"epoch": 1}])

    payload = last.to_payload()

    assert list(payload)[:3] == ["format", "model", "classes"] and list(payload)[-3:] == ["rows", "elapsed", "ema"]
    assert payload["scaler"] is None and payload["model"] is last.model  # tensors are never copied here
    assert checkpoint_from_payload(payload) == last


def test_an_earlier_versions_payload_reads_with_defaults_and_without_resume_state() -> None:
    read = checkpoint_from_payload({"model": {}, "classes": ["a"], "a_key_of_another_time": 1})

    assert type(read) is Checkpoint and read.backbone == {} and read.preprocessing is None and read.epoch is None
