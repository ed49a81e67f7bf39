"""Benchmark: transferctl against a plain PyTorch loop on the same data and model, in one run.

    python scripts/bench.py [--images 1000] [--fe-epochs 20] [--ft-epochs 2] [--device cpu|cuda]
                            [--contenders plain-ft,raw-best-ft,transferctl-ft] [--repeat 3] [--seeds 3]

CPU mode writes --images generated 224x224 images (8 shape classes, 80/20 train/val) and runs, each in its
own process (so every peak-memory figure is its own):

  plain-fe     the torchvision fine-tuning tutorial's feature-extraction loop: fp32, default memory layout,
               frozen body, a forward pass over every image every epoch (--fe-epochs)
  transferctl-fe  `transferctl train` with strategy feature_extract, the same epochs, precision auto,
               data.cache auto (a fresh cache folder: the features are computed, not reused)
  plain-ft     the tutorial's fine-tuning loop, all layers, fp32 (--ft-epochs)
  raw-best-ft  the same loop with channels-last and bf16 autocast: the best a raw loop gets here
  transferctl-ft  `transferctl train` fine_tune: 1 head epoch (cached), then --ft-epochs of all layers
  transferctl-ft-worker  the same with `num_workers: 1`: the crops made in a worker process, which on two
               cores `num_workers: auto` no longer does
  accuracy-fp32, accuracy-auto  `transferctl train` from scratch at 64 px for 8 epochs without augmentation,
               seeds 0-2 (--seeds N: 0 to N-1), precision fp32 and auto (bf16 where the CPU has bf16 units): the accuracy the fast
               paths cost, if any (one seed's noise is larger than the 1 point in question)

and prints wall time, training images/s, peak RSS and final val accuracy, with ratios to the plain loops.
`--contenders` runs a subset (ratios need their reference in it). `--repeat N` runs the contenders N times,
interleaved (A B C A B C ...), and reports medians, each repeat's images/s alongside: a shared or throttled
machine can be 30% slower for a minute, and interleaving spreads such spells over every contender.
Weights are random (no pretrained weights offline), so accuracies are low; they are compared, not judged.

`--device cuda` instead compares resnet50 training images/s in `transferctl train` (precision auto: bf16,
or fp16 with loss scaling on GPUs that only emulate bf16; channels-last, pinned memory; the last of 3
epochs over 4,000 images by default) with a synthetic-data ceiling: the same model, precision and step
(channels-last, cuDNN's autotuning, the fused AdamW step) on one batch already on the GPU, after 5 warm-up
steps; and the same steps with each batch copied in from pinned memory, as float32 and as uint8.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 32
CPU_CONTENDERS = ("plain-fe", "transferctl-fe", "plain-ft", "raw-best-ft", "transferctl-ft", "transferctl-ft-worker", "accuracy-fp32", "accuracy-auto")
CUDA_CONTENDERS = ("cuda-ceiling", "transferctl-cuda")
LR = 1e-3
# Random weights learn little in 2 epochs at 224 px, so accuracies there are chance-level noise. The accuracy
# check instead trains long enough at 64 px, without augmentation, to learn the shapes: once in fp32 and once
# with precision auto.
ACCURACY_EPOCHS = 8
ACCURACY_SIZE = 64
ACCURACY_SEEDS = 3
CUDA_IMAGES = 4000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="generated images, train and val together (default 1000; 4000 with --device cuda)")
    parser.add_argument("--fe-epochs", type=int, default=20, help="feature-extraction epochs (default 20)")
    parser.add_argument("--ft-epochs", type=int, default=None,
                        help="full fine-tuning epochs (default 2: the second shows images decoded once; 3 with --device cuda)")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--contenders", default=None, help="comma-separated subset of the contenders (default: all of --device's)")
    parser.add_argument("--repeat", type=int, default=1, help="run the contenders this many times, interleaved; report medians (default 1)")
    parser.add_argument("--seeds", type=int, default=ACCURACY_SEEDS, help=f"seeds of the accuracy check, from 0 (default {ACCURACY_SEEDS})")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one contender
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # A GPU runs an epoch of 800 images in about a second, of which the workers' first batches would be a
    # large part: more images, and the last of more epochs, measure the steady state the ceiling measures.
    on_gpu = args.device == "cuda"
    args.images = args.images if args.images is not None else (CUDA_IMAGES if on_gpu else 1000)
    args.ft_epochs = args.ft_epochs if args.ft_epochs is not None else (3 if on_gpu else 2)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the accuracy check reports their spread")
    return args


# --------------------------------------------------------------------------- the plain loop


def plain_loop(data: Path, epochs: int, body_trains: bool, fast: bool) -> dict[str, Any]:
    """Written like the torchvision fine-tuning tutorial: ImageFolder, a forward pass every epoch."""
    import torch
    import torchvision
    from torchvision import transforms as T

    torch.manual_seed(0)
    normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    train_set = torchvision.datasets.ImageFolder(str(data / "train"), train_tf)
    val_set = torchvision.datasets.ImageFolder(str(data / "val"), val_tf)
    workers = 0 if len(train_set) < 512 else 1  # what transferctl's num_workers: auto picks on this machine
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, shuffle=True, num_workers=workers)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=BATCH, shuffle=False, num_workers=workers)
    model = torchvision.models.resnet18(weights=None)
    for param in model.parameters():
        param.requires_grad = body_trains
    model.fc = torch.nn.Linear(model.fc.in_features, len(train_set.classes))
    if fast:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast)
    speeds, accuracy = [], 0.0
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        epoch_start, seen = time.perf_counter(), 0
        for images, labels in train_loader:
            if fast:
                images = images.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad()
            with autocast:
                loss = loss_fn(model(images).float(), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        speeds.append(seen / (time.perf_counter() - epoch_start))
        model.eval()
        correct = 0
        with torch.no_grad(), autocast:
            for images, labels in val_loader:
                if fast:
                    images = images.contiguous(memory_format=torch.channels_last)
                correct += int((model(images).argmax(1) == labels).sum())
        accuracy = correct / len(val_set)
    return {"seconds": time.perf_counter() - started, "images_per_second": sum(speeds) / len(speeds), "val_acc": accuracy}


# --------------------------------------------------------------------------- transferctl


def transferctl_run(
    data: Path, work: Path, strategy: str, schedule: list[dict[str, Any]], device: str = "cpu", name: str = "resnet18", **options: Any
) -> dict[str, Any]:
    from transferctl.config import config_from_dict
    from transferctl.training.train import train

    raw = {
        "name": f"bench-{strategy}", "seed": options.get("seed", 0), "backbone": {"name": name, "weights": "none"},
        "data": {"root": str(data), "batch_size": BATCH, "augment": options.get("augment", "standard"), "image_size": options.get("image_size"),
                 "num_workers": options.get("num_workers", "auto")},
        "strategy": strategy, "schedule": schedule, "device": device, "precision": options.get("precision", "auto"),
        "output": {"dir": str(work / "runs"), **options.get("output", {})},
    }  # fmt: skip
    clock = batch_clock()
    started = time.perf_counter()
    summary = train(config_from_dict(raw), observer=clock)
    seconds = time.perf_counter() - started  # everything: data check, model build, feature cache, checkpoints
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    measured = [index for index, r in enumerate(rows) if r["phase"] != "head"] or list(range(len(rows)))
    full = [rows[index]["images_per_second"] for index in measured]
    # Of each epoch's seconds (training and validation), those the training loop waited for its next batch.
    waits = [rows[index]["data_seconds"] / rows[index]["seconds"] for index in measured]
    return {"seconds": seconds, "images_per_second": sum(full) / len(full), "epoch_speeds": full, "data_waits": waits,
            "steady_speeds": [clock.steady_speeds[index] for index in measured], "val_acc": summary["final_val_acc"],
            "feature_cache": summary["feature_cache"], "decoded_images": summary["decoded_images"]}  # fmt: skip


def batch_clock() -> Any:
    """An observer of `transferctl train` that times each epoch between its first and last batch reports.

    train_one_epoch reports a batch after waiting for the device to finish it: the first, the last and one
    every 0.2 s. images/s between the first report and the last (`steady_speeds`, one per epoch, None for an
    epoch of one report) leave out what an epoch's first batch costs (the loaders' start, the first step).
    """
    from transferctl.training.observers import SilentObserver

    class BatchClock(SilentObserver):
        def __init__(self) -> None:
            self.steady_speeds: list[float | None] = []
            self._reports: list[tuple[int, float]] = []

        def batch_done(self, index: int, count: int, running_loss: float) -> None:
            self._reports.append((index, time.perf_counter()))

        def epoch_done(self, row: dict[str, Any]) -> None:
            if not self._reports:  # a solved head's epoch takes no steps
                self.steady_speeds.append(None)
                return
            (first, started), (last, ended) = self._reports[0], self._reports[-1]
            self.steady_speeds.append((last - first) * BATCH / (ended - started) if last > first and ended > started else None)
            self._reports = []

    return BatchClock()


def accuracy_check(data: Path, work: Path, precision: str, seeds: int) -> dict[str, Any]:
    """Final val accuracy over seeds 0 .. seeds-1: one seed's noise is larger than the 1 point in question."""
    import statistics

    schedule = [{"name": "all", "epochs": ACCURACY_EPOCHS, "train": "all", "lr": 2e-3}]
    runs = [transferctl_run(data, work, "scratch", schedule, precision=precision, image_size=ACCURACY_SIZE, augment="none", seed=seed)
            for seed in range(seeds)]  # fmt: skip
    accuracies = [run["val_acc"] for run in runs]
    return {"seconds": sum(run["seconds"] for run in runs), "images_per_second": statistics.mean(run["images_per_second"] for run in runs),
            "val_acc": statistics.mean(accuracies), "val_acc_sd": statistics.stdev(accuracies), "val_accs": accuracies}  # fmt: skip


def cuda_ceiling(device: str = "cuda", steps: int = 30, warmup: int = 5, batch: int = BATCH, size: int = 224, rounds: int = 3) -> dict[str, Any]:
    """resnet50 training steps on one batch already on the GPU: what the model alone can do, with the step
    `transferctl train` takes there: the precision `precision: auto` picks on this GPU (bf16, or fp16 with
    loss scaling where bf16 is emulated), channels-last, cuDNN's autotuning, the fused AdamW step, as many
    classes as the data. (device, batch and size let a test run it on a CPU.)

    The same steps are also timed with each batch first copied in from pinned memory: as float32, as
    transferctl's loaders send it, and as uint8 normalised on the GPU, as timm's PrefetchLoader does. Copies
    queue on the stream the steps run on, so a GPU that is the bottleneck pays for them; these two say
    whether sending uint8 batches (a quarter of the bytes) is worth building. Interleaved, `rounds` times."""
    import statistics

    import torch
    import torchvision

    from transferctl.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
    from transferctl.config import OptimizerConfig
    from transferctl.training.engine import make_grad_scaler
    from transferctl.training.runtime import Uint8Normalizer, make_runtime, tune_backend
    from transferctl.training.phases import build_optimizer
    from transferctl.testing.synthetic import SOURCE_CLASSES

    classes = len(SOURCE_CLASSES)
    model = torchvision.models.resnet50(weights=None, num_classes=classes).to(device).to(memory_format=torch.channels_last)
    runtime = make_runtime(device, "auto", model)
    tune_backend(runtime)
    scaler = make_grad_scaler(runtime) or torch.amp.GradScaler(runtime.device.type, enabled=False)
    optimizer = build_optimizer(OptimizerConfig(), [{"params": list(model.parameters()), "lr": LR}])
    on_gpu = runtime.device.type == "cuda"
    host = torch.randn(batch, 3, size, size)
    host_uint8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    if on_gpu:
        host, host_uint8 = host.pin_memory(), host_uint8.pin_memory()
    normalized = Uint8Normalizer(IMAGENET_MEAN, IMAGENET_STD, runtime)  # what recommend's features already send
    resident = host.to(device).contiguous(memory_format=torch.channels_last)
    batches: dict[str, Callable[[], Any]] = {
        "resident": lambda: resident,
        "float32": lambda: host.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
        "uint8": lambda: normalized(host_uint8),
    }
    labels = torch.randint(0, classes, (batch,), device=device)
    synchronize = torch.cuda.synchronize if on_gpu else lambda: None

    def seconds_of(next_batch: Callable[[], Any]) -> float:
        for step in range(warmup + steps):
            if step == warmup:
                synchronize()
                started = time.perf_counter()
            with runtime.autocast():
                loss = torch.nn.functional.cross_entropy(model(next_batch()).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        synchronize()
        return time.perf_counter() - started

    timings: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(rounds):
        for name, next_batch in batches.items():
            timings[name].append(seconds_of(next_batch))
    seconds = {name: statistics.median(times) for name, times in timings.items()}
    return {"seconds": sum(timings["resident"]), "images_per_second": steps * batch / seconds["resident"], "val_acc": None,
            "precision": runtime.precision, "fused_step": bool(optimizer.defaults.get("fused")),
            "copied_float32": seconds["resident"] / seconds["float32"], "copied_uint8": seconds["resident"] / seconds["uint8"]}  # fmt: skip


def contender(name: str, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import os

    # A fresh cache for every run, repeats included: features are computed, never reused from an earlier run.
    os.environ["TRANSFERCTL_CACHE"] = tempfile.mkdtemp(prefix=f"cache-{name}-", dir=work)
    if name == "plain-fe":
        return plain_loop(data, args.fe_epochs, body_trains=False, fast=False)
    if name == "plain-ft":
        return plain_loop(data, args.ft_epochs, body_trains=True, fast=False)
    if name == "raw-best-ft":
        return plain_loop(data, args.ft_epochs, body_trains=True, fast=True)
    if name == "transferctl-fe":
        return transferctl_run(data, work, "feature_extract", [{"name": "head", "epochs": args.fe_epochs, "train": "head", "lr": LR}])
    if name in ("transferctl-ft", "transferctl-ft-worker"):
        schedule = [{"name": "head", "epochs": 1, "train": "head", "lr": LR}, {"name": "body", "epochs": args.ft_epochs, "train": "all", "lr": LR}]
        # -worker: one data-loading worker process even on two cores, as before crops moved into the training process
        return transferctl_run(data, work, "fine_tune", schedule, num_workers=1 if name.endswith("-worker") else "auto")
    if name.startswith("accuracy-"):  # the same seed in fp32 and in the fast paths: does bf16 cost accuracy?
        return accuracy_check(data, work, name.removeprefix("accuracy-"), args.seeds)
    if name == "cuda-ceiling":
        return cuda_ceiling()
    if name == "transferctl-cuda":
        result = transferctl_run(data, work, "pretrained_init", [{"name": "all", "epochs": args.ft_epochs, "train": "all", "lr": LR}], "cuda", "resnet50")
        result["images_per_second"] = result["epoch_speeds"][-1]  # steady state, as the ceiling skips its warm-up steps
        result["data_wait"], result["steady_speed"] = result["data_waits"][-1], result["steady_speeds"][-1]
        return result
    raise SystemExit(f"unknown contender {name}")


# --------------------------------------------------------------------------- driver


def run_contender(name: str, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--only", name, "--data", str(data), "--work", str(work),
               "--fe-epochs", str(args.fe_epochs), "--ft-epochs", str(args.ft_epochs), "--seeds", str(args.seeds)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def scratch_folder(prefix: str, given: Path | None = None) -> Iterator[Path]:
    """Where a benchmark writes its images and runs: the folder given, which stays, or a temporary one that is
    removed when the benchmark ends, by an error or Ctrl-C too. Benchmarks write 0.1-1.3 GB each, and folders
    left behind once filled the disk the test suite then ran on."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)


def write_data(root: Path, images: int) -> Path:
    from transferctl.testing.synthetic import SOURCE_CLASSES, write_image_folder

    if (root / "train").is_dir():
        return root
    return write_image_folder(root, SOURCE_CLASSES, max(5, images // len(SOURCE_CLASSES)), 224, seed=0, layout="split")


def load() -> str:
    try:
        one, five, _ = (float(x) for x in Path("/proc/loadavg").read_text().split()[:3])
        return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"
    except OSError:
        return "load unknown"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.only:
        result = contender(args.only, args.data, args.work, args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    import os

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA GPU on this machine (scripts/gpu_check.sh runs it on a lent one)")
    names = chosen_contenders(args)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with scratch_folder("transferctl-bench-", args.work) as work:
        data = write_data(work / "data", args.images)
        print(f"# {len(list(data.rglob('*.png')))} images 224x224 in {data}; torch {torch.__version__}, {os.cpu_count()} CPUs, {load()}", file=sys.stderr)
        for repeat in range(args.repeat):
            for name in names:
                runs[name].append(run_contender(name, data, work, args))
                print(f"  {name} ({repeat + 1}/{args.repeat}): {json.dumps(runs[name][-1])}", file=sys.stderr)
    print(table({name: combined(results) for name, results in runs.items()}, args))
    print(f"# afterwards: {load()}")


def chosen_contenders(args: argparse.Namespace) -> list[str]:
    names = CUDA_CONTENDERS if args.device == "cuda" else CPU_CONTENDERS
    if args.contenders is None:
        return list(names)
    chosen = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in names]
    if unknown:
        raise SystemExit(f"--contenders: {', '.join(unknown)} unknown for --device {args.device}; choose from {', '.join(names)}")
    return chosen


def combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender's repeats as one row: median wall time, images/s and accuracy; the largest peak RSS."""
    import statistics

    result = dict(runs[-1])
    for key in ("seconds", "images_per_second", "val_acc"):
        values = [run[key] for run in runs if run.get(key) is not None]
        result[key] = statistics.median(values) if values else None
    result["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    result["repeats"] = [run["images_per_second"] for run in runs]
    return result


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """One row per contender that ran; a ratio where its reference ran too."""
    lines = ["| run | wall s | train img/s | peak RSS MB | final val acc | ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        acc = "-" if r["val_acc"] is None else f"{100 * r['val_acc']:.1f}%"
        ratio = ratio_text(name, results, args)
        if len(r.get("repeats", [])) > 1:
            ratio += f" (median of {len(r['repeats'])}: " + ", ".join(f"{speed:.1f}" for speed in r["repeats"]) + " img/s)"
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['images_per_second']:.1f} | {r['peak_rss_mb']:.0f} | {acc} | {ratio} |")
    return "\n".join(lines)


def ratio_text(name: str, results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    r = results[name]

    def speed_over(reference: str) -> float | None:
        return r["images_per_second"] / results[reference]["images_per_second"] if reference in results else None

    if name in ("plain-fe", "plain-ft"):
        return "1.00"
    if name == "cuda-ceiling":
        fused = ", fused AdamW" if r.get("fused_step") else ""
        copied = f"; with each batch copied in: float32 {r['copied_float32']:.2f}, uint8 normalised on the GPU {r['copied_uint8']:.2f}" if "copied_uint8" in r else ""
        return f"1.00 ({r.get('precision', '?')}{fused}, one batch already on the GPU{copied})"
    if name == "transferctl-cuda":
        ceiling = speed_over("cuda-ceiling")
        waited = f"waited for data {100 * r['data_wait']:.0f}% of the epoch"
        if ceiling is None:
            return waited
        steady = r.get("steady_speed")
        after_first = "" if steady is None else f"; after the epoch's first batch: {steady / results['cuda-ceiling']['images_per_second']:.2f}"
        return f"{ceiling:.2f} of the ceiling (target >= 0.90){after_first}, {waited}"
    if name == "transferctl-fe":
        plain = results.get("plain-fe")
        return "-" if plain is None else f"{plain['seconds'] / r['seconds']:.1f}x faster ({args.fe_epochs} epochs; target >= 30x)"
    if name == "raw-best-ft":
        plain = speed_over("plain-ft")
        return "-" if plain is None else f"{plain:.2f}x plain img/s"
    if name == "transferctl-ft-worker":
        inline = speed_over("transferctl-ft")
        return "-" if inline is None else f"transferctl-ft is {1 / inline:.2f}x this"
    if name == "transferctl-ft":
        parts = []
        if (plain := speed_over("plain-ft")) is not None:
            parts.append(f"{plain:.2f}x plain img/s (target >= 2.4)")
        if (best := speed_over("raw-best-ft")) is not None:
            parts.append(f"{best:.2f} of raw best (target >= 0.90)")
        decoded = sum(d["seconds"] for d in r["decoded_images"])
        waited = max(r["data_waits"])
        return ", ".join(parts + [f"decoding once took {decoded:.1f} s, outside the epochs", f"waited for data up to {100 * waited:.0f}% of an epoch"])
    seeds = f"seeds: {', '.join(f'{100 * a:.1f}' for a in r['val_accs'])}; sd {100 * r['val_acc_sd']:.1f}"
    if name == "accuracy-fp32":
        return f"scratch, {ACCURACY_EPOCHS} epochs at {ACCURACY_SIZE} px, fp32, mean of {len(r['val_accs'])} seeds ({seeds})"
    fp32 = results.get("accuracy-fp32")
    if fp32 is None:
        return f"scratch with precision auto ({seeds})"
    return (f"the same with precision auto: {100 * (r['val_acc'] - fp32['val_acc']):+.1f} points (target within 1; {seeds}), "
            f"{r['images_per_second'] / fp32['images_per_second']:.2f}x img/s")  # fmt: skip

if __name__ == "__main__":
    main()
