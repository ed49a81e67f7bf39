"""Cached backbone features for phases that train only the head.

While the whole backbone is frozen its output cannot change, so it is computed once per image and view
(the head's input, read by a forward pre-hook on the head, in eval mode without gradients) and the head
trains on those tensors alone: an epoch takes milliseconds instead of a forward pass over every image.
Views are drawn per (seed, epoch), so a resumed run matches an uninterrupted one; CacheSpec.key says what
a cached file depends on. The views, where the features live and what caching costs in accuracy:
docs/performance.md (Speed, Feature cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from transferctl.runs.cache_folder import CACHE_ENV, LIMIT_ENV, about_path, describe, features_path, keep_under_limit, limit_bytes, mark_used
from transferctl.data.folders import EpochSampler, ImageDataset, Sample, build_transform
from transferctl.data.label_files import label_file_digest
from transferctl.training.distributed import active as distributed_active
from transferctl.training.distributed import all_ranks_agree, gather_shards, is_main, shard, wrap_for_training
from transferctl.data.sharding import shard_of
from transferctl.training.engine import TrainingStopped
from transferctl.training.runtime import Runtime, logits_of
from transferctl.errors import ConfigError, Problem

FORMAT = 2  # bump when what a cache file holds changes (2: view 0 is the clean view)


def weights_digest(model: nn.Module, head_path: str) -> str:
    """A hash of every weight and buffer except the head's: the body the features come from."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        if name.startswith(head_path + "."):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def network_digest(model: nn.Module) -> str:
    """The network's code, which its weights do not show: its structure (the repr: layer types, strides,
    activations, pooling) and the source files of module classes from outside torch, torchvision and timm
    (a `python:` backbone's own code; an edit to its forward() keeps every weight's shape)."""
    import inspect

    digest = hashlib.blake2b(repr(model).encode(), digest_size=16)
    own = sorted({type(module) for module in model.modules() if type(module).__module__.split(".")[0] not in ("torch", "torchvision", "timm")}, key=str)
    for kind in own:
        with contextlib.suppress(TypeError, OSError):  # classes made at run time have no file
            digest.update(Path(inspect.getfile(kind)).read_bytes())
    return digest.hexdigest()


def files_fingerprint(samples: list[Sample]) -> list[list[Any]]:
    """[path, label, size, mtime_ns, ctime_ns, inode] of every sample: a changed, added or removed file changes
    the key. Size and mtime alone miss a file replaced by one of the same size with its mtime restored, and
    class folders swapped with mv (relabelling): the change time and the inode catch those."""
    rows = []
    for path, label in samples:
        stat = path.stat()
        rows.append([str(path), label, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino])
    return rows


def library_versions() -> dict[str, str]:
    """What computes the features besides the weights: the network (torch, timm), the resize and crop
    (torchvision), the decoding and resampling (Pillow). An upgrade may move them, so it computes new ones."""
    from importlib.metadata import PackageNotFoundError, version

    import PIL
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    with contextlib.suppress(PackageNotFoundError):
        versions["timm"] = version("timm")  # its metadata, not an import: timm's import takes seconds
    return versions


@dataclass(frozen=True)
class CacheSpec:
    """What the features of one split depend on, besides its files."""

    backbone: str
    weights: str  # weights_digest of the body
    cut: str | None
    head_path: str
    preprocessing: dict[str, Any]
    augment: str  # data.augment: none | standard | a policy's name
    views: int
    seed: int
    precision: str
    network: str = ""  # network_digest: the code the weights run in
    device: str = "cpu"  # the device type: a GPU's fp32 convolutions may use TF32 and give other features
    random_erasing: float | None = None  # data.random_erasing
    labels: str | None = None  # the digest of data.labels, when the samples come from a label file

    def key(self, samples: list[Sample]) -> str:
        parts = {
            "format": FORMAT, "libraries": library_versions(), "backbone": self.backbone, "cut": self.cut, "head": self.head_path,
            "weights": self.weights, "network": self.network, "preprocessing": self.preprocessing, "augment": self.augment,
            # Augmented views are drawn from the run seed; without augmentation the seed changes nothing.
            "views": self.views, "seed": self.seed if self.random else None, "precision": self.precision,
            "device": self.device, "files": files_fingerprint(samples),
        }  # fmt: skip
        if self.random_erasing is not None:  # only when set: the files cached before the option keep their keys
            parts["random_erasing"] = self.random_erasing
        if self.labels is not None:  # likewise: a folder's key stays as it was
            parts["labels"] = self.labels
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    @property
    def random(self) -> bool:
        """Whether the views after the clean one are random (drawn from the seed)."""
        return self.augment != "none" or self.random_erasing is not None


@dataclass
class FeatureStore:
    """(N, V, D) float32 features of one split: an ndarray, or an np.memmap of a file in the cache folder."""

    features: np.ndarray
    labels: np.ndarray  # (N,) int64 class indices, or (N, classes) float32 multi-hot rows
    location: str  # "memory" or the file
    reused: bool  # read from an earlier run's file
    seconds: float  # spent computing (0 when reused)
    saved: Path | None = None  # the cache folder's file of these features, when there is one

    @property
    def views(self) -> int:
        return int(self.features.shape[1])


class HeadNotCacheable(RuntimeError):
    """The head's output is not the network's output (e.g. squeezenet pools after its conv head)."""


def view_seeds(seed: int, view: int, count: int) -> list[int]:
    """The augmentation seed of view `view` of each of `count` images: from (run seed, view) only."""
    sequence = np.random.SeedSequence([seed & (2**64 - 1), 0xFEA7, view])
    return [int(s) for s in sequence.generate_state(count, dtype=np.uint64) >> np.uint64(2)]


@dataclass(frozen=True)
class Views:
    """The images whose features to cache: `clean` gives view 0, `dataset`'s random transform views 1, 2, ..."""

    dataset: ImageDataset
    clean: ImageDataset
    count: int
    seed: int

    def of(self, indices: list[int]) -> _Views:
        return _Views(self.dataset, self.clean, self.count, self.seed, indices)


class _Views:
    """Dataset of (image, view) pairs of the images `indices`, image-major: item k is view k % V of image
    indices[k // V]. View 0 comes from `clean` (the evaluation transform), the others from `dataset`'s random
    transform. A view's seed depends on the image's index in the whole dataset, never on the subset."""

    def __init__(self, dataset: ImageDataset, clean: ImageDataset, views: int, seed: int, indices: list[int]) -> None:
        self.dataset, self.clean, self.views, self.indices = dataset, clean, views, indices
        self.seeds = [view_seeds(seed, v, len(dataset)) for v in range(views)]

    def __len__(self) -> int:
        return len(self.indices) * self.views

    def __getitem__(self, item: int) -> tuple[Any, int]:
        position, view = divmod(item, self.views)
        index = self.indices[position]
        return self.clean[index] if view == 0 else self.dataset[(index, self.seeds[view][index])]


def load_or_compute(
    spec: CacheSpec, mode: str, budget_mb: int, model: nn.Module, views: Views, runtime: Runtime, batch_size: int, workers: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> FeatureStore:
    """The features of `views` under `spec`: from the cache folder when an earlier run left them, else computed.

    should_stop is asked after every batch (TrainingStopped when it says yes): computing takes minutes on a
    large set, and Ctrl-C must not wait for it. Under torchrun the ranks' batch counts differ, so a stop
    there waits for the features, as it waits for a step.
    """
    dataset = views.dataset
    labels = dataset.targets  # class indices, or multi-hot rows
    key = spec.key(dataset.samples)
    path = features_path(key)
    reused = _reuse(path, mode, budget_mb, (len(dataset), spec.views))
    if all_ranks_agree(reused is not None):  # under torchrun, every rank computes its part or none does
        assert reused is not None
        mark_used(path)
        return FeatureStore(reused[0], labels, reused[1], True, 0.0, path)
    started = time.perf_counter()
    per_batch = spec.views * max(1, batch_size // spec.views)  # whole images: every batch holds all views of its images
    if not distributed_active():
        loader = _view_loader(views.of(list(range(len(dataset)))), per_batch, workers, runtime)
        array, location = _compute(model, spec, loader, len(dataset), runtime, mode, budget_mb, path, should_stop)
    else:
        array, location = _compute_sharded(model, spec, views, per_batch, workers, runtime, mode, path)
    saved = path if mode != "memory" and path.is_file() else None
    return FeatureStore(array, labels, location, False, time.perf_counter() - started, saved)


def _reuse(path: Path, mode: str, budget_mb: int, rows: tuple[int, int]) -> tuple[np.ndarray, str] | None:
    """An earlier run's features for this key: in RAM when they fit the budget, else memory-mapped."""
    if mode == "memory" or not path.is_file():
        return None
    try:
        fits = mode == "auto" and path.stat().st_size <= budget_mb * 2**20
        array = np.load(path) if fits else np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None  # a damaged or foreign file: compute afresh and replace it
    if array.shape[:2] != rows:
        return None
    return array, "memory" if fits else str(path)


def _compute_sharded(
    model: nn.Module, spec: CacheSpec, views: Views, per_batch: int, workers: int, runtime: Runtime, mode: str, path: Path
) -> tuple[np.ndarray, str]:
    """Under torchrun: each rank computes its part of the images, every rank gets all rows; rank 0 saves them."""
    count = len(views.dataset)
    everything = list(range(count))
    if count < shard().world:  # some rank would have no image to learn the features' width from
        return _compute(model, spec, _view_loader(views.of(everything), per_batch, workers, runtime), count, runtime, "memory", 0, path)
    mine = shard_of(everything, shard(), pad=False)
    local, _ = _compute(model, spec, _view_loader(views.of(mine), per_batch, workers, runtime), len(mine), runtime, "memory", 0, path)
    gathered = gather_shards(torch.from_numpy(local), total=count).numpy()  # CPU tensors: gloo, also beside nccl
    if is_main():
        gathered, _ = _persist(gathered, "memory", mode, path, path.with_name(f"{path.name}.tmp-{os.getpid()}"))
    return gathered, "memory"


def _view_loader(views: _Views, batch_size: int, workers: int, runtime: Runtime) -> Any:
    from torch.utils.data import DataLoader

    # Its own generator: building the cache must not draw from the global RNG (resume restores it just before).
    return DataLoader(views, batch_size=batch_size, shuffle=False, num_workers=workers, generator=torch.Generator().manual_seed(0),
                      pin_memory=runtime.device.type == "cuda")  # fmt: skip


@torch.no_grad()
def _compute(
    model: nn.Module, spec: CacheSpec, loader: Any, count: int, runtime: Runtime, mode: str, budget_mb: int, path: Path,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[np.ndarray, str]:
    from transferctl.training.runtime import to_device

    head = model.get_submodule(spec.head_path)
    captured: dict[str, torch.Tensor] = {}

    def head_input(module: nn.Module, args: Any) -> None:
        captured["input"] = args[0]

    def head_output(module: nn.Module, args: Any, output: Any) -> None:
        captured["output"] = output

    handles = [head.register_forward_pre_hook(head_input), head.register_forward_hook(head_output)]
    array: np.ndarray | None = None
    location, temp = "memory", path.with_name(f"{path.name}.tmp-{os.getpid()}")
    was_training = model.training
    model.eval()
    try:
        row = 0
        for images, _ in loader:
            images, _ = to_device(images, torch.zeros(0, dtype=torch.long), runtime)
            with runtime.autocast():
                output = logits_of(model(images))
            if output is not captured["output"] or captured["input"].ndim != 2:
                raise HeadNotCacheable(f"the output of {spec.head_path} is not the network's output")
            features = captured["input"].float().cpu().numpy().reshape(-1, spec.views, captured["input"].shape[1])
            if array is None:
                array, location = _allocate(mode, budget_mb, (count, spec.views, features.shape[2]), temp)
            array[row : row + len(features)] = features
            row += len(features)
            if should_stop():
                raise TrainingStopped
    except BaseException:  # stopped, a second Ctrl-C, or failed: a half-written file must not stay in the cache folder
        if location != "memory":
            _discard(temp)
        raise
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    assert array is not None, "a split always has images"
    return _persist(array, location, mode, path, temp)


def _allocate(mode: str, budget_mb: int, shape: tuple[int, int, int], temp: Path) -> tuple[np.ndarray, str]:
    size = math.prod(shape) * 4
    if mode == "memory" or (mode == "auto" and size <= budget_mb * 2**20):
        return np.empty(shape, dtype=np.float32), "memory"
    try:
        temp.parent.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(temp, mode="w+", dtype=np.float32, shape=shape)
        _reserve(temp)
    except OSError as exc:
        _discard(temp)
        raise _unwritable(temp.parent, exc, size) from None
    return array, str(temp)


def _discard(temp: Path) -> None:
    """Remove a half-written cache file, if there is one and it can be removed (its folder may not even be one)."""
    with contextlib.suppress(OSError):
        temp.unlink(missing_ok=True)


def _reserve(path: Path) -> None:
    """Claim a memory-mapped file's blocks now: the file is sparse, and a disk that fills up while the
    features are written into the mapping kills the process (SIGBUS) instead of raising an error."""
    if not hasattr(os, "posix_fallocate"):
        return
    with path.open("r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            # A file system without fallocate: the mapping works, unreserved.


def _unwritable(folder: Path, exc: OSError, size: int) -> ConfigError:
    """Features that must go to disk (data.cache: disk, or too large for data.cache_memory_mb) and cannot."""
    reason = "it is not a folder" if folder.exists() and not folder.is_dir() else exc.strerror or str(exc)
    return ConfigError(Problem(str(folder), f"the feature cache ({size / 2**20:.1f} MB) cannot be written there: {reason}",
                               f"point ${CACHE_ENV} at a writable folder with room, or set data.cache: memory or a larger data.cache_memory_mb"))  # fmt: skip


def _persist(array: np.ndarray, location: str, mode: str, path: Path, temp: Path) -> tuple[np.ndarray, str]:
    """Move a finished cache file into place (atomically: a concurrent run sees the whole file or none)."""
    if mode == "memory":
        return array, location
    size = array.nbytes
    try:
        if location == "memory":
            temp.parent.mkdir(parents=True, exist_ok=True)
            with temp.open("wb") as handle:
                np.save(handle, array)
        else:
            array.flush()  # type: ignore[attr-defined]
            del array
        os.replace(temp, path)
    except OSError as exc:
        _discard(temp)
        if location != "memory":
            raise _unwritable(path.parent, exc, size) from None
        return array, location  # kept in memory, the features only miss the next run's reuse
    if location == "memory":
        return array, location
    return np.load(path, mmap_mode="r"), str(path)


class FeatureBatches:
    """Batches of cached features in the order an EpochSampler gives for (seed, epoch), one view per image.

    Shuffling ones draw each image's view from the seed the sampler pairs with it; `sampler` is there so
    data.set_loader_epoch treats this like the image loader it stands in for.
    """

    def __init__(self, store: FeatureStore, batch_size: int, sampler: Any, drop_last: bool = False) -> None:
        self.store, self.batch_size, self.drop_last = store, batch_size, drop_last  # drop_last as the image loader's
        self.sampler = sampler if isinstance(sampler, EpochSampler) else None  # a plain loader's SequentialSampler: in order

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else len(self.store.labels)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is None:
            order = np.arange(len(self.store.labels))
            views = np.zeros_like(order)
        else:  # under torchrun, this rank's shard of the epoch's order
            pairs = np.asarray(list(self.sampler), dtype=np.int64).reshape(-1, 2)
            order, views = pairs[:, 0], pairs[:, 1] % self.store.views
        for start in range(0, len(order) - (len(order) % self.batch_size if self.drop_last else 0), self.batch_size):
            index, view = order[start : start + self.batch_size], views[start : start + self.batch_size]
            features = np.ascontiguousarray(self.store.features[index, view])
            yield torch.from_numpy(features), torch.from_numpy(self.store.labels[index])


def head_for_features(model: nn.Module, head_path: str) -> nn.Module:
    """The head, preceded by the dropouts that sit directly before it in its container (they stay in train
    mode in a full forward pass of a frozen-body phase, so they do here too)."""
    parent_path, _, name = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = model.get_submodule(head_path)
    if not isinstance(parent, nn.Sequential):
        return head
    children = list(parent.named_children())
    position = [child for child, _ in children].index(name)
    dropouts: list[nn.Module] = []
    for _, module in reversed(children[:position]):
        if not isinstance(module, nn.modules.dropout._DropoutNd):
            break
        dropouts.insert(0, module)
    return nn.Sequential(*dropouts, head) if dropouts else head


class FrozenBodyShortcut:
    """Decides, per phase (or unfreezing stage), whether the head trains on cached features, and builds them.

    `path_for(plan)` returns (module to train, loaders) for a frozen-body plan, or None: full forward passes.
    The features are rebuilt when the body's weights changed since they were computed (a head phase after
    a body phase); a network whose head output is not its output falls back to full passes, with a notice.
    """

    def __init__(
        self, config: Any, backbone: Any, model: nn.Module, loaders: dict[str, Any], runtime: Runtime, notice: Any,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config, self.backbone, self.model, self.loaders, self.runtime, self.notice = config, backbone, model, loaders, runtime, notice
        self.should_stop = should_stop
        self.records: list[dict[str, Any]] = []  # one per build or reuse, for the summary
        self._built: tuple[str, dict[str, Any]] | None = None  # (body digest, feature loaders)
        self._unusable = False
        self.cache_limit = limit_bytes()  # read now: a mistyped limit stops the run before any work

    def path_for(self, plan: Any) -> tuple[nn.Module, dict[str, Any]] | None:
        data = self.config.data
        if data.cache == "off" or not plan.backbone_frozen or self._unusable:
            return None
        digest = weights_digest(self.model, self.backbone.head_path)
        if self._built is None or self._built[0] != digest:
            try:
                self._built = (digest, self._build(plan, digest))
            except HeadNotCacheable as exc:
                self._unusable = True
                self.notice(f"data.cache: {exc}; training with full forward passes")
                return None
        # Under torchrun the head alone is wrapped in DDP: the ranks average its gradients as in a full pass.
        return wrap_for_training(head_for_features(self.model, self.backbone.head_path), self.runtime.device), self._built[1]

    def _clean(self, dataset: ImageDataset) -> ImageDataset:
        """The same images under the evaluation transform (view 0)."""
        return dataset.with_transform(build_transform(self.backbone.preprocessing, "none", train=False))

    def _build(self, plan: Any, digest: str) -> dict[str, Any]:
        data, backbone = self.config.data, self.backbone
        views = data.cached_views if data.random_views else 1
        spec = CacheSpec(backbone.name, digest, backbone.cut, backbone.head_path, backbone.preprocessing.to_dict(), data.augment, views,
                         self.config.seed, self.runtime.precision, network_digest(self.model), self.runtime.device.type,
                         data.random_erasing, data.labels and label_file_digest(data.labels))  # fmt: skip
        stores = {}
        for split, spec_of_split in (("train", spec), ("val", dataclasses.replace(spec, augment="none", views=1, random_erasing=None))):
            loader = self.loaders[split]
            views_of_split = Views(loader.dataset, self._clean(loader.dataset), spec_of_split.views, self.config.seed)
            stores[split] = load_or_compute(spec_of_split, data.cache, data.cache_memory_mb, self.model, views_of_split, self.runtime,
                                            loader.batch_size, loader.num_workers, self.should_stop)  # fmt: skip
            store = stores[split]
            self.records.append({"phase": plan.name, "split": split, "views": store.views, "location": store.location,
                                 "reused": store.reused, "seconds": round(store.seconds, 3)})  # fmt: skip
        if is_main():
            self._file_away(stores)
        train, val = stores["train"], stores["val"]
        how = "reused" if train.reused and val.reused else f"computed in {train.seconds + val.seconds:.1f} s"
        self.notice(f"phase '{plan.name}': the backbone is frozen; training the head on cached features ({train.views} view(s) per image, {how}, {train.location})")
        loaders = self.loaders
        return {split: FeatureBatches(stores[split], loaders[split].batch_size, loaders[split].sampler, loaders[split].drop_last) for split in ("train", "val")}

    def _file_away(self, stores: dict[str, FeatureStore]) -> None:
        """Describe the feature files this build wrote, then hold the cache folder under its limit."""
        for split, store in stores.items():
            if store.saved is not None and not (store.reused and about_path(store.saved).is_file()):  # older entries had none
                describe(store.saved, self._about(split, store))
        removed = keep_under_limit(self.cache_limit, {store.saved for store in stores.values() if store.saved is not None})
        if any(entry.kind == "features" for entry in removed):
            megabytes = sum(entry.size for entry in removed) / 2**20
            self.notice(f"cache folder over its limit (${LIMIT_ENV}): removed {len(removed)} least recently used file(s), {megabytes:.0f} MB")

    def _about(self, split: str, store: FeatureStore) -> dict[str, Any]:
        samples = self.loaders[split].dataset.samples
        return {"backbone": self.backbone.name, "cut": self.backbone.cut, "split": split, "images": len(samples), "views": store.views,
                "width": int(store.features.shape[2]), "data": os.path.commonpath([str(path.parent) for path, _ in samples]),
                "augment": self.config.data.augment if split == "train" else "none", "precision": self.runtime.precision}  # fmt: skip
