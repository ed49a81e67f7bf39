"""data/folders.py: finding classes and splits, decoding every image mode to RGB, transforms, datasets."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferctl.data.preprocessing import Preprocessing
from transferctl.data.folders import (
    DatasetSplits,
    EpochSampler,
    ImageDataset,
    build_transform,
    data_notices,
    discover,
    is_image_file,
    list_images,
    make_loader,
    open_rgb,
    resolve_workers,
    stratified_split,
    to_rgb,
    transform_names,
    worker_error,
)
from transferctl.config import AUGMENTS
from transferctl.errors import DataError
from transferctl.testing.synthetic import tiny_dataset

PREPROCESSING = Preprocessing(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def write_png(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def write_class_tree(root: Path, per_class: dict[str, int]) -> Path:
    """root/<class>/NN.png with the given number of images per class."""
    for name, count in per_class.items():
        for index in range(count):
            write_png(root / name / f"{index:02d}.png")
    return root


def labels_per_class(samples: list[tuple[Path, int]]) -> Counter[int]:
    return Counter(label for _, label in samples)


# --------------------------------------------------------------------------- split layout


def test_split_layout_reads_train_val_and_test(tiny_split_data: Path) -> None:
    splits = discover(tiny_split_data, val_fraction=0.2, seed=0)

    assert splits.layout == "split"
    assert splits.classes == ["blue", "green", "red"]
    assert splits.counts() == {"train": 12, "val": 3, "test": 3}
    for name in ("train", "val", "test"):
        for path, label in splits.split(name):
            assert path.parent.name == splits.classes[label]
            assert path.parent.parent.name == name


def test_split_layout_without_test_has_empty_test(tmp_path: Path) -> None:
    root = tiny_dataset(tmp_path / "data", n_classes=2, per_class=5, layout="split")

    splits = discover(root, val_fraction=0.2, seed=0)

    assert splits.test == []
    assert splits.counts()["val"] == 2


def test_split_layout_ignores_val_fraction_and_seed(tiny_split_data: Path) -> None:
    first = discover(tiny_split_data, val_fraction=0.2, seed=0)
    second = discover(tiny_split_data, val_fraction=0.5, seed=7)

    assert first == second


def test_train_without_val_is_refused(tmp_path: Path) -> None:
    write_class_tree(tmp_path / "data" / "train", {"cat": 2, "dog": 2})

    with pytest.raises(DataError, match="no val/ folder") as info:
        discover(tmp_path / "data", val_fraction=0.2, seed=0)
    assert str(tmp_path / "data") in str(info.value)
    assert info.value.problems[0].where == "data.root"


def test_val_classes_differing_from_train_name_missing_and_extra(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "train", {"cat": 2, "dog": 2, "fox": 2})
    write_class_tree(root / "val", {"cat": 1, "dog": 1, "owl": 1})

    with pytest.raises(DataError) as info:
        discover(root, val_fraction=0.2, seed=0)

    message = str(info.value)
    assert info.value.problems[0].where == "data.root/val"
    assert "missing ['fox']" in message
    assert "extra ['owl']" in message


def test_test_classes_differing_from_train_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "train", {"cat": 2, "dog": 2})
    write_class_tree(root / "val", {"cat": 1, "dog": 1})
    write_class_tree(root / "test", {"cat": 1, "dog": 1, "emu": 1})

    with pytest.raises(DataError, match=r"extra \['emu'\]") as info:
        discover(root, val_fraction=0.2, seed=0)
    assert info.value.problems[0].where == "data.root/test"
    assert "missing" not in str(info.value)


def test_empty_class_folder_in_val_is_named(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "train", {"cat": 2, "dog": 2})
    write_class_tree(root / "val", {"cat": 1})
    (root / "val" / "dog").mkdir()

    with pytest.raises(DataError, match="has no images") as info:
        discover(root, val_fraction=0.2, seed=0)
    assert str(root / "val" / "dog") in str(info.value)


# --------------------------------------------------------------------------- flat layout


def test_flat_layout_is_split_by_val_fraction(tiny_flat_data: Path) -> None:
    splits = discover(tiny_flat_data, val_fraction=1 / 3, seed=0)

    assert splits.layout == "flat"
    assert splits.classes == ["blue", "green", "red"]
    assert splits.counts() == {"train": 12, "val": 6, "test": 0}
    assert not set(splits.train) & set(splits.val)
    assert labels_per_class(splits.val) == {0: 2, 1: 2, 2: 2}  # stratified: 2 of 6 from each class


def test_flat_split_is_deterministic_for_a_seed(tiny_flat_data: Path) -> None:
    first = discover(tiny_flat_data, val_fraction=0.34, seed=3)
    again = discover(tiny_flat_data, val_fraction=0.34, seed=3)

    assert first == again
    other_seeds = [discover(tiny_flat_data, val_fraction=0.34, seed=seed).val for seed in range(4, 10)]
    assert any(val != first.val for val in other_seeds)


def test_flat_split_does_not_depend_on_sample_order(tmp_path: Path) -> None:
    samples = [(tmp_path / f"{label}-{index}.png", label) for label in range(3) for index in range(10)]

    forward = stratified_split(samples, val_fraction=0.3, seed=11)
    backward = stratified_split(list(reversed(samples)), val_fraction=0.3, seed=11)

    assert forward == backward


def test_stratified_split_keeps_a_training_image_in_every_class(tmp_path: Path) -> None:
    samples = [(tmp_path / "a0.png", 0), (tmp_path / "b0.png", 1), (tmp_path / "b1.png", 1)]
    samples += [(tmp_path / f"c{index}.png", 2) for index in range(5)]

    train, val = stratified_split(samples, val_fraction=0.9, seed=0)

    assert labels_per_class(train) == {0: 1, 1: 1, 2: 1}
    assert labels_per_class(val) == {1: 1, 2: 4}
    assert sorted(train + val) == sorted(samples)


def test_stratified_split_with_no_validation_images_is_refused(tmp_path: Path) -> None:
    samples = [(tmp_path / "a.png", 0), (tmp_path / "b.png", 1)]  # one image per class: all stay in train

    with pytest.raises(DataError) as caught:
        stratified_split(samples, val_fraction=0.5, seed=0)
    assert str(caught.value) == (
        "data.root: every class has one image, which training keeps: none is left to validate on "
        "(add a second image to a class or more, or give data.root train/ and val/ folders)"
    )  # not 'raise val_fraction', which cannot help


def test_flat_layout_with_zero_val_fraction_is_refused(tiny_flat_data: Path) -> None:
    with pytest.raises(DataError, match="no validation images"):
        discover(tiny_flat_data, val_fraction=0.0, seed=0)


def write_run(run: Path, plot: bool = True) -> Path:
    """What train and report leave in a run directory, a PNG plot among them."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    if plot:
        write_png(run / "curves.png")
    return run


def test_runs_inside_a_flat_data_folder_are_not_classes(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "photos", {"cat": 5, "dog": 5})
    write_run(root / "runs" / "exp-20240309-070503")  # init's output.dir when the experiment file sits in the data folder
    write_run(root / "my-run", plot=False)  # a --run-dir there
    write_png(root / "dog" / "2019" / "nested.png")  # a class folder with folders of images stays a class

    splits = discover(root, val_fraction=0.2, seed=0)

    assert splits.classes == ["cat", "dog"] and splits.run_folders == (root / "my-run", root / "runs")
    assert all("runs" not in path.parts for path, _ in splits.train + splits.val) and len(splits.train + splits.val) == 11
    assert data_notices(splits) == [f"data.root: left out {root / 'my-run'}, {root / 'runs'}: transferctl runs, not a class"]


def test_runs_inside_a_split_layout_are_not_classes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        write_class_tree(root / split, {"cat": 2, "dog": 2})
    write_run(root / "train" / "runs" / "exp-1")

    splits = discover(root, val_fraction=0.2, seed=0)

    assert splits.classes == ["cat", "dog"] and splits.run_folders == (root / "train" / "runs",)


# --------------------------------------------------------------------------- folder errors


def test_missing_root_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(DataError) as info:
        discover(missing, val_fraction=0.2, seed=0)

    assert info.value.problems[0].where == "data.root"
    assert str(missing) in str(info.value)


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "data.zip"
    file.write_bytes(b"PK")

    with pytest.raises(DataError, match=f"data.root: {file} is a file, not a folder"):  # not "no such folder": it is there
        discover(file, val_fraction=0.2, seed=0)


@pytest.mark.parametrize(("class_names", "expected"), [([], "has no images"), (["only"], "at least two class folders, found only 'only'")])
def test_fewer_than_two_classes_is_refused(tmp_path: Path, class_names: list[str], expected: str) -> None:
    root = write_class_tree(tmp_path / "data", {name: 3 for name in class_names})
    root.mkdir(exist_ok=True)
    (root / ".hidden").mkdir()  # hidden folders are not classes
    write_png(root / ".hidden" / "a.png")

    with pytest.raises(DataError, match=expected) as info:
        discover(root, val_fraction=0.2, seed=0)
    assert str(root) in str(info.value)


def test_fewer_than_two_classes_in_train_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "train", {"cat": 2})
    write_class_tree(root / "val", {"cat": 1})

    with pytest.raises(DataError, match="at least two class folders") as info:
        discover(root, val_fraction=0.2, seed=0)
    assert info.value.problems[0].where == "data.root/train"


def test_class_folder_without_images_is_named(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "data", {"cat": 3})
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no pictures here")
    write_png(root / "dog" / ".hidden.png")

    with pytest.raises(DataError, match="has no images") as info:
        discover(root, val_fraction=0.2, seed=0)
    assert str(root / "dog") in str(info.value)


# --------------------------------------------------------------------------- what counts as an image


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.png", True),
        ("b.JPG", True),
        ("c.jpeg", True),
        ("d.webp", True),
        ("e.TIFF", True),
        ("notes.txt", False),
        ("Thumbs.db", False),
        ("archive.png.zip", False),
        ("no_suffix", False),
        (".DS_Store", False),
        ("._a.png", False),  # macOS AppleDouble metadata, not an image
        (".hidden.jpg", False),
    ],
)
def test_is_image_file(name: str, expected: bool) -> None:
    assert is_image_file(Path(name)) is expected


def test_non_image_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    for junk in ("notes.txt", ".DS_Store", "._00.png", "labels.csv"):
        (root / "cat" / junk).write_bytes(b"not an image")
    write_png(root / "cat" / ".cache" / "thumb.png")  # inside a hidden folder

    splits = discover(root, val_fraction=0.34, seed=0)

    every_path = [path for path, _ in splits.train + splits.val]
    assert len(every_path) == 6
    assert all(not part.startswith(".") for path in every_path for part in path.relative_to(root).parts)


def test_images_in_nested_subfolders_are_found(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "data", {"dog": 2})
    write_png(root / "cat" / "2023" / "summer" / "a.png")
    write_png(root / "cat" / "2024" / "b.png")

    splits = discover(root, val_fraction=0.5, seed=0)

    cat_paths = sorted(path for path, label in splits.train + splits.val if label == 0)
    assert cat_paths == [root / "cat" / "2023" / "summer" / "a.png", root / "cat" / "2024" / "b.png"]


def test_list_images_is_sorted_and_recursive(tmp_path: Path) -> None:
    folder = tmp_path / "cls"
    for relative in ("z.png", "a.png", "sub/m.png", "sub/deeper/b.png"):
        write_png(folder / relative)

    assert list_images(folder) == sorted(folder / relative for relative in ("z.png", "a.png", "sub/m.png", "sub/deeper/b.png"))


def test_symlinked_folder_loop_does_not_hang(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    (root / "dog" / "up").symlink_to(root, target_is_directory=True)

    assert list_images(root / "cat") == [root / "cat" / "00.png", root / "cat" / "01.png"]
    splits = discover(root, val_fraction=0.5, seed=0)
    assert splits.counts()["train"] + splits.counts()["val"] == 4


def test_symlinked_folders_are_not_followed_and_are_named(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "data", {"cat": 2, "dog": 3})
    elsewhere = write_class_tree(tmp_path / "elsewhere", {"bird": 2})
    (root / "all").symlink_to(root, target_is_directory=True)  # a link to the root: a class of copies of every image
    (root / "bird").symlink_to(elsewhere / "bird", target_is_directory=True)
    (root / "dog" / "more").symlink_to(elsewhere / "bird", target_is_directory=True)

    splits = discover(root, val_fraction=0.5, seed=0)

    assert splits.classes == ["cat", "dog"] and len(splits.train + splits.val) == 5
    assert splits.linked == (root / "all", root / "bird", root / "dog" / "more")
    assert data_notices(splits)[-1] == (f"data.root: left out 3 symlinked folders, not followed: {root / 'all'}, {root / 'bird'}, {root / 'dog' / 'more'} "
                                        "(copy or move the images there to use them)")  # fmt: skip


def test_symlinked_split_folders_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        write_class_tree(root / split, {"cat": 2, "dog": 2})
    (root / "test").symlink_to(root / "val", target_is_directory=True)
    (root / "train" / "cats-too").symlink_to(root / "train" / "cat", target_is_directory=True)

    splits = discover(root, val_fraction=0.2, seed=0)

    assert splits.classes == ["cat", "dog"] and splits.test == [] and splits.linked == (root / "test", root / "train" / "cats-too")
    (root / "val").rename(tmp_path / "real-val")
    (root / "val").symlink_to(tmp_path / "real-val", target_is_directory=True)
    with pytest.raises(DataError, match=r"has train/ but no val/ folder \(a symlinked folder, which is not followed\)"):
        discover(root, val_fraction=0.2, seed=0)


def test_class_folders_that_are_all_links_are_named_in_the_refusal(tmp_path: Path) -> None:
    real = write_class_tree(tmp_path / "real", {"cat": 2, "dog": 2})
    root = tmp_path / "data"
    root.mkdir()
    for name in ("cat", "dog"):
        (root / name).symlink_to(real / name, target_is_directory=True)

    with pytest.raises(DataError, match=r"has no images \(symlinked folders are not followed: cat, dog\)"):
        discover(root, val_fraction=0.5, seed=0)
    assert discover(tmp_path / "real", val_fraction=0.5, seed=0).classes == ["cat", "dog"]


def test_a_data_root_that_is_a_symlink_is_followed(tmp_path: Path) -> None:
    real = write_class_tree(tmp_path / "real", {"cat": 2, "dog": 2})
    (tmp_path / "link").symlink_to(real, target_is_directory=True)  # the user named it

    splits = discover(tmp_path / "link", val_fraction=0.5, seed=0)

    assert splits.classes == ["cat", "dog"] and splits.linked == ()


@pytest.mark.parametrize("kind", ["loop", "long name"])
def test_a_data_root_in_a_symlink_loop_or_with_a_name_too_long_is_one_line(tmp_path: Path, kind: str) -> None:
    root = tmp_path / ("n" * 300)
    if kind == "loop":
        root = tmp_path / "loop"
        root.symlink_to(root)

    with pytest.raises(DataError) as info:
        discover(root / "photos", val_fraction=0.5, seed=0)

    (problem,) = info.value.problems
    assert problem.where == "data.root" and ("symlink loop" in problem.message if kind == "loop" else "300 bytes" in problem.message)
    assert "n" * 60 not in str(problem)  # the long name is shortened


def test_a_fifo_named_like_an_image_is_skipped_not_waited_for(tmp_path: Path) -> None:
    """open() on a FIFO waits for a writer: discovery used to hang for ever. A child process, so that a
    regression fails on its timeout instead of hanging the tests."""
    import json
    import subprocess
    import sys

    root = write_class_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    os.mkfifo(root / "cat" / "x.png")
    script = """import json, sys
from pathlib import Path
from transferctl.data.folders import discover
from transferctl.errors import DataError
splits = discover(Path(sys.argv[1]), 0.5, 0)
try:
    discover(Path(sys.argv[1]), 0.5, 0, on_bad_image="error")
except DataError as exc:
    refusal = str(exc)
print(json.dumps({"skipped": {str(i.path): i.reason for i in splits.skipped}, "images": len(splits.train + splits.val), "refusal": refusal}))
"""
    done = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["skipped"] == {str(root / "cat" / "x.png"): "cannot be read: a FIFO (named pipe), not a regular file"} and found["images"] == 4
    assert "1 unreadable image" in found["refusal"]


def test_non_ascii_names_work(tmp_path: Path) -> None:
    root = tmp_path / "données"
    write_png(root / "chat été" / "photo ünïcode.png", (250, 0, 0))
    write_png(root / "chat été" / "二.png", (250, 0, 0))
    write_png(root / "собака" / "щенок.png", (0, 0, 250))
    write_png(root / "собака" / "🐶.png", (0, 0, 250))

    splits = discover(root, val_fraction=0.5, seed=0)

    assert splits.classes == sorted(["chat été", "собака"])
    for path, _ in splits.train + splits.val:
        assert open_rgb(path).size == (8, 8)


# --------------------------------------------------------------------------- decoding


def assert_rgb8(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert image.mode == "RGB"
    assert image.size == size
    array = np.asarray(image)
    assert array.dtype == np.uint8
    return array


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (12, 7), 90).save(path)

    array = assert_rgb8(open_rgb(path), (12, 7))
    assert (array == 90).all()


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (10, 6), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 255, 0, 0))  # fully transparent: shows the white background
    path = tmp_path / "rgba.png"
    image.save(path)

    array = assert_rgb8(open_rgb(path), (10, 6))
    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[3, 5]) == (255, 0, 0)


def test_la_becomes_rgb(tmp_path: Path) -> None:
    image = Image.new("LA", (5, 9), (40, 255))
    image.putpixel((1, 1), (40, 0))
    path = tmp_path / "la.png"
    image.save(path)

    array = assert_rgb8(open_rgb(path), (5, 9))
    assert tuple(array[0, 0]) == (40, 40, 40)
    assert tuple(array[1, 1]) == (255, 255, 255)


def test_palette_without_transparency_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    Image.new("RGB", (9, 4), (0, 0, 255)).convert("P").save(path)
    assert Image.open(path).mode == "P"

    array = assert_rgb8(open_rgb(path), (9, 4))
    assert tuple(array[2, 2]) == (0, 0, 255)


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (6, 6), 1)
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * (254 * 3))
    image.putpixel((0, 0), 0)
    path = tmp_path / "palette.gif"
    image.save(path, transparency=0)
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info

    array = assert_rgb8(open_rgb(path), (6, 6))
    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[3, 3]) == (0, 128, 0)


def test_sixteen_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 32 * 16).reshape(16, 32).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")

    array = assert_rgb8(open_rgb(path), (32, 16))
    gray = array[..., 0].astype(int)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert gray.min() == 0 and gray.max() == 255
    assert len(np.unique(gray)) > 200  # a ramp, not a few saturated levels
    assert (np.diff(gray.ravel()) >= 0).all()  # brightness order preserved


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_deep_integer_images_are_scaled_by_their_depth_so_dark_stays_dark(mode: str) -> None:
    def gray(values: list[list[int]]) -> np.ndarray:
        array = np.array(values, dtype=np.uint16 if mode == "I;16" else np.int32)
        image = Image.fromarray(array) if mode == "I;16" else Image.fromarray(array).convert("I")
        assert image.mode == mode
        return assert_rgb8(to_rgb(image), (2, 2))[..., 0]

    dark = gray([[0, 1000], [2000, 4000]])  # 6% of the 16-bit range at most
    assert dark.tolist() == [[0, 4], [8, 16]]  # not stretched to white: another image's brightness is comparable
    assert gray([[0, 1000], [2000, 65535]]).tolist() == [[0, 4], [8, 255]]


def test_values_without_a_known_scale_are_stretched_over_their_range() -> None:
    negative = Image.fromarray(np.array([[-10, 0], [100, 245]], dtype=np.int32))
    assert assert_rgb8(to_rgb(negative), (2, 2))[..., 0].tolist() == [[0, 10], [110, 255]]
    unit = Image.fromarray(np.array([[0.0, 0.2], [0.6, 1.0]], dtype=np.float32))  # floats in [0, 1]: not black
    assert assert_rgb8(to_rgb(unit), (2, 2))[..., 0].tolist() == [[0, 51], [153, 255]]
    wide = Image.fromarray(np.array([[-1.0, 0.0], [2.0, 4.0]], dtype=np.float32))
    assert assert_rgb8(to_rgb(wide), (2, 2))[..., 0].tolist() == [[0, 51], [153, 255]]


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.new("RGB", (20, 10), (255, 0, 0)).convert("CMYK").save(path, quality=95)
    with Image.open(path) as reopened:
        assert reopened.mode == "CMYK"

    array = assert_rgb8(open_rgb(path), (20, 10))
    red, green, blue = (int(channel) for channel in array[5, 10])
    assert red > 200 and green < 60 and blue < 60


def test_rgb_is_unchanged_and_open_rgb_returns_a_loaded_copy(tmp_path: Path) -> None:
    path = write_png(tmp_path / "rgb.png", (10, 20, 30), size=4)

    image = open_rgb(path)
    path.unlink()  # the file handle is closed and the pixels are already in memory

    assert tuple(assert_rgb8(image, (4, 4))[1, 1]) == (10, 20, 30)


# --------------------------------------------------------------------------- transforms and datasets


@pytest.mark.parametrize(("augment", "train"), [("standard", True), ("none", True), ("standard", False), ("none", False)])
def test_build_transform_gives_crop_sized_tensors(augment: str, train: bool) -> None:
    transform = build_transform(PREPROCESSING, augment=augment, train=train)

    for size in [(16, 16), (70, 30)]:
        tensor = transform(Image.new("RGB", size, (255, 255, 255)))
        assert isinstance(tensor, torch.Tensor)
        assert tensor.shape == (3, 32, 32)
        assert tensor.dtype == torch.float32
        assert torch.allclose(tensor, torch.ones_like(tensor))  # white normalised by mean 0.5, std 0.5


def test_evaluation_transform_is_deterministic() -> None:
    transform = build_transform(PREPROCESSING, augment="standard", train=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8))

    assert torch.equal(transform(image), transform(image))


def test_image_dataset_returns_tensor_and_label(tiny_split_data: Path) -> None:
    splits: DatasetSplits = discover(tiny_split_data, val_fraction=0.2, seed=0)
    dataset = ImageDataset(splits.val, build_transform(PREPROCESSING, augment="none", train=False))

    assert len(dataset) == 3
    for index, (path, expected_label) in enumerate(splits.val):
        tensor, label = dataset[index]
        assert label == expected_label
        assert tensor.shape == (3, 32, 32)


def test_image_dataset_decodes_unusual_modes(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (20, 20), 10).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(rgba)
    dataset = ImageDataset([(gray, 0), (rgba, 1)], build_transform(PREPROCESSING, augment="standard", train=True))

    assert [tuple(dataset[index][0].shape) for index in range(2)] == [(3, 32, 32), (3, 32, 32)]


@pytest.mark.parametrize(("setting", "n_images", "expected"), [(0, 10_000, 0), (3, 10, 3), ("2", 10, 2), ("auto", 511, 0)])
def test_resolve_workers_explicit_and_small(setting: int | str, n_images: int, expected: int) -> None:
    assert resolve_workers(setting, n_images) == expected


@pytest.mark.parametrize(("cpus", "expected"), [(None, 0), (1, 0), (2, 1), (4, 3), (64, 8)])
def test_resolve_workers_auto_for_large_datasets(monkeypatch: pytest.MonkeyPatch, cpus: int | None, expected: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)

    assert resolve_workers("auto", 512) == expected


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait phone photo stored landscape
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif)
    assert open_rgb(path).size == (20, 40)


# --------------------------------------------------------------------------- unreadable files


def noisy_jpeg(path: Path, size: int = 160) -> Path:
    """A JPEG large enough (over 16 KiB) that the check decodes it only when its end marker is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=95)
    assert path.stat().st_size > 20 * 1024
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG header announcing width x height pixels, and no pixels: what a decompression bomb looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def junk_tree(root: Path) -> Path:
    """cat and dog with 3 good images each; cat also holds every kind of unreadable file."""
    write_class_tree(root, {"cat": 3, "dog": 3})
    cat = root / "cat"
    (cat / "text.jpg").write_bytes(b"this is not an image")
    (cat / "empty.png").write_bytes(b"")
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noisy.save(cat / "cut.png")
    truncate(cat / "cut.png")
    truncate(noisy_jpeg(cat / "cut.jpg"))
    Image.new("RGB", (16, 16), (9, 9, 9)).save(cat / "small-cut.jpg")
    truncate(cat / "small-cut.jpg")
    png_header_only(cat / "bomb.png", 100_000, 100_000)
    (cat / "notes.txt").write_text("not an image, and not named like one")
    (cat / ".DS_Store").write_bytes(b"\x00\x01")
    return root


def test_unreadable_images_are_skipped_and_reported(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    root = junk_tree(tmp_path / "data")

    splits = discover(root, val_fraction=0.34, seed=0)

    reasons = {item.path.name: item.reason for item in splits.skipped}
    assert sorted(reasons) == ["bomb.png", "cut.jpg", "cut.png", "empty.png", "small-cut.jpg", "text.jpg"]
    assert reasons["text.jpg"] == reasons["empty.png"] == "not an image"
    assert "truncated" in reasons["cut.jpg"].lower() and "truncated" in reasons["small-cut.jpg"].lower()
    assert reasons["cut.png"].startswith("damaged")
    assert "decompression-bomb limit" in reasons["bomb.png"]
    assert splits.ignored == (root / "cat" / "notes.txt",)
    assert sorted(path.name for path, _ in splits.train + splits.val) == ["00.png", "00.png", "01.png", "01.png", "02.png", "02.png"]
    skipped, ignored = data_notices(splits)
    assert skipped.startswith("data.root: skipped 6 unreadable images: ") and skipped.endswith(" and 3 more")
    assert str(root / "cat" / "bomb.png") in skipped and "\n" not in skipped
    assert ignored == f"data.root: ignored 1 file without an image suffix: {root / 'cat' / 'notes.txt'}"
    assert not recwarn.list  # the bomb is reported, not warned about on stderr


def test_on_bad_image_error_refuses_and_names_the_files(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")

    with pytest.raises(DataError) as info:
        discover(root, val_fraction=0.5, seed=0, on_bad_image="error")

    (problem,) = info.value.problems
    assert problem.where == "data.root"
    assert problem.message.startswith(f"1 unreadable image: {root / 'dog' / 'broken.jpg'} (")
    assert "data.on_bad_image: skip" in problem.hint


def test_a_class_with_only_unreadable_images_is_refused(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "data", {"cat": 2})
    (root / "dog").mkdir()
    (root / "dog" / "a.png").write_bytes(b"garbage")

    with pytest.raises(DataError, match="has no readable images") as info:
        discover(root, val_fraction=0.5, seed=0)
    assert f"{root / 'dog' / 'a.png'} (not an image)" in str(info.value)


def test_complete_jpegs_pass_with_or_without_trailing_bytes(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    noisy_jpeg(root / "cat" / "plain.jpg")
    with (noisy_jpeg(root / "dog" / "short-trailer.jpg")).open("ab") as handle:
        handle.write(b"\x00" * 100)
    with (noisy_jpeg(root / "dog" / "long-trailer.jpg")).open("ab") as handle:
        handle.write(b"camera maker data " * 1000)  # the end marker is far from the end: decoded, and fine

    splits = discover(root, val_fraction=0.5, seed=0)

    assert splits.skipped == ()
    assert splits.counts()["train"] + splits.counts()["val"] == 7


def test_images_over_the_pixel_limit_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    root = tmp_path / "data"
    write_class_tree(root, {"cat": 2, "dog": 2})  # 8x8: 64 pixels
    write_png(root / "cat" / "large.png", size=12)  # 144 pixels: Pillow itself would only warn
    write_png(root / "dog" / "huge.png", size=16)  # 256 pixels, over twice the limit: Pillow refuses it

    splits = discover(root, val_fraction=0.5, seed=0)

    reasons = {item.path.name: item.reason for item in splits.skipped}
    assert reasons["large.png"] == "12x12 pixels is over the decompression-bomb limit of 100"
    assert reasons["huge.png"] == "over the decompression-bomb limit of 100 pixels"
    assert not recwarn.list


def test_an_empty_split_folder_says_it_has_no_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "train", {"cat": 2, "dog": 2})
    (root / "val" / ".thumbnails").mkdir(parents=True)

    with pytest.raises(DataError) as info:
        discover(root, val_fraction=0.2, seed=0)
    assert str(info.value).startswith(f"data.root/val: {root / 'val'} has no images")


def test_a_file_that_fails_to_decode_later_is_named(tmp_path: Path) -> None:
    """The quick check reads headers; a file damaged after it (or in a way it misses) is still one line."""
    good = write_png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    dataset = ImageDataset([(good, 0), (bad, 1)], build_transform(PREPROCESSING, augment="none", train=False))

    with pytest.raises(DataError) as info:
        dataset[1]
    assert info.value.problems[0].where == str(bad) and "cannot be decoded" in str(info.value)

    loader = make_loader(dataset, batch_size=2, shuffle=False, workers=1, seed=0)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    text = str(worker_error(info.value))
    assert text.startswith(f"{bad}: cannot be decoded") and "\n" not in text and "Traceback" not in text


# --------------------------------------------------------------------------- epoch order and augmentation


def test_epoch_order_and_image_seeds_depend_only_on_seed_and_epoch() -> None:
    first, again, other_seed = EpochSampler(50, seed=3), EpochSampler(50, seed=3), EpochSampler(50, seed=4)
    torch.rand(100)  # the global RNG does not matter

    first.set_epoch(2)
    again.set_epoch(2)
    other_seed.set_epoch(2)
    epoch2 = list(first)

    assert epoch2 == list(again) and epoch2 != list(other_seed)
    assert sorted(index for index, _ in epoch2) == list(range(50))
    first.set_epoch(3)
    assert [index for index, _ in first] != [index for index, _ in epoch2]
    assert len({seed for _, seed in epoch2}) == 50


def test_augmentation_comes_from_the_image_seed_alone(tmp_path: Path) -> None:
    path = tmp_path / "ramp.png"
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))).convert("RGB").save(path)
    dataset = ImageDataset([(path, 0)], build_transform(PREPROCESSING, augment="standard", train=True))

    state = torch.get_rng_state()
    first, _ = dataset[(0, 1234)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    torch.rand(100)
    again, _ = dataset[(0, 1234)]
    other, _ = dataset[(0, 99)]

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_small_classes_still_get_a_validation_image_or_a_note(tmp_path: Path) -> None:
    root = write_class_tree(tmp_path / "imbalanced", {"a": 10, "b": 2, "c": 1})

    splits = discover(root, val_fraction=0.2, seed=0)

    assert labels_per_class(splits.val) == {0: 2, 1: 1} and labels_per_class(splits.train) == {0: 8, 1: 1, 2: 1}
    assert data_notices(splits) == ["data.root: no validation image for c (a class of one image): val_acc and the best epoch leave it out; add images"]


def test_an_image_over_the_pixel_limit_is_refused_in_one_line_without_pillows_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from transferctl.data.folders import decode

    path = write_png(tmp_path / "large.png", size=12)  # 144 pixels: over the limit below, under twice it (Pillow only warns)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DataError, match="12x12 pixels is over the decompression-bomb limit of 100"):
        warnings.simplefilter("always")
        decode(path)  # as predict and evaluate decode: refused, as training's check refuses it
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_class_names_that_only_look_alike_are_pointed_out(tmp_path: Path) -> None:
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "émû")  # as macOS writes folder names
    root = tmp_path / "data"
    write_class_tree(root / "train", {"émû": 1, "b": 1})
    write_class_tree(root / "val", {decomposed: 1, "b": 1})

    with pytest.raises(DataError) as caught:
        discover(root, val_fraction=0.2, seed=0)

    assert "'\\xe9m\\xfb' and 'e\\u0301mu\\u0302' differ only in Unicode form or surrounding spaces: rename one" in str(caught.value)


def test_only_a_training_batch_of_one_image_is_left_out() -> None:
    nine = list(range(9))
    assert make_loader(nine, 4, shuffle=True, workers=0, seed=0).drop_last  # 4 + 4 + 1
    assert len(make_loader(nine, 4, shuffle=True, workers=0, seed=0)) == 2
    assert not make_loader(nine, 3, shuffle=True, workers=0, seed=0).drop_last  # 3 + 3 + 3
    assert not make_loader(nine, 4, shuffle=False, workers=0, seed=0).drop_last  # evaluation sees every image


# --------------------------------------------------------------------------- augmentation policies and random erasing

POLICIES = {"randaugment": "RandAugment", "trivialaugment": "TrivialAugmentWide", "autoaugment": "AutoAugment", "augmix": "AugMix"}


def noise_image(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("augment", AUGMENTS)
def test_each_augmentation_gives_crop_sized_tensors_reproducible_from_the_seed(tmp_path: Path, augment: str) -> None:
    dataset = ImageDataset([(noise_image(tmp_path / "a.png"), 0)], build_transform(PREPROCESSING, augment, train=True))
    first, again, other = (dataset[(0, seed)][0] for seed in (7, 7, 8))
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again)  # a resumed run draws the same views
    assert torch.equal(first, other) == (augment == "none")


@pytest.mark.parametrize(("augment", "policy"), POLICIES.items())
def test_a_policy_is_standard_then_the_torchvision_policy_on_the_8_bit_image(augment: str, policy: str) -> None:
    assert transform_names(build_transform(PREPROCESSING, augment, train=True)) == [
        "RandomResizedCrop", "RandomHorizontalFlip", policy, "ToTensor", "Normalize"
    ]  # fmt: skip
    assert transform_names(build_transform(PREPROCESSING, augment, train=False)) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]


def test_a_policy_changes_the_pixels_that_standard_gives_for_the_same_seed(tmp_path: Path) -> None:
    image = noise_image(tmp_path / "a.png")
    standard = ImageDataset([(image, 0)], build_transform(PREPROCESSING, "standard", train=True))
    for augment in POLICIES:
        policy = ImageDataset([(image, 0)], build_transform(PREPROCESSING, augment, train=True))
        assert not torch.equal(policy[(0, 3)][0], standard[(0, 3)][0]), augment


@pytest.mark.parametrize("augment", ["none", "standard", "randaugment"])
def test_random_erasing_erases_a_rectangle_of_the_normalised_training_tensor(tmp_path: Path, augment: str) -> None:
    image = noise_image(tmp_path / "a.png")
    plain = ImageDataset([(image, 0)], build_transform(PREPROCESSING, augment, train=True))[(0, 5)][0]
    erased = ImageDataset([(image, 0)], build_transform(PREPROCESSING, augment, train=True, random_erasing=1.0))[(0, 5)][0]
    changed = erased != plain
    assert changed.any() and (erased[changed] == 0).all()  # zero after normalisation: the mean colour
    assert transform_names(build_transform(PREPROCESSING, augment, train=True, random_erasing=0.25))[-1] == "RandomErasing(p=0.25)"
    assert "RandomErasing" not in str(transform_names(build_transform(PREPROCESSING, augment, train=False, random_erasing=1.0)))
