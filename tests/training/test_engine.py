"""Device, precision and memory-layout choices, and the fast paths agreeing with plain fp32."""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import pytest
import torch
import torchvision

from transferctl.training import engine
from transferctl.training import runtime as runtime_module
from transferctl.training.runtime import Runtime, choose_device, choose_precision, is_convolutional, make_runtime, predict_logits, prepare_model, to_device
from transferctl.errors import ConfigError

CPU = torch.device("cpu")


def test_auto_precision_is_bf16_only_on_cpus_with_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "cpu_has_bf16_units", lambda: True)
    assert choose_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(runtime_module, "cpu_has_bf16_units", lambda: False)
    assert choose_precision("auto", CPU) == "fp32"
    assert choose_precision("bf16", CPU) == "bf16" and choose_precision("fp32", CPU) == "fp32"


def test_fp16_on_a_cpu_is_a_user_error() -> None:
    with pytest.raises(ConfigError, match="precision: fp16 autocast is for GPUs"):
        choose_precision("fp16", CPU)


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_cuda_is_bf16_only_where_the_gpu_has_it(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: str) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # emulated on a T4 or V100
    assert choose_precision("auto", torch.device("cuda")) == expected
    assert choose_precision("fp16", torch.device("cuda")) == "fp16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_a_gpu_is_a_user_error() -> None:
    assert choose_device("auto").type in ("cpu", "mps")
    with pytest.raises(ConfigError, match="device: cuda asked for, but no CUDA GPU is available"):
        choose_device("cuda")


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_a_user_error() -> None:
    from torch._inductor import config as inductor

    model = torch.nn.Linear(2, 2)
    # Inductor's own patch: monkeypatch would delete the setting afterwards (it sees a class attribute).
    with inductor.patch({"cpp.cxx": (None, "/nowhere/g++")}), pytest.raises(ConfigError, match=r"compile: torch.compile on the CPU needs a C\+\+ compiler: .*/nowhere/g\+\+.*set compile: false"):
        make_runtime("cpu", "fp32", model, compile=True)
    assert inductor.cpp.cxx != (None, "/nowhere/g++")
    assert not make_runtime("cpu", "fp32", model).compile  # not asked: not checked


@pytest.mark.parametrize("channels_last", [True, False])
def test_uint8_batches_are_normalised_as_torchvision_normalises_images(channels_last: bool) -> None:
    from torchvision import transforms as T

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = runtime_module.Uint8Normalizer(mean, std, Runtime(CPU, "fp32", channels_last))(images)
    expected = torch.stack([T.Normalize(mean, std)(image.float() / 255.0) for image in images])
    torch.testing.assert_close(batch, expected)
    assert batch.dtype == torch.float32 and batch.is_contiguous(memory_format=torch.channels_last) == channels_last


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
    images, _ = to_device(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), runtime)
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


def test_batchnorm_gets_fp32_input_only_for_training_under_cpu_bf16() -> None:
    """Which layers, and why: tests/training/test_bf16_batchnorm.py."""
    bf16 = prepare_model(torchvision.models.resnet18(num_classes=3), Runtime(CPU, "bf16", channels_last=True))
    fp32 = prepare_model(torchvision.models.resnet18(num_classes=3), Runtime(CPU, "fp32", channels_last=True))
    inference = prepare_model(torchvision.models.resnet18(num_classes=3), Runtime(CPU, "bf16", channels_last=True), training=False)
    assert bf16.layer1[0].bn2._forward_pre_hooks and not fp32.layer1[0].bn2._forward_pre_hooks
    assert not inference.layer1[0].bn2._forward_pre_hooks  # evaluate and predict never train BatchNorm


# fp16 with loss scaling is for GPUs, but PyTorch's CPU autocast and GradScaler run the same code path:
# these check transferctl's use of them on machines without one.
FP16 = Runtime(CPU, "fp16", channels_last=False)


def small_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    )


def sgd_with_schedule(model: torch.nn.Module, fused: bool | None = None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def colour_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images whose class is the brightest channel: learnable in a few steps."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (count * 8,), generator=generator)
    images = torch.rand(count * 8, 3, 12, 12, generator=generator)
    images[torch.arange(labels.numel()), labels] += 1.0
    return list(zip(images.split(8), labels.split(8)))


# A fused optimizer (phases.build_optimizer's choice) checks the scaler's overflow flag inside its own kernel.
@pytest.mark.parametrize("fused", [False, True])
def test_fp16_steps_whose_gradients_overflow_are_skipped_and_the_scale_drops(recwarn: pytest.WarningsRecorder, fused: bool) -> None:
    model = small_classifier()
    optimizer, scheduler = sgd_with_schedule(model, fused)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # every scaled gradient overflows
    engine.train_one_epoch(model, colour_batches(3), optimizer, scheduler, FP16, scaler)
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**97  # halved once per skipped step
    assert scheduler.last_epoch == 3  # the schedule keeps its one step per batch
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]  # true of a skipped step, and noise


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_with_the_runs_grad_scaler_learns(fused: bool) -> None:
    model = small_classifier()
    optimizer, scheduler = sgd_with_schedule(model, fused)
    scaler = engine.make_grad_scaler(FP16)
    assert scaler is not None and engine.make_grad_scaler(Runtime(CPU, "bf16", False)) is None
    batches = colour_batches(6)
    first = engine.train_one_epoch(model, batches, optimizer, scheduler, FP16, scaler)
    for _ in range(4):
        last = engine.train_one_epoch(model, batches, optimizer, scheduler, FP16, scaler)
    assert last.loss < first.loss - 0.1 and last.accuracy > first.accuracy


def test_on_batch_hears_of_the_first_and_last_batches_and_one_per_interval() -> None:
    model = small_classifier()
    optimizer, scheduler = sgd_with_schedule(model)
    heard: list[int] = []
    engine.train_one_epoch(model, colour_batches(6), optimizer, scheduler, Runtime(CPU, "fp32", False), on_batch=lambda i, n, loss: heard.append(i), report_seconds=3600)
    assert heard == [0, 5]  # not after every batch: on a GPU each read waits for the queued steps
    heard.clear()
    engine.train_one_epoch(model, colour_batches(6), optimizer, scheduler, Runtime(CPU, "fp32", False), on_batch=lambda i, n, loss: heard.append(i), report_seconds=0)
    assert heard == list(range(6))


class SlowBatches:
    """Batches that take `delay` seconds each to arrive, as from a loader that does not keep up."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], delay: float) -> None:
        self.batches, self.delay = batches, delay

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def test_an_epoch_reports_the_time_it_waited_for_its_batches() -> None:
    model = small_classifier()
    optimizer, scheduler = sgd_with_schedule(model)
    runtime = Runtime(CPU, "fp32", False)
    slow = engine.train_one_epoch(model, SlowBatches(colour_batches(4), 0.05), optimizer, scheduler, runtime)
    ready = engine.train_one_epoch(model, colour_batches(4), optimizer, scheduler, runtime)
    assert 0.2 <= slow.data_seconds <= slow.seconds
    assert 0.0 <= ready.data_seconds < slow.data_seconds


def test_a_diverging_loss_still_stops_the_epoch_between_reports() -> None:
    model = small_classifier()
    optimizer, scheduler = sgd_with_schedule(model)
    batches = colour_batches(4)
    batches[1] = (torch.full_like(batches[1][0], float("nan")), batches[1][1])
    with pytest.raises(engine.NonFiniteLossError, match="at batch 4 of 4"):  # noticed at the next report: the last batch
        engine.train_one_epoch(model, batches, optimizer, scheduler, Runtime(CPU, "fp32", False), on_batch=lambda *args: None, report_seconds=3600)
    fresh = small_classifier()
    with pytest.raises(engine.NonFiniteLossError, match="training loss became nan"):  # no reports at all: the epoch's end
        engine.train_one_epoch(fresh, batches, *sgd_with_schedule(fresh), Runtime(CPU, "fp32", False))


def test_cudnn_times_its_algorithms_only_for_gpu_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runtime_module.tune_backend(Runtime(CPU, "fp32", False))
    assert torch.backends.cudnn.benchmark is False
    runtime_module.tune_backend(Runtime(torch.device("cuda"), "bf16", True))
    assert torch.backends.cudnn.benchmark is True


def test_batches_go_to_a_gpu_without_blocking_and_stay_put_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy's arguments, recorded on any machine: Tensor.to is stood in for, so no GPU is needed."""
    copies: list[tuple[str, bool]] = []
    monkeypatch.setattr(torch.Tensor, "to", lambda tensor, device, non_blocking=False: copies.append((str(device), non_blocking)) or tensor)
    images, labels = torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    to_device(images, labels, Runtime(torch.device("cuda"), "bf16", channels_last=True))
    assert copies == [("cuda", True), ("cuda", True)]  # from pinned memory, overlapping the previous step
    copies.clear()
    to_device(images, labels, Runtime(CPU, "fp32", channels_last=False))
    assert copies == [("cpu", False), ("cpu", False)]


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits for image i are the i-th row of a table (the image holds its index)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[images[:, 0].long()]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # scikit-learn's own call below
def test_validation_metrics_are_scikit_learns_and_its_loss_stays_plain_cross_entropy() -> None:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    # 4 classes: class 3 never appears, class 2 is predicted but never true, class 1 is mostly missed.
    truth = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    predicted = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0, 2, 2])
    table = torch.nn.functional.one_hot(predicted, 4).float() * 3.0
    batches = [(torch.arange(0, 6).float()[:, None], truth[:6]), (torch.arange(6, 10).float()[:, None], truth[6:])]
    stats = engine.evaluate(FixedLogits(table), batches, Runtime(CPU, "fp32", False))
    assert stats.accuracy == pytest.approx(0.6)
    assert stats.balanced_accuracy == pytest.approx(balanced_accuracy_score(truth, predicted)) == pytest.approx((5 / 7 + 1 / 3) / 2)
    assert stats.macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert stats.loss == pytest.approx(float(torch.nn.functional.cross_entropy(table, truth)))
    empty = engine.evaluate(FixedLogits(table), [], Runtime(CPU, "fp32", False))
    assert empty.images == 0 and np.isnan(empty.balanced_accuracy) and np.isnan(empty.macro_f1)


def test_train_one_epoch_minimises_the_loss_it_is_given() -> None:
    images, labels = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    runtime = Runtime(CPU, "fp32", False)
    results = []
    for loss_fn in (None, torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0]), label_smoothing=0.2)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no step: the reported loss is the first weights'
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        results.append(engine.train_one_epoch(model, [(images, labels)], optimizer, scheduler, runtime, loss_fn=loss_fn).loss)
        expected = (loss_fn or torch.nn.CrossEntropyLoss())(model(images), labels).item()
        assert results[-1] == pytest.approx(expected)
    assert results[0] != pytest.approx(results[1])
