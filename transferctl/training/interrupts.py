"""Ctrl-C and SIGTERM during training: ask the loop to stop at the next safe point instead of dying mid-write.

The first signal only sets a flag; the training loop looks at it between steps and after each epoch's
checkpoint. A second Ctrl-C means "now": it raises KeyboardInterrupt at once (atomic writes still leave
every file whole). Handlers can only be installed from the main thread; elsewhere the flag never rises
and signals keep their old behaviour.

Before that, while torch is imported and the data checked (seconds to minutes), there is nothing to save:
`signals_interrupt` makes SIGTERM end that at once as Ctrl-C does (StopSignal, exit 130 in the CLI), where
it used to kill the process (exit 143).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Truthy once a stop signal arrived; `name` says which (SIGINT, SIGTERM)."""

    def __init__(self) -> None:
        self.name: str | None = None

    def __call__(self) -> bool:
        return self.name is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: the user does not want to wait for the step to end
        self.name = signal.Signals(signum).name


class StopSignal(KeyboardInterrupt):
    """SIGINT or SIGTERM before training started: like Ctrl-C, it ends the work where it is; `name` says which."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _raise_stop_signal(signum: int, frame: Any) -> None:
    raise StopSignal(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise StopSignal, until a stop_on_signals block takes over."""
    with _handling(_raise_stop_signal):
        yield


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the returned request instead of killing the process.

    Nested in another such block, it returns the outer request: a signal that came while the run directory
    was being made still stops the loop at its first step.
    """
    current = listening()
    if current is not None:
        yield current
        return
    request = StopRequest()
    with _handling(request._handle):
        yield request


def listening() -> StopRequest | None:
    """The request that SIGINT or SIGTERM set now, if a stop_on_signals block is listening."""
    for signum in STOP_SIGNALS:
        owner = getattr(signal.getsignal(signum), "__self__", None)
        if isinstance(owner, StopRequest):
            return owner
    return None


@contextlib.contextmanager
def _handling(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """handler for SIGINT and SIGTERM within the block, then the old ones back.

    A signal the process was started ignoring (`nohup`, a background job's SIGINT) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    heeded = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, handler) for signum in heeded}
    try:
        yield
    finally:
        for signum, old in previous.items():
            # None: a handler installed outside Python; the default is the closest we can put back.
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
