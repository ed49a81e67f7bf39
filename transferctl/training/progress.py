"""How training looks on a terminal (Rich bars), in a pipe or log (one plain line per epoch), or --quiet."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from transferctl.training.phases import PhasePlan
from transferctl.training.observers import SilentObserver as QuietObserver


def epoch_line(row: dict[str, Any], epochs_in_phase: int | None = None) -> str:
    of = f"/{epochs_in_phase}" if epochs_in_phase else ""
    return (
        f"[{row['phase']}] epoch {row['epoch']}{of}: train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f} "
        f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}{_map(row)} ({row['images_per_second']:.0f} img/s, {row['seconds']:.1f}s)"
    )


def _map(row: dict[str, Any]) -> str:
    """A multi-label row's mean average precision (its val_acc: every label right)."""
    return f" val_map {row['val_map']:.4f}" if "val_map" in row else ""


class LineObserver(QuietObserver):
    """For pipes and log files: no control characters, one line per phase and per epoch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.epochs = 0

    def notice(self, message: str) -> None:
        self.console.print(f"note: {message}", highlight=False, markup=False)

    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None:
        self.epochs = plan.epochs
        self.console.print(f"phase {plan.index + 1} '{plan.name}': training {', '.join(plan.trainable)} for {plan.epochs} epochs", highlight=False, markup=False)

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.console.print(epoch_line(row, self.epochs), highlight=False, markup=False)


class RichObserver(QuietObserver):
    """An epoch bar and a batch bar with the running loss and images/s."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.console = progress.console
        self.epoch_task: Any = None
        self.batch_task: Any = None
        self.batch_started = time.perf_counter()
        self.epochs = 0

    def phase_started(self, plan: PhasePlan, batches_per_epoch: int) -> None:
        for task in (self.epoch_task, self.batch_task):
            if task is not None:
                self.progress.remove_task(task)
        self.epochs = plan.epochs
        self.epoch_task = self.progress.add_task(f"{plan.name}: epochs", total=plan.epochs, info="")
        self.batch_task = self.progress.add_task("batches", total=batches_per_epoch, info="")
        self.batch_started = time.perf_counter()

    def notice(self, message: str) -> None:
        self.console.print(f"[yellow]note:[/] {escape(message)}", highlight=False)

    def batch_done(self, index: int, count: int, running_loss: float) -> None:
        if index == 0:
            self.batch_started = time.perf_counter()
            self.progress.reset(self.batch_task, total=count or None)
        self.progress.update(self.batch_task, completed=index + 1, info=f"loss {running_loss:.4f}")

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.progress.update(self.epoch_task, completed=row["epoch"])  # not advance: a resumed phase starts midway
        info = f"val_acc {row['val_acc']:.4f}{_map(row)}  {row['images_per_second']:.0f} img/s"
        self.progress.update(self.epoch_task, info=info)
        self.console.print(epoch_line(row, self.epochs), highlight=False, markup=False)


@contextlib.contextmanager
def make_observer(console: Console, quiet: bool = False) -> Iterator[QuietObserver]:
    if quiet:
        yield QuietObserver()
        return
    if not console.is_terminal:
        yield LineObserver(console)
        return
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=False) as progress:
        yield RichObserver(progress)


def render_plan(plan: dict[str, Any]) -> Group:
    """`transferctl check`: the data, the model, and a table per phase of what trains at which lr."""
    data = plan["data"]
    pre = plan["preprocessing"]
    header = Table.grid(padding=(0, 2))
    header.add_row("experiment", f"{escape(plan['name'])} ({plan['strategy']})")
    cut = f", cut after {plan['cut']}" if plan.get("cut") else ""
    header.add_row("backbone", f"{escape(plan['backbone'])}, weights: {escape(str(plan['weights']))}{cut}")
    header.add_row("layer groups", ", ".join(plan["layer_groups"]))
    header.add_row("preprocessing", f"resize {pre['resize']}, crop {pre['crop']}, mean {_rounded(pre['mean'])}, std {_rounded(pre['std'])}")
    task = ", multi-label (a sigmoid each)" if data.get("task") == "multi_label" else ""
    header.add_row("data", f"{escape(data['root'])} ({data['layout']}): {len(data['classes'])} classes{task}, train {data['train']}, val {data['val']}, test {data['test']}")
    header.add_row("augment", f"{_augmentation_name(plan['augmentation'])}: {', '.join(plan['augmentation']['train'])}")
    if kit := _kit_text(plan["kit"]):
        header.add_row("kit", kit)
    header.add_row("runs on", f"{plan['device']}, {plan['precision']}")
    phases = Table(title="phases")
    # "ends early" only when some phase may: the table stays narrow enough for an 80-column terminal.
    early = any(phase.get("plateau_patience") for phase in plan["phases"])
    for column in ("phase", "epochs", "trains", "trainable", "learning rate", "BatchNorm", *(("ends early",) if early else ())):
        phases.add_column(column)
    for phase in plan["phases"]:
        trains = "head only" if phase["train"] == ["head"] else ", ".join(phase["train"])
        if phase.get("unfreeze_steps"):
            trains = _unfreezing(phase["unfreeze_steps"])
        share = phase["trainable_params"] / max(phase["total_params"], 1)
        params = f"{phase['trainable_params']:,} ({share:.1%})"
        lrs = _compact_lrs(phase["lr"]) + (f" (layer_decay {phase['layer_decay']:g})" if phase.get("layer_decay", 1.0) != 1.0 else "")
        if phase.get("lr_auto"):
            lrs = f"auto (lr-find at train time) x {lrs}"
        if phase.get("head_solved"):
            lrs = "head solved (L-BFGS)" if phase["train"] == ["head"] else f"{lrs}; head-only step solved (L-BFGS)"
        patience = phase.get("plateau_patience")
        ends = f"plateau of {patience} epochs" if patience else "no"
        phases.add_row(escape(phase["phase"]), str(phase["epochs"]), trains, params, lrs, phase["batchnorm"]["trained groups"], *((ends,) if early else ()))
    caption = "Frozen groups keep their BatchNorm statistics (eval mode) and get no gradients."
    if any(phase.get("head_solved") for phase in plan["phases"]):
        caption += (" A solved head is fitted to convergence on the cached features in its first epoch, its weight decay chosen by"
                    " cross-validation on the training images (solver: minibatch trains it at lr instead).")  # fmt: skip
    notes = [Text(f"note: {line}", style="yellow") for line in [*data.get("notices", []), *_cached_views_cost(plan["augmentation"])]]
    return Group(header, *notes, phases, caption)


def _kit_text(kit: dict[str, Any]) -> str:
    """The fine-tuning options that differ from plain cross-entropy on shuffled batches, in the file's words."""
    parts = []
    if kit["label_smoothing"]:
        parts.append(f"label_smoothing {kit['label_smoothing']:g}")
    if kit["class_weights"] != "none":
        parts.append(f"class_weights {kit['class_weights']}")
    if kit["sampler"] != "shuffle":
        parts.append(f"sampler {kit['sampler']}")
    for phase, mixing in kit["mixing"].items():
        kinds = " or ".join(f"{kind} {alpha:g}" for kind, alpha in mixing.items() if alpha is not None)
        parts.append(f"{kinds} in phase {escape(phase)}")
    if kit["ema_decay"] is not None:
        parts.append(f"ema {kit['ema_decay']:g}")
    return ", ".join(parts)


def _augmentation_name(augmentation: dict[str, Any]) -> str:
    erasing = augmentation["random_erasing"]
    return augmentation["augment"] + (f" + random_erasing {erasing:g}" if erasing is not None else "")


def _cached_views_cost(augmentation: dict[str, Any]) -> list[str]:
    """What a random augmentation becomes in the phases that train the head on cached features: a fixed
    set of views, each computed by one forward pass over the training images."""
    phases, views = augmentation["cached_phases"], augmentation["cached_views"]
    if not (augmentation["random"] and phases):
        return []
    name, where = _augmentation_name(augmentation), ", ".join(escape(phase) for phase in phases)
    if views == 1:
        return [f"{name}: phase {where} trains the head on cached features of the clean view alone, without the augmentation; "
                "data.cached_views: N adds N-1 augmented views (one forward pass of the training images each)"]  # fmt: skip
    return [f"{name}: {views} cached views = {views} forward passes of the training images (the clean view and {views - 1} augmented) "
            f"in phase {where}; raise data.cached_views for more variety"]  # fmt: skip


def _unfreezing(steps: list[dict[str, Any]]) -> str:
    """'head; +layer4 from epoch 3; +layer3 from epoch 5': gradual unfreezing, one line per step."""
    lines, before = [], set()
    for step in steps:
        added = [name for name in step["train"] if name not in before]
        lines.append(("" if not before else "+") + ", ".join(added) + (f" from epoch {step['epochs'][0]}" if before else ""))
        before.update(step["train"])
    return "\n".join(lines)


def _compact_lrs(lrs: dict[str, float]) -> str:
    """'head 0.01, backbone 0.001' rather than one entry per layer group when the body shares a rate."""
    body = {name: lr for name, lr in lrs.items() if name != "head"}
    parts = [f"head {lrs['head']:.2g}"] if "head" in lrs else []
    if len(set(body.values())) == 1:
        parts.append(f"backbone {next(iter(body.values())):.2g}")
    else:
        parts.extend(f"{name} {lr:.2g}" for name, lr in body.items())
    return ", ".join(parts)


def _rounded(values: list[float] | tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"
