"""Device, precision and memory-layout choices, and the fast paths agreeing with plain fp32."""

from __future__ import annotations

import pytest
import torch
import torchvision

from transferctl import engine
from transferctl.engine import Runtime, _to_device, choose_device, choose_precision, is_convolutional, make_runtime, predict_logits, prepare_model
from transferctl.errors import ConfigError

CPU = torch.device("cpu")


def test_auto_precision_is_bf16_only_on_cpus_with_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "cpu_has_bf16_units", lambda: True)
    assert choose_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(engine, "cpu_has_bf16_units", lambda: False)
    assert choose_precision("auto", CPU) == "fp32"
    assert choose_precision("bf16", CPU) == "bf16" and choose_precision("fp32", CPU) == "fp32"


def test_fp16_on_a_cpu_is_a_user_error() -> None:
    with pytest.raises(ConfigError, match="precision: fp16 autocast is for GPUs"):
        choose_precision("fp16", CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_a_gpu_is_a_user_error() -> None:
    assert choose_device("auto").type in ("cpu", "mps")
    with pytest.raises(ConfigError, match="device: cuda asked for, but no CUDA GPU is available"):
        choose_device("cuda")


def test_channels_last_only_for_convolutional_networks() -> None:
    assert is_convolutional(torchvision.models.resnet18(num_classes=3))
    transformer = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=64, mlp_dim=256, num_classes=3)
    assert not is_convolutional(transformer)
    runtime = make_runtime("cpu", "fp32", torchvision.models.resnet18(num_classes=3))
    assert runtime.channels_last and runtime.precision == "fp32"


def test_the_model_and_its_batches_use_channels_last() -> None:
    runtime = Runtime(CPU, "fp32", channels_last=True)
    model = prepare_model(torchvision.models.resnet18(num_classes=3), runtime)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, _ = _to_device(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), runtime)
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_fast_paths_predict_what_fp32_predicts() -> None:
    """channels-last is exact up to summation order; bf16 autocast keeps the logits close and the classes."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    images = torch.randn(16, 3, 64, 64)
    labels = torch.zeros(16, dtype=torch.long)
    batches = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    reference, _ = predict_logits(model, batches, Runtime(CPU, "fp32", channels_last=False))
    layout, _ = predict_logits(prepare_model(model, Runtime(CPU, "fp32", True)), batches, Runtime(CPU, "fp32", True))
    reduced, _ = predict_logits(model, batches, Runtime(CPU, "bf16", True))
    torch.testing.assert_close(layout, reference, rtol=1e-4, atol=1e-4)
    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))
    assert (reduced.argmax(1) == reference.argmax(1)).float().mean() >= 0.8


def test_training_batchnorm_sees_fp32_under_cpu_bf16_autocast() -> None:
    seen: list[torch.dtype] = []

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.append(output.dtype)

    model = prepare_model(torchvision.models.resnet18(num_classes=3), Runtime(CPU, "bf16", channels_last=True))
    model.bn1.register_forward_hook(record)
    prepare_model(model, Runtime(CPU, "bf16", channels_last=True))  # preparing twice adds no second hook
    assert len(model.bn1._forward_pre_hooks) == 1
    with Runtime(CPU, "bf16", True).autocast():
        logits = model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert seen == [torch.float32] and logits.dtype == torch.bfloat16  # the convolutions and the head still run in bf16
    model.eval()  # frozen BatchNorm is a fixed affine map: bf16 is fine there, and faster
    with torch.no_grad(), Runtime(CPU, "bf16", True).autocast():
        model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert seen == [torch.float32, torch.bfloat16]
    plain = prepare_model(torchvision.models.resnet18(num_classes=3), Runtime(CPU, "fp32", channels_last=True))
    assert not plain.bn1._forward_pre_hooks
