"""Distributed data-parallel training: two gloo processes on the CPU, started by PyTorch's own launcher.

The model is resnet18 at 32 px with a frozen body in the head phase and `bn: frozen` in the body phase, and no
augmentation. Why: with BatchNorm in training mode each rank normalises with its own half-batch's statistics,
which a single process with the whole batch never sees, so the two could not agree; with BatchNorm in eval
mode (and no dropout) a step's gradient is the mean over the global batch either way, DDP averages the ranks'
equal-sized halves, and the final metrics agree up to the order of floating-point sums.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from helpers import cli_with_patched_decoding, experiment, one_thread, slow_decoding, write_experiment
from transferctl.config import load_config
from transferctl.training.distributed import per_rank_batch
from transferctl.data.sharding import Shard, shard_length, shard_of
from transferctl.errors import ConfigError
from transferctl.testing.synthetic import tiny_dataset
from transferctl.training.train import train

SCHEDULE = [
    {"name": "head", "epochs": 1, "train": "head", "lr": 1.0e-2},
    {"name": "body", "epochs": 1, "train": "all", "lr": 1.0e-2, "backbone_lr_mult": 0.1, "bn": "frozen"},
]
MEASURED = ("train_loss", "train_acc", "val_loss", "val_acc")

# A rank for the interruption test: the real CLI with image decoding slowed down, so that a signal sent after
# the first epoch's row appears always lands while the second epoch is still running.
SLOW_RANK = cli_with_patched_decoding(slow_decoding(0.1))

# A rank whose image decoding fails (`broken`) or never returns (`stuck`), on rank 1 only.
FAULTY_RANK = cli_with_patched_decoding("""
import os, time
def broken(path):
    raise OSError("the disk went away")
def stuck(path):
    time.sleep(3600)
if os.environ.get("RANK") == "1":
    data.open_rgb = {fault}
""")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config_file(module_tmp_path: Path) -> Path:
    root = module_tmp_path
    # 12 training images (an even count: no padding, so every image counts once, as in one process) in 3
    # global batches of 4; 3 validation images, which two ranks share unevenly (2 + 1).
    data = tiny_dataset(root / "data", n_classes=3, per_class=5, layout="split")
    assert len(list((data / "train").rglob("*.png"))) == 12 and len(list((data / "val").rglob("*.png"))) == 3
    raw = experiment(data, root / "runs", data={"batch_size": 4}, schedule=SCHEDULE)
    return write_experiment(root / "experiment.yaml", raw)


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def transferctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "transferctl", *args], capture_output=True, text=True, env={**cli_env(), **env}, timeout=300)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_rows_match(got: list[dict[str, Any]], want: list[dict[str, Any]], tolerance: float) -> None:
    assert [(r["phase"], r["epoch"]) for r in got] == [(r["phase"], r["epoch"]) for r in want]
    for row, expected in zip(got, want):
        for key in MEASURED:
            assert row[key] == pytest.approx(expected[key], abs=tolerance), (row["phase"], key)


@pytest.fixture(scope="module")
def two_process_run(config_file: Path) -> Path:
    """`transferctl train --nproc 2`: torchrun's launcher, two gloo ranks."""
    result = transferctl("train", str(config_file), "--nproc", "2", "--json", TRANSFERCTL_CACHE=str(config_file.parent / "feature-cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # one JSON document: only rank 0 prints
    return Path(summary["run_dir"])


def test_two_processes_write_one_run_that_matches_one_process(two_process_run: Path, config_file: Path) -> None:
    runs = two_process_run.parent
    assert [p.name for p in runs.iterdir()] == [two_process_run.name]  # rank 0 named it; rank 1 wrote nothing
    assert (two_process_run / "summary.json").is_file() and (two_process_run / "checkpoints" / "last.pt").is_file()
    assert not list(two_process_run.rglob(".*.tmp"))
    single = train(load_config(config_file), run_dir=runs.parent / "single")
    assert_rows_match(metrics(two_process_run), metrics(Path(single["run_dir"])), tolerance=1e-4)
    # The head phase trained on features each rank computed for half of the images, then gathered.
    cache = json.loads((two_process_run / "summary.json").read_text())["feature_cache"]
    assert [(r["phase"], r["split"], r["reused"]) for r in cache] == [("head", "train", False), ("head", "val", False)]
    assert metrics(two_process_run)[-1]["val_acc"] == pytest.approx(single["final_val_acc"], abs=1e-6)


def test_a_users_error_under_nproc_is_its_one_line_and_exit_1(config_file: Path, tmp_path: Path) -> None:
    result = transferctl("train", str(config_file), "--nproc", "2", "--set", "data.batch_size=7", "--run-dir", str(tmp_path / "odd"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") and "data.batch_size: 7 images per step cannot be split" in line for line in lines), result.stderr[-3000:]


def test_the_launcher_exits_with_its_workers_code() -> None:
    from transferctl.training.torchrun import worst_exit_code

    assert worst_exit_code([1, 0]) == 1 and worst_exit_code([130, 130]) == 130  # a user's error; interrupted
    assert worst_exit_code([-9]) == 137 and worst_exit_code([]) == 1  # killed by SIGKILL; nothing known


@pytest.mark.slow
def test_a_stopped_distributed_run_resumes_to_the_same_metrics(two_process_run: Path, config_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "stopped"
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    process = subprocess.Popen([*launcher, "train", str(config_file), "--run-dir", str(run_dir), "--quiet"], env=cli_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, "the first epoch never finished"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # the launcher passes it on to both ranks, which stop together
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert len(metrics(run_dir)) == 1 and not (run_dir / "summary.json").exists(), stderr[-2000:]

    result = transferctl("train", "--resume", str(run_dir), "--nproc", "2", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["epochs"] == 2
    assert_rows_match(metrics(run_dir), metrics(two_process_run), tolerance=1e-6)


# `transferctl train --nproc N` whose workers are SLOW_RANK (the script given): the launcher's command is
# PyTorch's (through transferctl.training.torchrun) with the workers' `-m transferctl` replaced.
NPROC_WITH_SLOW_RANKS = """
import sys
import transferctl.training.distributed as distributed
launch_command = distributed.launch_command
def slow_ranks(nproc, argv):
    command = launch_command(nproc, argv)
    workers = command.index("-m", command.index("transferctl.training.torchrun") + 1)
    return [*command[:workers], {rank_script!r}, *command[workers + 2:]]
distributed.launch_command = slow_ranks
from transferctl.cli import main
sys.argv[0] = "transferctl"
main()
"""


def processes_naming(text: str) -> list[str]:
    """Command lines of this machine's processes that mention text (Linux's /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if any(text.encode() in word for word in words):
            found.append(" ".join(word.decode(errors="replace") for word in words))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="lists processes through /proc")
def test_sigterm_to_train_nproc_stops_every_worker_and_exits_130(config_file: Path, tmp_path: Path) -> None:
    rank, parent, run_dir = tmp_path / "slow_rank.py", tmp_path / "parent.py", tmp_path / "run"
    rank.write_text(SLOW_RANK)
    parent.write_text(NPROC_WITH_SLOW_RANKS.format(rank_script=str(rank)))
    command = [sys.executable, str(parent), "train", str(config_file), "--nproc", "2", "--run-dir", str(run_dir), "--quiet"]
    process = subprocess.Popen(command, env=cli_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, "the first epoch never finished"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # as a job scheduler stops a job: to the command it started
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.startswith(f"interrupted: {run_dir}: stopped by SIGTERM during phase 'body' epoch 1") and len(stderr.splitlines()) == 1, stderr[-3000:]
    assert processes_naming(str(run_dir)) == []  # the launcher and both workers ended with it
    assert len(metrics(run_dir)) == 1 and not (run_dir / "summary.json").exists()


# A rank that, once the first epoch is on disk, waits before the second: time for a test to take a node away.
PAUSE_AFTER_THE_FIRST_EPOCH = """
import sys, time
import transferctl.training.train as train
save_epoch = train._Trainer._save_epoch
def save_then_pause(self, *args, **kwargs):
    save_epoch(self, *args, **kwargs)
    if len(self.rows) == 1:
        time.sleep(15)
train._Trainer._save_epoch = save_then_pause
from transferctl.cli import main
sys.argv[0] = "transferctl"
main()
"""


def two_nodes(command: list[str], run_id: str, **env: str) -> list[subprocess.Popen[str]]:
    """Two torchrun agents on this machine as the two nodes of one run (c10d rendezvous on localhost, one
    process each), as docs/distributed.md's two-machine command starts them; the first hosts the rendezvous."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    agents = []
    for host in (1, 0):
        launcher = [sys.executable, "-m", "transferctl.training.torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", run_id, "--rdzv_conf", f"is_host={host}"]  # fmt: skip
        agents.append(subprocess.Popen([*launcher, *command], env={**cli_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return agents


def children(pid: int) -> list[int]:
    """The processes that pid started (Linux's /proc): a torchrun agent's workers."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def two_node_run(config_file: Path, module_tmp_path: Path) -> Path:
    """A run on two nodes (here two torchrun agents on one machine), each naming no run directory."""
    out = module_tmp_path / "two-nodes"
    agents = two_nodes(["-m", "transferctl", "train", str(config_file), "--set", f"output.dir={out}", "--json"], "full")
    done = [agent.communicate(timeout=400) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], [stderr[-3000:] for _, stderr in done]
    summaries = [json.loads(stdout) for stdout, _ in done if stdout.strip()]
    assert len(summaries) == 1  # rank 0's, on whichever node it ran
    return Path(summaries[0]["run_dir"])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds a node's processes through /proc")
def test_two_nodes_write_one_run_that_matches_one_node(two_node_run: Path, two_process_run: Path) -> None:
    run = two_node_run
    assert [path.name for path in run.parent.iterdir()] == [run.name]  # rank 0 named it; the other node wrote nothing
    assert (run / "summary.json").is_file() and not list(run.rglob(".*.tmp"))
    # The same world size as --nproc 2 on one node: the same shards, and the frozen body's phase first.
    assert_rows_match(metrics(run), metrics(two_process_run), tolerance=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds a node's processes through /proc")
def test_a_lost_node_stops_the_other_with_a_message_and_the_run_resumes(two_node_run: Path, config_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = tmp_path / "pausing_rank.py"
    script.write_text(PAUSE_AFTER_THE_FIRST_EPOCH)
    survivor, lost = two_nodes([str(script), "train", str(config_file), "--run-dir", str(run_dir), "--quiet"], "lost", TRANSFERCTL_DIST_TIMEOUT="60")
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert survivor.poll() is None and lost.poll() is None and time.monotonic() < deadline, "the first epoch never finished"
        time.sleep(0.05)
    for pid in [lost.pid, *children(lost.pid)]:  # the machine is gone: its agent and its worker at once
        os.kill(pid, signal.SIGKILL)
    lost.communicate(timeout=60)
    started = time.monotonic()
    _, stderr = survivor.communicate(timeout=240)

    assert survivor.returncode == 1 and time.monotonic() - started < 120
    [line] = stderr.strip().splitlines()  # one line, no traceback from the worker or its launcher
    assert line.startswith("error: ") and "lost contact with the other node (" in line, stderr[-3000:]
    assert f"resume with: transferctl train --resume {run_dir}, under torchrun on every node as this run was started" in line
    assert len(metrics(run_dir)) == 1 and not (run_dir / "summary.json").exists()

    agents = two_nodes(["-m", "transferctl", "train", "--resume", str(run_dir), "--json"], "resumed")
    done = [agent.communicate(timeout=400) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], [stderr[-3000:] for _, stderr in done]
    assert_rows_match(metrics(run_dir), metrics(two_node_run), tolerance=1e-6)


def test_shards_cover_every_item_once_and_pad_to_equal_lengths() -> None:
    items = list(range(7))
    shards = [shard_of(items, Shard(rank, 2), pad=True) for rank in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5, 0]]  # wrapped around, as DistributedSampler pads
    unpadded = [shard_of(items, Shard(rank, 3), pad=False) for rank in range(3)]
    assert sorted(sum(unpadded, [])) == items
    for world in (1, 2, 3, 8):
        for rank in range(world):
            for pad in (True, False):
                assert shard_length(7, Shard(rank, world), pad) == len(shard_of(items, Shard(rank, world), pad))


def test_a_global_batch_that_does_not_split_evenly_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import transferctl.training.distributed as distributed

    monkeypatch.setattr(distributed, "shard", lambda: Shard(0, 4))
    assert per_rank_batch(32) == 8
    with pytest.raises(ConfigError, match="multiple of 4, e.g. 8 or 12"):
        per_rank_batch(10)


def _missing_root() -> None:
    raise ConfigError("data.root: no such folder")


def _collectives(rank: int, init_file: str, results: Any) -> None:
    """One of two gloo ranks (torch.multiprocessing): the helpers that talk to the other rank."""
    import torch.distributed as dist

    from transferctl.training.distributed import TrainingModule, all_ranks_agree, from_main, gather_shards, reduce_stats
    from transferctl.training.engine import EpochStats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = torch.arange(7, dtype=torch.float32).unsqueeze(1)  # 7 rows: rank 0 has 4, rank 1 has 3
        gathered = gather_shards(rows[rank::2], total=7)
        agreed = (all_ranks_agree(True), all_ranks_agree(rank == 0))
        stats = reduce_stats(EpochStats(loss=1.0 + rank, accuracy=0.5 * rank, images=2 - rank, seconds=1.0 + rank, data_seconds=0.5 - 0.25 * rank))
        scores = torch.full((2 - rank, 2), float(rank)).numpy()  # a multi-label validation's rows: 2 on rank 0, 1 on rank 1
        multi = reduce_stats(EpochStats(loss=1.0, accuracy=0.0, images=2 - rank, seconds=1.0, scores=scores, targets=scores + 1))
        try:
            from_main(_missing_root)
            copied = ""
        except ConfigError as exc:
            copied = f"{exc} echoed={getattr(exc, 'echoed', False)}"
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        model[0].requires_grad_(False)
        stepped = TrainingModule(model, torch.device("cpu"))
        first = stepped()
        same, reduced = stepped() is first, first.module is model
        model[0].requires_grad_(True)
        results.put((rank, gathered.squeeze(1).tolist(), (stats.loss, stats.accuracy, stats.images, stats.seconds, stats.data_seconds), copied, same, reduced,
                     stepped() is not first, agreed, (multi.scores.tolist(), multi.targets.tolist())))  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_collective_helpers_across_two_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_collectives, args=(rank, str(tmp_path / "init"), results)) for rank in range(2)]
    for process in processes:
        process.start()
    got = dict((item[0], item[1:]) for item in (results.get(timeout=120) for _ in processes))
    for process in processes:
        process.join(timeout=60)
    for rank in range(2):
        gathered, stats, copied, same, wrapped_model, rewrapped, agreed, multi = got[rank]
        assert agreed == (True, False)  # false as soon as one rank says no
        assert multi == ([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])  # every rank's rows, in rank order
        assert gathered == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # back in order on every rank
        assert stats == pytest.approx((4.0 / 3, 0.5 / 3, 3, 2.0, 0.5))  # sums over images, the slowest rank's times
        assert copied.startswith("data.root: no such folder") and copied.endswith(f"echoed={rank == 1}")
        assert same and wrapped_model and rewrapped  # DDP rebuilt only when what trains changed


def run_with_a_faulty_rank(fault: str, config_file: Path, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    script = tmp_path / f"{fault}_rank.py"
    script.write_text(FAULTY_RANK.format(fault=fault))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    started = time.monotonic()
    done = subprocess.run([*launcher, "train", str(config_file), "--run-dir", str(tmp_path / "run"), "--quiet"],
                          env={**cli_env(), **env}, capture_output=True, text=True, timeout=240)  # fmt: skip
    return done, time.monotonic() - started


def test_a_failing_rank_stops_the_others_with_its_message(config_file: Path, tmp_path: Path) -> None:
    done, seconds = run_with_a_faulty_rank("broken", config_file, tmp_path)
    assert done.returncode != 0
    assert "cannot be decoded: the disk went away" in done.stderr
    assert seconds < 120  # torchrun stopped rank 0; nobody waited for the 600 s collective timeout


def test_a_rank_that_stops_responding_times_out_with_a_message(config_file: Path, tmp_path: Path) -> None:
    done, seconds = run_with_a_faulty_rank("stuck", config_file, tmp_path, TRANSFERCTL_DIST_TIMEOUT="5")
    assert done.returncode != 0
    assert "rank 0 of 2: lost contact with the other training processes" in done.stderr, done.stderr[-3000:]
    assert "TRANSFERCTL_DIST_TIMEOUT=<seconds> (now 5)" in done.stderr
    assert f"resume with: transferctl train --resume {tmp_path / 'run'};" in done.stderr
    assert seconds < 120


@pytest.mark.slow
def test_a_multi_label_run_on_two_processes_matches_one_process(tmp_path: Path) -> None:
    """Validation scores are gathered from both ranks, so val_map and the thresholds are those of one process."""
    from transferctl.testing.synthetic import write_multi_label_dataset

    labels = write_multi_label_dataset(tmp_path / "data", images=30, size=16)
    raw = experiment(labels.parent, tmp_path / "runs", data={"batch_size": 4, "labels": str(labels), "cache": "off"}, schedule=SCHEDULE)
    config = write_experiment(tmp_path / "experiment.yaml", raw)
    runs = []
    for nproc in ("1", "2"):
        result = transferctl("train", str(config), "--nproc", nproc, "--json", "--run-dir", str(tmp_path / f"run{nproc}"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout))
    one, two = (metrics(tmp_path / f"run{nproc}") for nproc in ("1", "2"))
    assert [row["val_map"] for row in two] == pytest.approx([row["val_map"] for row in one], abs=2e-3)
    assert runs[0]["thresholds"].keys() == runs[1]["thresholds"].keys()
