"""Shared fixtures: tiny generated image folders in tmp_path, and an isolated torch cache."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from transferctl.testing.synthetic import tiny_dataset


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (None: remove) environment variables for a while, then put back what was there."""
    saved = {name: os.environ.get(name) for name in values}
    _set_environment(values)
    try:
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def isolated_torch_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point TORCH_HOME at a temporary folder, so no test reads or fills the real weights cache."""
    home = tmp_path_factory.mktemp("torch_home")
    with environment(TORCH_HOME=str(home)):
        yield home


@pytest.fixture(scope="module")
def module_tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder shared by one test module and removed after it: a trained run weighs about 180 MB, and
    keeping every module's run until the session ends once filled a CI machine's disk."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def session_feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TRANSFERCTL_CACHE for what runs before a test's own fixtures: module-scoped fixtures train runs too."""
    folder = tmp_path_factory.mktemp("transferctl-cache")
    with environment(TRANSFERCTL_CACHE=str(folder), TRANSFERCTL_CACHE_MAX_MB=None):
        yield folder


@pytest.fixture(autouse=True)
def isolated_feature_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point TRANSFERCTL_CACHE at the test's own folder: no test reads or fills ~/.cache/transferctl."""
    folder = tmp_path / "transferctl-cache"
    monkeypatch.setenv("TRANSFERCTL_CACHE", str(folder))
    monkeypatch.delenv("TRANSFERCTL_CACHE_MAX_MB", raising=False)  # the default limit, whatever this shell says
    return folder


@pytest.fixture(scope="module")
def heeded_sigint() -> Iterator[None]:
    """For tests that press Ctrl-C (a real SIGINT): a test run started in the background, where SIGINT is
    ignored and transferctl therefore leaves it ignored, must still feel it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def tiny_split_data(tmp_path: Path) -> Path:
    """tmp_path/tiny_split/{train,val,test}/{red,green,blue}/NNNN.png: 16x16, 4/1/1 per class."""
    return tiny_dataset(tmp_path / "tiny_split", n_classes=3, layout="split", test=True)


@pytest.fixture
def tiny_flat_data(tmp_path: Path) -> Path:
    """tmp_path/tiny_flat/{red,green,blue}/NNNN.png: 16x16, 6 per class."""
    return tiny_dataset(tmp_path / "tiny_flat", n_classes=3, layout="flat")
