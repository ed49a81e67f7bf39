"""Start-up time of the instant commands against `import torch`, measured in the same run.

    python scripts/bench_startup.py [--repeat 5]

`transferctl --help` and `transferctl runs` must not import torch; this prints their median wall time,
that of `python -c "import torch"`, and the ratio (lower is better; well under 1 means torch stayed out).
`transferctl backbones` does import torch and builds every model once: it is timed with an empty cache
folder (one run) and then with the facts it kept there (median).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall_seconds(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, env=env)
    return time.perf_counter() - start


def median_seconds(command: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    wall_seconds(command, env)  # warm the file cache once
    return statistics.median(wall_seconds(command, env) for _ in range(repeat))


def transferctl_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m transferctl`."""
    script = Path(sys.executable).with_name("transferctl")
    if script.is_file():
        return [str(script)]
    found = shutil.which("transferctl")
    return [found] if found else [sys.executable, "-m", "transferctl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per command (median reported)")
    args = parser.parse_args()
    cli = transferctl_command()
    with tempfile.TemporaryDirectory() as empty_runs, tempfile.TemporaryDirectory() as cache:
        fresh_cache = {**os.environ, "TRANSFERCTL_CACHE": cache}
        results = {
            "import torch": median_seconds([sys.executable, "-c", "import torch"], args.repeat),
            "transferctl --help": median_seconds([*cli, "--help"], args.repeat),
            "transferctl runs": median_seconds([*cli, "runs", empty_runs], args.repeat),
            "python (empty)": median_seconds([sys.executable, "-c", "pass"], args.repeat),
            "backbones (first)": wall_seconds([*cli, "backbones"], fresh_cache),
            "backbones (cached)": median_seconds([*cli, "backbones"], args.repeat, fresh_cache),
        }
    torch_time = results["import torch"]
    print(f"median of {args.repeat} runs each ({' '.join(cli)})")
    for name, seconds in results.items():
        print(f"  {name:<20} {seconds * 1000:8.0f} ms   {seconds / torch_time:5.2f}x import torch")
    print(f"ratio --help / import torch: {results['transferctl --help'] / torch_time:.3f}")


if __name__ == "__main__":
    main()
