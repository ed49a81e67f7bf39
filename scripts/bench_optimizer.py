"""The fused optimizer step against torch's per-tensor default on CPU, in the same run.

    python scripts/bench_optimizer.py [--rounds 5] [--batch 32] [--steps 4] [--size 224]

transferctl builds its optimizer with `fused=True` where torch has a fused step for the parameters
(phases.build_optimizer; CPU from torch 2.4). On a CPU, torch's default is a loop of small ops per
tensor. Both settings below are transferctl's own optimizer over resnet18's fine-tuning parameter groups
(every layer group trained, the body at a tenth of the head's learning rate, no weight decay on biases and
norms), the per-tensor one with its groups' `fused` switched off. Two measures, settings alternating for
--rounds rounds:

  the optimizer step alone   steps/s with fixed gradients (AdamW, Adam and SGD with momentum)
  a training step            images/s of transferctl's training loop (engine.train_one_epoch) on a fixed
                             --size px batch, precision auto, channels-last: what the fused step saves per
                             step (more at small sizes, where the rest of the step is cheaper)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import interleaved, table  # noqa: E402

CLASSES = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="training steps per round (the optimizer alone runs 10x as many)")
    parser.add_argument("--size", type=int, default=224, help="image size of the training step")
    return parser.parse_args(argv)


def fine_tuning_optimizer(model: Any, name: str, fused: bool) -> Any:
    from transferctl.config import config_from_dict
    from transferctl.models.layer_groups import layer_groups
    from transferctl.training.phases import build_optimizer, optimizer_param_groups, plan_phases

    config = config_from_dict({"data": {"root": "d"}, "strategy": "fine_tune", "optimizer": {"name": name}})
    groups = layer_groups("resnet18", model)
    body_phase = plan_phases(config, [group_name for group_name, _ in groups])[-1]
    optimizer = build_optimizer(config.optimizer, optimizer_param_groups(model, groups, body_phase, config.optimizer.weight_decay))
    for group in optimizer.param_groups:
        group["fused"] = fused
    return optimizer


def optimizer_speed(name: str, fused: bool, steps: int) -> Callable[[], float]:
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    optimizer = fine_tuning_optimizer(model, name, fused)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3

    def measure() -> float:
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        return steps / (time.perf_counter() - started)

    return measure


def training_steps(fused: bool, batch: int, size: int) -> Callable[[int], float]:
    """A function that runs that many of transferctl's training steps on one fixed batch and returns their seconds."""
    import torch
    import torchvision

    from transferctl.config import SchedulerConfig
    from transferctl.training.engine import train_one_epoch
    from transferctl.training.runtime import make_runtime, prepare_model
    from transferctl.training.phases import build_scheduler

    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    runtime = make_runtime("cpu", "auto", model)
    model = prepare_model(model, runtime).train()
    optimizer = fine_tuning_optimizer(model, "adamw", fused)
    scheduler = build_scheduler(optimizer, SchedulerConfig(name="constant"), 1, 1)  # constant: its length does not matter
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, size, size, generator=generator), torch.randint(0, CLASSES, (batch,), generator=generator))

    def run(steps: int) -> float:
        started = time.perf_counter()
        train_one_epoch(model, [images] * steps, optimizer, scheduler, runtime)
        return time.perf_counter() - started

    return run


def training_speed(fused: bool, batch: int, size: int, steps: int) -> Callable[[], float]:
    run = training_steps(fused, batch, size)
    return lambda: steps * batch / run(steps)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    alone = {
        f"{name} {kind}": optimizer_speed(name, kind == "fused", 10 * args.steps)
        for name in ("adamw", "adam", "sgd")
        for kind in ("per-tensor", "fused")
    }
    alone_speeds = interleaved(alone, args.rounds, unit="steps/s")
    training = interleaved({kind: training_speed(kind == "fused", args.batch, args.size, args.steps) for kind in ("per-tensor", "fused")}, args.rounds)
    print(f"# resnet18 fine-tuning parameter groups, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    for name in ("adamw", "adam", "sgd"):
        print(table(f"{name} step alone", {kind: alone_speeds[f"{name} {kind}"] for kind in ("per-tensor", "fused")}, unit="steps/s"))
        print()
    print(f"# a training step: batch {args.batch}, {args.size} px, precision auto, channels-last")
    print(table("AdamW training step", training))


if __name__ == "__main__":
    main()
