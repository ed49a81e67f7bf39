"""Distributed data-parallel training on PyTorch's own engine: torchrun starts the processes, this module joins them.

`torchrun --nproc_per_node N -m transferctl train x.yaml` (or `transferctl train --nproc N x.yaml`) starts N
processes with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. Each one:
  - joins the process group (gloo for CPU tensors, nccl for CUDA ones) with a timeout, so a rank that dies
    stops the others with a message instead of a hang;
  - trains on its shard of every epoch (`shard_of`: the order still depends only on (seed, epoch));
  - wraps the model in DistributedDataParallel per phase, after freezing (`wrap_for_training`): frozen
    parameters are never registered with DDP, so no `find_unused_parameters` is needed;
  - sums its epoch statistics with the others' (`reduce_stats`), so every rank sees the metrics a single
    process would have computed, and every rank takes the same early-stopping decisions;
  - leaves the run directory to rank 0 (`is_main`), which also decides its name (`from_main`).

`data.batch_size` is the global batch: each of the N processes takes batch_size / N images per step, so the
same experiment file gives the same optimisation whatever N is.

Without those environment variables (or with WORLD_SIZE=1) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

from transferctl.data.sharding import Shard
from transferctl.errors import ConfigError, Problem, TrainingError, TransferctlError

T = TypeVar("T")

TIMEOUT_VARIABLE = "TRANSFERCTL_DIST_TIMEOUT"  # seconds a collective may wait for the slowest rank
DEFAULT_TIMEOUT_S = 600.0
# What gloo's errors say when the other side is gone or too slow (it raises them as plain RuntimeErrors).
GLOO_FAILURES = ("gloo/transport", "Timed out waiting", "Connection closed by peer", "Connection reset by peer")


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 outside torchrun); reads no torch, so the CLI may call it."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return env_world_size() > 1


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard() -> Shard:
    import torch.distributed as dist

    return Shard(dist.get_rank(), dist.get_world_size()) if active() else Shard()


def is_main() -> bool:
    """Rank 0, or a plain single process: the one that writes files and shows progress."""
    return shard().rank == 0


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(Problem(TIMEOUT_VARIABLE, f"'{raw}' is not a number of seconds", "e.g. 600")) from None
    return timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group() -> Iterator[Shard]:
    """Join torchrun's process group for the block (once: nested uses and plain processes pass through).

    A collective that fails because another rank died or timed out becomes a TrainingError naming this rank.
    """
    import torch
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        yield shard()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"  # nccl for DDP's gradients, gloo for small objects on the CPU
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout())
    try:
        yield shard()
    except RuntimeError as exc:
        if not is_lost_contact(exc):
            raise  # a bug, not a lost rank: keep its traceback
        raise lost_contact(exc) from None
    finally:
        dist.destroy_process_group()


def is_lost_contact(exc: BaseException) -> bool:
    """A collective failed because another rank died or timed out (DistError, or gloo's own RuntimeErrors)."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in GLOO_FAILURES))


def env_nodes() -> int:
    """How many machines (torchrun's nodes) the run spans; GROUP_WORLD_SIZE as torchrun set it."""
    return int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)


def lost_contact(exc: BaseException, resume: str = "") -> TrainingError:
    """This rank's one line when the others are gone: which rank, what torch said, and how to go on.

    resume: the command that continues the run, once there is a run directory to continue.
    """
    text = " ".join(str(exc).split())[:240] or type(exc).__name__
    nodes = env_nodes()
    others = "the other node" + ("s" if nodes > 2 else "") if nodes > 1 else "the other training processes"
    first = "another node probably failed or was stopped first: see its messages" if nodes > 1 else "another rank probably failed first: see its message"
    again = f"; resume with: {resume}" + (", under torchrun on every node as this run was started" if nodes > 1 else "") if resume else ""
    slow = f"; a slow rank may need {TIMEOUT_VARIABLE}=<seconds> (now {timeout().total_seconds():g})"
    return TrainingError(Problem(f"rank {env_rank()} of {env_world_size()}", f"lost contact with {others} ({text})", first + again + slow))


def device_spec(spec: str) -> str:
    """The device this rank trains on: under torchrun, `auto` and `cuda` mean cuda:LOCAL_RANK."""
    if not launched():
        return spec
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if spec.startswith("cuda:"):
        raise ConfigError(Problem("device", f"{spec} names one GPU, but each of the {env_world_size()} processes needs its own", "use device: cuda (or auto): process N uses cuda:LOCAL_RANK"))
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
        return f"cuda:{local}"
    if spec == "mps":
        raise ConfigError(Problem("device", "mps cannot be shared by several processes", "use device: cpu or train in one process"))
    return "cpu" if spec == "auto" else spec


def per_rank_batch(batch_size: int, where: str = "data.batch_size") -> int:
    """The global batch split evenly: unequal per-rank batches would weight the ranks' gradients unequally."""
    world = shard().world
    if batch_size % world:
        lower, upper = (batch_size // world) * world, -(-batch_size // world) * world
        choices = " or ".join(str(n) for n in (lower, upper) if n > 0)
        raise ConfigError(Problem(where, f"{batch_size} images per step cannot be split evenly over {world} processes", f"use a multiple of {world}, e.g. {choices}"))
    return batch_size // world


def from_main(produce: Callable[[], T]) -> T:
    """Rank 0 computes a value (a file read, a folder created) and every rank gets it.

    A user error on rank 0 is raised on every rank (rank 0's own, the others a copy), so no rank waits for a
    value that never comes.
    """
    if not active():
        return produce()
    import torch
    import torch.distributed as dist

    message: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            message[0] = ("ok", produce())
        except TransferctlError as exc:
            failure, message[0] = exc, ("error", type(exc), exc.problems)
        except BaseException as exc:
            failure, message[0] = exc, ("error", TrainingError, (Problem("rank 0", f"failed: {type(exc).__name__}: {exc}", "see rank 0's traceback"),))
    dist.broadcast_object_list(message, src=0, device=torch.device("cpu"))  # gloo, also beside nccl
    if failure is not None:
        raise failure
    kind, *rest = message[0]
    if kind == "ok":
        return rest[0]
    error_type, problems = rest
    copy = error_type(*problems)
    copy.echoed = True  # type: ignore[attr-defined]  # the CLI leaves printing it to rank 0
    raise copy


def reduce_stats(stats: Any) -> Any:
    """One epoch's EpochStats summed over ranks: the mean loss and accuracy over every rank's images.

    Sums of loss and of correct predictions are reduced, never means, so the result equals one process's
    over the same images; a rank without images adds nothing. Seconds (and seconds waiting for data) are
    the slowest rank's.
    """
    if not active():
        return stats
    import torch
    import torch.distributed as dist

    from transferctl.training.engine import EpochStats

    has = stats.images > 0
    sums = torch.tensor(
        [stats.loss * stats.images if has else 0.0, stats.accuracy * stats.images if has else 0.0, float(stats.images)],
        dtype=torch.float64,
    )
    dist.all_reduce(sums)
    slowest = torch.tensor([stats.seconds, stats.data_seconds], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    seconds, data_seconds = slowest.tolist()
    loss_sum, correct, images = sums.tolist()
    scores, targets = (_joined(stats.scores), _joined(stats.targets)) if stats.scores is not None else (None, None)
    if images == 0:
        return EpochStats(float("nan"), float("nan"), 0, seconds, data_seconds, scores=scores, targets=targets)
    return EpochStats(loss_sum / images, correct / images, int(images), seconds, data_seconds, confusion=_summed_confusion(stats.confusion),
                      scores=scores, targets=targets)  # fmt: skip


def _joined(rows: Any) -> Any:
    """A multi-label validation's per-image rows (scores or targets) from every rank, one after another."""
    import numpy as np
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    present = [part for part in gathered if part is not None and len(part)]
    return np.concatenate(present) if present else rows


def _summed_confusion(confusion: Any) -> Any:
    """Validation's confusion counts over every rank. Gathered as objects: a rank without validation images
    has none, so the ranks' arrays need not agree in shape for an all_reduce."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, confusion)
    present = [counts for counts in gathered if counts is not None]
    return sum(present[1:], present[0]) if present else None


def wrap_for_training(model: Any, device: Any) -> Any:
    """The module to step with in a phase: DDP over the parameters that train *now*.

    Call it after the phase's freezing: DDP registers only parameters with requires_grad, and it reads them
    when it is built, so a phase that changes what trains needs a new wrapper. Frozen parameters then cost
    nothing (no find_unused_parameters, no gradient buckets). Outside torchrun the model is returned as it is.
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


class TrainingModule:
    """The module to step with: the model itself, or DDP over it, rebuilt whenever what trains changes.

    A phase (or a gradual-unfreezing step) changes requires_grad; DDP reads it when it is built, so asking
    this before every epoch keeps the wrapper in line with the freezing, wherever that happened.
    """

    def __init__(self, model: Any, device: Any) -> None:
        self.model = model
        self.device = device
        self.trainable: tuple[str, ...] | None = None
        self.wrapped: Any = model

    def __call__(self) -> Any:
        if not active():
            return self.model
        trainable = tuple(name for name, param in self.model.named_parameters() if param.requires_grad)
        if trainable != self.trainable:
            self.wrapped, self.trainable = wrap_for_training(self.model, self.device), trainable
        return self.wrapped


class AgreedStop:
    """A stop request every rank answers the same: true when any rank received SIGINT/SIGTERM.

    Asked between steps by all ranks in step, it costs one tiny all_reduce; a rank that stopped alone would
    leave the others waiting in the next gradient reduction.
    """

    def __init__(self, request: Any) -> None:
        self.request = request
        self._agreed = False

    @property
    def name(self) -> str | None:
        return self.request.name or ("a signal to another rank" if self._agreed else None)

    def __call__(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.request() else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._agreed = bool(flag.item())
        return self._agreed


def agreed_stop(request: Any) -> Any:
    return AgreedStop(request) if active() else request


def all_ranks_agree(flag: bool) -> bool:
    """True when `flag` is true on every rank (outside torchrun: the flag itself)."""
    if not active():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)  # a CPU tensor: gloo, also beside nccl
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_shards(local: Any, total: int) -> Any:
    """Rows computed by every rank on its unpadded `shard_of` part, back in the original order on every rank.

    For work done once per item and needed by all, e.g. a frozen backbone's features: rank r computed the
    rows r, r + world, ...; the result is all `total` rows.
    """
    if not active():
        return local
    import torch
    import torch.distributed as dist

    part = shard()
    rows = -(-total // part.world)
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: len(local)] = local
    pieces = [torch.empty_like(padded) for _ in range(part.world)]
    dist.all_gather(pieces, padded)
    result = local.new_empty((total, *local.shape[1:]))
    for rank, piece in enumerate(pieces):
        count = len(range(rank, total, part.world))
        result[rank :: part.world] = piece[:count]
    return result


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """torchrun (through transferctl.training.torchrun) starting `transferctl <argv>` in nproc processes on this machine."""
    import sys

    return [sys.executable, "-m", "transferctl.training.torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "transferctl", *argv]


def launch_environment(environ: dict[str, str]) -> dict[str, str]:
    """torchrun's own default of one OpenMP thread per process, set here so that it does not announce it
    in a five-line banner on every run."""
    return {**environ, "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", "1")}
