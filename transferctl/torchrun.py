"""`python -m transferctl.torchrun ARGS`: PyTorch's torchrun, which `train --nproc N` starts, with a failed
worker's exit code as its own and nothing more said.

torchrun answers a worker that stopped with an error by logging it and raising a traceback of its own
(ChildFailedError), after the worker has already said what went wrong: a user's mistake, one line from
each rank, would end in some forty lines of launcher internals.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        return worst_exit_code([failure.exitcode for failure in exc.failures.values()])
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
