"""Peak memory of keeping the decoded images (data/decoded_cache.decode_all) against the size of what it keeps.

    python scripts/bench_decode_memory.py [--images 600] [--workers 0]

Generates 500x375 PNGs in a temporary folder, decodes them once at a 256 px short side and prints how much
the process's peak resident memory grew, as a ratio to the cache's own size (1.0 is the floor: the
images have to be somewhere; collecting them first and copying them into one buffer would give ~2).
Imports and the first decode are done before the baseline is read, so only the cache is measured.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: this one)")
    args = parser.parse_args()

    from transferctl.data.decoded_cache import decode_all

    with tempfile.TemporaryDirectory(prefix="transferctl-bench-") as folder:
        rng = np.random.default_rng(0)
        samples = []
        for index in range(args.images):
            path = Path(folder) / f"{index}.png"
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path)
            samples.append((path, 0))
        decode_all(samples[:2], 256, "bilinear", workers=0)  # imports torchvision's transforms
        before = peak_mb()
        decoded = decode_all(samples, 256, "bilinear", workers=args.workers)
        grew = peak_mb() - before
    print(f"{args.images} images kept: {decoded.megabytes:.0f} MB; peak memory grew {grew:.0f} MB ({grew / decoded.megabytes:.2f}x the cache)")


if __name__ == "__main__":
    main()
