"""Decode each image once: the decoded, resized 8-bit pixels stay in memory across epochs.

Phases that run the backbone on every image (fine-tuning, training from scratch) otherwise decode every
file again in every epoch. Each image is decoded and resized to the preprocessing's short side once (the
first step of the evaluation transform, so evaluation sees exactly the pixels it would without the cache),
and stored as uint8 in one flat tensor, which DataLoader workers share instead of copying. Random crops
then come from the resized image, as fastai's presizing does. When a split is kept, what it costs in
memory, and where the crops are made: docs/performance.md (Speed, Decoded images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferctl.data.folders import ImageDataset, Sample, decode, resized_short_side, without_workers

CHANNELS = 3


@dataclass
class DecodedImages:
    """The resized RGB pixels of every sample of a split, back to back in one uint8 tensor."""

    pixels: Any  # torch.Tensor, uint8, flat
    shapes: np.ndarray  # (N, 2): height, width
    offsets: np.ndarray  # (N,): where each image starts in `pixels`
    seconds: float  # spent decoding

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def megabytes(self) -> float:
        return self.pixels.numel() / 2**20

    def image(self, index: int) -> Any:
        from PIL import Image

        height, width = (int(n) for n in self.shapes[index])
        start = int(self.offsets[index])
        array = self.pixels[start : start + height * width * CHANNELS].numpy().reshape(height, width, CHANNELS)
        return Image.fromarray(array)


def resized_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(height, width) of a (width, height) image whose short side becomes `short_side` (torchvision's rounding)."""
    width, height = size
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def estimated_bytes(paths: list[Path], short_side: int, stop_above: float = float("inf")) -> int:
    """What the decoded images will take, from the files' headers alone (no pixels are decoded).

    Stops reading headers once the total passes `stop_above`: a dataset far over the budget, which is
    where reading every header would take long, is told apart after the first budget's worth of images.
    """
    from PIL import Image

    total = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                height, width = resized_size(image.size, short_side)
        except OSError:
            continue  # decoding it names the file in a clear error
        total += height * width * CHANNELS
        if total > stop_above:
            break
    return total


class _Decode:
    """Dataset of decoded, resized images as uint8 (H, W, 3) tensors, for a DataLoader's workers."""

    def __init__(self, samples: list[Sample], short_side: int, interpolation: str) -> None:
        self.samples, self.short_side, self.interpolation = samples, short_side, interpolation

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        import torch

        image = resized_short_side(decode(self.samples[index][0]), self.short_side, self.interpolation)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def decode_all(samples: list[Sample], short_side: int, interpolation: str, workers: int, expected_bytes: int | None = None) -> DecodedImages:
    """Decode every sample once, on `workers` processes (0: in this one).

    Each image goes straight into one buffer sized from the headers (`expected_bytes`, else estimated here),
    so the peak is the cache itself rather than twice it; an estimate that falls short grows the buffer.
    """
    import torch
    from torch.utils.data import DataLoader

    started = time.perf_counter()
    if expected_bytes is None:
        expected_bytes = estimated_bytes([path for path, _ in samples], short_side)
    pixels = torch.empty(expected_bytes, dtype=torch.uint8)
    shapes = np.zeros((len(samples), 2), dtype=np.int64)
    offsets = np.zeros(len(samples), dtype=np.int64)
    # Its own generator: workers' seeds must not come from the global RNG (a resumed run restored it).
    loader = DataLoader(_Decode(samples, short_side, interpolation), batch_size=None, num_workers=workers, generator=torch.Generator().manual_seed(0))
    used = 0
    for index, image in enumerate(loader):
        size = image.numel()
        if used + size > pixels.numel():
            pixels.resize_(max(used + size, pixels.numel() + pixels.numel() // 4))
        pixels[used : used + size] = image.reshape(-1)
        shapes[index], offsets[index] = image.shape[:2], used
        used += size
    return DecodedImages(pixels[:used], shapes, offsets, time.perf_counter() - started)


def keep_decoded(dataset: ImageDataset, preprocessing: Any, budget_mb: int, workers: int) -> DecodedImages | None:
    """Decode a dataset's images once and keep them on it, when their estimated size fits `budget_mb`."""
    if dataset.decoded is None:
        budget = budget_mb * 2**20
        expected = estimated_bytes([path for path, _ in dataset.samples], preprocessing.resize, stop_above=budget)
        if expected > budget:
            return None
        dataset.decoded = decode_all(dataset.samples, preprocessing.resize, preprocessing.interpolation, workers, expected)
    return dataset.decoded


class DecodeOnce:
    """Before the first epoch that runs the backbone on images, keeps each split's decoded images in memory
    when they fit; `records` says what was kept, for the run's summary.

    With `inline`, a split kept in memory is then cropped and normalised in the training process itself
    (its loader in `loaders` is replaced by one without workers): for CPU training on two cores, where the
    one worker process competes with the model's two threads for the cores (scripts/bench.py measured it).
    """

    def __init__(self, data: Any, preprocessing: Any, loaders: dict[str, Any], notice: Any, inline: bool = False) -> None:
        self.data, self.preprocessing, self.loaders, self.notice, self.inline = data, preprocessing, loaders, notice, inline
        self.records: list[dict[str, Any]] = []
        self._done = data.cache == "off"

    def prepare(self) -> None:
        if self._done:
            return
        self._done = True
        for split in ("train", "val"):
            loader = self.loaders[split]
            decoded = keep_decoded(loader.dataset, self.preprocessing, self.data.cache_memory_mb, loader.num_workers)
            if decoded is None:
                self.notice(f"data.cache_memory_mb: the decoded {split} images need more than {self.data.cache_memory_mb} MB; decoding them every epoch")
                continue
            inline = self.inline and loader.num_workers > 0
            if inline:
                self.loaders[split] = without_workers(loader)
            self.records.append({"split": split, "images": len(decoded), "megabytes": round(decoded.megabytes, 1), "seconds": round(decoded.seconds, 3),
                                 "workers": 0 if inline else loader.num_workers})  # fmt: skip
        if self.records:
            kept = ", ".join(f"{r['split']} {r['images']} ({r['megabytes']:.0f} MB)" for r in self.records)
            where = "; cropped in this process, beside the model's threads" if self.inline and not any(r["workers"] for r in self.records) else ""
            self.notice(f"decoded images kept in memory for the next epochs: {kept}, in {sum(r['seconds'] for r in self.records):.1f} s{where}")
