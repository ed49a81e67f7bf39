"""Which BatchNorm layers need fp32 output under CPU bf16 autocast: those whose output is summed.

PyTorch's CPU autocast hands BatchNorm bf16 activations and leaves its output in bf16. The normalisation
itself is fine in bf16 (the kernel accumulates its statistics in fp32), but a residual network adds
block outputs to a running sum, and a sum of two bf16 tensors is rounded again in every block, forward
and backward: training from scratch lost accuracy to it. A BatchNorm given fp32 input returns fp32, and
a sum with an fp32 operand is fp32, so the residual stream stays fp32 from the first block's sum on.

Every other BatchNorm feeds a convolution or a linear layer (after an activation, perhaps), which casts
its input to bf16 anyway, or a pooling, as the stem's does: its output is rounded once there, and that
rounding is not compounded. fp32 in every BatchNorm cost time and memory, mostly in the stem's, on the
largest activation. So only layers whose output reaches a sum through elementwise steps (activations,
dropout, stochastic depth) get fp32 input.
The graph comes from torch.fx; a model it cannot trace gets fp32 in every BatchNorm, as safe as before.
What each choice measured (scripts/bench.py): docs/performance.md (Speed, and the BatchNorm notes).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

_BatchNorm = nn.modules.batchnorm._BatchNorm
_SUM_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_SUM_METHODS = {"add", "add_"}
# Steps that end an elementwise path: their output is a new quantity (convolutions and linear layers
# also cast their input to bf16 under autocast), so what follows them no longer sums this layer's output.
# Everything else is walked through, functional pooling included: at worst a layer gets fp32 it needn't.
_NOT_ELEMENTWISE = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    _BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)


def batchnorm_in_fp32(model: nn.Module) -> None:
    """Feed fp32 activations to the training BatchNorm layers whose output is summed (see the module doc).

    For CPU bf16 training only (runtime.prepare_model). In eval mode a BatchNorm is a fixed per-channel
    affine map and stays in bf16. Preparing a model twice adds no second hook.
    """
    for module in batchnorms_feeding_sums(model):
        if not getattr(module, "_transferctl_fp32_input", False):
            module.register_forward_pre_hook(_fp32_input)
            module._transferctl_fp32_input = True  # type: ignore[assignment]


def batchnorms_feeding_sums(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers whose output reaches an addition through elementwise steps only; every
    BatchNorm layer when the model cannot be traced."""
    modules = dict(model.named_modules())
    try:
        graph = _LeafModulesTracer().trace(model)
    except Exception:  # noqa: BLE001 - fx refuses data-dependent control flow in many ways; none is a bug here
        return [module for module in modules.values() if isinstance(module, _BatchNorm)]
    found: dict[int, nn.Module] = {}
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]
        if isinstance(module, _BatchNorm) and _reaches_a_sum(node, modules):
            found[id(module)] = module
    return list(found.values())


class _LeafModulesTracer(fx.Tracer):
    """Treats every BatchNorm layer, including subclasses with children (timm's BatchNormAct2d holds its
    activation), and every module without children as one opaque step (torchvision's StochasticDepth,
    for one, cannot be traced inside); traces through the containers that compose them."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _BatchNorm) or super().is_leaf_module(module, qualified_name) or next(module.children(), None) is None


def _reaches_a_sum(start: fx.Node, modules: dict[str, nn.Module]) -> bool:
    seen: set[fx.Node] = set()
    pending = list(start.users)
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_sum(node):
            return True
        if node.op == "call_module" and isinstance(modules.get(node.target), _NOT_ELEMENTWISE):  # type: ignore[arg-type]
            continue
        pending.extend(node.users)
    return False


def _is_sum(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _SUM_FUNCTIONS) or (node.op == "call_method" and node.target in _SUM_METHODS)


def _fp32_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    first = args[0]
    if module.training and isinstance(first, torch.Tensor) and first.dtype == torch.bfloat16:
        return (first.float(), *args[1:])
    return None
