"""Write the demo's generated source and target datasets (used by `make demo`).

    python scripts/make_demo_data.py --out data/demo [--seed 0] [--size 64]

Running it again replaces data it generated before; any other non-empty folder is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# run from a checkout without installing: make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transferctl.errors import TransferctlError  # noqa: E402
from transferctl.testing.synthetic import make_transfer_pair  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to hold source/ and target/")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--source-per-class", type=int, default=200,
                        help="source images per class, train and val together (default: 200)")
    parser.add_argument("--target-per-class", type=int, default=60,
                        help="target images per class, train, val and test together (default: 60)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        source, target = make_transfer_pair(
            args.out,
            seed=args.seed,
            size=args.size,
            source_per_class=args.source_per_class,
            target_per_class=args.target_per_class,
            overwrite=True,
        )
    except (TransferctlError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(source)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
