from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from runs_helpers import ONE_EPOCH, constant_run, train_tiny_run
from transferctl.cli import app
from transferctl.synthetic import tiny_dataset

runner = CliRunner()

CLASSES = ["blue", "green", "red"]
LOGITS = [0.0, 1.0, 2.0]  # every image: red, then green, then blue
PROBS = [math.exp(v) / sum(math.exp(w) for w in LOGITS) for v in LOGITS]

LINE_SCHEMA = {
    "oneOf": [
        {
            "type": "object",
            "required": ["path", "label", "score", "top"],
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string"},
                "label": {"type": "string"},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "top": {"type": "array", "minItems": 1, "items": {
                    "type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}], "minItems": 2, "maxItems": 2,
                }},
            },
        },
        {
            "type": "object",
            "required": ["path", "error"],
            "additionalProperties": False,
            "properties": {"path": {"type": "string"}, "error": {"type": "string"}},
        },
    ]
}  # fmt: skip


def invoke(*args: object, input: str | None = None):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that answers red (p = 0.665), green, blue for every image."""
    base = tmp_path_factory.mktemp("predict")
    return constant_run(train_tiny_run(base, schedule=ONE_EPOCH), base / "constant", CLASSES, LOGITS)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """tmp_path/imgs: six images, 00.png ... 05.png, and a corrupt 03-broken.png among them."""
    source = tiny_dataset(tmp_path / "source", n_classes=3, per_class=2, layout="flat")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for index, path in enumerate(sorted(source.glob("*/*.png"))):
        (folder / f"{index:02d}.png").write_bytes(path.read_bytes())
    (folder / "03-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return folder


def check_prediction(record: dict[str, object], top_k: int) -> None:
    jsonschema.validate(record, LINE_SCHEMA)
    assert record["label"] == "red" and record["score"] == pytest.approx(PROBS[2], abs=1e-5)
    expected = [["red", PROBS[2]], ["green", PROBS[1]], ["blue", PROBS[0]]][:top_k]
    assert [label for label, _ in record["top"]] == [label for label, _ in expected]  # type: ignore[union-attr]
    assert [score for _, score in record["top"]] == pytest.approx([score for _, score in expected], abs=1e-5)  # type: ignore[union-attr]


def test_predict_in_a_real_shell_pipeline_with_a_corrupt_file(run: Path, images: Path) -> None:
    python = shlex.quote(sys.executable)
    script = (
        f"set -o pipefail; find {shlex.quote(str(images))} -name '*.png' | sort "
        f"| {python} -m transferctl predict {shlex.quote(str(run))} - --batch-size 2 --top-k 2 --device cpu "
        f"| {python} -c 'import sys; sys.stdout.write(sys.stdin.read())'"
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # one input failed; the others were still predicted
    records = [json.loads(line) for line in done.stdout.splitlines()]
    names = [Path(r["path"]).name for r in records]
    assert names == ["00.png", "01.png", "02.png", "03-broken.png", "03.png", "04.png", "05.png"]
    broken = records[3]
    jsonschema.validate(broken, LINE_SCHEMA)
    assert "label" not in broken and "not an image" in broken["error"]
    for record in records[:3] + records[4:]:
        check_prediction(record, top_k=2)
    assert "03-broken.png" in done.stderr and "1 of 7 inputs could not be read" in done.stderr


def test_folders_expand_and_all_good_inputs_exit_0(run: Path, images: Path) -> None:
    (images / "03-broken.png").unlink()
    result = invoke("predict", run, images, "--device", "cpu")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 6
    for record in records:
        check_prediction(record, top_k=3)  # --top-k 5 is capped at the 3 classes


def test_unreadable_inputs_become_error_lines(run: Path, images: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    inputs = [images / "00.png", notes, tmp_path / "missing.png", images / "01.png"]
    result = invoke("predict", run, "-", "--device", "cpu", input="".join(f"{p}\n" for p in inputs) + "\n")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in inputs]
    assert [("error" in r) for r in records] == [False, True, True, False]
    assert records[2]["error"] == "no such file"
    assert result.stderr.count("error:") == 2


def test_strict_stops_at_the_first_failure(run: Path, images: Path) -> None:
    paths = sorted(str(p) for p in images.iterdir())
    result = invoke("predict", run, *paths, "--strict", "--batch-size", "1", "--device", "cpu")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 4 and "error" in records[-1] and "--strict" in result.stderr


def test_usage_errors(run: Path, images: Path) -> None:
    assert invoke("predict", run).exit_code == 2
    assert invoke("predict", run, "-", images / "00.png").exit_code == 2
    result = invoke("predict", images, images / "00.png")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == f"error: {images}: no checkpoints/ folder: not a transferctl run directory, or no epoch has finished yet (pass a folder that `transferctl train` wrote)"


def test_misspelt_device_and_precision_are_user_errors(run: Path, images: Path) -> None:
    result = invoke("predict", run, images, "--device", "gpu")
    assert result.exit_code == 1 and "--device: 'gpu' is not a device" in result.stderr
    result = invoke("predict", run, images, "--precision", "fp8")
    assert result.exit_code == 1 and "--precision" in result.stderr
