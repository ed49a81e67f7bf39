"""scripts/bench.py's bookkeeping: which contenders run, how repeats become one row, ratios only with references.

The contenders themselves train for minutes; the benchmark is run by hand (docs/performance.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench")


def run(speed: float, seconds: float = 100.0, rss: float = 1000.0, **extra: Any) -> dict[str, Any]:
    return {"seconds": seconds, "images_per_second": speed, "val_acc": 0.2, "peak_rss_mb": rss, **extra}


def test_contenders_default_to_the_devices_and_keep_the_chosen_order(bench: ModuleType) -> None:
    assert bench.chosen_contenders(bench.parse_args([])) == list(bench.CPU_CONTENDERS)
    assert bench.chosen_contenders(bench.parse_args(["--device", "cuda"])) == list(bench.CUDA_CONTENDERS)
    chosen = bench.chosen_contenders(bench.parse_args(["--contenders", "transferctl-ft, plain-ft"]))
    assert chosen == ["transferctl-ft", "plain-ft"]


def test_an_unknown_contender_is_named_with_the_choices(bench: ModuleType) -> None:
    with pytest.raises(SystemExit, match="cuda-ceiling unknown for --device cpu; choose from plain-fe"):
        bench.chosen_contenders(bench.parse_args(["--contenders", "plain-ft,cuda-ceiling"]))


def test_repeat_needs_one_run_at_least(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeat", "0"])
    assert "--repeat must be at least 1" in capsys.readouterr().err


def test_seeds_need_two_for_a_spread(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.parse_args([]).seeds == 3 and bench.parse_args(["--seeds", "6"]).seeds == 6
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "1"])
    assert "--seeds must be at least 2" in capsys.readouterr().err


def test_the_accuracy_check_trains_every_seed_and_passes_them_to_its_process(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    trained: list[int] = []
    monkeypatch.setattr(bench, "transferctl_run", lambda *args, seed, **options: trained.append(seed) or run(20.0, val_acc=0.5 + seed / 100))
    result = bench.contender("accuracy-auto", tmp_path / "data", tmp_path, argparse.Namespace(fe_epochs=1, ft_epochs=1, seeds=4))
    assert trained == [0, 1, 2, 3] and result["val_accs"] == [0.5, 0.51, 0.52, 0.53]
    assert "mean of 4 seeds" in bench.ratio_text("accuracy-fp32", {"accuracy-fp32": result}, bench.parse_args([]))

    commands: list[list[str]] = []
    monkeypatch.setattr(bench.subprocess, "run", lambda command, **options: commands.append(command) or argparse.Namespace(returncode=0, stdout="{}"))
    bench.run_contender("accuracy-auto", tmp_path / "data", tmp_path, bench.parse_args(["--seeds", "5"]))
    assert commands[0][commands[0].index("--seeds") + 1] == "5"


def test_repeats_become_medians_and_the_largest_peak_memory(bench: ModuleType) -> None:
    row = bench.combined([run(10.0, 90.0, 500.0), run(30.0, 70.0, 900.0), run(12.0, 80.0, 700.0)])
    assert row["images_per_second"] == 12.0
    assert row["seconds"] == 80.0
    assert row["peak_rss_mb"] == 900.0
    assert row["repeats"] == [10.0, 30.0, 12.0]


def test_ratios_use_the_references_that_ran(bench: ModuleType) -> None:
    args = bench.parse_args(["--contenders", "plain-ft,transferctl-ft", "--repeat", "2"])
    decoded = {"decoded_images": [{"seconds": 1.5}, {"seconds": 0.5}], "data_waits": [0.04, 0.06]}
    results = {
        "plain-ft": bench.combined([run(10.0), run(12.0)]),
        "transferctl-ft": bench.combined([run(26.0, **decoded), run(28.0, **decoded)]),
    }
    text = bench.table(results, args)
    assert "2.45x plain img/s (target >= 2.4)" in text  # 27 / 11
    assert "raw best" not in text  # raw-best-ft did not run
    assert "decoding once took 2.0 s" in text
    assert "waited for data up to 6% of an epoch" in text
    assert "(median of 2: 26.0, 28.0 img/s)" in text


def test_the_worker_row_compares_with_transferctl_as_it_runs(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options: list[object] = []
    monkeypatch.setattr(bench, "transferctl_run", lambda *args, **kwargs: options.append(kwargs["num_workers"]) or run(30.0))
    bench.contender("transferctl-ft", tmp_path, tmp_path, bench.parse_args([]))
    bench.contender("transferctl-ft-worker", tmp_path, tmp_path, bench.parse_args([]))
    assert options == ["auto", 1]
    decoded = {"decoded_images": [{"seconds": 1.0}], "data_waits": [0.05]}
    results = {"transferctl-ft": bench.combined([run(39.0, **decoded)]), "transferctl-ft-worker": bench.combined([run(30.0, **decoded)])}
    assert bench.table(results, bench.parse_args([])).splitlines()[-1].endswith("| transferctl-ft is 1.30x this |")


def test_a_contender_without_its_reference_gets_no_ratio(bench: ModuleType) -> None:
    args = bench.parse_args(["--contenders", "transferctl-fe"])
    text = bench.table({"transferctl-fe": bench.combined([run(5000.0)])}, args)
    assert text.splitlines()[-1].endswith("| - |")


def test_the_cuda_rows_compare_with_the_ceiling(bench: ModuleType) -> None:
    args = bench.parse_args(["--device", "cuda"])
    ceiling = {**run(2000.0), "precision": "fp16", "fused_step": True, "copied_float32": 0.941, "copied_uint8": 0.987}
    results = {"cuda-ceiling": bench.combined([ceiling]), "transferctl-cuda": bench.combined([run(1900.0, data_wait=0.123, steady_speed=1960.0)])}
    rows = bench.table(results, args).splitlines()
    assert rows[2].startswith("| cuda-ceiling |")
    assert rows[2].endswith("| 1.00 (fp16, fused AdamW, one batch already on the GPU; with each batch copied in: float32 0.94, uint8 normalised on the GPU 0.99) |")
    assert "0.95 of the ceiling (target >= 0.90); after the epoch's first batch: 0.98, waited for data 12% of the epoch" in rows[3]


def test_the_ceiling_takes_transferctls_step(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never run anywhere but on a lent GPU otherwise: here on the CPU, tiny, so a slip shows before then.
    import torch

    from transferctl.training import runtime as runtime_module

    tuned: list[str] = []
    monkeypatch.setattr(runtime_module, "tune_backend", lambda runtime: tuned.append(runtime.device.type))
    ceiling = bench.cuda_ceiling("cpu", steps=2, warmup=1, batch=2, size=32, rounds=1)

    assert ceiling["images_per_second"] > 0 and ceiling["fused_step"] and tuned == ["cpu"]
    assert ceiling["copied_float32"] > 0 and ceiling["copied_uint8"] > 0
    assert ceiling["precision"] == runtime_module.choose_precision("auto", torch.device("cpu"))


def test_gpu_runs_default_to_more_images_and_epochs(bench: ModuleType) -> None:
    cpu, cuda = bench.parse_args([]), bench.parse_args(["--device", "cuda"])
    assert (cpu.images, cpu.ft_epochs) == (1000, 2) and (cuda.images, cuda.ft_epochs) == (bench.CUDA_IMAGES, 3)
    assert bench.parse_args(["--device", "cuda", "--images", "50", "--ft-epochs", "1"]).images == 50


def test_transferctl_on_the_gpu_is_timed_in_its_last_epoch(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = {"epoch_speeds": [500.0, 1000.0, 1100.0], "data_waits": [0.5, 0.2, 0.1], "steady_speeds": [None, 1200.0, 1150.0]}
    monkeypatch.setattr(bench, "transferctl_run", lambda *args, **options: {**run(800.0), **epochs})
    result = bench.contender("transferctl-cuda", tmp_path, tmp_path, bench.parse_args(["--device", "cuda"]))
    assert result["images_per_second"] == 1100.0  # the first epochs include the workers' start and cuDNN's tuning
    assert (result["data_wait"], result["steady_speed"]) == (0.1, 1150.0)


def test_the_batch_clock_times_an_epoch_from_its_first_report_to_its_last(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    clock = bench.batch_clock()
    times = iter([10.0, 10.5, 12.0, 20.0])
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(times)))
    for index in (0, 40, 99):
        clock.batch_done(index, 100, 1.0)
    clock.epoch_done({})
    clock.batch_done(0, 1, 1.0)  # an epoch of one batch: no span to time
    clock.epoch_done({})

    assert clock.steady_speeds == [pytest.approx(99 * bench.BATCH / 2.0), None]


def test_a_real_run_gives_every_epoch_its_speeds(bench: ModuleType, tiny_split_data: Path, tmp_path: Path) -> None:
    schedule = [{"name": "head", "epochs": 1, "train": "head", "lr": 1e-3}, {"name": "all", "epochs": 2, "train": "all", "lr": 1e-3}]
    result = bench.transferctl_run(tiny_split_data, tmp_path, "fine_tune", schedule, image_size=32, augment="none", output={"checkpoint_seconds": 3600})
    assert len(result["epoch_speeds"]) == len(result["data_waits"]) == len(result["steady_speeds"]) == 2  # the head epoch left out


def test_every_run_computes_its_features_in_a_fresh_cache(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import os

    caches: list[str] = []
    monkeypatch.setattr(bench, "transferctl_run", lambda *args, **options: caches.append(os.environ["TRANSFERCTL_CACHE"]) or run(20.0))
    monkeypatch.setenv("TRANSFERCTL_CACHE", str(tmp_path / "outside"))
    args = argparse.Namespace(fe_epochs=1, ft_epochs=1)
    for _ in range(2):  # two repeats of one contender: the second must not reuse the first one's features
        bench.contender("transferctl-fe", tmp_path / "data", tmp_path, args)
    assert len(set(caches)) == 2 and all(Path(cache).parent == tmp_path and not any(Path(cache).iterdir()) for cache in caches)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_mode_without_a_gpu_says_so_in_one_line(bench: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--device cuda: PyTorch sees no CUDA GPU on this machine"):
        bench.main(["--device", "cuda", "--work", str(tmp_path)])
    assert not (tmp_path / "data").exists()  # refused before writing a thousand images


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_the_optimizer_benchmark_compares_the_fused_step_with_torchs_per_tensor_loop(name: str) -> None:
    import torchvision

    bench_optimizer = load_script("bench_optimizer")
    model = torchvision.models.resnet18(weights=None, num_classes=bench_optimizer.CLASSES)
    fused = bench_optimizer.fine_tuning_optimizer(model, name, fused=True)
    per_tensor = bench_optimizer.fine_tuning_optimizer(model, name, fused=False)
    assert all(group["fused"] for group in fused.param_groups)
    assert not any(group["fused"] or group["foreach"] for group in per_tensor.param_groups)
    names = [group["name"] for group in fused.param_groups]
    assert {"stem", "layer4", "head", "head/no_decay"} <= set(names)  # every layer group, as fine-tuning trains them


def test_the_checkpoint_benchmark_changes_only_when_checkpoints_are_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transferctl.runs.rundir import RunDir

    bench_checkpoints = load_script("bench_checkpoints")
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_run(*args: Any, **options: Any) -> dict[str, Any]:
        calls.append((args, options))
        RunDir(tmp_path).save_checkpoint("last", {"epoch": len(calls)})
        RunDir(tmp_path).write_json("summary.json", {})  # not a checkpoint: not counted
        return run(1.0)

    monkeypatch.setattr(bench_checkpoints, "transferctl_run", fake_run)
    real_write = RunDir._write
    per_run: dict[str, tuple[int, int]] = {}
    with bench_checkpoints.CheckpointWrites() as writes:
        for seconds in (0, 30):
            bench_checkpoints.feature_extract_run(tmp_path / "data", tmp_path, 3, seconds, writes, per_run)()
    assert RunDir._write is real_write
    (first_args, first), (second_args, second) = calls
    assert first_args == second_args and first == {"output": {"checkpoint_seconds": 0}} and second == {"output": {"checkpoint_seconds": 30}}
    assert first_args[3] == [{"name": "head", "epochs": 3, "train": "head", "lr": bench_checkpoints.LR}]
    size = (tmp_path / "checkpoints" / "last.pt").stat().st_size
    assert per_run == {"checkpoint_seconds: 0": (1, size), "checkpoint_seconds: 30": (1, size)}


def test_a_temporary_work_folder_is_removed_when_the_benchmark_stops(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(KeyboardInterrupt), bench.scratch_folder("transferctl-bench-") as work:
        (work / "data").mkdir()
        raise KeyboardInterrupt
    assert work.parent == tmp_path and not work.exists()
    given = tmp_path / "mine" / "work"
    with bench.scratch_folder("transferctl-bench-", given) as work:
        (work / "runs").mkdir()
    assert work == given and (given / "runs").is_dir()  # the folder asked for is the user's: it stays


def test_the_benchmark_leaves_no_temporary_folder_behind(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(bench, "write_data", lambda root, images: root.mkdir(parents=True) or root)
    works: list[Path] = []
    monkeypatch.setattr(bench, "run_contender", lambda name, data, work, args: works.append(work) or run(10.0))
    bench.main(["--contenders", "plain-ft,plain-fe"])
    assert len(set(works)) == 1 and works[0].parent == tmp_path and not any(tmp_path.iterdir())


def test_every_scripts_temporary_folder_is_removed_afterwards() -> None:
    """mkdtemp leaves its folder behind; benchmarks that did filled a disk. Inside a work folder it goes with it."""
    for script in sorted((REPO / "scripts").glob("*.py")):
        for line in script.read_text().splitlines():
            assert "mkdtemp(" not in line or "dir=work" in line, f"{script.name}: {line.strip()}"
