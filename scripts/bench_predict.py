"""predict with files decoded ahead on threads against decoding them in turn, in the same run.

    python scripts/bench_predict.py [--images 512] [--size 320] [--rounds 5] [--batch 32]

Writes --images generated PNGs of --size px, then labels them with a resnet18 (random weights; precision
auto, channels-last, the ImageNet preprocessing: resize 256, crop 224) through transferctl's Predictor,
once with decode_threads=0 (each batch decoded, then run) and once with the default threads (the next batch
decodes while the model runs this one), alternating for --rounds rounds. Prints each setting's median
images/s and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torchvision

    from transferctl.backbones import Preprocessing
    from transferctl.engine import make_runtime, prepare_model
    from transferctl.inference import eval_transform
    from transferctl.predict import Predictor, default_decode_threads
    from transferctl.synthetic import SOURCE_CLASSES, write_image_folder

    args = parse_args(argv)
    root = write_image_folder(Path(tempfile.mkdtemp(prefix="transferctl-bench-predict-")) / "images", SOURCE_CLASSES,
                              max(1, args.images // len(SOURCE_CLASSES)), args.size, seed=0, layout="flat")  # fmt: skip
    paths = sorted(str(p) for p in root.rglob("*.png"))
    model = torchvision.models.resnet18(weights=None, num_classes=len(SOURCE_CLASSES))
    runtime = make_runtime("cpu", "auto", model)
    model = prepare_model(model, runtime).eval()
    transform = eval_transform(Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    settings = {"in turn (decode_threads=0)": 0, f"ahead ({default_decode_threads()} thread(s), the default)": default_decode_threads()}
    speeds: dict[str, list[float]] = {name: [] for name in settings}
    list(Predictor(model, list(SOURCE_CLASSES), transform, runtime).predict(paths[: args.batch], args.batch))  # warm-up
    for _ in range(args.rounds):
        for name, threads in settings.items():
            predictor = Predictor(model, list(SOURCE_CLASSES), transform, runtime, decode_threads=threads)
            started = time.perf_counter()
            count = sum(1 for _ in predictor.predict(paths, args.batch))
            speeds[name].append(count / (time.perf_counter() - started))
            print(f"{name}: {speeds[name][-1]:.1f} img/s", file=sys.stderr)
    print(f"# {len(paths)} PNGs of {args.size} px, resnet18, precision {runtime.precision}, batch {args.batch}, {args.rounds} rounds")
    print("| decoding | images/s (median) | per round |")
    print("| --- | --- | --- |")
    for name, values in speeds.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    baseline, ahead = (statistics.median(values) for values in speeds.values())
    print(f"\nahead / in turn: {ahead / baseline:.2f}x")


if __name__ == "__main__":
    main()
