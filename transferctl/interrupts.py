"""Ctrl-C and SIGTERM during training: ask the loop to stop at the next safe point instead of dying mid-write.

The first signal only sets a flag; the training loop looks at it between steps and after each epoch's
checkpoint. A second Ctrl-C means "now": it raises KeyboardInterrupt at once (atomic writes still leave
every file whole). Handlers can only be installed from the main thread; elsewhere the flag never rises
and signals keep their old behaviour.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

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


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the returned request instead of killing the process.

    A signal the process was started ignoring (`nohup`, a background job's SIGINT) stays ignored.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    heeded = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, request._handle) for signum in heeded}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            # None: a handler installed outside Python; the default is the closest we can put back.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
