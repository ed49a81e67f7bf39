"""Image folders: find the classes and splits, decode images the way the backbone expects, build loaders."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transferctl.errors import DataError, Problem

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLITS = ("train", "val", "test")

Sample = tuple[Path, int]


@dataclass(frozen=True)
class DatasetSplits:
    """The classes (sorted folder names) and the (path, label) samples of each split."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    layout: str = "split"

    def split(self, name: str) -> list[Sample]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def counts(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def discover(root: Path, val_fraction: float, seed: int) -> DatasetSplits:
    """Read a class-per-folder tree: root/{train,val[,test]}/<class>/*, or root/<class>/* split here."""
    if not root.is_dir():
        raise DataError(Problem("data.root", f"no such folder: {root}", "point data.root at a folder of class folders"))
    if (root / "train").is_dir():
        return _discover_split_layout(root)
    classes = class_folders(root, "data.root")
    samples = _samples(root, classes, "data.root")
    train, val = stratified_split(samples, val_fraction, seed)
    return DatasetSplits(root, classes, train, val, [], layout="flat")


def _discover_split_layout(root: Path) -> DatasetSplits:
    if not (root / "val").is_dir():
        raise DataError(Problem("data.root", f"{root} has train/ but no val/ folder", "add root/val/<class>/ images, or put the class folders directly under data.root"))
    classes = class_folders(root / "train", "data.root/train")
    for split in ("val", "test"):
        if (root / split).is_dir():
            _check_same_classes(classes, class_folders(root / split, f"data.root/{split}"), split)
    splits = {
        split: _samples(root / split, classes, f"data.root/{split}") if (root / split).is_dir() else []
        for split in SPLITS
    }
    return DatasetSplits(root, classes, splits["train"], splits["val"], splits["test"], layout="split")


def class_folders(folder: Path, where: str) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "none"
        raise DataError(Problem(where, f"{folder} needs at least two class folders, found {found}", "make one sub-folder of images per class"))
    return classes


def _check_same_classes(train: list[str], other: list[str], split: str) -> None:
    missing, extra = sorted(set(train) - set(other)), sorted(set(other) - set(train))
    if missing or extra:
        detail = "; ".join(part for part in (f"missing {missing}" if missing else "", f"extra {extra}" if extra else "") if part)
        raise DataError(Problem(f"data.root/{split}", f"class folders differ from train/: {detail}", "use the same class folders in every split"))


def _samples(folder: Path, classes: list[str], where: str) -> list[Sample]:
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        files = list_images(folder / name)
        if not files:
            raise DataError(Problem(where, f"class folder {folder / name} has no images", f"add images ({', '.join(sorted(IMAGE_SUFFIXES)[:4])}, ...) or remove the folder"))
        samples.extend((path, label) for path in files)
    return samples


def list_images(folder: Path) -> list[Path]:
    """Image files below folder, recursively, sorted; symlinked folders are not followed (no loops)."""
    found: list[Path] = []
    for directory, subdirs, files in os.walk(folder, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(Path(directory) / name for name in files if is_image_file(Path(name)))
    return sorted(found)


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The same seed gives the same split; every class keeps at least one training image."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        group = sorted(by_class[label])
        rng.shuffle(group)
        n_val = min(len(group) - 1, round(len(group) * val_fraction))
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    if not val:
        raise DataError(Problem("data.val_fraction", "leaves no validation images", "add images or raise val_fraction"))
    return sorted(train), sorted(val)


# ---------------------------------------------------------------------------------------------
# Decoding and transforms


def open_rgb(path: Path) -> Any:
    """Decode any image mode (grayscale, RGBA, palette, 16-bit, CMYK) into upright 8-bit RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        # Phones store photos sideways with an EXIF rotation tag; the network must see them upright.
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Any) -> Any:
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer images: scale to 8 bits instead of clipping everything bright to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / top)).astype("uint8"), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def build_transform(preprocessing: Any, augment: str, train: bool) -> Callable[[Any], Any]:
    """The pretrained weights' own preprocessing; training adds random crops and flips when asked."""
    from torchvision import transforms as T

    interpolation = T.InterpolationMode(preprocessing.interpolation)
    normalize = [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    if train and augment == "standard":
        return T.Compose(
            [T.RandomResizedCrop(preprocessing.crop, interpolation=interpolation, antialias=True), T.RandomHorizontalFlip(), *normalize]
        )
    return T.Compose(
        [T.Resize(preprocessing.resize, interpolation=interpolation, antialias=True), T.CenterCrop(preprocessing.crop), *normalize]
    )


class ImageDataset:
    """(image tensor, label) pairs from a list of samples."""

    def __init__(self, samples: list[Sample], transform: Callable[[Any], Any]) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return self.transform(open_rgb(path)), label


def resolve_workers(setting: int | str, n_images: int) -> int:
    """'auto': worker processes only when there is enough decoding to hide their start-up cost."""
    if setting != "auto":
        return int(setting)
    if n_images < 512:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(dataset: Any, batch_size: int, shuffle: bool, workers: int, seed: int, pin_memory: bool = False) -> Any:
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
