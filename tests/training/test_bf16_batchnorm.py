"""bf16_batchnorm.py: under CPU bf16 autocast, the BatchNorm layers whose output is summed get fp32 input,
so residual streams stay fp32, and the others stay in bf16."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from transferctl.training.runtime import Runtime, prepare_model
from transferctl.training.bf16_batchnorm import batchnorm_in_fp32, batchnorms_feeding_sums

CPU_BF16 = Runtime(torch.device("cpu"), "bf16", channels_last=True)


def names_of(model: nn.Module, chosen: list[nn.Module]) -> list[str]:
    ids = {id(module) for module in chosen}
    return [name for name, module in model.named_modules() if id(module) in ids]


def batchnorm_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]


def test_resnet_the_last_batchnorm_of_each_block_and_of_each_shortcut() -> None:
    model = torchvision.models.resnet18(num_classes=3)
    chosen = names_of(model, batchnorms_feeding_sums(model))
    assert chosen == [name for name in batchnorm_names(model) if name.endswith(("bn2", "downsample.1"))]
    assert "bn1" not in chosen  # the stem: max pooling comes between it and the first sum


def last_batchnorm_of_blocks_in_sums(blocks: list[tuple[str, nn.Module]]) -> list[str]:
    """A block's output is summed when the block has a shortcut, or when the next block's shortcut is it."""
    shortcut = [bool(getattr(block, "use_res_connect", False)) for _, block in blocks] + [False]
    return [f"{name}.{batchnorm_names(block)[-1]}" for index, (name, block) in enumerate(blocks) if shortcut[index] or shortcut[index + 1]]


def test_inverted_residuals_the_projections_summed_as_branch_or_as_shortcut() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=3)
    chosen = names_of(model, batchnorms_feeding_sums(model))
    blocks = [(f"features.{index}", block) for index, block in enumerate(model.features)][1:-1]
    assert chosen == last_batchnorm_of_blocks_in_sums(blocks) and len(chosen) == 15
    assert "features.0.1" not in chosen and "features.3.conv.0.1" not in chosen  # the stem; an expansion


def test_through_stochastic_depth_which_fx_cannot_trace_inside() -> None:
    model = torchvision.models.efficientnet_b0(num_classes=3)
    chosen = names_of(model, batchnorms_feeding_sums(model))
    blocks = [(f"features.{stage}.{index}", block) for stage in range(1, 8) for index, block in enumerate(model.features[stage])]
    assert chosen == last_batchnorm_of_blocks_in_sums(blocks) and len(chosen) == 14


def test_concatenating_networks_sum_nothing() -> None:
    model = torchvision.models.densenet121(num_classes=3)
    assert batchnorms_feeding_sums(model) == []


class Residual(nn.Module):
    """Sums written three ways, with elementwise steps and a pooling between BatchNorm and sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.through_activation = nn.BatchNorm2d(4)
        self.through_pooling = nn.BatchNorm2d(4)
        self.into_method = nn.BatchNorm2d(4)
        self.into_conv = nn.BatchNorm2d(4)
        self.act, self.drop, self.pool = nn.ReLU(), nn.Dropout(0.1), nn.MaxPool2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.act(self.through_activation(self.conv(x)))) + x
        y = torch.add(self.pool(self.through_pooling(y)), y)
        y = y.add(self.into_method(y))
        return self.conv(self.act(self.into_conv(y)))


class DataDependent(Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.into_conv(x) if x.sum() > 0 else x  # fx cannot trace a branch on a tensor's value


class BatchNormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm subclass that holds its activation as a child module."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training))


class BlockWithBatchNormAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm_then_conv, self.norm_then_sum = BatchNormAct(4), BatchNormAct(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm_then_sum(self.conv(self.norm_then_conv(self.conv(x))))


def test_a_batchnorm_subclass_with_children_is_one_step() -> None:
    model = BlockWithBatchNormAct()
    assert names_of(model, batchnorms_feeding_sums(model)) == ["norm_then_sum"]


def test_only_elementwise_steps_lead_to_a_sum() -> None:
    model = Residual()
    assert names_of(model, batchnorms_feeding_sums(model)) == ["through_activation", "into_method"]


def test_a_model_fx_cannot_trace_gets_fp32_in_every_batchnorm() -> None:
    model = DataDependent()
    assert names_of(model, batchnorms_feeding_sums(model)) == ["through_activation", "through_pooling", "into_method", "into_conv"]


def test_the_residual_stream_stays_fp32_and_the_rest_runs_in_bf16() -> None:
    model = prepare_model(torchvision.models.resnet18(num_classes=3), CPU_BF16)
    batchnorm_in_fp32(model)  # preparing twice adds no second hook
    assert all(len(model.get_submodule(name)._forward_pre_hooks) == 1 for name in ("layer1.0.bn2", "layer2.0.downsample.1"))
    dtypes: dict[str, torch.dtype] = {}
    for name in ("bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0", "layer4.1", "fc"):
        model.get_submodule(name).register_forward_hook(lambda module, args, output, name=name: dtypes.__setitem__(name, output.dtype))
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    with CPU_BF16.autocast():
        model(images)
    assert dtypes == {"bn1": torch.bfloat16, "layer1.0.bn1": torch.bfloat16, "layer1.0.bn2": torch.float32,
                      "layer1.0": torch.float32, "layer4.1": torch.float32, "fc": torch.bfloat16}  # fmt: skip

    model.eval()  # frozen BatchNorm is a fixed affine map: bf16 is fine there, and faster
    with torch.no_grad(), CPU_BF16.autocast():
        model(images)
    assert set(dtypes.values()) == {torch.bfloat16}
