"""allocator.keep_freed_memory: CPU training reuses freed buffers instead of mapping fresh, zeroed pages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from transferctl.training import malloc_tuning as allocator

from transferctl.training import runtime as runtime_module
from transferctl.training.runtime import Runtime

# A child process: the setting lasts for the rest of the process, and the test compares before and after.
FAULTS_PER_BUFFER = textwrap.dedent(
    """
    import resource, torch
    from transferctl.training.malloc_tuning import keep_freed_memory

    def faults_per_buffer():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.ones(8 * 2**20)  # 32 MB, written, then freed: a step's activation
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

    torch.ones(8 * 2**20)
    before = faults_per_buffer()
    kept = keep_freed_memory()
    faults_per_buffer()  # the heap grows to its working size once
    print(before, kept, faults_per_buffer())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator._glibc_mallopt() is None, reason="glibc only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again() -> None:
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_BUFFER], capture_output=True, text=True, check=True)
    before, kept, after = done.stdout.split()
    assert kept == "True"
    assert float(before) > 4000  # 8,192 pages of 4 KB, mapped and zeroed for every buffer
    assert float(after) < float(before) / 20


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_kept", False)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator._glibc_mallopt() is None
    assert allocator.keep_freed_memory() is False


def test_cpu_training_keeps_freed_memory_and_inference_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(runtime_module, "keep_freed_memory", lambda: calls.append(True) or True)
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=False)
    runtime_module.prepare_model(torch.nn.Linear(2, 2), runtime, training=False)
    assert calls == []
    runtime_module.prepare_model(torch.nn.Linear(2, 2), runtime, training=True)
    assert calls == [True]
