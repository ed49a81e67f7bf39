"""`python -m transferctl.training.torchrun ARGS`: PyTorch's torchrun, which `train --nproc N` starts, with a failed
worker's exit code as its own and nothing more said.

torchrun answers a worker that stopped with an error by logging it and raising a traceback of its own
(ChildFailedError), after the worker has already said what went wrong: a user's mistake, one line from
each rank, would end in some forty lines of launcher internals.
"""

from __future__ import annotations

import logging
import signal
import sys

EXIT_INTERRUPTED = 130  # as transferctl.cli: stopped by a signal, resumable


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Each of torchrun's modules sets its own logger's level when imported ("Received 15 death signal, ..."):
    # the parent's level alone does not quiet them.
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        return worst_exit_code([failure.exitcode for failure in exc.failures.values()])
    except SignalException as exc:
        # SIGTERM or Ctrl-C to the launcher: it passed the signal on and waited for the workers, which stopped
        # at the same step (rank 0 said how to resume), as one process stops: exit 130, not a traceback.
        return EXIT_INTERRUPTED if exc.sigval in (signal.SIGINT, signal.SIGTERM) else 128 + int(exc.sigval)
    return 0


def worst_exit_code(codes: list[int]) -> int:
    """A worker's own exit code (1: a user's error, 130: interrupted), or 128 + the signal that killed it."""
    own = [code for code in codes if code > 0]
    if own:
        return max(own)
    killed = [-code for code in codes if code < 0]
    return 128 + killed[0] if killed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
