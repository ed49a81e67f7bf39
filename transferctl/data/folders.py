"""Image folders: find the classes and splits, decode images the way the backbone expects, build loaders."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from transferctl.data.sharding import Shard, shard_length, shard_of
from transferctl.data.targets import Label, class_counts, stratum, target_array
from transferctl.errors import DataError, Problem
from transferctl.paths import checked, open_regular, shown

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLITS = ("train", "val", "test")

Sample = tuple[Path, Label]
BAD_IMAGE_POLICIES = ("skip", "error")
SHOWN_PATHS = 3  # how many example paths a message about skipped files names


@dataclass(frozen=True)
class BadImage:
    """A file with an image suffix that cannot be used: why, in a few words."""

    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetSplits:
    """The classes (sorted folder names) and the (path, label) samples of each split."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    layout: str = "split"
    skipped: tuple[BadImage, ...] = ()  # unreadable images left out (data.on_bad_image: skip)
    ignored: tuple[Path, ...] = ()  # files in class folders that are not images by their suffix
    run_folders: tuple[Path, ...] = ()  # transferctl runs among the class folders: output.dir inside data.root
    linked: tuple[Path, ...] = ()  # symlinked folders left out: discovery does not follow them
    label_file: Path | None = None  # data.labels, when the samples come from a label file (skipped then holds its bad rows)
    label_digest: str | None = None  # its content's digest: resume and the feature cache notice an edited file
    multi_label: bool = False  # labels are tuples of classes (data/targets.py): several per image, one sigmoid each

    def split(self, name: str) -> list[Sample]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def counts(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def discover(root: Path, val_fraction: float, seed: int, on_bad_image: str = "skip", split: bool = True) -> DatasetSplits:
    """Read a class-per-folder tree: root/{train,val[,test]}/<class>/*, or root/<class>/* split here.

    Every image is checked once, quickly (see image_problem); unreadable ones are left out and listed in
    `skipped`, or with on_bad_image 'error' they stop everything before training starts. split=False
    leaves a flat tree whole, in `train` (for a reader of every image, which needs no validation share).
    Symlinked folders below root are not followed (a link to the root would make a class of copies of every
    image); they are listed in `linked`. root itself may be a link: the user named it.
    """
    checked(root, DataError, "data.root")
    if not root.is_dir():
        what = f"{shown(root)} is a file, not a folder" if root.exists() else f"no such folder: {shown(root)}"
        raise DataError(Problem("data.root", what, "point data.root at a folder of class folders"))
    if _real_folder(root / "train"):
        return _discover_split_layout(root, on_bad_image)
    found = class_folders(root, "data.root")
    tree = _read_tree({"data.root": root}, found.classes, on_bad_image)
    train, val = stratified_split(tree.samples["data.root"], val_fraction, seed) if split else (sorted(tree.samples["data.root"]), [])
    return DatasetSplits(root, found.classes, train, val, [], layout="flat", skipped=tree.skipped, ignored=tree.ignored, run_folders=found.runs,
                         linked=found.linked + tree.linked)  # fmt: skip


def _discover_split_layout(root: Path, on_bad_image: str) -> DatasetSplits:
    if not _real_folder(root / "val"):
        linked = " (a symlinked folder, which is not followed)" if (root / "val").is_symlink() else ""
        raise DataError(Problem("data.root", f"{shown(root)} has train/ but no val/ folder{linked}", "add root/val/<class>/ images, or put the class folders directly under data.root"))
    present = [split for split in SPLITS if _real_folder(root / split)]
    found = {split: class_folders(root / split, f"data.root/{split}") for split in present}
    classes = found["train"].classes
    for split in present[1:]:
        _check_same_classes(classes, found[split].classes, split)
    tree = _read_tree({f"data.root/{split}": root / split for split in present}, classes, on_bad_image)
    splits = {split: tree.samples.get(f"data.root/{split}", []) for split in SPLITS}
    found_runs = tuple(path for split in present for path in found[split].runs)
    linked = tuple(root / split for split in SPLITS if (root / split).is_symlink()) + tuple(path for split in present for path in found[split].linked)
    return DatasetSplits(root, classes, splits["train"], splits["val"], splits["test"], layout="split", skipped=tree.skipped, ignored=tree.ignored,
                         run_folders=found_runs, linked=linked + tree.linked)  # fmt: skip


def _real_folder(path: Path) -> bool:
    """A folder that is not a symlink: discovery follows no link below data.root."""
    return path.is_dir() and not path.is_symlink()


@dataclass(frozen=True)
class ClassFolders:
    classes: list[str]  # the class folders' names, sorted
    runs: tuple[Path, ...]  # sub-folders holding transferctl runs (run_folders), never classes
    linked: tuple[Path, ...]  # symlinked sub-folders, not followed


def class_folders(folder: Path, where: str) -> ClassFolders:
    """The class folders: the visible sub-folders, less those that hold runs and those that are symlinks."""
    real, linked = _sub_folders(folder)
    runs = run_folders(real)
    classes = sorted(p.name for p in real if p not in runs)
    if len(classes) < 2:
        unfollowed = f" (symlinked folders are not followed: {', '.join(shown(p.name) for p in linked)})" if linked else ""
        if not list_images(folder):
            raise DataError(Problem(where, f"{shown(folder)} has no images{unfollowed}", "put the images in one sub-folder per class, the same classes in every split"))
        found = f"only '{shown(classes[0])}'" if classes else "none"
        raise DataError(Problem(where, f"{shown(folder)} needs at least two class folders, found {found}{unfollowed}", "make one sub-folder of images per class"))
    return ClassFolders(classes, runs, tuple(linked))


def _sub_folders(folder: Path) -> tuple[list[Path], list[Path]]:
    """(visible sub-folders, visible symlinks to folders) of folder, each sorted; the entries' types come
    with the listing, so only the links are looked up (Path.is_dir: a link in a loop is no folder)."""
    real: list[Path] = []
    linked: list[Path] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                if Path(entry.path).is_dir():
                    linked.append(Path(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                real.append(Path(entry.path))
    return sorted(real), sorted(linked)


def run_folders(folders: list[Path]) -> tuple[Path, ...]:
    """Those of the folders that hold transferctl runs (a run, or a folder of runs), which are never classes:
    an experiment file in a flat data folder (`transferctl init .`) writes its runs/ there."""
    from transferctl.runs.listing import is_run_dir

    def holds_runs(path: Path) -> bool:
        with os.scandir(path) as entries:  # the entries' types come with the listing: no stat per image
            return is_run_dir(path) or any(entry.is_dir(follow_symlinks=False) and is_run_dir(Path(entry.path)) for entry in entries)

    return tuple(sorted(path for path in folders if holds_runs(path)))


def _check_same_classes(train: list[str], other: list[str], split: str) -> None:
    detail = class_differences(train, other)
    if detail:
        raise DataError(Problem(f"data.root/{split}", f"class folders differ from train/: {detail}", "use the same class folders in every split"))


def class_differences(expected: list[str], found: list[str]) -> str:
    """"missing [...]; extra [...]" ('' when the sets agree), naming pairs that only look alike."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    parts = [f"missing {missing}" if missing else "", f"extra {extra}" if extra else "", lookalikes(missing, extra)]
    return "; ".join(part for part in parts if part)


def lookalikes(missing: list[str], extra: list[str]) -> str:
    """Names that print alike but differ in Unicode form (macOS writes é as e and a combining accent) or in
    spaces at their ends: a missing and an extra name that read the same would otherwise baffle."""
    import unicodedata

    def plain(name: str) -> str:
        return unicodedata.normalize("NFC", name).strip()

    pairs = [(a, b) for a in missing for b in extra if plain(a) == plain(b)]
    return "; ".join(f"{ascii(a)} and {ascii(b)} differ only in Unicode form or surrounding spaces: rename one" for a, b in pairs)


@dataclass(frozen=True)
class _Tree:
    samples: dict[str, list[Sample]]  # keyed by where (data.root, data.root/train, ...)
    skipped: tuple[BadImage, ...]
    ignored: tuple[Path, ...]
    linked: tuple[Path, ...]  # symlinked folders inside the class folders, not followed


def _read_tree(folders: dict[str, Path], classes: list[str], on_bad_image: str) -> _Tree:
    """The samples below each folder, every image checked once (all folders together: one thread pool)."""
    listed: dict[str, list[list[Path]]] = {}
    ignored: list[Path] = []
    linked: list[Path] = []
    for where, folder in folders.items():
        listed[where] = []
        for name in classes:
            scan = scan_folder(folder / name)
            if not scan.images:
                raise DataError(Problem(where, f"class folder {shown(folder / name)} has no images", f"add images ({', '.join(sorted(IMAGE_SUFFIXES)[:4])}, ...) or remove the folder"))
            listed[where].append(scan.images)
            ignored.extend(scan.others)
            linked.extend(scan.linked)
    bad = find_bad_images([path for per_class in listed.values() for files in per_class for path in files])
    if bad and on_bad_image == "error":
        raise DataError(Problem("data.root", f"{_count(len(bad), 'unreadable image')}: {_examples(bad)}", "fix or remove them, or set data.on_bad_image: skip to train without them"))
    samples: dict[str, list[Sample]] = {}
    for where, per_class in listed.items():
        samples[where] = []
        for label, files in enumerate(per_class):
            good = [path for path in files if path not in bad]
            if not good:
                folder = folders[where] / classes[label]
                raise DataError(Problem(where, f"class folder {folder} has no readable images: {_examples(bad, files)}", "replace them with images that open"))
            samples[where].extend((path, label) for path in good)
    skipped = tuple(BadImage(path, bad[path]) for path in sorted(bad))
    return _Tree(samples, skipped, tuple(sorted(ignored)), tuple(sorted(linked)))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _examples(bad: dict[Path, str], among: list[Path] | None = None) -> str:
    """'a.jpg (damaged: ...), b.png (...) and 4 more': the first few, so the message stays one line."""
    paths = sorted(among if among is not None else bad)
    shown = ", ".join(f"{path} ({bad[path]})" for path in paths[:SHOWN_PATHS])
    return shown + (f" and {len(paths) - SHOWN_PATHS} more" if len(paths) > SHOWN_PATHS else "")


def split_fingerprint(splits: DatasetSplits) -> dict[str, dict[str, Any]]:
    """How many images train and val hold, and which (a digest of their paths under the root and labels):
    a checkpoint keeps it, and resume says when the images it finds are not the ones the run started on."""

    def digest(samples: list[Sample]) -> str:
        hashed = hashlib.sha256()
        for path, label in sorted(samples):
            hashed.update(f"{path.relative_to(splits.root).as_posix()}\t{label}\n".encode("utf-8", "surrogateescape"))
        return hashed.hexdigest()[:16]

    fingerprint = {name: {"images": len(samples), "digest": digest(samples)} for name, samples in (("train", splits.train), ("val", splits.val))}
    if splits.label_digest is not None:  # only with a label file: runs on folders keep their fingerprints
        fingerprint["labels"] = {"images": len(splits.train) + len(splits.val) + len(splits.test), "digest": splits.label_digest}
    return fingerprint


def changed_images(started: dict[str, dict[str, Any]] | None, now: dict[str, dict[str, Any]]) -> str | None:
    """A notice when the splits differ from the fingerprint a run started with; None when alike or unknown."""
    if not started or all(started.get(name) == now[name] for name in now):
        return None
    counts = ", ".join(f"{name} {started.get(name, {}).get('images', '?')} -> {now[name]['images']}" for name in now)
    if "labels" in now and started.get("labels") != now["labels"]:
        return f"data.labels: the label file differs from the one the run started on ({counts}): start a new run for numbers that compare"
    return (f"data.root: the images differ from those the run started on ({counts}); a flat folder's validation share is drawn "
            "again, so images may have moved between train and val: start a new run for numbers that compare")  # fmt: skip


def data_notices(splits: DatasetSplits) -> list[str]:
    """One line each about files discovery left out: what a user should hear before training starts."""
    notices = []
    if splits.skipped and splits.label_file is not None:
        notices.append(f"data.labels: skipped {bad_rows(splits.skipped)}")
    elif splits.skipped:
        bad = {item.path: item.reason for item in splits.skipped}
        notices.append(f"data.root: skipped {_count(len(bad), 'unreadable image')}: {_examples(bad)}")
    if splits.ignored:
        notices.append(f"data.root: ignored {_count(len(splits.ignored), 'file')} without an image suffix: {_first_paths(splits.ignored)}")
    unseen = sorted(set(range(len(splits.classes))) - set(class_counts([label for _, label in splits.val]))) if splits.val else []  # none: not split
    if unseen:
        names = ", ".join(splits.classes[label] for label in unseen)
        notices.append(f"data.root: no validation image for {names} (a class of one image): val_acc and the best epoch leave it out; add images")
    if splits.run_folders:
        folders = ", ".join(str(path) for path in splits.run_folders)
        notices.append(f"data.root: left out {folders}: transferctl runs, not a class")
    if splits.linked:
        notices.append(f"data.root: left out {_count(len(splits.linked), 'symlinked folder')}, not followed: {_first_paths(splits.linked)} (copy or move the images there to use them)")
    return notices


def bad_rows(bad: list[BadImage] | tuple[BadImage, ...]) -> str:
    """'2 bad rows: a.png (line 3: no such image), ...' (a label file's rows): the first few, so the line stays one."""
    named = ", ".join(f"{shown(item.path)} ({item.reason})" for item in bad[:SHOWN_PATHS])
    more = f" and {len(bad) - SHOWN_PATHS} more" if len(bad) > SHOWN_PATHS else ""
    return f"{_count(len(bad), 'bad row')}: {named}{more}"


def _first_paths(paths: tuple[Path, ...]) -> str:
    """'a, b, c and 4 more': the first few, so a notice stays one line."""
    more = f" and {len(paths) - SHOWN_PATHS} more" if len(paths) > SHOWN_PATHS else ""
    return ", ".join(shown(path) for path in paths[:SHOWN_PATHS]) + more


def list_images(folder: Path) -> list[Path]:
    """Image files below folder, recursively, sorted; symlinked folders are not followed (no loops)."""
    return scan_folder(folder).images


@dataclass(frozen=True)
class FolderScan:
    images: list[Path]  # files with an image suffix, sorted
    others: list[Path]  # other visible files, sorted
    linked: list[Path]  # symlinked folders, not followed (a link to an ancestor would loop), sorted


def scan_folder(folder: Path) -> FolderScan:
    """The files below folder; hidden files and folders are left out, symlinked folders not followed."""
    images: list[Path] = []
    others: list[Path] = []
    linked: list[Path] = []
    for directory, subdirs, files in os.walk(folder, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        linked.extend(Path(directory) / d for d in subdirs if os.path.islink(os.path.join(directory, d)))
        for name in files:
            path = Path(directory) / name
            if is_image_file(path):
                images.append(path)
            elif not name.startswith("."):
                others.append(path)
    return FolderScan(sorted(images), sorted(others), sorted(linked))


# ---------------------------------------------------------------------------------------------
# Checking images before training


def find_bad_images(paths: list[Path]) -> dict[Path, str]:
    """{path: reason} for every file that cannot be trained on; threads, since Pillow and reads release the GIL."""
    from PIL import Image

    with warnings.catch_warnings():
        # Too-large images are reported with the skipped ones, not as a stray warning on stderr.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if len(paths) < 64:
            reasons = [image_problem(path) for path in paths]
        else:
            with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
                reasons = list(pool.map(image_problem, paths, chunksize=32))
    return {path: reason for path, reason in zip(paths, reasons) if reason is not None}


def image_problem(path: Path) -> str | None:
    """Why a file cannot be trained on, or None. Fast: headers for all, CRCs of PNG chunks, the end marker
    of JPEGs; only a JPEG without its end marker and other formats are decoded, to be sure."""
    from PIL import Image, UnidentifiedImageError

    try:
        with opened_image(path) as image:
            too_large = over_pixel_limit(image)
            if too_large:
                return too_large
            if image.format == "PNG":
                image.verify()
            elif not (image.format == "JPEG" and _jpeg_has_end_marker(path)):
                image.load()
    except Image.DecompressionBombError:
        return f"over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
    except UnidentifiedImageError:
        return "not an image"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}" if exc.strerror else f"damaged: {_first_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - damaged files make Pillow raise SyntaxError, ValueError, struct.error...
        return f"damaged: {_first_line(exc)}"
    return None


@contextlib.contextmanager
def opened_image(path: Path) -> Iterator[Any]:
    """Image.open on a regular file only (open_regular): a FIFO named x.png would wait for a writer forever.
    Pillow's 'cannot identify' would name the open file object; it names the path, as for a path given."""
    from PIL import Image, UnidentifiedImageError

    with open_regular(path) as handle:
        try:
            image = Image.open(handle)
        except UnidentifiedImageError:
            raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None
        with image:
            yield image


def over_pixel_limit(image: Any) -> str | None:
    """Why an opened image is too large to decode (Pillow's decompression-bomb limit), or None."""
    from PIL import Image

    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    return f"{width}x{height} pixels is over the decompression-bomb limit of {limit:,}" if limit is not None and width * height > limit else None


def _jpeg_has_end_marker(path: Path) -> bool:
    """A complete JPEG ends with FFD9 (possibly followed by a little padding); a truncated one does not.

    Small files are decoded instead: cheap, and their tail could reach back into an EXIF thumbnail.
    """
    tail = 4096
    with open_regular(path) as handle:
        if handle.seek(0, os.SEEK_END) <= 4 * tail:
            return False
        handle.seek(-tail, os.SEEK_END)
        return b"\xff\xd9" in handle.read()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The same seed gives the same split; every class keeps at least one training image, and a class of
    two or more images gives validation at least one (val_acc would otherwise not see the class). Multi-label
    images are split by their rarest class (targets.stratum)."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    counts = class_counts([label for _, label in samples])
    for sample in samples:
        by_class[stratum(sample[1], counts)].append(sample)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        group = sorted(by_class[label])
        rng.shuffle(group)
        n_val = min(len(group) - 1, round(len(group) * val_fraction) or int(val_fraction > 0))
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    if not val and val_fraction <= 0:
        raise DataError(Problem("data.val_fraction", "leaves no validation images", "raise val_fraction"))
    if not val:  # every class of two or more images gave one: each class has a single image, which trains
        raise DataError(
            Problem(
                "data.root", "every class has one image, which training keeps: none is left to validate on",
                "add a second image to a class or more, or give data.root train/ and val/ folders",
            )
        )  # raising val_fraction cannot help
    return sorted(train), sorted(val)


# ---------------------------------------------------------------------------------------------
# Decoding and transforms


# What open_rgb does before the transforms, for deployments that must decode alike (export's model.json).
DECODING_STEPS = (
    "EXIF orientation applied (the image upright)",
    "transparency (RGBA, LA, palette with transparency) composited onto white",
    "16-bit and 32-bit integer gray in [0, 65535] divided by 257; float gray in [0, 1] times 255; other deep values stretched over the image's own range",
    "gray, palette and CMYK converted to RGB",
)


def open_rgb(path: Path) -> Any:
    """Decode any image mode (grayscale, RGBA, palette, 16-bit, CMYK) into upright 8-bit RGB."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        # Pillow only warns between its pixel limit and twice that (over twice, it refuses). Here the limit
        # is the limit, as in training's check: predict and evaluate treat such a file alike, in one line.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with opened_image(path) as image:
            too_large = over_pixel_limit(image)
            if too_large:
                raise ValueError(too_large)
            image.load()
            # Phones store photos sideways with an EXIF rotation tag; the network must see them upright.
            return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Any) -> Any:
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        image = _deep_to_8bit(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _deep_to_8bit(image: Any) -> Any:
    """16-bit, 32-bit and float grayscale to 8 bits by the depth's own scale, so a dark image stays dark
    and images keep their brightness relative to each other: 16-bit values over 257, floats in [0, 1]
    times 255. Values with no known scale (negative, beyond 16 bits, floats outside [0, 1]) are stretched
    over their own range. Converting directly would clip all but the darkest values to white (or, for
    floats in [0, 1], everything to black)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image, dtype=np.float64)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode != "F" and 0 <= low and high <= 65535:
        scaled = array / 257.0
    elif image.mode == "F" and 0 <= low and high <= 1:
        scaled = array * 255.0
    else:
        scaled = (array - low) * (255.0 / ((high - low) or 1.0))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype("uint8"), mode="L")


def resized_short_side(image: Any, short_side: int, interpolation: str) -> Any:
    """The evaluation transform's first step: the short side becomes `short_side`."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    return F.resize(image, short_side, interpolation=InterpolationMode(interpolation), antialias=True)


def build_transform(preprocessing: Any, augment: str, train: bool, random_erasing: float | None = None) -> Callable[[Any], Any]:
    """The pretrained weights' own preprocessing; training adds random crops and flips when asked, then the
    named policy on the 8-bit image (the policies are defined on its 0-255 pixels), and erasing on the
    normalised tensor (an erased patch reads as the mean colour, as in torchvision's reference recipe)."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    interpolation = T.InterpolationMode(preprocessing.interpolation)
    normalize = [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    erase = [v2.RandomErasing(p=random_erasing)] if train and random_erasing is not None else []
    if train and augment != "none":
        crop_and_flip = [T.RandomResizedCrop(preprocessing.crop, interpolation=interpolation, antialias=True), T.RandomHorizontalFlip()]
        return T.Compose([*crop_and_flip, *_policy(augment, interpolation), *normalize, *erase])
    return T.Compose(
        [T.Resize(preprocessing.resize, interpolation=interpolation, antialias=True), T.CenterCrop(preprocessing.crop), *normalize, *erase]
    )


def _policy(augment: str, interpolation: Any) -> list[Any]:
    """torchvision's automatic augmentation policy named by data.augment (none for standard), with their
    published defaults (AutoAugment: the ImageNet policy)."""
    from torchvision.transforms import v2

    if augment == "standard":
        return []
    policies = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide, "autoaugment": v2.AutoAugment, "augmix": v2.AugMix}
    return [policies[augment](interpolation=interpolation)]


def transform_names(transform: Any) -> list[str]:
    """The steps of a build_transform pipeline as `check` names them: 'RandAugment', 'RandomErasing(p=0.25)'."""
    from torchvision.transforms import v2

    return [type(step).__name__ + (f"(p={step.p:g})" if isinstance(step, v2.RandomErasing) else "") for step in transform.transforms]


def decode(path: Path) -> Any:
    """open_rgb, with a user's damaged file as a DataError."""
    try:
        return open_rgb(path)
    except Exception as exc:  # noqa: BLE001 - Pillow's errors for a damaged file have many types
        raise DataError(Problem(str(path), f"cannot be decoded: {_first_line(exc)}", "remove or replace the file")) from None


class DecodedPixels(Protocol):
    """Images decoded once and kept (data/decoded_cache.py), by their index in the dataset's samples."""

    def image(self, index: int) -> Any: ...  # a PIL image, as decode() returns


class ImageDataset:
    """(image tensor, label) pairs from a list of samples.

    Items are indices, or (index, seed) pairs from an EpochSampler: the transform's random crop and flip
    then come from that seed alone, never from RNG state left by earlier images, epochs or workers.
    `decoded` (decoded_cache.keep_decoded) holds the images already decoded and resized, when they fit in memory.
    """

    def __init__(self, samples: list[Sample], transform: Callable[[Any], Any], multi_label_classes: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.decoded: DecodedPixels | None = None
        # Multi-label: each item's target is its multi-hot row (float32), which the default collate stacks.
        self.multi_hot = None if multi_label_classes is None else target_array([label for _, label in samples], multi_label_classes, True)

    def with_transform(self, transform: Callable[[Any], Any]) -> ImageDataset:
        """The same images, targets and decoded pixels under another transform."""
        twin = copy.copy(self)
        twin.transform = transform
        return twin

    @property
    def targets(self) -> Any:
        """Every item's target: class indices, or multi-hot rows (targets.target_array)."""
        return self.multi_hot if self.multi_hot is not None else target_array([label for _, label in self.samples], 0, False)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[index]
        if self.multi_hot is not None:
            label = self.multi_hot[index]
        image = self.decoded.image(index) if self.decoded is not None else decode(path)
        if seed is None:
            return self.transform(image), label
        with seeded_torch_rng(seed):
            return self.transform(image), label


@contextlib.contextmanager
def seeded_torch_rng(seed: int) -> Iterator[None]:
    """Run a block on torch's CPU generator seeded with `seed`; the caller's RNG state is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 64-bit seed for (run seed, global epoch); negative run seeds are fine."""
    import numpy as np

    return int(np.random.SeedSequence([seed & (2**64 - 1), epoch]).generate_state(1, dtype=np.uint64)[0])


class EpochSampler:
    """Sample indices in an order that depends only on (seed, epoch), each with its own random seed.

    A resumed run therefore sees the same order and the same augmentations as an uninterrupted one, with
    any number of workers (persistent workers keep RNG state across epochs, so nothing may rely on it).
    Under distributed training each rank takes its `shard` of that one order (distributed.shard_of): padded
    for training, so every rank takes the same number of steps; unpadded for evaluation, so no image counts twice.
    With `weights` (one per image; data.sampler: balanced) the epoch is `size` draws with replacement, as
    WeightedRandomSampler makes them, from the same seeded generator.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, shard: Shard | None = None, pad: bool = True, weights: Sequence[float] | None = None) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.shard = shard or Shard()
        self.pad = pad
        self.epoch = 1
        self.weights = weights

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return shard_length(self.size, self.shard, self.pad)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        import torch

        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            # WeightedRandomSampler's own draw, which takes no generator per epoch: an image drawn twice gets two seeds.
            order = torch.multinomial(torch.as_tensor(self.weights, dtype=torch.double), self.size, replacement=True, generator=generator)
            seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
            return iter(shard_of(list(zip(order.tolist(), seeds.tolist())), self.shard, self.pad))
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        return iter(shard_of(list(zip(order.tolist(), seeds[order].tolist())), self.shard, self.pad))


def without_workers(loader: Any) -> Any:
    """The same loader, its batches made in this process: same dataset, batch size, sampler (the same
    EpochSampler object, so set_loader_epoch still reaches it), generator and pinning."""
    from torch.utils.data import DataLoader

    sampler = loader.sampler if isinstance(loader.sampler, EpochSampler) else None
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=0, generator=loader.generator, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last)  # fmt: skip


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Make the next pass over a shuffling loader the one for `epoch` (global, counted from 1)."""
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(epoch)


def worker_error(exc: DataError) -> DataError:
    """A DataError raised in a DataLoader worker comes back as traceback text; keep its last line."""
    text = str(exc).strip()
    if "Original Traceback" not in text:
        return exc
    last = text.splitlines()[-1]
    prefix = f"{DataError.__module__}.{DataError.__name__}: "
    return DataError(last.removeprefix(prefix))


def resolve_workers(setting: int | str, n_images: int) -> int:
    """'auto': worker processes only when there is enough decoding to hide their start-up cost."""
    if setting != "auto":
        return int(setting)
    if n_images < 512:
        return 0
    return spare_cores()


def spare_cores() -> int:
    """Cores for decoding images beside the model: all but one, which the model's own threads keep; at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(
    dataset: Any, batch_size: int, shuffle: bool, workers: int, seed: int, pin_memory: bool = False, shard: Shard | None = None,
    weights: Sequence[float] | None = None,
) -> Any:  # fmt: skip
    """A DataLoader; shuffling ones use an EpochSampler (call set_loader_epoch before each epoch), which
    draws by `weights` (one per image) when given.

    With a shard of several ranks, this rank's part: training shards padded to equal length, others not.
    """
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator()
    generator.manual_seed(seed)
    sharded = shard is not None and shard.world > 1
    sampler = EpochSampler(len(dataset), seed, shuffle, shard, pad=shuffle, weights=weights if shuffle else None) if shuffle or sharded else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # A training batch of one image: BatchNorm cannot normalise one value per channel and raises (a 1x1
        # feature map). Such a last batch is left out of its epoch; the shuffle leaves out another image each epoch.
        drop_last=shuffle and sampler is not None and len(sampler) > 1 and len(sampler) % batch_size == 1,
    )
