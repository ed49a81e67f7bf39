"""Where and how a network runs: device, precision (autocast), memory layout, and a forward pass over batches.
Shared by training, inference and recommend; no file I/O here."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from transferctl.errors import ConfigError, Problem
from transferctl.training.bf16_batchnorm import batchnorm_in_fp32
from transferctl.training.malloc_tuning import keep_freed_memory


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool = False  # torch.compile the model in place (prepare_model)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def choose_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(Problem("device", f"{spec} asked for, but no CUDA GPU is available", "use device: auto or cpu"))
    if spec.startswith("cuda:") and int(spec[5:]) >= torch.cuda.device_count():
        raise ConfigError(Problem("device", f"{spec} does not exist; this machine has {torch.cuda.device_count()} GPU(s)", "use cuda:0"))
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(Problem("device", "mps asked for, but it is not available", "use device: auto or cpu"))
    return torch.device(spec)


@lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """AMX or AVX512-BF16: the CPU multiplies bf16 natively, so autocast to bf16 pays (docs/performance.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cuda_has_bf16_units(device: torch.device) -> bool:
    """Ampere (compute capability 8) and later multiply bf16 natively. torch.cuda.is_bf16_supported() also
    says yes for older GPUs (T4, V100), which only emulate bf16, slower than fp16 with loss scaling."""
    if torch.version.hip:
        return True  # ROCm: PyTorch treats every supported AMD GPU as having bf16
    return torch.cuda.get_device_capability(device)[0] >= 8


def choose_precision(spec: str, device: torch.device) -> str:
    if spec != "auto":
        if spec == "fp16" and device.type == "cpu":
            raise ConfigError(Problem("precision", "fp16 autocast is for GPUs", "use bf16 or fp32 on a CPU"))
        return spec
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16_units(device) else "fp16"
    if device.type == "cpu" and cpu_has_bf16_units():
        return "bf16"
    return "fp32"


def make_runtime(device_spec: str, precision_spec: str, model: nn.Module, compile: bool = False) -> Runtime:
    device = choose_device(device_spec)
    if compile and device.type == "cpu":
        check_cpp_compiler()
    return Runtime(device, choose_precision(precision_spec, device), channels_last=is_convolutional(model), compile=compile)


def check_cpp_compiler() -> None:
    """torch.compile's CPU kernels are C++ that inductor builds during the first step: without a working
    compiler (slim container images have none) that step fails deep inside torch. Ask before training."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # a torch that builds its kernels otherwise: compiling will say what it lacks
        return
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as exc:
        found = str(exc).strip().splitlines()[0] if str(exc).strip() else "no working C++ compiler found"
        raise ConfigError(Problem("compile", f"torch.compile on the CPU needs a C++ compiler: {found}", "install g++ or point $CXX at a compiler, or set compile: false")) from None


def is_convolutional(model: nn.Module) -> bool:
    """channels-last helps convolutions; transformers gain nothing from it."""
    convs = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    return total > 0 and convs / total > 0.3


def prepare_model(model: nn.Module, runtime: Runtime, training: bool = True) -> nn.Module:
    """Move the model to the runtime's device and layout. For CPU training, keep freed memory in the process
    (malloc_tuning.py); under CPU bf16, also give the BatchNorm layers whose output is summed fp32 input
    (bf16_batchnorm.py; inference never needs it)."""
    model.to(runtime.device)
    tune_backend(runtime)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    if training and runtime.device.type == "cpu":
        keep_freed_memory()  # malloc_tuning.py: a step's buffers are reused, not mapped and zeroed again
        if runtime.precision == "bf16":
            batchnorm_in_fp32(model)
    if runtime.compile:
        # In place (nn.Module.compile): state_dict keys stay as they are, so checkpoints load anywhere.
        model.compile()
    return model


def tune_backend(runtime: Runtime) -> None:
    """On CUDA, let cuDNN time its convolution algorithms for each input shape once and keep the fastest:
    the batches' shape repeats all run long (a last, smaller batch adds one more shape)."""
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


class Uint8Normalizer:
    """uint8 image batches (N, 3, H, W) to the model's input on the runtime's device: float, normalised by the
    weights' mean and std (given on the 0-1 scale), channels-last where the runtime is. A uint8 batch is a
    quarter of the bytes of a float32 one on its way to the device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], runtime: Runtime) -> None:
        self.runtime = runtime
        self.mean = torch.tensor(mean, device=runtime.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=runtime.device).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = (images.to(self.runtime.device, non_blocking=True).float() - self.mean) / self.std
        return batch.contiguous(memory_format=torch.channels_last) if self.runtime.channels_last else batch


def to_device(images: torch.Tensor, labels: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    non_blocking = runtime.device.type == "cuda"
    images = images.to(runtime.device, non_blocking=non_blocking)
    if runtime.channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(runtime.device, non_blocking=non_blocking)


def logits_of(output: Any) -> torch.Tensor:
    """Some torchvision models return named tuples in train mode; the first field is the logits."""
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]], runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, on CPU) and labels of a loader, in loader order, in eval mode.

    They stay on the device until the end: copying each batch's to the CPU would wait for the GPU every batch.
    """
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in batches:
        images, labels_on_device = to_device(images, torch.as_tensor(labels), runtime)
        with runtime.autocast():
            logits = logits_of(model(images))
        all_logits.append(logits.float())
        all_labels.append(labels_on_device)
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels).cpu()
