"""Wall time of `transferctl recommend --data` on 1,000 generated images and three small backbones.

    python scripts/bench_recommend.py [--backbones resnet18,mobilenet_v3_large,regnet_y_400mf] [--images 1000]

The target: at most 60 s on 2 CPU cores for the forward-pass measurements (`--fast`, the default here; `--race`
adds the race, whose time `--budget` bounds: pass e.g. `--extra '--budget 60'`). It times the real command line in a subprocess (start-up and
imports included), with torchvision's DEFAULT weights so the whole path runs: the ImageNet head is kept and
its predictions compared with the labels. Offline, those weights are stood in for by random ones of the
same shapes, written into a temporary TORCH_HOME (the speed is the same; the advice is meaningless).
Pass --real-cache to use the weights in your own torch hub cache instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transferctl.analysis.recommend import MeasureOptions  # no torch: TORCH_HOME can still be set below



def make_images(root: Path, images: int, size: int, seed: int) -> Path:
    """`images` generated pictures in 8 shape classes, flat class-per-folder layout."""
    from transferctl.testing.synthetic import SOURCE_CLASSES, write_image_folder

    per_class = max(2, images // len(SOURCE_CLASSES))
    return write_image_folder(root, SOURCE_CLASSES, per_class, size, seed, layout="flat")


def stand_in_weights(torch_home: Path, backbones: list[str]) -> None:
    """Random weights under the file names torchvision's DEFAULT weights are cached as."""
    os.environ["TORCH_HOME"] = str(torch_home)
    import torch
    import torchvision

    from transferctl.models.torchvision_models import cached_weights_path

    for name in backbones:
        path = cached_weights_path(torchvision.models.get_model_weights(name).DEFAULT)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torchvision.models.get_model(name, weights=None).state_dict(), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(MeasureOptions().backbones), help="default: recommend's own")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help="side of the generated images (the networks still see 224 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-cache", action="store_true", help="use the torch hub cache as it is")
    parser.add_argument("--extra", default="", help="more arguments for recommend, e.g. '--max-images 500'")
    parser.add_argument("--race", action="store_true", help="time the race too (without it: recommend --fast)")
    args = parser.parse_args()
    backbones = [name for name in args.backbones.split(",") if name]

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        data = make_images(folder / "data", args.images, args.size, args.seed)
        print(f"generated {args.images} images in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        env = dict(os.environ)
        if not args.real_cache:
            stand_in_weights(folder / "torch_home", backbones)
            env["TORCH_HOME"] = str(folder / "torch_home")
        command = [sys.executable, "-m", "transferctl", "recommend", "--data", str(data), "--backbone", ",".join(backbones),
                   "--json", "--quiet", *([] if args.race else ["--fast"]), *args.extra.split()]  # fmt: skip
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"bench_recommend: recommend failed with exit code {done.returncode}")
    result = json.loads(done.stdout)
    for row in result["ranking"]:
        print(f"  {row['name']:<22} {row['seconds']:6.1f}s  LogME {row['logme']:+.3f}  probe {100 * row['probe_acc']:.1f}%")
    print(f"recommend --data: {result['data']['sampled']} images, {len(backbones)} backbones, {seconds:.1f}s wall, "
          f"{cpu.ru_utime + cpu.ru_stime:.0f}s CPU (target <= 60 s wall on 2 idle CPU cores; {os.cpu_count()} cores here, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other work slows this down)")


if __name__ == "__main__":
    main()
