from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from runs_helpers import ONE_EPOCH, constant_run, train_tiny_run
from transferctl.cli import app
from transferctl.testing.synthetic import tiny_dataset

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
def run(module_tmp_path: Path) -> Path:
    """A run that answers red (p = 0.665), green, blue for every image."""
    base = module_tmp_path
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


def test_a_folder_without_images_is_an_error_line(run: Path, images: Path, tmp_path: Path) -> None:
    empty, notes = tmp_path / "empty", tmp_path / "notes"
    empty.mkdir()
    notes.mkdir()
    (notes / "readme.txt").write_text("no images here")
    result = invoke("predict", run, empty, images / "00.png", notes, "--device", "cpu")
    assert result.exit_code == 1  # it passed without a word, exit 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(empty), str(images / "00.png"), str(notes)]
    assert records[0] == {"path": str(empty), "error": "a folder with no images in it"} and "label" in records[1]
    assert result.stderr.splitlines() == [f"error: {empty}: a folder with no images in it", f"error: {notes}: a folder with no images in it", "2 of 3 inputs could not be read"]


def test_a_file_name_with_a_newline_keeps_its_error_on_one_line(run: Path, tmp_path: Path) -> None:
    odd = tmp_path / "bad\nname.png"
    odd.write_bytes(b"not an image")
    result = invoke("predict", run, odd, "--device", "cpu")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["path"] == str(odd)  # JSON keeps the name as it is
    assert result.stderr.splitlines()[0] == f"error: {tmp_path}/bad\\nname.png: not an image (or a format Pillow cannot read)"


def test_a_name_too_long_or_a_symlink_loop_on_stdin_is_an_error_line_among_the_others(run: Path, images: Path, tmp_path: Path) -> None:
    """The reader thread's OSError (File name too long) used to end the command, losing the records before it."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    inputs = [images / "00.png", tmp_path / ("n" * 300), loop / "x.png", images / "01.png"]

    result = invoke("predict", run, "-", "--device", "cpu", "--batch-size", "1", input="".join(f"{p}\n" for p in inputs))

    assert result.exit_code == 1 and "Traceback" not in result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in inputs] and "label" in records[0] and "label" in records[3]
    assert records[1]["error"] == "has a name of 300 bytes, where file systems allow 255"
    assert records[2]["error"] == "runs into a symlink loop: links that lead back to each other"
    assert result.stderr.splitlines()[0] == f"error: {tmp_path}/{'n' * 22}...{'n' * 22}: has a name of 300 bytes, where file systems allow 255"


def test_a_fifo_is_an_error_line_not_a_wait_for_ever(run: Path, images: Path, tmp_path: Path) -> None:
    """open() on a FIFO waits for a writer: given alone or in a folder, predict used to hang. A child
    process, so that a regression fails on its timeout instead of hanging the tests."""
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    os.mkfifo(images / "02-fifo.png")
    command = [sys.executable, "-m", "transferctl", "predict", str(run), str(fifo), str(images / "00.png"), str(images), "--device", "cpu"]

    done = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1, done.stderr
    records = {record["path"]: record for record in map(json.loads, done.stdout.splitlines())}
    fifo_error = "a FIFO (named pipe), not a regular file"
    assert records[str(fifo)] == {"path": str(fifo), "error": fifo_error} == {**records[str(images / "02-fifo.png")], "path": str(fifo)}
    assert "label" in records[str(images / "00.png")] and len(records) == 9  # fifo, 00.png, the folder's 7 entries


def test_strict_stops_at_the_first_failure(run: Path, images: Path) -> None:
    paths = sorted(str(p) for p in images.iterdir())
    result = invoke("predict", run, *paths, "--strict", "--batch-size", "1", "--device", "cpu")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 4 and "error" in records[-1] and "--strict" in result.stderr


def test_ctrl_c_while_waiting_for_paths_exits_130(run: Path, images: Path, heeded_sigint: None) -> None:
    import signal

    command = [sys.executable, "-m", "transferctl", "predict", str(run), "-", "--batch-size", "1", "--device", "cpu"]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        child.stdin.write(f"{images / '00.png'}\n")
        child.stdin.flush()
        assert json.loads(child.stdout.readline())["path"] == str(images / "00.png")  # stdin stays open
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, stderr  # twice -6 (SIGABRT) in the teardown before it was skipped: keep what it said
    assert "interrupted" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("reading_stdin", [True, False])
def test_ctrl_c_leaves_without_teardown_only_while_a_thread_reads_stdin(reading_stdin: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from transferctl.cli import predict as command

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    try:
        with command._leaving_at_once_on_ctrl_c(reading_stdin):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        exits.append(-1)  # left to the shared handler, which exits 130 the usual way
    assert exits == ([130] if reading_stdin else [-1])


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


# --------------------------------------------------------------------------- decoding ahead on threads


class CountingPaths:
    """An iterator of paths that counts how many were taken (as `find | predict -` hands them over)."""

    def __init__(self, paths: list[str]) -> None:
        self._paths, self.taken = iter(paths), 0

    def __iter__(self) -> CountingPaths:
        return self

    def __next__(self) -> str:
        path = next(self._paths)
        self.taken += 1
        return path


def pixel_predictor(decode_threads: int, transform_calls: list[str] | None = None, delay: float = 0.0):  # noqa: ANN201
    """A Predictor whose 'model' scores each image by its mean colour; slower decoding for earlier files."""
    import time

    import torch
    from PIL import Image

    from transferctl.training.runtime import Runtime
    from transferctl.inference.predict import Predictor

    def transform(image: Image.Image) -> torch.Tensor:
        if transform_calls is not None:
            transform_calls.append(image.filename if hasattr(image, "filename") else "")
        time.sleep(delay)
        return torch.as_tensor(list(image.resize((1, 1)).getpixel((0, 0))), dtype=torch.float32) / 255

    model = torch.nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3) * 10)
        model.bias.zero_()
    return Predictor(model, ["r", "g", "b"], transform, Runtime(torch.device("cpu"), "fp32", False), 3, decode_threads)


@pytest.fixture
def many_images(tmp_path: Path) -> list[str]:
    source = tiny_dataset(tmp_path / "many", n_classes=3, per_class=6, layout="flat")
    paths = sorted(str(p) for p in source.glob("*/*.png"))
    return paths + [str(tmp_path / "missing.png")] + paths[:3]


def test_threads_give_the_same_records_in_input_order(many_images: list[str]) -> None:
    alone = list(pixel_predictor(0).predict(many_images, batch_size=4))
    threaded = list(pixel_predictor(3).predict(many_images, batch_size=4))
    assert [r["path"] for r in threaded] == many_images
    assert threaded == alone
    assert threaded[len(many_images) - 4] == {"path": many_images[-4], "error": "no such file"}


def test_decoding_runs_at_most_one_batch_ahead(many_images: list[str]) -> None:
    import time

    paths = CountingPaths(many_images)
    records = pixel_predictor(2).predict(paths, batch_size=3)
    next(records)
    time.sleep(0.5)  # the reader thread takes what the bound lets it
    # The first batch, the next one queued, and the one the reader holds until there is room.
    assert paths.taken == 2 * 3 + 1 < len(many_images)
    records.close()


def test_a_waiting_input_does_not_hold_back_decoded_files(many_images: list[str]) -> None:
    import threading

    more = threading.Event()

    def slow_input() -> Iterator[str]:  # two paths, then nothing until `more` (a `find` still searching)
        yield from many_images[:2]
        assert more.wait(timeout=30)
        yield from many_images[2:4]

    records = pixel_predictor(2).predict(slow_input(), batch_size=1)
    assert [next(records)["path"] for _ in range(2)] == many_images[:2]
    more.set()
    assert [r["path"] for r in records] == many_images[2:4]


def test_an_error_while_reading_the_paths_comes_after_the_paths_before_it(many_images: list[str]) -> None:
    def failing_input() -> Iterator[str]:
        yield many_images[0]
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    records = pixel_predictor(2).predict(failing_input(), batch_size=1)
    assert next(records)["path"] == many_images[0]
    with pytest.raises(UnicodeDecodeError):
        next(records)


def test_stopping_early_skips_files_not_yet_decoding(many_images: list[str]) -> None:
    calls: list[str] = []
    records = pixel_predictor(1, calls, delay=0.05).predict(many_images, batch_size=1)
    next(records)
    records.close()  # what --strict and a closed pipe do
    assert len(calls) <= 3 < len(many_images)


def test_a_bug_in_the_transform_is_not_an_error_record(many_images: list[str]) -> None:
    predictor = pixel_predictor(2)

    def broken(image: object) -> object:
        raise KeyError("a bug, not a damaged file")

    predictor.transform = broken
    with pytest.raises(KeyError, match="a bug"):
        list(predictor.predict(many_images, batch_size=4))


def test_one_core_is_left_to_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from transferctl.inference import predict

    for cores, threads in ((1, 1), (2, 1), (4, 3), (64, 8)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert predict.default_decode_threads() == threads


def test_a_file_name_that_is_not_utf8_is_still_valid_json_in_utf8() -> None:
    import os

    from transferctl.cli.predict import json_line

    latin1 = os.fsdecode(b"photos/caf\xe9.png")  # a Latin-1 name: Python holds the byte as a lone surrogate
    line = json_line({"path": latin1, "label": "caf\u00e9"})
    assert os.fsencode(json.loads(line.encode("utf-8").decode("utf-8"))["path"]) == b"photos/caf\xe9.png"
    assert json_line({"path": "photos/caf\u00e9.png"}) == '{"path": "photos/caf\u00e9.png"}'  # UTF-8 names stay readable


# ---------------------------------------------------------------------------------------------
# Test-time augmentation (--tta)


def test_tta_records_hold_the_probabilities_averaged_over_the_image_and_its_flip(many_images: list[str]) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from transferctl.inference.predict import Predictor
    from transferctl.training.runtime import Runtime

    def transform(image: Image.Image) -> torch.Tensor:  # the left and right halves' mean colours: (3, 1, 2)
        return torch.as_tensor(np.array(image.resize((2, 1))), dtype=torch.float32).permute(2, 0, 1) / 255

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    paths = many_images[:5]
    predictor = Predictor(model, ["r", "g", "b"], transform, Runtime(torch.device("cpu"), "fp32", False), 3, 0, tta="flip")
    records = list(predictor.predict(paths, batch_size=2))
    with torch.no_grad():
        images = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
        expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
    assert [record["tta"] for record in records] == ["flip"] * 5
    assert [record["score"] for record in records] == pytest.approx(expected.max(1).values.tolist(), abs=1e-6)
    plain = list(Predictor(model, ["r", "g", "b"], transform, Runtime(torch.device("cpu"), "fp32", False), 3, 0).predict(paths, batch_size=2))
    assert "tta" not in plain[0] and [r["score"] for r in plain] != pytest.approx([r["score"] for r in records], abs=1e-6)


def test_predict_tta_on_the_command_line(run: Path, images: Path) -> None:
    result = invoke("predict", run, images / "00.png", "--tta", "flip", "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["tta"] == "flip" and record["label"] == "red"  # the constant run: both views give its logits
    result = invoke("predict", run, images / "00.png", "--tta", "mirror", "--device", "cpu")
    assert result.exit_code == 1 and result.stdout == "" and "--tta: 'mirror' is not a test-time augmentation" in result.stderr


# ---------------------------------------------------------------------------------------------
# Multi-label runs


@pytest.fixture(scope="module")
def multi_label(module_tmp_path: Path) -> Path:
    from helpers import multi_label_run

    return multi_label_run(module_tmp_path / "multi-label")


def sigmoid_scores(run: Path, paths: list[Path], checkpoint: str = "best") -> tuple[list[str], list[float], list[list[float]]]:
    """The classes, the thresholds best.pt carries and each image's sigmoid scores, computed here."""
    import torch

    from transferctl.data.folders import open_rgb
    from transferctl.inference.trained_model import eval_transform, load_trained_model

    model, classes, preprocessing = load_trained_model(run, checkpoint)
    thresholds = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["best"]["thresholds"]
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.stack([eval_transform(preprocessing)(open_rgb(path)) for path in paths])))
    return classes, thresholds, scores.double().tolist()


def test_a_multi_label_run_gives_every_label_at_or_above_its_threshold(multi_label: Path) -> None:
    paths = sorted((multi_label.parent / "data" / "images").glob("*.png"))
    result = invoke("predict", multi_label, multi_label.parent / "data" / "images", "--device", "cpu")
    assert result.exit_code == 0 and "note:" not in result.stderr, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    classes, thresholds, scores = sigmoid_scores(multi_label, paths)
    assert len(set(thresholds)) == 3 and 0.5 not in thresholds  # tuned: a 0.5 default would not show they are used
    for path, record, image in zip(paths, records, scores):
        want = sorted((name for name, score, cut in zip(classes, image, thresholds) if score >= cut), key=lambda name: -image[classes.index(name)])
        assert record["path"] == str(path) and [name for name, _ in record["labels"]] == want
        assert [score for _, score in record["labels"]] == pytest.approx([image[classes.index(name)] for name in want], abs=1e-5)
        assert list(record["scores"]) == classes and list(record["scores"].values()) == pytest.approx(image, abs=1e-5)
    assert {len(record["labels"]) for record in records} >= {1, 2}  # images with one label and with several


def test_weights_the_thresholds_were_not_tuned_for_use_0_5_with_one_note(multi_label: Path) -> None:
    path = sorted((multi_label.parent / "data" / "images").glob("*.png"))[0]
    result = invoke("predict", multi_label, path, "--checkpoint", "last", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("note:") == 1 and "0.5" in result.stderr
    classes, _, (image,) = sigmoid_scores(multi_label, [path], "last")
    assert {name for name, _ in json.loads(result.stdout)["labels"]} == {name for name, score in zip(classes, image) if score >= 0.5}


def test_multi_label_tta_averages_the_sigmoid_scores(many_images: list[str]) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from transferctl.inference.predict import Predictor
    from transferctl.inference.trained_model import RunTask
    from transferctl.training.runtime import Runtime

    def transform(image: Image.Image) -> torch.Tensor:
        return torch.as_tensor(np.array(image.resize((2, 1))), dtype=torch.float32).permute(2, 0, 1) / 255

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    predictor = Predictor(model, ["r", "g", "b"], transform, Runtime(torch.device("cpu"), "fp32", False), 3, 0, tta="flip", task=RunTask(True, (0.3, 0.4, 0.7)))
    records = list(predictor.predict(many_images[:4], batch_size=2))
    with torch.no_grad():
        images = torch.stack([transform(Image.open(path).convert("RGB")) for path in many_images[:4]])
        expected = (model(images).sigmoid() + model(images.flip(-1)).sigmoid()) / 2
    assert [score for record in records for score in record["scores"].values()] == pytest.approx(expected.flatten().tolist(), abs=1e-6)
    assert [[name for name, _ in record["labels"]] for record in records] == [
        sorted((name for name, score, cut in zip("rgb", row, (0.3, 0.4, 0.7)) if score >= cut), key=lambda name: -row["rgb".index(name)]) for row in expected.tolist()
    ]
