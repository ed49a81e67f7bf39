"""Generated datasets: layouts, counts, image sizes, determinism and that the classes are learnable."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferctl.errors import DataError
from transferctl.testing.synthetic import (
    MARKER,
    SHAPES,
    SOURCE_CLASSES,
    TARGET_CLASSES,
    TARGET_PAIRS,
    make_transfer_pair,
    split_counts,
    tiny_dataset,
    write_image_folder,
)

REPO = Path(__file__).resolve().parents[2]


def count_pngs(folder: Path) -> dict[str, int]:
    return {d.name: len(list(d.glob("*.png"))) for d in sorted(folder.iterdir()) if d.is_dir()}


def load_split(folder: Path, side: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Images downsampled to side x side, flattened, with integer labels by sorted class name."""
    xs, ys = [], []
    for label, class_dir in enumerate(sorted(d for d in folder.iterdir() if d.is_dir())):
        for path in sorted(class_dir.glob("*.png")):
            with Image.open(path) as image:
                xs.append(np.asarray(image.resize((side, side)), np.float32).ravel())
            ys.append(label)
    return np.stack(xs), np.asarray(ys)


def test_split_layout_has_every_split_and_class(tiny_split_data: Path) -> None:
    assert sorted(p.name for p in tiny_split_data.iterdir() if p.is_dir()) == ["test", "train", "val"]
    assert count_pngs(tiny_split_data / "train") == {"blue": 4, "green": 4, "red": 4}
    assert count_pngs(tiny_split_data / "val") == {"blue": 1, "green": 1, "red": 1}
    assert count_pngs(tiny_split_data / "test") == {"blue": 1, "green": 1, "red": 1}


def test_split_file_names_are_unique_within_a_class(tiny_split_data: Path) -> None:
    splits = ("train", "val", "test")
    names = [p.name for split in splits for p in (tiny_split_data / split / "red").iterdir()]
    assert len(names) == len(set(names)) == 6


def test_flat_layout_has_class_folders_at_the_root(tiny_flat_data: Path) -> None:
    assert count_pngs(tiny_flat_data) == {"blue": 6, "green": 6, "red": 6}


def test_images_are_rgb_at_the_requested_size(tmp_path: Path) -> None:
    root = tiny_dataset(tmp_path / "d", size=24, layout="flat", per_class=2)
    for path in root.rglob("*.png"):
        with Image.open(path) as image:
            assert image.size == (24, 24)
            assert image.mode == "RGB"


@pytest.mark.parametrize("maker", [*SOURCE_CLASSES.values(), *TARGET_CLASSES.values()])
@pytest.mark.parametrize("size", [32, 64, 97])
def test_shape_makers_draw_rgb_images_of_any_size(maker, size: int) -> None:
    image = maker(np.random.default_rng(1), size)
    assert (image.mode, image.size) == ("RGB", (size, size))
    assert np.asarray(image).std() > 5  # not blank


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    first = files(write_image_folder(tmp_path / "a", SOURCE_CLASSES, 3, 32, seed=7))
    again = files(write_image_folder(tmp_path / "b", SOURCE_CLASSES, 3, 32, seed=7))
    other = files(write_image_folder(tmp_path / "c", SOURCE_CLASSES, 3, 32, seed=8))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first)


def test_a_class_does_not_depend_on_the_other_classes(tmp_path: Path) -> None:
    alone = write_image_folder(tmp_path / "a", {"star": SOURCE_CLASSES["star"]}, 3, 32, 0, "flat")
    together = write_image_folder(tmp_path / "b", SOURCE_CLASSES, 3, 32, 0, "flat")
    for path in (alone / "star").glob("*.png"):
        assert path.read_bytes() == (together / "star" / path.name).read_bytes()


@pytest.mark.parametrize(
    ("n", "layout", "fraction", "test", "expected"),
    [
        (10, "split", 0.2, False, {"train": 8, "val": 2}),
        (10, "split", 0.2, True, {"train": 6, "val": 2, "test": 2}),
        (6, "split", 0.01, False, {"train": 5, "val": 1}),  # val never empty
        (60, "split", 0.3, True, {"train": 24, "val": 18, "test": 18}),
        (5, "flat", 0.2, True, {"": 5}),
    ],
)
def test_split_counts(n: int, layout: str, fraction: float, test: bool, expected: dict) -> None:
    assert split_counts(n, layout, fraction, test) == expected


@pytest.mark.parametrize(
    ("n", "layout", "fraction", "test"),
    [(0, "flat", 0.2, False), (2, "split", 0.5, True), (10, "split", 1.0, False), (10, "nested", 0.2, False)],
)
def test_split_counts_rejects_impossible_requests(n: int, layout: str, fraction: float, test: bool) -> None:
    with pytest.raises(ValueError):
        split_counts(n, layout, fraction, test)


def test_bad_class_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="folder name"):
        write_image_folder(tmp_path / "d", {"a/b": SOURCE_CLASSES["circle"]}, 2, 16, 0)


def test_foreign_folders_are_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="not generated by transferctl"):
        tiny_dataset(tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_generated_folders_are_replaced_only_when_asked(tmp_path: Path) -> None:
    root = tiny_dataset(tmp_path / "d", n_classes=4, layout="flat")
    assert (root / MARKER).is_file()
    with pytest.raises(DataError, match="overwrite=True"):
        tiny_dataset(root, layout="flat")
    tiny_dataset(root, n_classes=2, layout="flat", overwrite=True)
    assert count_pngs(root) == {"green": 6, "red": 6}  # no stale classes left behind


def test_tiny_classes_are_separable_by_nearest_centroid(tmp_path: Path) -> None:
    root = tiny_dataset(tmp_path / "d", n_classes=12, per_class=10, val_fraction=0.3)
    x_train, y_train = load_split(root / "train")
    x_val, y_val = load_split(root / "val")
    centroids = np.stack([x_train[y_train == c].mean(axis=0) for c in range(12)])
    distances = ((x_val[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = (distances.argmin(axis=1) == y_val).mean()
    assert accuracy > 0.9  # chance is 1/12


def test_transfer_pair_layout_and_classes(tmp_path: Path) -> None:
    source, target = make_transfer_pair(tmp_path, size=32, source_per_class=5, target_per_class=7)
    assert (source, target) == (tmp_path / "source", tmp_path / "target")
    assert count_pngs(source / "train") == {name: 4 for name in SOURCE_CLASSES}
    assert count_pngs(source / "val") == {name: 1 for name in SOURCE_CLASSES}
    assert not (source / "test").exists()
    for split, n in {"train": 3, "val": 2, "test": 2}.items():
        assert count_pngs(target / split) == {name: n for name in TARGET_CLASSES}


def test_target_classes_are_pairs_of_source_shapes() -> None:
    shapes = [shape for pair in TARGET_PAIRS for shape in pair]
    assert set(shapes) <= set(SHAPES) == set(SOURCE_CLASSES)
    # each shape in exactly two classes: no single shape gives a target class away
    assert all(shapes.count(shape) == 2 for shape in set(shapes))


def test_synthetic_does_not_import_torch() -> None:
    code = "import sys, transferctl.testing.synthetic; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_demo_script_writes_both_datasets_and_prints_their_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--out", str(tmp_path), "--size", "32", "--source-per-class", "5", "--target-per-class", "5"]
    for _ in range(2):  # a second run replaces the first
        assert script.main(argv) == 0
        assert capsys.readouterr().out.split() == [str(tmp_path / "source"), str(tmp_path / "target")]
    assert script.main([*argv[:2], "--size", "2"]) == 1
    assert "size must be at least" in capsys.readouterr().err
