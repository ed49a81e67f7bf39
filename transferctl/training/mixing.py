"""mixup and cutmix: each training batch blended with itself shifted by one (torchvision's transforms.v2 MixUp
and CutMix; RandomChoice picks one of them per batch when both are set), trained against the soft targets.

A batch's draw comes from (run seed, global epoch, batch index) alone, on a generator of its own, so a resumed
run mixes exactly as the uninterrupted one did and no other random state moves. Images can be mixed only
where the network sees them: a head trained on cached features does not mix (refuse_cached_mixing).
docs/experiment-file.md (Mixup and cutmix) says how the loss and train accuracy are defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from transferctl.config import ExperimentConfig, schedule_of
from transferctl.data.folders import epoch_seed, seeded_torch_rng
from transferctl.errors import ConfigError, Problem
from transferctl.training.phases import PhasePlan, stages_of

# (batch index, images, labels) -> (mixed images, soft targets, each image's dominant label)
MixBatch = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Mixing:
    """A phase's mixing: the Beta distributions' alphas, None where that kind is off."""

    mixup: float | None
    cutmix: float | None


def mixing_of(config: ExperimentConfig, phase_index: int) -> Mixing:
    """The phase's own mixup and cutmix where it sets them, else the run's."""
    phase = schedule_of(config)[phase_index]
    mixup = phase.mixup if phase.mixup is not None else config.mixup
    cutmix = phase.cutmix if phase.cutmix is not None else config.cutmix
    return Mixing(mixup.alpha if mixup is not None else None, cutmix.alpha if cutmix is not None else None)


class BatchMixer:
    """Mixes training batches for one phase; for_epoch(e) gives the loop its batch function for global epoch e."""

    def __init__(self, mixing: Mixing, num_classes: int, seed: int) -> None:
        from torchvision.transforms import v2

        kinds = []
        if mixing.mixup is not None:
            kinds.append(v2.MixUp(alpha=mixing.mixup, num_classes=num_classes))
        if mixing.cutmix is not None:
            kinds.append(v2.CutMix(alpha=mixing.cutmix, num_classes=num_classes))
        self.transform = kinds[0] if len(kinds) == 1 else v2.RandomChoice(kinds)
        self.seed = seed

    def for_epoch(self, epoch: int) -> MixBatch:
        return partial(self.mix, epoch)

    def mix(self, epoch: int, index: int, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # torchvision draws on torch's CPU generator: seeded for this batch, then put back as it was.
        with seeded_torch_rng(epoch_seed(epoch_seed(self.seed, epoch), index)):
            images, targets = self.transform(images, labels)
        return images, targets, targets.argmax(dim=1)


def batch_mixer(config: ExperimentConfig, phase_index: int, num_classes: int) -> BatchMixer | None:
    """The phase's mixer, or None when it mixes nothing."""
    mixing = mixing_of(config, phase_index)
    if mixing.mixup is None and mixing.cutmix is None:
        return None
    return BatchMixer(mixing, num_classes, config.seed)


def refuse_cached_mixing(config: ExperimentConfig, plans: list[PhasePlan], group_names: list[str]) -> None:
    """Mixing happens where images pass through the network: a stage that trains the head alone on cached
    features (unless data.cache is off) sees none and does not mix, so the run's mixup and cutmix apply to the
    other stages. A phase that sets its own and has no stage that sees images would mix nothing: refused."""
    if config.data.cache == "off":
        return
    schedule = schedule_of(config)
    for plan in plans:
        if not all(stage.plan.backbone_frozen for stage in stages_of(plan, group_names)):
            continue
        for kind in ("mixup", "cutmix"):
            if getattr(schedule[plan.index], kind) is None:
                continue
            raise ConfigError(
                Problem(f"schedule[{plan.index}].{kind}", f"phase '{plan.name}' trains the head alone on cached features, which holds no images to mix",
                        f"set data.cache: off, or set {kind} only in the phases that train the body")
            )  # fmt: skip
