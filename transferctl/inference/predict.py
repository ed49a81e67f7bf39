"""predict: class probabilities for image files, one record per input, in input order. A multi-label run's
record lists every label whose sigmoid score reaches its class's threshold (trained_model.RunTask).

Inputs stream through: paths are read lazily (a `find | transferctl predict RUN -` pipeline produces its
first lines before `find` ends), decoded on a few threads up to one batch ahead, and run through the model
a batch at a time, so the next batch decodes while the model runs this one (Pillow and torchvision's
transforms release the GIL; scripts/bench_predict.py measures the gain). A file that cannot be decoded
becomes an error record in its place; it never stops the others.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from transferctl.data.folders import list_images, open_rgb, spare_cores
from transferctl.paths import NotRegularFile, path_trouble

if TYPE_CHECKING:
    from transferctl.inference.trained_model import RunTask

DEFAULT_TOP_K = 5


def read_path_lines(stream: TextIO) -> Iterator[str]:
    """One path per line (as `find` writes them); blank lines are skipped, the rest kept verbatim."""
    for line in stream:
        path = line.rstrip("\r\n")
        if path.strip():
            yield path


def expand_paths(paths: Iterable[str]) -> Iterator[str]:
    """Files as given; a folder becomes the images below it, sorted. A folder without images stays itself,
    so that it gets an error record (decode_error) instead of passing without a word."""
    for path in paths:
        if _is_folder(path):
            yield from [str(image) for image in list_images(Path(path))] or [path]
        else:
            yield path


def _is_folder(path: str) -> bool:
    """Path.is_dir, or False for a path that cannot be looked up (a name over 255 bytes): decoding it gives
    its error record, where an exception would end the command and lose the records of later inputs."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def decode_error(path: str, exc: BaseException) -> str:
    """A short, path-free reason why a file could not be read as an image."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "a folder with no images in it"  # expand_paths leaves only such folders
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (or a format Pillow cannot read)"
    if isinstance(exc, NotRegularFile):
        return str(exc)  # a FIFO, which would wait for a writer forever, or a device
    trouble = path_trouble(exc, path)
    if trouble is not None:
        return trouble
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot decode: {text.replace(path, '').strip(' :')[:200] or type(exc).__name__}"


@dataclass
class _Pending:
    path: str
    image: Any = None  # the transformed tensor, or None when decoding failed
    error: str | None = None


_END = object()  # the reader thread's last item: no more paths


def _put(ahead: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put an item on the bounded queue, unless the consumer stopped meanwhile; False when it did."""
    while not stop.is_set():
        try:
            ahead.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    if isinstance(item, Future):
        item.cancel()
    return False


def default_decode_threads() -> int:
    """The data loaders' spare cores, and at least one thread: on one core it still overlaps file reads."""
    return max(1, spare_cores())


class Predictor:
    """A trained model ready to label images; yields one dict per input path.

    decode_threads: threads that decode the files ahead of the model (0: decode in this thread, in turn).
    tta: test-time augmentation (inference/tta.py): each record's probabilities are averaged over its views
    and the record says so ("tta": "flip"). task: a multi-label run's thresholds; its records list labels, not a top k.
    """

    def __init__(
        self, model: Any, classes: list[str], transform: Any, runtime: Any, top_k: int = DEFAULT_TOP_K, decode_threads: int | None = None,
        tta: str = "none", task: RunTask | None = None,
    ) -> None:
        self.model = model
        self.classes = classes
        self.transform = transform
        self.runtime = runtime
        self.top_k = max(1, min(top_k, len(classes)))
        self.decode_threads = default_decode_threads() if decode_threads is None else decode_threads
        self.tta = tta
        from transferctl.inference.trained_model import RunTask

        self.task = task or RunTask()

    def predict(self, paths: Iterable[str], batch_size: int) -> Iterator[dict[str, Any]]:
        pending: list[_Pending] = []
        decoded = 0
        for item in self._decoded(paths, lookahead=batch_size):
            pending.append(item)
            decoded += item.error is None
            if decoded >= batch_size:
                yield from self._flush(pending)
                pending, decoded = [], 0
        yield from self._flush(pending)

    def _decoded(self, paths: Iterable[str], lookahead: int) -> Iterator[_Pending]:
        """Every path decoded, in input order, up to `lookahead` files ahead of the one handed out.

        A thread reads the paths, so a decoded file is handed out at once even while the input waits (a
        slow `find`, paths typed one by one): nothing waits for a path that has not arrived yet.
        """
        if self.decode_threads < 1:
            yield from map(self._decode, paths)
            return
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="transferctl-decode") as pool:
            ahead: queue.Queue[Any] = queue.Queue(maxsize=lookahead)
            stop = threading.Event()
            reader = threading.Thread(target=self._read_ahead, args=(paths, pool, ahead, stop), name="transferctl-paths", daemon=True)
            reader.start()
            try:
                while (item := ahead.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item  # reading the paths failed: a bug, or the input's own error
                    yield item.result()
            finally:
                stop.set()  # stopped early (--strict, a closed pipe): skip what has not started
                while not ahead.empty():
                    item = ahead.get_nowait()
                    if isinstance(item, Future):
                        item.cancel()

    def _read_ahead(self, paths: Iterable[str], pool: ThreadPoolExecutor, ahead: queue.Queue[Any], stop: threading.Event) -> None:
        """The reader thread: submit each path for decoding, in order; then _END, or what went wrong."""
        last: Any = _END
        try:
            for path in paths:
                if stop.is_set() or not _put(ahead, pool.submit(self._decode, path), stop):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            last = exc
        _put(ahead, last, stop)

    def _decode(self, path: str) -> _Pending:
        from PIL import Image

        try:
            return _Pending(path, image=self.transform(open_rgb(Path(path))))
        # Everything Pillow raises for a file it cannot decode; a bug elsewhere still surfaces.
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            return _Pending(path, error=decode_error(path, exc))

    def _flush(self, pending: list[_Pending]) -> Iterator[dict[str, Any]]:
        import torch

        from transferctl.inference.tta import averaged_probabilities, view_logits

        images = [item.image for item in pending if item.error is None]
        probabilities = None
        if images:
            batch = torch.stack(images)
            logits, _ = view_logits(self.model, [(batch, torch.zeros(len(images), dtype=torch.long))], self.runtime, self.tta)
            probabilities = averaged_probabilities(logits, self.task.multi_label)  # with one view (no tta): its softmax (sigmoid)
        row = 0
        for item in pending:
            if item.error is not None:
                yield {"path": item.path, "error": item.error}
                continue
            assert probabilities is not None
            yield self._record(item.path, probabilities[row])
            row += 1

    def _record(self, path: str, probabilities: Any) -> dict[str, Any]:
        import torch

        if self.task.multi_label:
            record = self._labels_record(path, probabilities)
        else:
            scores, indices = torch.topk(probabilities, self.top_k)
            top = [[self.classes[int(i)], round(float(s), 6)] for s, i in zip(scores, indices)]
            record = {"path": path, "label": top[0][0], "score": top[0][1], "top": top}
        return record if self.tta == "none" else {**record, "tta": self.tta}

    def _labels_record(self, path: str, scores: Any) -> dict[str, Any]:
        """Every label whose score is at or above its class's threshold, highest first, and every class's score."""
        from transferctl.training.multi_label_metrics import decisions

        values = scores.double().numpy()
        given = decisions(values, self.task.thresholds)
        labels = [[self.classes[i], round(float(values[i]), 6)] for i in sorted(range(len(values)), key=lambda i: -values[i]) if given[i]]
        return {"path": path, "labels": labels, "scores": {name: round(float(value), 6) for name, value in zip(self.classes, values)}}


def load_predictor(run_dir: Path, checkpoint: str, device: str, precision: str, top_k: int, trust_code: bool = False, tta: str = "none") -> Predictor:
    from transferctl.inference.trained_model import check_runtime_options, eval_transform, inference_runtime, load_trained_task
    from transferctl.inference.tta import check_tta

    check_runtime_options(device, precision)
    check_tta(tta)
    (model, classes, preprocessing), task = load_trained_task(run_dir, checkpoint, trust_code)
    model, runtime = inference_runtime(model, device, precision)
    return Predictor(model, classes, eval_transform(preprocessing), runtime, top_k, tta=tta, task=task)
