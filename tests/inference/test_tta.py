from __future__ import annotations

import pytest
import torch
from torch import nn

from transferctl.errors import ConfigError
from transferctl.inference.tta import as_logits, averaged_probabilities, check_tta, view_logits
from transferctl.training.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "fp32", False)


def test_flip_probabilities_are_the_mean_of_the_two_passes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 3))  # sees where each pixel is: a flip changes its output
    images = torch.randn(6, 3, 4, 5)
    batches = [(images[:4], torch.zeros(4, dtype=torch.long)), (images[4:], torch.ones(2, dtype=torch.long))]
    logits, labels = view_logits(model, batches, CPU, "flip")
    with torch.no_grad():
        plain, flipped = model(images), model(torch.flip(images, dims=[3]))
    assert logits.shape == (2, 6, 3) and labels.tolist() == [0, 0, 0, 0, 1, 1]
    torch.testing.assert_close(logits[0], plain)
    torch.testing.assert_close(logits[1], flipped)
    assert not torch.allclose(plain, flipped)
    torch.testing.assert_close(averaged_probabilities(logits), (plain.softmax(1) + flipped.softmax(1)) / 2)


def test_no_tta_is_the_plain_softmax() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    images = torch.randn(3, 3, 2, 2)
    logits, _ = view_logits(model, [(images, torch.zeros(3, dtype=torch.long))], CPU, "none")
    with torch.no_grad():
        torch.testing.assert_close(averaged_probabilities(logits), model(images).softmax(1))


def test_as_logits_gives_the_probabilities_back() -> None:
    probabilities = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]], dtype=torch.float64)
    logits = as_logits(probabilities)
    assert torch.isfinite(logits).all()  # a probability of 0 must not become -inf in the metrics
    torch.testing.assert_close(logits.softmax(1), probabilities)


def test_an_unknown_tta_is_one_line_naming_the_option() -> None:
    with pytest.raises(ConfigError) as caught:
        check_tta("flips")
    assert str(caught.value.problems[0]).count("\n") == 0
    assert "--tta" in str(caught.value.problems[0]) and "did you mean 'flip'" in str(caught.value.problems[0])
